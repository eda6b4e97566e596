"""Serving: load fine-tuned models (``registry``), generate (``engine``), answer chat
completions (``chat``) and stream them as server-sent events (``stream``)."""
