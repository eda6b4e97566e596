"""Turn the user's hyperparameters (numbers or ``"auto"``) into concrete values. Pure: no torch.

Rules (deliberately simple; a later change makes them depend on tokens and images too):

- ``n_epochs`` "auto": OpenAI's cookbook rule. Start at 3; with fewer than 100 example-epochs
  raise it to ``min(25, 100 // n_examples)``; with more than 25,000 lower it to
  ``max(1, 25000 // n_examples)``.
- ``batch_size`` "auto": about 0.2 % of the examples, clamped to 1..32.
- ``learning_rate_multiplier`` "auto": 1.0 (the base rate comes from :func:`base_learning_rate`).
- ``beta`` (DPO only) "auto": 0.1.
"""

from __future__ import annotations

import math
from typing import Any

AUTO = "auto"
DEFAULT_BETA = 0.1
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3
MAX_AUTO_EPOCHS = 25
MAX_AUTO_BATCH = 32

BASE_LEARNING_RATES = {"full": 1e-3, "lora": 2e-4}
"""Rate at ``learning_rate_multiplier=1``. Full: 1e-3 makes the tiny model learn in seconds (real
full fine-tunes want a multiplier well below 1). LoRA: 2e-4, the usual LoRA rate."""


def base_learning_rate(training_type: str) -> float:
    """The learning rate a multiplier of 1.0 stands for (see ``BASE_LEARNING_RATES``)."""
    if training_type not in BASE_LEARNING_RATES:
        raise ValueError(f"unknown training type {training_type!r}; expected 'full' or 'lora'")
    return BASE_LEARNING_RATES[training_type]


def auto_epochs(n_examples: int) -> int:
    n = DEFAULT_EPOCHS
    if n_examples * n < MIN_TARGET_EXAMPLES:
        n = min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // max(1, n_examples))
    elif n_examples * n > MAX_TARGET_EXAMPLES:
        n = max(1, MAX_TARGET_EXAMPLES // n_examples)
    return n


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(MAX_AUTO_BATCH, math.ceil(n_examples * 0.002)))


def resolve_hparams(
    requested: dict[str, Any],
    *,
    n_examples: int,
    training_type: str,
    method: str = "supervised",
) -> dict[str, int | float]:
    """Concrete ``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` (+ ``beta`` for dpo).

    ``requested`` maps those names to numbers or ``"auto"``; missing names count as ``"auto"``.
    ``training_type`` ("full" | "lora") is accepted so later rules can depend on it.
    """
    if training_type not in BASE_LEARNING_RATES:
        raise ValueError(f"unknown training type {training_type!r}")

    def pick(name: str, auto_value: int | float) -> Any:
        value = requested[name] if name in requested and requested[name] is not None else AUTO
        return auto_value if value == AUTO else value

    out: dict[str, int | float] = {
        "n_epochs": int(pick("n_epochs", auto_epochs(n_examples))),
        "batch_size": int(pick("batch_size", auto_batch_size(n_examples))),
        "learning_rate_multiplier": float(pick("learning_rate_multiplier", 1.0)),
    }
    if method == "dpo":
        out["beta"] = float(pick("beta", DEFAULT_BETA))
    return out
