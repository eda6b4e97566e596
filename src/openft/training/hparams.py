"""Turn the user's hyperparameters (numbers or ``"auto"``) into concrete values. Pure: no torch.

OpenAI's advice (fine-tuning guide, "Iterating on hyperparameters"): train first with every
hyperparameter on ``"auto"``, picked from the dataset, then adjust epochs by 1-2 or raise the
learning-rate multiplier (:func:`advice` says so in the job's events). User-given numbers always
win; their ranges are validated at the API edge, not here. Each ``"auto"`` resolves as follows
(``n`` = usable training examples; the token and image numbers come from the validation report,
see :class:`DatasetStats`; without them only ``n`` is used):

``n_epochs``
    OpenAI's cookbook rule, exactly: 3; if ``3n < 100`` then ``min(25, 100 // n)``; elif
    ``3n > 25,000`` then ``max(1, 25,000 // n)`` (10 ex -> 10, 1,000 -> 3, 20,000 -> 1). Then, for
    text datasets, long examples lower the small-data boost (never more epochs than the rule, never
    fewer than 3): it stops once the epochs cover ``MIN_TARGET_TOKENS`` (~100 passes of a 1k-token
    example), i.e. ``min(rule, max(3, ceil(102,400 / (n * tokens_mean))))``.
``batch_size``
    One sequence per 500 examples (0.2 %), rounded *down* to a power of two, clamped to 1..32
    sequences (1..64 for text datasets, reached from 32,000 examples on; 32 without stats). Then at most
    ``TOKEN_BUDGET`` tokens per batch counted with the p95 example (16,384 LoRA, 8,192 full), again
    rounded down to a power of two. A DPO pair is two sequences: the clamp counts sequences (16 or
    32 pairs), and the report's token count of a pair already covers both.
``learning_rate_multiplier``
    1.0 (below: why it does not follow the batch size).
``beta`` (DPO only)
    0.1, the DPO paper's and TRL's default.

"Text dataset": fewer than half the examples have an image (:attr:`DatasetStats.image_heavy`).

**Random-init bases with images** (``pretrained=False``, i.e. ``openft-tiny-vlm``, image-heavy
data): at least ``RANDOM_INIT_IMAGE_PASSES`` example-passes (epochs up to ``MAX_AUTO_EPOCHS``)
and batches of ``RANDOM_INIT_IMAGE_BATCH`` once there are 16 examples per batch item. Such a model
learns what an image shows from the file alone: colour (a patch mean) comes in a few hundred
passes, shape (a spatial pattern) needs thousands, and one-example batches at its 1e-3 rate
stall (240 pictures of 3 colours x 2 shapes: batch 1 x 3 epochs left shape at chance, 0.50 held
out; batch 8 x 20 epochs reached 0.83). Pretrained bases and text keep the rules above.

Why these choices:

- **Epoch cap for long examples.** The cookbook boost exists so that a tiny dataset still gets
  ~100 example-passes of training signal. A long example already carries much of that signal
  per pass, and ten passes over a few long documents teach the model to recite them. Image
  datasets are exempt: image tokens are never trained on (the loss covers assistant text only),
  so their token count says little about how fast the answers are memorised.
- **Powers of two** divide well: the worker splits a batch into micro-batches (the largest
  divisor of ``batch_size`` that fits in memory, :func:`openft.training.memory.plan_batch`); a
  batch of 16 can run as 8x2 or 4x4, one of 17 only as 1x17. This is also why memory does not
  cap the batch here: the effective batch (and so the training dynamics) stays the same whatever
  device runs the job.
- **Token budget.** Long or image-heavy examples (image tokens are part of the count) give fewer
  examples per step, so the steps stay of similar size in tokens and the updates per epoch do not
  collapse (5,000 examples of 4k tokens: batch 4, 16k tokens, not 8). Full fine-tuning moves every weight at a low base rate and gets smaller batches (more, smaller
  steps); LoRA's 2e-4 is the rate published LoRA recipes use with larger batches.
- **Multiplier 1.0.** The base rates below are the ones published recipes use at batch sizes
  from 8 to 128 (LLaVA-1.5: LoRA 2e-4 and full 2e-5 at 128; QLoRA: 2e-4 at 16), and an Adam
  update's size barely depends on the batch, so the 1..64 range this rule produces needs no
  correction. Square-root scaling would *halve* the rate at batch 1-2, where the small datasets
  are (and where the tiny model's 1e-3 was validated). Keeping 1.0 also means a user who raises
  the multiplier knows what 1.0 stood for: :func:`base_learning_rate`.

Base learning rates (the rate at ``learning_rate_multiplier=1``; :func:`base_learning_rate`):

=================================  ======  ======  ===================================================
base model                         lora    full    why
=================================  ======  ======  ===================================================
random init (``openft-tiny-vlm``)  2e-4    1e-3    learns in seconds from scratch; full is its default
Qwen2-VL / Qwen2.5-VL              2e-4    1e-5    Qwen2-VL full fine-tuning recipes
LLaVA-1.5 style                    2e-4    2e-5    LLaVA-1.5 visual instruction tuning stage
other pretrained                   2e-4    1e-5    the conservative full rate
=================================  ======  ======  ===================================================

LoRA is 2e-4 throughout (LLaVA-1.5 LoRA, QLoRA).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from openft.datasets.report import Summary

AUTO = "auto"
DEFAULT_BETA = 0.1
DEFAULT_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MAX_AUTO_EPOCHS = 25
MIN_TARGET_TOKENS = 100 * 1024
"""Tokens the small-data epoch boost aims to cover: ~100 passes of a 1k-token example."""
EXAMPLES_PER_BATCH_ITEM = 500
"""Auto batch grows by one per this many examples (0.2 %), before power-of-two rounding."""
MAX_AUTO_BATCH = 32
"""Most sequences per auto batch."""
MAX_AUTO_BATCH_TEXT = 64
"""Most sequences per auto batch for text datasets (short sequences, cheap steps; reached from
32,000 examples on)."""
TOKEN_BUDGET = {"lora": 16_384, "full": 8_192}
"""Most tokens per auto batch, counted with the p95 example (a DPO pair's count covers both of
its sequences)."""
DPO_SEQUENCES_PER_EXAMPLE = 2
RANDOM_INIT_IMAGE_PASSES = 4_800
"""Fewest example-passes for image-heavy data on a random-init base (module docstring)."""
RANDOM_INIT_IMAGE_BATCH = 8
"""Auto batch for image-heavy data on a random-init base, from 16 examples per batch item."""

TRAINING_TYPES = ("full", "lora")
RANDOM_INIT_LEARNING_RATES = {"full": 1e-3, "lora": 2e-4}
"""The random-init tiny model: 1e-3 makes it learn in seconds. LoRA on frozen random weights
barely learns at any rate (which is why its default training type is full)."""
PRETRAINED_LEARNING_RATES = {"full": 1e-5, "lora": 2e-4}
"""A pretrained base of no listed family: the usual LoRA rate, a conservative full rate."""
FAMILY_LEARNING_RATES = {
    "qwen2_vl": {"full": 1e-5, "lora": 2e-4},
    "llava": {"full": 2e-5, "lora": 2e-4},
}
"""Pretrained bases by family name (:mod:`openft.models.families`)."""


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters: what a job trains with, stored on it and shown to the user."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    beta: float | None = None
    """DPO only."""

    def to_dict(self) -> dict[str, int | float]:
        """For storage and the wire: ``beta`` only for DPO."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DatasetStats:
    """What the rule uses from the training file's validation report (tokens are per example and
    include image tokens; a DPO pair counts both of its sequences)."""

    examples: int
    """Usable examples (the ones the counts below describe)."""
    tokens_mean: float
    """Mean tokens per example."""
    tokens_p95: int
    """95th-percentile tokens per example (nearest rank)."""
    tokens_max: int
    """Longest example. Not used by the rule (one outlier should not shrink every batch); the
    memory planner uses it."""
    examples_with_images: int = 0
    """Examples with at least one image."""
    images: int = 0
    """Images in all."""
    trained_max: int | None = None
    """The most trained (labelled) tokens in one sequence (None: unknown, so every position)."""

    @classmethod
    def from_summary(cls, summary: Summary) -> DatasetStats:
        """From a validation report's summary (token numbers are None for an empty file)."""
        tokens = summary.tokens
        return cls(
            examples=summary.usable_examples,
            tokens_mean=float(tokens.mean or 0),
            tokens_p95=tokens.p95 or 0,
            tokens_max=tokens.max or 0,
            examples_with_images=summary.examples_with_images,
            images=summary.images,
            trained_max=tokens.trained_max,
        )

    @property
    def image_heavy(self) -> bool:
        """At least half the examples have an image."""
        return self.examples > 0 and 2 * self.examples_with_images >= self.examples


def base_learning_rate(training_type: str, *, family: str | None, pretrained: bool) -> float:
    """The learning rate a multiplier of 1.0 stands for (the table in the module docstring).

    ``pretrained``: False for a random-init base (``openft-tiny-vlm``), True for a real one, in
    which case ``family`` (``"qwen2_vl"``, ``"llava"``; None or unknown: generic) picks the row.
    """
    if training_type not in TRAINING_TYPES:
        raise ValueError(f"unknown training type {training_type!r}; expected 'full' or 'lora'")
    if not pretrained:
        table = RANDOM_INIT_LEARNING_RATES
    else:
        table = FAMILY_LEARNING_RATES.get(family or "", PRETRAINED_LEARNING_RATES)
    return table[training_type]


def auto_epochs(n_examples: int, stats: DatasetStats | None = None) -> int:
    """The cookbook rule, then the long-example cap (module docstring)."""
    n = DEFAULT_EPOCHS
    if n_examples * n < MIN_TARGET_EXAMPLES:
        n = min(MAX_AUTO_EPOCHS, MIN_TARGET_EXAMPLES // max(1, n_examples))
    elif n_examples * n > MAX_TARGET_EXAMPLES:
        n = max(1, MAX_TARGET_EXAMPLES // n_examples)
    if n > DEFAULT_EPOCHS and stats is not None and not stats.image_heavy:
        total = stats.tokens_mean * n_examples
        if total > 0:
            n = min(n, max(DEFAULT_EPOCHS, math.ceil(MIN_TARGET_TOKENS / total)))
    return n


def auto_batch_size(
    n_examples: int,
    *,
    training_type: str = "lora",
    method: str = "supervised",
    stats: DatasetStats | None = None,
) -> int:
    """About 0.2 % of the examples, capped by sequences and by tokens (module docstring)."""
    per_example = DPO_SEQUENCES_PER_EXAMPLE if method == "dpo" else 1
    text = stats is not None and not stats.image_heavy
    cap = (MAX_AUTO_BATCH_TEXT if text else MAX_AUTO_BATCH) // per_example
    batch = min(cap, _pow2_floor(n_examples // EXAMPLES_PER_BATCH_ITEM))
    if stats is not None and stats.tokens_p95 > 0:
        batch = min(batch, _pow2_floor(TOKEN_BUDGET[training_type] // stats.tokens_p95))
    return batch


def resolve_hparams(
    requested: dict[str, Any],
    *,
    n_examples: int,
    training_type: str,
    method: str = "supervised",
    stats: DatasetStats | None = None,
    pretrained: bool = True,
) -> Hyperparameters:
    """Concrete ``n_epochs``, ``batch_size``, ``learning_rate_multiplier`` (+ ``beta`` for dpo).

    ``requested`` maps those names to numbers or ``"auto"``; missing or None names count as
    ``"auto"``, and given numbers pass through unchanged (ints for epochs and batch size, floats
    for the multiplier and beta). ``training_type`` is ``"full"`` or ``"lora"``; ``method``
    ``"supervised"`` or ``"dpo"``. ``stats`` (the training file's validation summary, see
    :meth:`DatasetStats.from_summary`) refines the rules for long and image-heavy examples;
    without it only ``n_examples`` counts. ``pretrained=False`` (a random-init base) asks more
    training of image-heavy data (module docstring). No rule uses the model's size: the base rate
    already depends on the family (:func:`base_learning_rate`), and we know of no size adjustment
    worth its risk across the models we train.
    """
    if training_type not in TRAINING_TYPES:
        raise ValueError(f"unknown training type {training_type!r}; expected 'full' or 'lora'")

    def pick(name: str, auto: Any) -> Any:
        value = requested.get(name)
        if value is None or value == AUTO:
            return auto()
        return value

    from_scratch = not pretrained and stats is not None and stats.image_heavy

    def epochs() -> int:
        n = auto_epochs(n_examples, stats)
        if from_scratch:
            n = max(n, min(MAX_AUTO_EPOCHS, math.ceil(RANDOM_INIT_IMAGE_PASSES / max(1, n_examples))))
        return n

    def batch() -> int:
        b = auto_batch_size(n_examples, training_type=training_type, method=method, stats=stats)
        if from_scratch:
            b = max(b, min(RANDOM_INIT_IMAGE_BATCH, _pow2_floor(n_examples // 16)))
        return b

    return Hyperparameters(
        n_epochs=int(pick("n_epochs", epochs)),
        batch_size=int(pick("batch_size", batch)),
        learning_rate_multiplier=float(pick("learning_rate_multiplier", lambda: 1.0)),
        beta=float(pick("beta", lambda: DEFAULT_BETA)) if method == "dpo" else None,
    )


def advice(resolved: Hyperparameters) -> str:
    """How to adjust after a first run (OpenAI's "Iterating on hyperparameters"), with the
    numbers filled in from ``resolved``; the worker logs it when the job starts."""
    epochs = resolved.n_epochs
    multiplier = resolved.learning_rate_multiplier
    more = f"{epochs + 1}-{epochs + 2}"
    if epochs > 2:
        fewer = f"lower it by 1-2 (to {epochs - 2}-{epochs - 1})"
    elif epochs == 2:
        fewer = "lower it to 1"
    else:
        fewer = (
            f"lower learning_rate_multiplier instead (e.g. to {multiplier / 2:g}), as 1 epoch is the least"
        )
    text = (
        f"If the model follows the training data less than expected (common when there is one right "
        f"answer: classification, extraction, parsing), raise n_epochs by 1-2 (to {more}); if it "
        f"becomes less diverse than expected, {fewer}. If it does not appear to converge, raise "
        f"learning_rate_multiplier (e.g. to {multiplier * 2:g})."
    )
    if resolved.beta is not None:
        text += (
            f" beta={resolved.beta:g}: raise it to stay closer to the base model, lower it to "
            "follow the preferences more strongly."
        )
    return text


def _pow2_floor(x: int) -> int:
    """The largest power of two <= ``x`` (1 for ``x < 2``)."""
    return 1 << (x.bit_length() - 1) if x >= 1 else 1
