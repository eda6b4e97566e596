"""Typed, frozen training configuration: what a recipe needs, resolved once by the worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


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
    """Module names (peft vocabulary) that get adapters, matched *inside the language model only*:
    the recipe expands them to full module paths so a vision encoder with same-named layers
    (Qwen2.5-VL's ``mlp.gate_proj``...) stays untouched. The vision tower gets adapters only with
    ``TrainConfig.train_vision_tower``."""
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

    # --- what trains (namespaced extension options the API passes through) ------------------
    train_vision_tower: bool = False
    """Also train the vision encoder (Qwen2-VL: ``visual.blocks`` + ``visual.patch_embed``). Off by
    default: the pretrained encoder already sees well and is easily damaged by small datasets.
    With LoRA it gets adapters on all of its linear layers; with full fine-tuning all its weights train."""
    train_projector: bool = False
    """LoRA only: train the vision-to-text projector (Qwen2-VL: ``visual.merger``; LLaVA-style:
    ``multi_modal_projector``) in full, saved with the adapter (peft ``modules_to_save``). Full
    fine-tuning always trains the projector: it is small and is where image features meet the
    language model, so freezing it while the language model moves helps nothing."""

    # --- how it trains (memory and speed; results equal up to float error) -----------------
    micro_batch_size: int | None = None
    """Examples per forward/backward pass; gradients accumulate until ``batch_size`` examples make
    one optimizer step. The loss is normalised over the whole batch's tokens, so any micro-batch
    size gives the same update as the full batch. ``None``: the whole batch at once."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass (less memory, ~20-30% slower steps). The worker
    sets it from the memory plan (on only when the batch would not fit without it); ``None``: off."""
    bf16: bool | None = None
    """bf16 autocast for forward/backward (fp32 master weights and optimizer state; with LoRA the
    frozen base weights are loaded in bf16). ``None``: on when the CUDA device supports bf16; CPU
    always trains in fp32."""

    packing: bool | None = None
    """Padding-free batches: a micro-batch's examples are concatenated into one row whose position
    ids restart at every example, so no compute goes to padding and attention never crosses
    examples (flash-attention turns the position ids into ``cu_seqlens``; sdpa/eager get a
    block-diagonal mask over the whole row). Micro-batches with images fall back to padding
    (Qwen2-VL's M-RoPE positions are per example). The loss is the same as with padding up to float
    error. ``None``: on with flash-attention only, since sdpa computes attention over the whole
    packed row (quadratic in its length) and is slower than padding for long rows."""
    labelled_logits: bool = True
    """Compute the vocabulary projection only at positions that predict a labelled token (the
    ``lm_head`` runs on those hidden states alone), instead of full-vocabulary logits at every
    position: same loss and gradients, a fraction of the logits memory and FLOPs."""
    loss_kernel: Literal["auto", "chunked", "plain", "liger"] = "auto"
    """How the loss meets the vocabulary (same loss and gradients up to float error). ``"chunked"``:
    the lm_head's hidden states go to a chunked linear cross-entropy that never holds more than
    one block of ~256 MB of fp32 logits, forward and backward (one extra lm_head matmul in the
    backward). ``"liger"``: Liger's fused linear cross-entropy and its RMSNorm/RoPE/SwiGLU kernels
    (CUDA, ``pip install 'openft[gpu]'``, supported families). ``"plain"``: ``(n, V)`` logits from
    the model. ``"auto"``: Liger where it can run, else chunked; plain where the lm_head cannot be
    taken out of the model (FSDP, ``labelled_logits`` off, a family not checked)."""
    attn_implementation: str | None = None
    """``"sdpa"``, ``"flash_attention_2"``, ``"eager"``... passed to ``from_pretrained``. ``None``:
    flash-attention on CUDA when the ``flash_attn`` package is installed, else ``"sdpa"``."""
    fused_optimizer: bool | None = None
    """AdamW's fused CUDA kernel (one launch for all parameters). ``None``: on for CUDA."""
    prefetch: bool = True
    """Collate the next micro-batches in a background thread (pinned memory on CUDA, copied with
    ``non_blocking=True``) while the current one computes."""
    render_workers: int | None = None
    """Processes for the up-front render of every example (``training.prerender``), this one
    included: same results in the same order, on several cores. ``1``: serially in this process;
    ``None``: this process's share of the cores (its torch threads), at most one per 32 examples."""

    cache_vision_features: Literal["auto", "on", "off"] = "auto"
    """Run the frozen vision tower once per distinct image set and reuse its work every epoch and
    in validation (``training.vision_cache``): same losses, no vision-tower forward after an image's
    first. With the projector frozen too (the default LoRA plan) the projected features are cached;
    when the projector trains (``train_projector``, full fine-tuning) the tower's outputs are, and
    the projector runs on them with autograd every step. ``"auto"``: on when the tower is frozen,
    has no active dropout, the job is not FSDP-sharded and the cache fits a quarter of the host's
    available memory (else off, the reason logged). ``"on"``: also when the tower has dropout (it
    then runs in eval mode) or the cache exceeds that budget; refused (``InvalidRequest``) when the
    tower trains. ``"off"``: never."""

    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """How a job on several processes splits the work (ignored on one process). ``"ddp"``: every
    rank holds the whole model, gradients are all-reduced. ``"fsdp"`` (full fine-tuning only):
    FSDP2 shards weights, gradients and AdamW state over the ranks, for models whose training state
    does not fit one device; the model is loaded on the CPU and moves to the device shard by shard.
    The worker sets it from the training plan (``training.plan.plan_parallelism``)."""

    # --- validation and crash safety ---------------------------------------------------------
    valid_every: int | None = None
    """Compute ``valid_loss`` / ``valid_mean_token_accuracy`` on a fixed sample of validation
    examples every this many steps (and at every epoch end, with a full pass too). ``None``: about
    10 evaluations per run and at least one per epoch."""
    state_every_steps: int | None = None
    """Write resumable training state (``output_dir/state``) every this many steps, besides every
    epoch end and right before a cancel/pause. ``None``: every ~5% of the run's steps, but at most
    once per 30 s; ``0``: only at epoch ends and stops."""
    async_state_save: bool = True
    """Write periodic state saves in a background thread (``training.async_save``): the step only
    waits for a copy of the state to CPU, not for the disk. At most one write is in flight; it is
    finished before an epoch's checkpoint, a stop, the end of the run or an error. ``False``: every
    save writes before training goes on."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_epochs", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "valid_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or None, got {value}")
        if self.render_workers is not None and self.render_workers < 1:
            problems.append(f"render_workers must be >= 1 or None, got {self.render_workers}")
        if self.state_every_steps is not None and self.state_every_steps < 0:
            problems.append(f"state_every_steps must be >= 0 or None, got {self.state_every_steps}")
        if self.loss_kernel not in ("auto", "chunked", "plain", "liger"):
            problems.append(f"loss_kernel must be auto, chunked, plain or liger, got {self.loss_kernel!r}")
        if self.parallelism == "fsdp" and self.lora is not None:
            problems.append("parallelism 'fsdp' is for full fine-tuning (lora must be None)")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
