"""What every recipe does before its loop, and the small helpers their loops share.

``setup(cfg, reporter)`` seeds, picks the device and precision, loads the model made trainable
(fresh LoRA, a continued adapter, or full weights) and announces what trains. The rest are pure
helpers both recipes call: moving a batch to the device, the fixed validation sample, and the
fingerprint of what must not change between a run and its resumption.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch

from openft.adapters import apply_lora, merge
from openft.errors import JobFailed
from openft.models.loader import load_model, resolve_device, weights_kind
from openft.models.render import Rendered
from openft.training import distributed, fsdp_io
from openft.training.collate import collate_packed, collate_sft
from openft.training.config import TrainConfig
from openft.training.loss import (
    LogitHead,
    Scores,
    choose_loss_kernel,
    logit_transform,
    predicting_positions,
    shifted_targets,
)
from openft.training.reporter import Reporter
from openft.training.trainable import describe_trainable, lora_plan, set_full_trainable
from openft.training.vision_cache import SLOTS_KEY, VisionCache, vision_cache_for

MAX_GRAD_NORM = 1.0
"""Gradients are clipped to this global norm before every optimizer step."""
VALID_EVALS_PER_RUN = 10
"""With ``cfg.valid_every=None``: about this many periodic evaluations per run, at least one per epoch."""

T = TypeVar("T")


class Setup(NamedTuple):
    model: Any
    processor: Any
    device: torch.device
    pad_id: int
    bf16: bool
    checkpointing: bool
    autocast: Callable[[], Any]
    """bf16 autocast on devices that have it, else a no-op."""
    feeder: Feeder
    """Collates, moves and runs micro-batches the way ``cfg`` asks (packing, labelled-only logits)."""


def setup(cfg: TrainConfig, reporter: Reporter) -> Setup:
    """Seeded, on its device, with what trains decided and announced: where every recipe starts."""
    seed_everything(cfg.seed)
    device = torch.device(resolve_device(cfg.device))
    bf16, checkpointing = _precision(cfg, device)
    attention = attention_for(cfg, device)
    model, processor = _build_model(
        cfg, bf16=bf16, gradient_checkpointing=checkpointing, attn_implementation=attention
    )
    reporter.on_message(describe_trainable(model, lora=cfg.lora is not None), once="trainable")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    pack = packing_for(model) if wants_packing(cfg, attention) else None
    if cfg.packing and pack is None:
        reporter.on_message(
            f"padding-free packing is not supported for {model.config.model_type} models; batches are padded",
            once="no-packing",
        )
    vision = vision_cache_for(
        model,
        device,
        cfg.cache_vision_features,
        reporter,
        dtype_bytes=2 if bf16 else 4,
        sharded=cfg.parallelism == "fsdp" and distributed.world_size() > 1,
    )
    loss_kernel, why = loss_kernel_for(cfg, model, device)
    reporter.on_message(f"loss: {LOSS_KERNEL_NAMES[loss_kernel]} ({why})", once="loss-kernel")
    feeder = Feeder(
        device=device,
        pad_id=pad_id,
        packing=pack is not None,
        mrope=pack == "mrope",
        labelled_logits=cfg.labelled_logits,
        autocast=autocast,
        vision=vision,
        loss_kernel=loss_kernel,
    )
    return Setup(model, processor, device, pad_id, bf16, checkpointing, autocast, feeder)


MROPE_PACKABLE = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
"""M-RoPE families whose forward takes packed ``(4, B, T)`` position ids (text row first; checked in
transformers 5.24's modeling code). Other M-RoPE families are padded."""


def packing_for(model: Any) -> str | None:
    """How ``model`` takes packed text: ``"mrope"`` (Qwen2-VL-style 4-row positions), ``"1d"`` (plain
    RoPE: a ``(1, T)`` position row), or None when it cannot be packed."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if config.model_type in MROPE_PACKABLE:
        return "mrope"
    if isinstance(rope, dict) and "mrope_section" in rope:
        return None
    return "1d"


def wants_packing(cfg: TrainConfig, attention: str) -> bool:
    """``cfg.packing``, else on only with flash-attention (varlen kernels: no work across examples);
    sdpa/eager on a packed row attend over all of it under a block-diagonal mask."""
    return cfg.packing if cfg.packing is not None else attention.startswith("flash_attention")


def attention_for(cfg: TrainConfig, device: torch.device) -> str:
    """``cfg.attn_implementation``, else flash-attention on CUDA when installed, else sdpa."""
    if cfg.attn_implementation is not None:
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


LOSS_KERNEL_NAMES = {
    "plain": "full-vocabulary logits at the labelled positions",
    "chunked": "chunked linear cross-entropy (no full-vocabulary logits)",
    "liger": "Liger fused linear cross-entropy, RMSNorm, RoPE and SwiGLU kernels",
}


def loss_kernel_for(cfg: TrainConfig, model: Any, device: torch.device) -> tuple[str, str]:
    """``(kernel, why)`` for ``cfg.loss_kernel`` on this model and device (see
    :func:`training.loss.choose_loss_kernel`); Liger's kernels are patched into the model here."""
    bare = distributed.unwrap(model)
    kernel, why = planned_loss_kernel(
        cfg.loss_kernel,
        bare,
        device.type,
        labelled_logits=cfg.labelled_logits,
        sharded=distributed.sharded(model),
    )
    if kernel == "liger":
        _apply_liger(bare)
    return kernel, why


def planned_loss_kernel(
    requested: str, model: Any, device_type: str, *, labelled_logits: bool = True, sharded: bool = False
) -> tuple[str, str]:
    """``(kernel, why)`` that ``requested`` resolves to for ``model`` (unwrapped; a meta-device
    model is enough) on ``device_type``, without patching anything: the worker asks before
    training, for the memory plan and to refuse a kernel that cannot run; raises ``ValueError``
    saying why (:func:`training.loss.choose_loss_kernel`)."""
    model_type = model.config.model_type
    head = model.get_output_embeddings()
    problem = None
    if not labelled_logits:
        problem = "labelled_logits is off"
    elif sharded:
        problem = "FSDP shards the lm_head"
    elif type(head) is not torch.nn.Linear:
        problem = f"the lm_head is a {type(head).__name__}, not a plain Linear layer"
    elif logit_transform(model.config) is None:
        problem = f"the logits of {model_type} models were not checked for post-processing"
    return choose_loss_kernel(
        requested,
        device_type=device_type,
        liger_model_types=_liger_model_types() if device_type == "cuda" else None,
        model_type=model_type,
        head_problem=problem,
    )


def _liger_model_types() -> frozenset[str] | None:
    """Families the installed liger-kernel patches; None when it (or Triton) is not importable."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return None
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return None
    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def _apply_liger(model: Any) -> None:
    """Liger's RMSNorm, RoPE and SwiGLU (and LayerNorm where the family has it) into ``model``;
    not its loss patches: the loss runs on the labelled hidden states (``loss.labelled_loss``)."""
    import inspect

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN[base.config.model_type]
    wanted = {"fused_linear_cross_entropy": False, "cross_entropy": False, "model": base}
    apply(**{k: v for k, v in wanted.items() if k in inspect.signature(apply).parameters})


@dataclass(frozen=True)
class Feeder:
    """How a recipe turns rendered examples into logits at the labelled positions.

    ``collate`` runs on the prefetch thread: padding-free packing for text-only micro-batches when
    the family allows it, else right padding; pinned memory on CUDA. ``forward`` copies the batch
    with ``non_blocking=True`` and runs the model; with ``labelled_logits`` the ``lm_head`` only
    sees the hidden states that predict a labelled token (transformers' boolean
    ``logits_to_keep``), otherwise full logits are computed and the same positions picked after.
    With a ``loss_kernel`` other than ``"plain"`` the lm_head does not run at all: its input
    hidden states come back with the head itself, for a loss that never holds ``(n, V)`` logits.
    """

    device: torch.device
    pad_id: int
    packing: bool
    mrope: bool
    labelled_logits: bool
    autocast: Callable[[], Any]
    vision: VisionCache | None = None
    """Frozen image features computed once (``cfg.cache_vision_features``); None: the tower runs
    at every forward."""
    loss_kernel: str = "plain"
    """``"plain"``, ``"chunked"`` or ``"liger"`` (:func:`loss_kernel_for`)."""
    _checked: list[bool] = field(default_factory=list, compare=False, repr=False)
    """Non-empty once the first forward confirmed the head's post-processing (one host sync)."""

    def collate(self, items: Sequence[Rendered]) -> dict[str, torch.Tensor]:
        if self.packing and not any(r.vision for r in items):
            batch = collate_packed(items, mrope=self.mrope)
        else:
            batch = collate_sft(items, self.pad_id)
        return self.pinned(self.tag_vision(batch, items))

    def tag_vision(
        self, batch: dict[str, torch.Tensor], items: Sequence[Rendered]
    ) -> dict[str, torch.Tensor]:
        """``batch`` (collated from ``items``, rows in order) with its examples' vision-cache slots."""
        return self.vision.tag(batch, items) if self.vision is not None else batch

    def pinned(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Scores:
        """Labelled-position logits ``(n, V)``, their targets and rows, and the batch's row count."""
        slots = batch.get(SLOTS_KEY)
        batch = to_device({k: v for k, v in batch.items() if k != SLOTS_KEY}, self.device)
        labels = batch.pop("labels")
        keep = predicting_positions(labels)
        targets, rows = shifted_targets(labels, keep)
        served = (
            self.vision.serving(batch, slots) if self.vision is not None else contextlib.nullcontext(batch)
        )
        with self.autocast(), served as inputs:
            if self.loss_kernel != "plain":
                hidden, head = self._labelled_hidden(model, inputs, keep)
                return Scores(None, targets, rows, labels.shape[0], hidden, head, self.loss_kernel)
            if self.labelled_logits:
                logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
            else:
                logits = model(**inputs, use_cache=False).logits[keep]
        return Scores(logits, targets, rows, labels.shape[0])

    def _labelled_hidden(
        self, model: Any, batch: dict[str, torch.Tensor], keep: torch.Tensor
    ) -> tuple[torch.Tensor, LogitHead]:
        """The ``(n, H)`` hidden states the lm_head would see at ``keep``, and the head as a
        :class:`LogitHead`. The model runs as usual (DDP's hooks, checkpointing and all) with its
        lm_head swapped for one that keeps its input and projects only the first row, a probe
        whose post-processed logits (softcapping, scaling) are checked against the head's once."""
        bare = distributed.unwrap(model)
        module = bare.get_output_embeddings()
        seen: list[torch.Tensor] = []

        def keep_input(x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            # With gradients: DDP (find_unused_parameters) walks the output's graph to see which
            # parameters this step uses; a detached output would mark them all unused.
            return module.__class__.forward(module, x[:1])

        module.forward = keep_input
        try:
            out = model(**batch, use_cache=False, logits_to_keep=keep).logits
        finally:
            del module.forward
        (hidden,) = seen
        device = hidden.device.type
        scale, softcap = logit_transform(bare.config) or (1.0, None)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        head = LogitHead(module.weight, module.bias, scale, softcap, dtype)
        if not self._checked and hidden.shape[0] > 0:
            with torch.no_grad(), torch.autocast(device, enabled=dtype is not None, dtype=dtype):
                probe = head.logits(hidden[:1].detach())
            # The model post-processes in the lm_head's dtype (bf16 under autocast), the head in fp32.
            tol = 1e-5 if dtype is None else 2e-2
            if not torch.allclose(out.detach().float(), probe, rtol=tol, atol=tol):
                raise JobFailed(
                    f"{bare.config.model_type}: the model post-processes its logits in a way the "
                    'chunked loss does not; train with extra_body.openft.loss_kernel = "plain"',
                    code="unsupported_parameter",
                    param="openft.loss_kernel",
                )
            self._checked.append(True)
        return hidden, head


def valid_every(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Steps between periodic validations: ``cfg.valid_every``, else about
    :data:`VALID_EVALS_PER_RUN` per run and at least one per epoch."""
    return cfg.valid_every or max(1, min(steps_per_epoch, math.ceil(total_steps / VALID_EVALS_PER_RUN)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the loop itself
        pass


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """``(bf16, gradient_checkpointing)``: bf16 ``None`` means on where the GPU supports it; CPU
    always trains in fp32 (its bf16 autocast is slow and only loses precision). Checkpointing is
    what the memory plan chose (``None``: off; it costs ~20-30% per step when memory fits)."""
    cuda = device.type == "cuda"
    bf16 = cuda and (cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_bf16_supported())
    return bf16, bool(cfg.gradient_checkpointing)


def _build_model(
    cfg: TrainConfig, *, bf16: bool, gradient_checkpointing: bool, attn_implementation: str
) -> tuple[Any, Any]:
    """Base (or ``init_weights``) model made trainable: fresh LoRA, a continued adapter, or full weights.

    LoRA under bf16 loads the frozen base in bf16 (half the memory) and keeps every trainable
    weight in fp32; full fine-tuning keeps fp32 master weights and relies on autocast.
    """
    dtype = torch.bfloat16 if bf16 and cfg.lora is not None else None
    continuing_adapter = cfg.init_weights is not None and weights_kind(cfg.init_weights) == "adapter"
    # FSDP: the whole model would not fit the device; ``distributed.shard`` moves it there in shards.
    # Every rank builds the architecture on the meta device; with safetensors weights each rank
    # then reads only its own slices (``fsdp_io``), else rank 0 reads them all (into host memory)
    # and the others receive their shards from it.
    fsdp = cfg.parallelism == "fsdp" and distributed.world_size() > 1
    load = functools.partial(
        load_model,
        cfg.base_model,
        cfg.init_weights,
        device="cpu" if fsdp else cfg.device,
        dtype=dtype,
        trainable=True,
        attn_implementation=attn_implementation,
    )
    model, processor = load(weights=not fsdp)
    sliced = fsdp and not continuing_adapter and fsdp_io.slices_cover(model, model.name_or_path)
    materialised = not fsdp or (distributed.is_main() and not sliced)
    if fsdp and materialised:
        model, processor = load(weights=True)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it works with frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None and not continuing_adapter:
        plan = lora_plan(
            model, cfg.lora, train_vision_tower=cfg.train_vision_tower, train_projector=cfg.train_projector
        )
        model = apply_lora(model, plan)
    elif cfg.lora is None and continuing_adapter and materialised:
        model = merge(model)  # full fine-tuning continues from base + adapter folded together
    if cfg.lora is None:
        set_full_trainable(model, train_vision_tower=cfg.train_vision_tower)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # AdamW on bf16 weights loses small updates
    if sliced:
        fsdp_io.align_frozen_dtypes(model, model.name_or_path)
    model.train()
    return model, processor


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy to ``device``; from pinned memory the copy is asynchronous (no host sync)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fixed_sample(items: list[T], n: int, seed: int) -> list[T]:
    """The same ``n`` items every call (seeded), in their original order."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(f"openft-valid:{seed}").sample(range(len(items)), n))]


def run_fingerprint(cfg: TrainConfig, lengths: list[int]) -> str:
    """What must not change between a run and its resumption: data, batch order and schedule."""
    what = {
        "lengths": lengths,
        "batch_size": cfg.batch_size,
        "n_epochs": cfg.n_epochs,
        "seed": cfg.seed,
        "learning_rate": cfg.learning_rate,
        "lora": cfg.lora is not None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
