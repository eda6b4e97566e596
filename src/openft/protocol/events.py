"""``fine_tuning.job.event``: one line of a job's log (messages and per-step metrics)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from openft.protocol.common import ListResponse

Level = Literal["info", "warn", "error"]


class FineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Level
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None
    """For ``metrics`` events: step, train_loss, train_mean_token_accuracy, total_steps, ..."""


class EventList(ListResponse[FineTuningJobEvent]):
    pass
