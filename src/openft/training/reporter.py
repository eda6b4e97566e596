"""How a recipe talks to whoever runs it (the worker writes events; tests record calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        """A human-readable progress line (``level``: info | warn | error). ``once``: a key for a line
        that belongs to the job, not to this run (e.g. what trains), so a resumed run does not repeat it."""

    def on_step(self, metrics: dict[str, float | int]) -> None:
        """After every optimizer step. Keys: step, total_steps, epoch, train_loss,
        train_mean_token_accuracy, trained_tokens (cumulative)."""

    def on_checkpoint(
        self, weights_dir: Path, *, step: int, epoch: int, metrics: dict[str, float | int]
    ) -> None:
        """A servable weights folder was written (adapter or full weights + processor + openft.json)."""

    def should_stop(self) -> bool:
        """Polled every step; True makes the recipe raise ``openft.errors.JobCancelled``."""


@dataclass
class ListReporter:
    """Records every call; for tests. ``stop_after`` steps makes ``should_stop`` return True."""

    stop_after: int | None = None
    messages: list[tuple[str, str]] = field(default_factory=list)
    once_keys: list[str] = field(default_factory=list)
    steps: list[dict[str, float | int]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        self.messages.append((level, message))
        if once is not None:
            self.once_keys.append(once)

    def on_step(self, metrics: dict[str, float | int]) -> None:
        self.steps.append(dict(metrics))

    def on_checkpoint(
        self, weights_dir: Path, *, step: int, epoch: int, metrics: dict[str, float | int]
    ) -> None:
        self.checkpoints.append(
            {"weights_dir": Path(weights_dir), "step": step, "epoch": epoch, "metrics": dict(metrics)}
        )

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.steps) >= self.stop_after
