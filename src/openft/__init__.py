"""openft: self-hosted fine-tuning for open models, speaking OpenAI's fine-tuning API."""

__version__ = "0.1.0"
