"""openft extensions under /v1 (not in OpenAI's API): a job's per-step metrics and a file's
validation report. Both are project-scoped like every other /v1 route."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class StepMetrics(BaseModel):
    """One training step as recorded by the worker (the rows of the results CSV, live)."""

    model_config = ConfigDict(extra="allow")  # DPO jobs add reward_* quantities

    step: int
    total_steps: int | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None


class StepMetricsList(BaseModel):
    """``GET /v1/fine_tuning/jobs/{id}/metrics``: every recorded step after ``after_step``, oldest first."""

    object: Literal["list"] = "list"
    data: list[StepMetrics]


class ValidationIssue(BaseModel):
    line: int
    """1-based line of the file (0 = the file as a whole)."""
    field: str
    """JSON path inside the line, e.g. ``messages[0].content[1].image_url.url``."""
    code: str
    """Stable issue code (``contains_faces``, ``invalid_structure``, ...)."""
    severity: Literal["error", "skip", "warning"]
    message: str
    thumbnail: str | None = None
    """For issues about an inline (``data:``) image: a small PNG of it as a data URL."""


class FileValidation(BaseModel):
    """``GET /v1/files/{id}/validation``: the report the worker computes before training."""

    object: Literal["file.validation"] = "file.validation"
    file_id: str
    method: Literal["supervised", "dpo"]
    ok: bool
    """Trainable: no errors and enough usable examples."""
    summary: dict[str, Any]
    issues: list[ValidationIssue]
