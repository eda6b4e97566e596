"""Predict a training step's peak memory, and split a batch into micro-batches that fit.

Pure arithmetic (no torch import): the worker can refuse a job that cannot fit, or pick
gradient accumulation, before loading anything. The model is the usual one for transformer
training (weights + gradients + AdamW states + saved activations + logits), with constants
measured on this code base's models (``tests/unit/training/test_memory_estimate.py`` compares
against measured peaks and asserts a factor-of-two band):

- **activations** per decoder layer and token: ``26*hidden + 4*intermediate`` elements without
  gradient checkpointing (norm inputs/outputs, q/k/v and their rotary copies, attention output,
  residuals; gate, up, act and product of the MLP). With checkpointing only each layer's input is
  kept (``hidden`` per layer and token), plus one layer recomputed at a time. Attention is assumed
  memory-efficient (SDPA/flash: no ``seq^2`` term); eager attention on long sequences needs more.
- **logits**: in the model dtype, an fp32 copy for the loss (log-softmax) and its fp32 gradient,
  for as many rows as the loss kernel that runs holds at once (``loss_kernel``): ``"full"`` every
  position (``batch*seq*vocab``, the Hugging Face loss), ``"plain"`` the labelled positions only,
  ``"chunked"``/``"liger"`` at most one block of :func:`chunk_rows` rows (:data:`CHUNK_BYTES` of
  fp32 logits; Liger's fused kernel chunks likewise). DPO doubles the sequences (chosen + rejected).
- **vision tower**: ``image_tokens`` per example (patches entering the encoder) through
  ``vision_layers`` layers of ``30*vision_hidden`` elements each (stored like the decoder's).

``total`` is the sum of the parts, a deliberately conservative peak (activations are partly freed
before the optimizer step allocates its temporaries).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from openft.errors import InvalidRequest
from openft.models.families import find_family

ADAMW_STATE_BYTES = 8
"""Two fp32 states (exp_avg, exp_avg_sq) per trainable parameter."""
ACT_HIDDEN_FACTOR = 26
ACT_INTERMEDIATE_FACTOR = 4
VISION_ACT_FACTOR = 30
LOGITS_FP32_COPIES = 2  # the fp32 log-softmax input/output and its gradient, beside the model-dtype logits
CHUNK_BYTES = 256 * 2**20
"""fp32 logits per block of the chunked loss (``training.loss``): rows = this // (4 * V) (441 rows
at V=151,936), at least 1."""
LOSS_KERNEL_ROWS = ("full", "plain", "chunked", "liger")
"""``loss_kernel`` values :func:`estimate_peak_bytes` knows: the chosen kernels of
``training.loss.choose_loss_kernel``, and ``"full"``: logits at every position."""


def chunk_rows(vocab: int, budget: int | None = None) -> int:
    """Rows per chunk so that one chunk's fp32 logits take at most ``budget`` (default
    :data:`CHUNK_BYTES`) bytes."""
    return max(1, (budget or CHUNK_BYTES) // (4 * vocab))


def logits_rows(
    loss_kernel: str, *, sequences: int, seq_len: int, labelled_len: int | None, vocab: int
) -> int:
    """Rows of vocabulary logits the loss holds at once (see the module docstring).
    ``labelled_len``: labelled tokens per sequence (None: unknown, bounded by ``seq_len``)."""
    if loss_kernel not in LOSS_KERNEL_ROWS:
        raise ValueError(f"loss_kernel must be one of {', '.join(LOSS_KERNEL_ROWS)}, got {loss_kernel!r}")
    every = sequences * seq_len
    if loss_kernel == "full":
        return every
    labelled = every if labelled_len is None else sequences * min(labelled_len, seq_len)
    if loss_kernel == "plain":
        return labelled
    return min(labelled, chunk_rows(vocab))


@dataclass(frozen=True)
class MemoryEstimate:
    total: int
    """Predicted peak bytes of one optimizer step on the training device."""
    breakdown: dict[str, int]
    """Bytes per part: weights, gathered_weights (FSDP), gradients, optimizer, activations,
    vision_activations, logits, reference_model (DPO without LoRA)."""

    def describe(self) -> str:
        parts = sorted(self.breakdown.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {_gib(v)}" for k, v in parts if v)


def estimate_peak_bytes(
    *,
    n_params: int,
    n_trainable: int,
    dtype_bytes: int,
    seq_len: int,
    batch_size: int,
    hidden_size: int,
    n_layers: int,
    vocab_size: int,
    image_tokens: int,
    gradient_checkpointing: bool,
    lora: bool,
    dpo: bool,
    intermediate_size: int | None = None,
    vision_hidden_size: int | None = None,
    vision_layers: int | None = None,
    shards: int = 1,
    loss_kernel: str = "full",
    labelled_len: int | None = None,
) -> MemoryEstimate:
    """Peak bytes of one training step (forward, backward, AdamW step) for one micro-batch.

    ``seq_len`` is the padded sequence length the decoder sees (image placeholder tokens
    included); ``batch_size`` counts examples (a DPO example is two sequences); ``image_tokens``
    is the number of patches per example entering the vision encoder (0 for text). ``lora``: the
    base weights are frozen (``n_trainable`` counts the adapters plus anything saved with them)
    and a DPO reference is the same model with adapters disabled; without LoRA, DPO keeps a
    frozen reference copy. ``intermediate_size`` defaults to ``4*hidden_size``, the vision sizes
    to the text ones. ``shards`` > 1 (FSDP over that many ranks): weights, gradients and optimizer
    state are split evenly, plus the whole weights FSDP gathers at a time: the root group
    (embeddings and head, kept gathered through the step) and two decoder layers (the one running
    and the one prefetched). ``loss_kernel`` and ``labelled_len`` (labelled tokens per sequence)
    size the logits (:func:`logits_rows`).
    """
    inter = intermediate_size if intermediate_size is not None else 4 * hidden_size
    v_hidden = vision_hidden_size if vision_hidden_size is not None else hidden_size
    v_layers = vision_layers if vision_layers is not None else n_layers
    rows = batch_size * (2 if dpo else 1)
    tokens = rows * seq_len

    block = 4 * hidden_size * hidden_size + 3 * hidden_size * inter  # one decoder layer's weights
    per_layer = ACT_HIDDEN_FACTOR * hidden_size + ACT_INTERMEDIATE_FACTOR * inter  # elements/token
    if gradient_checkpointing:
        act_elems = tokens * (n_layers * hidden_size + per_layer)
    else:
        act_elems = tokens * n_layers * per_layer
    v_tokens = rows * image_tokens
    v_per_layer = VISION_ACT_FACTOR * v_hidden
    if gradient_checkpointing:
        v_elems = v_tokens * (v_layers * v_hidden + v_per_layer) if v_tokens else 0
    else:
        v_elems = v_tokens * v_layers * v_per_layer

    breakdown = {
        "weights": n_params * dtype_bytes // shards,
        "gathered_weights": min(n_params, 2 * vocab_size * hidden_size + 2 * block) * dtype_bytes
        if shards > 1
        else 0,
        "gradients": n_trainable * dtype_bytes // shards,
        "optimizer": n_trainable * ADAMW_STATE_BYTES // shards,
        "activations": act_elems * dtype_bytes,
        "vision_activations": v_elems * dtype_bytes,
        "logits": logits_rows(
            loss_kernel, sequences=rows, seq_len=seq_len, labelled_len=labelled_len, vocab=vocab_size
        )
        * vocab_size
        * (dtype_bytes + 4 * LOGITS_FP32_COPIES),
        "reference_model": n_params * dtype_bytes // shards if dpo and not lora else 0,
    }
    return MemoryEstimate(total=sum(breakdown.values()), breakdown=breakdown)


def plan_batch(
    estimate_fn: Callable[[int], MemoryEstimate], *, batch_size: int, available_bytes: int
) -> tuple[int, int]:
    """``(micro_batch_size, grad_accum_steps)`` with ``micro * steps == batch_size``: the largest
    micro-batch dividing ``batch_size`` whose estimate fits in ``available_bytes`` (the effective
    batch, and so the training dynamics, stay what the user asked for).

    ``estimate_fn(micro_batch_size)`` returns the estimate for that micro-batch. Raises
    ``InvalidRequest`` with what to change when not even one example fits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for micro in sorted((d for d in range(1, batch_size + 1) if batch_size % d == 0), reverse=True):
        if estimate_fn(micro).total <= available_bytes:
            return micro, batch_size // micro
    one = estimate_fn(1)
    raise InvalidRequest(
        f"one training example needs about {_gib(one.total)} but {_gib(available_bytes)} is available "
        f"({one.describe()}); batch_size does not help here (batches are already split into "
        'micro-batches of 1). Use shorter examples, fewer images or images with detail: "low", '
        "or a lower image pixel cap (max_pixels)",
        param="training_file",
        code="insufficient_memory",
    )


@dataclass(frozen=True)
class ModelFacts:
    """The numbers :func:`estimate_peak_bytes` needs about a model, read by :func:`model_facts`;
    the field names are its keyword names (``estimate_peak_bytes(**asdict(facts), ...)``)."""

    n_params: int
    n_trainable: int
    dtype_bytes: int
    hidden_size: int
    n_layers: int
    vocab_size: int
    intermediate_size: int
    vision_hidden_size: int | None = None
    """The vision encoder's width; None for a text model."""
    vision_layers: int | None = None


def model_facts(model: Any) -> ModelFacts:
    """The numbers :func:`estimate_peak_bytes` needs, read from a loaded model (peft or not)."""
    params = list(model.parameters())
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision = getattr(config, "vision_config", None)
    vision_width = vision_depth = None
    if vision is not None:
        # Qwen2-VL names the encoder width embed_dim (its hidden_size is the merger's output).
        vision_width = int(getattr(vision, "embed_dim", None) or vision.hidden_size)
        depth = getattr(vision, "depth", None) or getattr(vision, "num_hidden_layers", None)
        vision_depth = int(depth) if depth else None
    return ModelFacts(
        n_params=sum(p.numel() for p in params),
        n_trainable=sum(p.numel() for p in params if p.requires_grad),
        dtype_bytes=max((p.element_size() for p in params), default=4),
        hidden_size=int(text.hidden_size),
        n_layers=int(text.num_hidden_layers),
        vocab_size=int(text.vocab_size),
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * text.hidden_size),
        vision_hidden_size=vision_width,
        vision_layers=vision_depth,
    )


def _gib(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def available_bytes(device: str) -> int:
    """Free memory on ``device``: the GPU's free memory, or the machine's available RAM on CPU."""
    import os

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def lora_trainable_params(model: Any, target_modules: Sequence[str]) -> int:
    """Parameters LoRA of rank 1 adds on the language model's target linears (scale by ``r``):
    the layers ``trainable.lora_plan`` puts adapters on without ``train_vision_tower``."""
    from openft.training.trainable import part_of  # the family registry's answer, as lora_plan asks

    family = find_family(model)
    total = 0
    for name, module in model.named_modules():
        if (
            name.rsplit(".", 1)[-1] in target_modules
            and hasattr(module, "in_features")
            and part_of(name, family) == "language_model"
        ):
            total += module.in_features + module.out_features
    return total


def plan_for_model(
    model: Any,
    *,
    batch_size: int,
    seq_len: int,
    image_tokens: int,
    lora_rank: int | None,
    lora_targets: Sequence[str] = (),
    dpo: bool,
    gradient_checkpointing: bool,
    available: int,
    shards: int = 1,
    loss_kernel: str = "full",
    labelled_len: int | None = None,
) -> tuple[int, int, MemoryEstimate]:
    """Micro-batch and accumulation steps that fit ``available`` bytes for this (meta) model and
    the longest example; plus the estimate at the chosen micro-batch. ``shards``: FSDP ranks;
    ``loss_kernel``: the one that will run (``training.setup.planned_loss_kernel``);
    ``labelled_len``: the most labelled tokens in one sequence (None: unknown).
    ``image_tokens`` counts the decoder's image tokens per example; the model's family says how
    many encoder patches each is."""
    facts = model_facts(model)
    # Image tokens in, encoder patches out: the vision tower sees more patches than the decoder
    # sees tokens where the projector merges or pools them (Gemma 3: 16 patches per token).
    family = find_family(model)
    if family is not None and image_tokens:
        image_tokens *= family.patches_per_token(model.config)
    if lora_rank is not None:
        facts = replace(facts, n_trainable=lora_rank * lora_trainable_params(model, lora_targets))

    def estimate(micro: int) -> MemoryEstimate:
        return estimate_peak_bytes(
            **asdict(facts),
            seq_len=seq_len,
            batch_size=micro,
            image_tokens=image_tokens,
            gradient_checkpointing=gradient_checkpointing,
            lora=lora_rank is not None,
            dpo=dpo,
            shards=shards,
            loss_kernel=loss_kernel,
            labelled_len=labelled_len,
        )

    micro, accum = plan_batch(estimate, batch_size=batch_size, available_bytes=available)
    return micro, accum, estimate(micro)


def vision_cache_bytes(*, image_tokens: int, hidden_size: int, layers: int = 1, dtype_bytes: int) -> int:
    """Host memory to keep the projected image features of a run (``training.vision_cache``): one
    ``hidden_size`` row per image token of every distinct image set, times ``layers`` (Qwen3-VL's
    DeepStack keeps one more row per DeepStack layer), in the compute dtype. A 448-px image on
    Qwen2-VL-2B is 256 tokens x 1536 x 2 bytes = 0.75 MiB (against 4.6 MB of fp32 pixels)."""
    return image_tokens * hidden_size * layers * dtype_bytes
