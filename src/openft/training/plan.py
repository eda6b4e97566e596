"""Training policy: what a job trains and how, decided from typed facts before anything loads.

:func:`plan_training` is pure (no torch, no database): the job's facts, the training file's
statistics and the base model's family in, a :class:`TrainingPlan` out. It decides

- **LoRA or full**: the user's ``training_type``; ``auto`` continues the way an ``ft:`` parent was
  trained (its adapter, or all its weights), else full for the random-init tiny model (LoRA on
  frozen random weights barely learns) and LoRA for real pretrained bases;
- **refusals**: LoRA on top of a fully fine-tuned parent is not supported;
- **hyperparameters**: ``"auto"`` resolved from the dataset (``training.hparams``);
- **base learning rate**: by training type, family, and whether the base is pretrained.

:func:`plan_memory` then fits the batch into the device's memory (micro-batches with gradient
accumulation, or a clear failure) from the base model's shapes, and :func:`plan_parallelism`
decides how a job on several processes splits the work (DDP or FSDP2, see there) with the memory
plan that goes with it. The worker only orchestrates: it gathers the facts, calls these, announces
the plan and runs the recipe with :meth:`TrainingPlan.train_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openft.errors import InvalidRequest, JobFailed
from openft.settings import TINY_MODEL, TINY_TEXT_MODELS
from openft.training.config import LoraConfig, TrainConfig
from openft.training.hparams import DatasetStats, Hyperparameters, advice, base_learning_rate, resolve_hparams

TrainingType = Literal["lora", "full"]
Parallelism = Literal["single", "ddp", "fsdp"]
LossKernel = Literal["auto", "chunked", "plain", "liger"]

__all__ = [
    "DatasetStats",
    "JobFacts",
    "MemoryPlan",
    "ParallelPlan",
    "TrainingPlan",
    "choose_parallelism",
    "plan_loss_kernel",
    "plan_memory",
    "plan_parallelism",
    "plan_training",
]


@dataclass(frozen=True)
class JobFacts:
    """What the job asks for, as stored on it (and, for an ``ft:`` parent, how it was trained)."""

    base_model: str
    """The root base model's catalog name (``openft-tiny-vlm``, a Hugging Face id, a folder)."""
    method: Literal["supervised", "dpo"]
    requested: Mapping[str, Any] = field(default_factory=dict)
    """The user's hyperparameters: numbers or ``"auto"`` (missing means ``"auto"``)."""
    training_type: Literal["auto", "lora", "full"] = "auto"
    train_vision_tower: bool = False
    train_projector: bool = False
    cache_vision_features: Literal["auto", "on", "off"] = "auto"
    loss_kernel: LossKernel = "auto"
    init_model: str | None = None
    """The ``ft:`` model the job continues from, if any."""
    parent_kind: Literal["adapter", "full"] | None = None
    """How ``init_model`` was trained: its weights folder holds an adapter or full weights."""
    max_length: int = 2048
    """The job's length limit (``models.validation.length_limit``): longer examples are truncated."""
    catalog_training_type: Literal["auto", "lora", "full"] = "auto"
    """What ``training_type: "auto"`` means for this base (its catalog entry); ``auto``: openft's rule."""
    catalog_learning_rate: float | None = None
    """The catalog entry's base learning rate; None: openft's table."""
    lora_rank: int | None = None
    """The catalog entry's LoRA rank (alpha twice it); None: ``LoraConfig``'s default."""
    bf16: bool | None = None
    """The catalog entry's CUDA precision (``dtype``); None: by device."""


@dataclass(frozen=True)
class TrainingPlan:
    training_type: TrainingType
    hyperparameters: Hyperparameters
    base_learning_rate: float
    """The rate a ``learning_rate_multiplier`` of 1 stands for."""
    lora: LoraConfig | None
    train_vision_tower: bool = False
    train_projector: bool = False
    max_length: int = 2048
    bf16: bool | None = None
    cache_vision_features: Literal["auto", "on", "off"] = "auto"
    loss_kernel: LossKernel = "auto"
    """As asked (``openft.loss_kernel``); the worker resolves it (``training.setup.planned_loss_kernel``)."""

    @property
    def learning_rate(self) -> float:
        return self.base_learning_rate * self.hyperparameters.learning_rate_multiplier

    def announcement(self) -> str:
        """The "Fine-tuning job started" event: the resolved values and how to adjust them."""
        hp = self.hyperparameters
        return (
            f"Fine-tuning job started ({self.training_type}): n_epochs={hp.n_epochs}, "
            f"batch_size={hp.batch_size}, learning_rate_multiplier={hp.learning_rate_multiplier} "
            f"(base learning rate {self.base_learning_rate:g}). {advice(hp)}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The announcement's data, for storage."""
        return {
            "hyperparameters": self.hyperparameters.to_dict(),
            "training_type": self.training_type,
            "base_learning_rate": self.base_learning_rate,
        }

    def train_config(
        self,
        *,
        base_model: str,
        output_dir: Path,
        seed: int,
        device: str,
        init_weights: Path | None,
        micro_batch_size: int | None,
        gradient_checkpointing: bool = False,
        parallelism: Parallelism = "single",
    ) -> TrainConfig:
        """The recipe's configuration: this plan on a resolved base folder, device and work dir."""
        return TrainConfig(
            base_model=base_model,
            output_dir=output_dir,
            n_epochs=self.hyperparameters.n_epochs,
            batch_size=self.hyperparameters.batch_size,
            learning_rate=self.learning_rate,
            seed=seed,
            lora=self.lora,
            micro_batch_size=micro_batch_size,
            gradient_checkpointing=gradient_checkpointing,
            init_weights=init_weights,
            device=device,
            train_vision_tower=self.train_vision_tower,
            train_projector=self.train_projector,
            max_length=self.max_length,
            bf16=self.bf16,
            parallelism="fsdp" if parallelism == "fsdp" else "ddp",
            cache_vision_features=self.cache_vision_features,
            loss_kernel=self.loss_kernel,
        )


def default_training_type(base_model: str) -> TrainingType:
    """``"full"`` for the tiny random-init model (LoRA on frozen random weights barely learns),
    ``"lora"`` for real pretrained bases."""
    return "full" if is_tiny(base_model) else "lora"


def is_tiny(base_model: str) -> bool:
    """A built-in random-init model (the tiny VLM, a tiny text model), by catalog name or as a
    folder of that name."""
    name = Path(str(base_model).rstrip("/")).name
    return name == TINY_MODEL or name in TINY_TEXT_MODELS


def plan_training(job: JobFacts, stats: DatasetStats, *, family: str | None) -> TrainingPlan:
    """Decide what trains and how (the module docstring); raises ``JobFailed`` for a refusal."""
    training_type: TrainingType
    if job.training_type == "auto":
        # Continue the way the parent was trained: an adapter on its base, or all weights.
        # Else the catalog entry's default, else openft's rule.
        if job.parent_kind == "full":
            training_type = "full"
        elif job.catalog_training_type != "auto":
            training_type = job.catalog_training_type
        else:
            training_type = default_training_type(job.base_model)
    elif job.training_type == "lora" and job.parent_kind == "full":
        raise JobFailed(
            f"Model {job.init_model} was fully fine-tuned, and LoRA on top of it is not supported yet; "
            "continue it with training_type 'full' or 'auto'.",
            code="invalid_training_type",
            param="openft.training_type",
        )
    else:
        training_type = job.training_type
    hp = resolve_hparams(
        dict(job.requested),
        n_examples=stats.examples,
        training_type=training_type,
        method=job.method,
        stats=stats,
        pretrained=not is_tiny(job.base_model),  # a random-init base needs more passes over images
    )
    return TrainingPlan(
        training_type=training_type,
        hyperparameters=hp,
        base_learning_rate=job.catalog_learning_rate
        or base_learning_rate(training_type, family=family, pretrained=not is_tiny(job.base_model)),
        lora=_lora(job.lora_rank) if training_type == "lora" else None,
        train_vision_tower=job.train_vision_tower,
        train_projector=job.train_projector,
        max_length=job.max_length,
        bf16=job.bf16,
        cache_vision_features=job.cache_vision_features,
        loss_kernel=job.loss_kernel,
    )


def _lora(rank: int | None) -> LoraConfig:
    return LoraConfig(r=rank, alpha=2 * rank) if rank else LoraConfig()


def plan_loss_kernel(model: Any, plan: TrainingPlan, *, device: str) -> str:
    """The loss kernel ``plan.loss_kernel`` resolves to for ``model`` (a meta-device model is
    enough) on ``device``, one process (under FSDP the recipe falls back to plain, see
    :func:`plan_parallelism`): what the memory plan counts logits for. A kernel this worker cannot
    run (Liger without CUDA or liger-kernel, an lm_head the loss cannot take out) fails the job
    here, before anything loads: only the worker that takes the job knows its device."""
    from openft.training.setup import planned_loss_kernel

    try:
        kernel, _ = planned_loss_kernel(plan.loss_kernel, model, device.split(":")[0])
    except ValueError as exc:
        raise JobFailed(f"openft.{exc}.", code="unsupported_parameter", param="openft.loss_kernel") from exc
    return kernel


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch_size: int | None
    """Examples per forward pass; None when the whole batch fits at once."""
    grad_accum_steps: int
    estimate_bytes: int
    available_bytes: int
    device: str
    longest_example: int
    batch_size: int
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: only when not even one example fits without."""

    def announcement(self) -> str:
        gib = 1024**3
        message = (
            f"Estimated peak training memory {self.estimate_bytes / gib:.2f} GiB of "
            f"{self.available_bytes / gib:.2f} GiB available on {self.device} "
            f"(longest example {self.longest_example} tokens)."
        )
        if self.gradient_checkpointing:
            message += " Gradient checkpointing is on: without it not even one example would fit."
        if self.grad_accum_steps > 1:
            message += (
                f" Training in micro-batches of {self.micro_batch_size} with {self.grad_accum_steps} "
                f"gradient-accumulation steps, so the effective batch_size stays {self.batch_size}."
            )
        return message

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate_bytes": self.estimate_bytes,
            "available_bytes": self.available_bytes,
            "micro_batch_size": self.micro_batch_size or self.batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "gradient_checkpointing": self.gradient_checkpointing,
        }


def plan_memory(
    model: Any,
    plan: TrainingPlan,
    stats: DatasetStats,
    *,
    dpo: bool,
    device: str,
    limit_bytes: int | None,
    shards: int = 1,
    loss_kernel: str = "plain",
) -> MemoryPlan:
    """Predict peak memory for ``model`` (shapes only: a meta-device model is enough) before
    spending any compute: split the batch into micro-batches with gradient accumulation when it
    would not fit in ``limit_bytes`` (default: what ``device`` has free), or fail with advice.

    Gradient checkpointing (~20-30% slower steps) is chosen only when it is needed: when not even
    a micro-batch of one fits without it. Accumulating more micro-batches costs no extra FLOPs.
    ``shards``: the FSDP ranks that split weights, gradients and optimizer state (1: none).
    ``loss_kernel``: the one that will run (``"plain"``, ``"chunked"``, ``"liger"``): the chunked
    kernels hold one block of logits, not every labelled position's, so long sequences with a
    large vocabulary need neither checkpointing nor micro-batches for the logits' sake."""
    from openft.training.memory import available_bytes, plan_for_model

    available = limit_bytes or available_bytes(device)
    batch_size = plan.hyperparameters.batch_size

    def fit(checkpointing: bool) -> tuple[int, int, Any]:
        return plan_for_model(
            model,
            batch_size=batch_size,
            seq_len=min(stats.tokens_max, plan.max_length),  # longer examples are truncated
            image_tokens=min(stats.tokens_max, plan.max_length) if stats.images else 0,
            lora_rank=plan.lora.r if plan.lora else None,
            lora_targets=plan.lora.target_modules if plan.lora else (),
            dpo=dpo,
            gradient_checkpointing=checkpointing,
            available=available,
            shards=shards,
            loss_kernel=loss_kernel,
            labelled_len=stats.trained_max,  # from the validation counts: a long prompt with a short
        )  # answer holds the answer's logits only (a loss over labelled positions)

    checkpointing = False
    try:
        try:
            micro, accum, estimate = fit(False)
        except InvalidRequest:
            checkpointing = True
            micro, accum, estimate = fit(True)
    except InvalidRequest as exc:
        raise JobFailed(
            f"The job would run out of memory on {device}: {exc.message}.",
            code="insufficient_memory",
            param="training_file",
        ) from exc
    return MemoryPlan(
        micro_batch_size=micro if accum > 1 else None,
        grad_accum_steps=accum,
        estimate_bytes=estimate.total,
        available_bytes=available,
        device=device,
        longest_example=stats.tokens_max,
        batch_size=batch_size,
        gradient_checkpointing=checkpointing,
    )


@dataclass(frozen=True)
class ParallelPlan:
    parallelism: Parallelism
    memory: MemoryPlan
    """The memory plan for one rank under ``parallelism``."""
    nproc: int
    requested: Literal["auto", "ddp", "fsdp"] = "auto"

    def announcement(self) -> str:
        if self.parallelism == "single":
            message = "Training on 1 process."
            if self.requested != "auto":
                message += (
                    f" parallelism '{self.requested}' has no effect here: this worker runs each job on "
                    "one process (start it with --nproc N to use N processes)."
                )
            return message
        if self.parallelism == "ddp":
            return (
                f"Training on {self.nproc} processes with DDP: every process holds the whole model and "
                "takes its share of each batch."
            )
        return (
            f"Training on {self.nproc} processes with FSDP2 (fully_shard per transformer block): "
            f"weights, gradients and optimizer state are split {self.nproc} ways"
            + (" because they do not fit one device." if self.requested == "auto" else ".")
        )

    def to_dict(self) -> dict[str, Any]:
        return {"parallelism": self.parallelism, "nproc": self.nproc}


def choose_parallelism(
    requested: Literal["auto", "ddp", "fsdp"],
    *,
    training_type: TrainingType,
    nproc: int,
    fits_one_device: bool,
) -> Parallelism:
    """How a job on ``nproc`` processes splits the work; raises ``JobFailed`` for a refusal.

    - one process: ``"single"`` (nothing to split; the announcement says so when something was asked);
    - ``requested`` ``"ddp"`` / ``"fsdp"`` (the job's ``openft.parallelism``): honoured, except FSDP
      with LoRA, refused (the adapter's save, the DPO reference with the adapter disabled and the
      frozen base's dtype all assume an unsharded model; a LoRA's training state is small, so
      DDP's replicas cost little);
    - ``"auto"``: DDP for LoRA; for full fine-tuning, FSDP2 only when the training state does not
      fit one device without gradient checkpointing (``fits_one_device``, from the memory planner),
      else DDP. Not "always FSDP for full": when the model fits, DDP moves less data (one gradient
      all-reduce per step, against FSDP's weight all-gather in forward and again in backward plus a
      gradient reduce-scatter per micro-batch, about 1.5x the bytes) and overlaps it with the
      backward more simply, so it is the faster of the two; sharding pays only when it is the
      difference between fitting and not (or having to recompute activations).
    """
    if requested == "fsdp" and training_type == "lora":  # refused on any worker, one process or not
        raise JobFailed(
            "parallelism 'fsdp' is supported for full fine-tuning only, and this job trains a LoRA "
            "adapter; use parallelism 'ddp' (or 'auto'), or training_type 'full'.",
            code="unsupported_parameter",
            param="openft.parallelism",
        )
    if nproc <= 1:
        return "single"
    if requested != "auto":
        return requested
    return "fsdp" if training_type == "full" and not fits_one_device else "ddp"


def plan_parallelism(
    model: Any,
    plan: TrainingPlan,
    stats: DatasetStats,
    *,
    requested: Literal["auto", "ddp", "fsdp"],
    nproc: int,
    dpo: bool,
    device: str,
    limit_bytes: int | None,
    loss_kernel: str = "plain",
) -> ParallelPlan:
    """:func:`choose_parallelism` with the memory plan that goes with it: the one-device plan
    decides whether the model fits; under FSDP the batch is planned again with the training state
    split ``nproc`` ways. A job that fits neither way fails with the one-device plan's advice.

    ``loss_kernel``: the one that runs unsharded; FSDP shards the lm_head, so its plan counts the
    plain kernel's logits, and a job that asked for ``chunked`` or ``liger`` is refused there."""
    try:
        single: MemoryPlan | None = plan_memory(
            model, plan, stats, dpo=dpo, device=device, limit_bytes=limit_bytes, loss_kernel=loss_kernel
        )
        too_big: JobFailed | None = None
    except JobFailed as exc:
        single, too_big = None, exc
    parallelism = choose_parallelism(
        requested,
        training_type=plan.training_type,
        nproc=nproc,
        fits_one_device=single is not None and not single.gradient_checkpointing,
    )
    if parallelism == "fsdp":
        if plan.loss_kernel in ("chunked", "liger"):
            raise JobFailed(
                f"openft.loss_kernel '{plan.loss_kernel}' cannot run under FSDP (it shards the lm_head), "
                "and this full fine-tuning job needs FSDP on this worker"
                + (" to fit" if requested == "auto" else "")
                + "; use loss_kernel 'auto' or 'plain', or parallelism 'ddp'.",
                code="unsupported_parameter",
                param="openft.loss_kernel",
            )
        memory = plan_memory(
            model,
            plan,
            stats,
            dpo=dpo,
            device=device,
            limit_bytes=limit_bytes,
            shards=nproc,
            loss_kernel="plain",
        )
    elif single is not None:
        memory = single
    else:
        assert too_big is not None
        raise too_big
    return ParallelPlan(parallelism=parallelism, memory=memory, nproc=nproc, requested=requested)
