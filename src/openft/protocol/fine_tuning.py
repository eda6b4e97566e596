"""Fine-tuning jobs: the create request, the ``fine_tuning.job`` object and its pieces."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from openft.errors import InvalidRequest
from openft.protocol.common import ListResponse, Request

Auto = Literal["auto"]


def _range(name: str, allowed: str) -> WrapValidator:
    """Replace pydantic's union noise ("Input should be 'auto' (and 1 more problem)") with the
    allowed range, under one stable code the API passes on as the error's ``code``."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "invalid_hyperparameter",
                "{name} must be {allowed}, got {got}",
                {"name": name, "allowed": allowed, "got": json.dumps(value)},
            ) from None

    return WrapValidator(check)


NEpochs = Annotated[Auto | Annotated[int, Field(ge=1, le=50)], _range("n_epochs", '1–50 or "auto"')]
BatchSize = Annotated[Auto | Annotated[int, Field(ge=1, le=256)], _range("batch_size", '1–256 or "auto"')]
LrMultiplier = Annotated[
    Auto | Annotated[float, Field(gt=0)], _range("learning_rate_multiplier", 'a number > 0 or "auto"')
]
Beta = Annotated[Auto | Annotated[float, Field(gt=0, le=2)], _range("beta", 'a number in (0, 2] or "auto"')]

# "paused" is not in the spec's enum, but the spec's own pause example returns it and the SDK accepts it.
JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES: tuple[str, ...] = ("validating_files", "queued", "running")
"""Statuses of a job a worker holds or may claim (paused jobs wait for a resume)."""


class _Strict(BaseModel):
    # Inside our own nested objects an unknown key is almost always a typo ("n_epoch"):
    # refuse it with its name rather than silently training with defaults.
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Strict):
    n_epochs: NEpochs = "auto"
    """Full passes over the training file (1-50)."""
    batch_size: BatchSize = "auto"
    """Examples per optimizer step (1-256)."""
    learning_rate_multiplier: LrMultiplier = "auto"
    """Scales the base learning rate of the model family and training type (> 0)."""


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Beta = "auto"
    """Strength of the pull towards the reference model (0 < beta <= 2); higher is more conservative."""


class SupervisedMethod(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_type(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "reinforcement":
            raise PydanticCustomError(
                "unsupported_method",
                "method type 'reinforcement' (reinforcement fine-tuning with graders) is not supported "
                "by openft yet; use 'supervised' or 'dpo'",
            )
        return data

    @model_validator(mode="after")
    def _fill(self) -> Method:
        if self.type == "supervised" and self.supervised is None:
            self.supervised = SupervisedMethod()
        if self.type == "dpo" and self.dpo is None:
            self.dpo = DpoMethod()
        return self

    @property
    def hyperparameters(self) -> SupervisedHyperparameters:
        section = self.supervised if self.type == "supervised" else self.dpo
        assert section is not None  # filled by _fill
        return section.hyperparameters


class OpenFTOptions(_Strict):
    """openft extension (not an OpenAI field): send with ``extra_body={"openft": {...}}``."""

    training_type: Literal["auto", "lora", "full"] = "auto"
    """``auto``: full fine-tuning for the tiny built-in model, LoRA for real models."""
    train_vision_tower: bool = False
    """Also train the vision encoder (LoRA on its linear layers, or all its weights in full fine-tuning)."""
    train_projector: bool = False
    """Also train the vision-to-language projector (e.g. Qwen2-VL's ``visual.merger``)."""
    max_length: int | None = Field(default=None, ge=16, le=1_048_576)
    """Length limit in tokens (images included): longer examples are truncated from the end.
    Default: the model catalog's ``max_length``, else the model's context length."""
    parallelism: Literal["auto", "ddp", "fsdp"] = "auto"
    """How a job on several processes (``openft worker --nproc N``) splits the work: ``ddp`` (every
    process holds the whole model), ``fsdp`` (FSDP2: weights, gradients and optimizer state split
    across the processes; full fine-tuning only), ``auto``: FSDP2 for full fine-tuning that does not
    fit one device, else DDP."""
    cache_vision_features: Literal["auto", "on", "off"] = "auto"
    """Run the frozen vision tower once per image and reuse its work every epoch and in validation:
    the same losses, no vision-tower pass after an image's first. With the projector frozen too
    (LoRA without ``train_projector``) the projected features are kept; when the projector trains
    (``train_projector``, or full fine-tuning) the tower's output is kept and the projector runs on
    it every step. ``auto``: on when the tower is frozen and what is kept fits a quarter of the
    host's free memory; ``on``: also beyond that budget (refused with ``train_vision_tower``);
    ``off``: never."""
    loss_kernel: Literal["auto", "chunked", "plain", "liger"] = "auto"
    """How the loss meets the vocabulary (the same loss up to float error): ``chunked`` never holds
    more than one ~256 MB block of fp32 logits; ``liger``: Liger's fused kernels (a CUDA worker with
    ``openft[gpu]`` installed, supported families; else the job fails before training, saying why);
    ``plain``: the labelled positions' full-vocabulary logits from the model (for a family whose
    logits the chunked loss refuses). ``auto``: Liger where it can run, else chunked, else plain.
    ``chunked`` and ``liger`` cannot run with ``parallelism: fsdp`` (it shards the lm_head)."""


class WandbIntegration(BaseModel):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] | None = None


class Integration(BaseModel):
    type: Literal["wandb"]
    wandb: WandbIntegration


class CreateFineTuningJobRequest(Request):
    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    """Part of the fine-tuned model name; letters, digits, ``-`` and ``_``."""
    seed: int | None = Field(default=None, ge=0, le=2147483647)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    integrations: list[Integration] | None = Field(default=None, max_length=5)
    method: Method | None = None
    hyperparameters: SupervisedHyperparameters | None = None
    """Deprecated by OpenAI: same as ``method.supervised.hyperparameters``."""
    openft: OpenFTOptions = Field(default_factory=OpenFTOptions)

    @model_validator(mode="after")
    def _check(self) -> CreateFineTuningJobRequest:
        if self.metadata and any(len(k) > 64 for k in self.metadata):
            raise ValueError("metadata keys must be at most 64 characters")
        return self

    def refuse_unsupported(self) -> None:
        """Raise ``InvalidRequest`` for a parameter openft would otherwise ignore."""
        if self.integrations:
            raise InvalidRequest(
                "'integrations' are not supported by openft (no Weights & Biases logging); remove them. "
                "Training metrics are the job's events (type 'metrics') and its result file.",
                param="integrations",
                code="unsupported_parameter",
            )
        if self.openft.parallelism == "fsdp" and self.openft.training_type == "lora":
            raise InvalidRequest(
                "openft.parallelism 'fsdp' is supported for full fine-tuning only; with training_type "
                "'lora' use parallelism 'ddp' or 'auto' (a LoRA adapter's training state is small), or "
                "set training_type 'full'.",
                param="openft.parallelism",
                code="unsupported_parameter",
            )
        if self.openft.parallelism == "fsdp" and self.openft.loss_kernel in ("chunked", "liger"):
            raise InvalidRequest(
                f"openft.loss_kernel '{self.openft.loss_kernel}' cannot run with parallelism 'fsdp' (FSDP "
                "shards the lm_head the loss takes out of the model); use loss_kernel 'auto' or 'plain', "
                "or parallelism 'ddp'.",
                param="openft.loss_kernel",
                code="unsupported_parameter",
            )
        if self.openft.cache_vision_features == "on" and self.openft.train_vision_tower:
            raise InvalidRequest(
                "openft.cache_vision_features 'on' needs a frozen vision tower, but this job trains it "
                "(train_vision_tower); use 'auto' or 'off', or leave the tower frozen.",
                param="openft.cache_vision_features",
                code="unsupported_parameter",
            )
        self.refuse_extra(
            hint=" (not supported by openft; its own options go in 'openft', e.g. "
            'extra_body={"openft": {...}})'
        )

    def resolved_method(self) -> Method:
        """The method, with the deprecated top-level hyperparameters folded in (no method = supervised).

        Top-level ``hyperparameters`` and ``method.*.hyperparameters`` that disagree are refused
        rather than one silently winning."""
        if self.method is not None:
            if self.hyperparameters is None:
                return self.method
            if self.method.type != "supervised":
                raise InvalidRequest(
                    f"top-level 'hyperparameters' apply to supervised fine-tuning only; with method type "
                    f"'{self.method.type}' put them in method.{self.method.type}.hyperparameters",
                    param="hyperparameters",
                    code="conflicting_hyperparameters",
                )
            section = self.method.supervised
            given = (
                section.hyperparameters if section and "hyperparameters" in section.model_fields_set else None
            )
            if given is not None and given != self.hyperparameters:
                raise InvalidRequest(
                    "top-level 'hyperparameters' (deprecated) and method.supervised.hyperparameters "
                    "disagree; send them in method.supervised.hyperparameters only",
                    param="hyperparameters",
                    code="conflicting_hyperparameters",
                )
            return Method(
                type="supervised", supervised=SupervisedMethod(hyperparameters=self.hyperparameters)
            )
        hp = self.hyperparameters or SupervisedHyperparameters()
        return Method(type="supervised", supervised=SupervisedMethod(hyperparameters=hp))


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    """``n_epochs``, ``batch_size``, ``learning_rate_multiplier``: ``"auto"`` until training resolves them."""
    model: str
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    integrations: list[Integration] | None = None
    seed: int
    estimated_finish: int | None = None
    method: dict[str, Any]
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class JobList(ListResponse[FineTuningJob]):
    pass
