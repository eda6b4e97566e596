"""Fine-tuning jobs: the create request, the ``fine_tuning.job`` object and its pieces."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openft.protocol.common import ListResponse, Request

Auto = Literal["auto"]
NEpochs = Auto | Annotated[int, Field(ge=1, le=50)]
BatchSize = Auto | Annotated[int, Field(ge=1, le=256)]
LrMultiplier = Auto | Annotated[float, Field(gt=0)]
Beta = Auto | Annotated[float, Field(gt=0, le=2)]

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

    def resolved_method(self) -> Method:
        """The method, with the deprecated top-level hyperparameters folded in (no method = supervised)."""
        if self.method is not None:
            if self.hyperparameters is not None and self.method.type == "supervised":
                return Method(
                    type="supervised", supervised=SupervisedMethod(hyperparameters=self.hyperparameters)
                )
            return self.method
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
