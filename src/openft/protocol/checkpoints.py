"""``fine_tuning.job.checkpoint``: a servable model saved at an epoch end."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from openft.protocol.common import FirstLastListResponse, OmitUnset


class CheckpointMetrics(OmitUnset):
    omit_if_none = (
        "step",
        "train_loss",
        "train_mean_token_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
        "full_valid_loss",
        "full_valid_mean_token_accuracy",
    )

    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class FineTuningJobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    """Servable model name: ``ft:...:ckpt-step-<N>``."""
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class CheckpointList(FirstLastListResponse[FineTuningJobCheckpoint]):
    pass
