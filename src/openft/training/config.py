"""Typed, frozen training configuration: what a recipe needs, resolved once by the worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openft.models.tiny import TINY_NAME


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    """Rank of the low-rank update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Module names (peft vocabulary) that get adapters; the defaults are the language model's projections."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter (e.g. ``embed_tokens``, ``lm_head``)."""


@dataclass(frozen=True)
class TrainConfig:
    base_model: str
    """Resolved local path or Hugging Face id of the base model (see ``models.loader.resolve_base``)."""
    output_dir: Path
    """Where checkpoints (``step-<N>/``) and the final weights go."""
    n_epochs: int
    """Passes over the training examples."""
    batch_size: int
    """Examples per optimizer step."""
    learning_rate: float
    """Peak AdamW learning rate (base rate x the user's ``learning_rate_multiplier``)."""
    seed: int
    """Seeds torch, Python and the batch order: same seed and data give the same losses on CPU."""
    lora: LoraConfig | None = None
    """LoRA settings; ``None`` means full fine-tuning."""
    init_weights: Path | None = None
    """Continue from an ``ft:`` model's weights folder (adapter or full) instead of the bare base."""
    max_length: int = 2048
    """Longest sequence in tokens (image tokens included); longer examples are cut after their last
    complete assistant turn that fits."""
    device: str = "auto"
    """``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""
    keep_checkpoints: int = 3
    """How many epoch checkpoints to keep on disk; older ones are deleted (the final one is always kept)."""


def default_training_type(base_model: str) -> Literal["full", "lora"]:
    """``"full"`` for the tiny random-init model (LoRA on frozen random weights barely learns),
    ``"lora"`` for real pretrained bases."""
    name = str(base_model).rstrip("/")
    if name == TINY_NAME or Path(name).name == TINY_NAME:
        return "full"
    return "lora"
