"""``JobReporter``: the training ``Reporter`` that writes events, checkpoints and the results CSV."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

from openft.storage import repo
from openft.storage.blobs import BlobStore
from openft.storage.db import Database
from openft.storage.tables import Job
from openft.worker.checkpoints import store_checkpoint
from openft.worker.queue import JobLease

# OpenAI's results CSV columns, in order, and the metric each is read from.
CSV_COLUMNS = {
    "step": "step",
    "train_loss": "train_loss",
    "train_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
}
# openft extension: DPO jobs add the preference quantities after OpenAI's columns.
DPO_CSV_COLUMNS = (
    "rewards_chosen",
    "rewards_rejected",
    "reward_margin",
    "reward_accuracy",
    "valid_reward_margin",
    "valid_reward_accuracy",
)
# Above this many steps, metrics events are thinned (the CSV still has every step).
MAX_METRIC_EVENTS = 500


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


class JobReporter:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        job: Job,
        model_name: str,
        lease: JobLease,
        keep_checkpoints: int,
    ) -> None:
        self._db, self._blobs, self._job, self._lease = db, blobs, job, lease
        self.model_name = model_name
        self._keep_checkpoints = keep_checkpoints
        self.last_checkpoint_key: str | None = None
        self.last_metrics: dict[str, Any] = {}
        self._started = time.time()
        self._last_eta_write = 0.0

    # -- Reporter protocol -------------------------------------------------------------

    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        with self._db.session() as s:
            repo.append_event(s, job_id=self._job.id, message=message, level=level, once=once)

    def on_step(self, metrics: dict[str, float | int]) -> None:
        step, total = int(metrics["step"]), int(metrics["total_steps"])
        self.last_metrics = dict(metrics)
        every = max(1, math.ceil(total / MAX_METRIC_EVENTS))
        now = time.time()
        with self._db.session() as s:
            repo.record_step(
                s, job_id=self._job.id, step=step, data={k: v for k, v in metrics.items() if k != "step"}
            )
            if step % every == 0 or step == total or "valid_loss" in metrics:
                parts = [f"training loss={_fmt(metrics.get('train_loss'))}"]
                if metrics.get("valid_loss") is not None:
                    parts.append(f"validation loss={_fmt(metrics['valid_loss'])}")
                data = {k: v for k, v in metrics.items() if k != "epoch"}
                repo.append_event(
                    s,
                    job_id=self._job.id,
                    type="metrics",
                    message=f"Step {step}/{total}: " + ", ".join(parts),
                    data=data,
                    once=f"metrics:{step}",  # a step replayed after a crash is announced once
                )
            if now - self._last_eta_write > 2.0:
                # Keep estimated_finish current: linear extrapolation from the steps done so far.
                eta = int(self._started + (now - self._started) * total / max(step, 1))
                repo.transition(
                    s,
                    job_id=self._job.id,
                    worker_id=self._lease.worker_id,
                    frm=("running",),
                    estimated_finish=eta,
                )
                self._last_eta_write = now

    def on_checkpoint(
        self, weights_dir: Path, *, step: int, epoch: int, metrics: dict[str, float | int]
    ) -> None:
        keep = {
            k: v for k, v in metrics.items() if k not in ("step", "total_steps", "epoch", "trained_tokens")
        }
        self.last_checkpoint_key = store_checkpoint(
            self._db,
            self._blobs,
            job=self._job,
            model_name=self.model_name,
            weights_dir=weights_dir,
            step=step,
            metrics=keep,
            keep=self._keep_checkpoints,
        )

    def should_stop(self) -> bool:
        return self._lease.should_stop

    # -- results -------------------------------------------------------------------------

    def results_csv(self) -> bytes:
        """OpenAI's results CSV, from every recorded step (also those run before a pause or restart)."""
        with self._db.session() as s:
            steps = repo.step_metrics(s, job_id=self._job.id)
        columns = dict(CSV_COLUMNS)
        if self._job.method_type == "dpo":
            columns |= {name: name for name in DPO_CSV_COLUMNS}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for m in steps:
            writer.writerow(["" if m.get(key) is None else m[key] for key in columns.values()])
        return buf.getvalue().encode()
