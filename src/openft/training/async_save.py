"""Resumable state saves that do not stall training: copy to CPU now, write in the background.

A full fine-tune's state (fp32 weights + two AdamW moments, 12 bytes per parameter) is ~18 GB for
a 1.5B model; writing and fsyncing it stalls the step for seconds each time. A periodic save
instead takes a :func:`snapshot` (a CPU copy of the trainable weights, optimizer and scheduler
state, so the next steps may update the originals) and hands ``state.save_state`` over that copy
to a :class:`StateWriter`, whose single thread writes it with the same tmp-folder + fsync + rename
as a synchronous save: a process killed mid-write leaves the previous state in place.

At most one write is in flight: a new one first waits for the last, and a failed write is raised
(as :class:`StateSaveError`) by the next save, by :meth:`StateWriter.wait`, or when the run leaves
the writer's ``with`` block, so a lost save fails the job instead of going unnoticed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import torch

log = logging.getLogger(__name__)


class StateSaveError(RuntimeError):
    """A background state write failed: the job stops rather than train on without a resumable state."""


class StateWriter:
    """One background writer thread for a run's state saves (a context manager: leaving it waits
    for the last write and raises its error)."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
        self._what = ""

    def submit(self, write: Callable[[], Any], what: str) -> None:
        """Run ``write`` (it must only touch copies) in the background, after the previous write."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openft-state-save")
        self._pending, self._what = self._executor.submit(write), what

    def wait(self) -> None:
        """Block until no write is in flight; raise :class:`StateSaveError` if the last one failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:
            raise StateSaveError(
                f"saving the resumable training state ({self._what}) failed: {type(exc).__name__}: {exc}"
            ) from exc

    def check(self) -> None:
        """Raise a finished write's failure now (cheap, never blocks): the run stops at the next
        step rather than at the next save."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def __enter__(self) -> StateWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:  # the run already failed: finish the write (the state it resumes from), keep its error
            self.close()
        except StateSaveError as save_error:
            log.error("%s (while the run was failing with %r)", save_error, exc)
            exc.add_note(str(save_error))


def snapshot(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> tuple[tuple[dict[str, torch.Tensor], dict[str, Any]], SavedScheduler]:
    """What ``state.save_state`` writes, copied to CPU: ``(weights, optimizer_state)`` to pass as
    its ``copied``, and a stand-in for ``scheduler``. (A sharded model's shards are copied by
    ``dcp.async_save`` instead: ``training.sharded_state``.)"""
    weights = {n: _cpu_copy(p) for n, p in model.named_parameters() if p.requires_grad}
    copied = (weights, _cpu_copy(optimizer.state_dict()))
    return copied, SavedScheduler(copy.deepcopy(scheduler.state_dict()))


class SavedScheduler:
    """A scheduler's ``state_dict`` as it was at the snapshot (what ``save_state`` asks it for)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _cpu_copy(value: Any) -> Any:
    """``value`` with every tensor copied to CPU (never aliasing the live one), containers rebuilt."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)
