"""Moving finished weights directories into blobs and recording them as servable models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from openft import ids
from openft.storage import repo
from openft.storage.blobs import BlobStore
from openft.storage.db import Database
from openft.storage.tables import Job


def store_checkpoint(
    db: Database,
    blobs: BlobStore,
    *,
    job: Job,
    model_name: str,
    weights_dir: Path,
    step: int,
    metrics: dict[str, Any],
    keep: int,
) -> str:
    """Store a checkpoint's weights, record it (servable as ``<model>:ckpt-step-N``), keep the
    newest ``keep`` (the run's ``keep_checkpoints``: the same ones stay on disk and in storage)."""
    key = blobs.put_dir(weights_dir)
    with db.session() as s:
        ckpt_name = ids.checkpoint_model_name(model_name, step)
        row, created = repo.add_checkpoint(
            s, job=job, step=step, metrics={"step": step, **metrics}, model_name=ckpt_name, weights=key
        )
        removed = repo.prune_checkpoints(s, job_id=job.id, keep=keep)
        repo.delete_unreferenced(s, blobs, weights=removed)  # older epochs' weights leave storage too
        if created:  # a checkpoint recorded again after a restart is announced once
            repo.append_event(
                s,
                job_id=job.id,
                message=f"Checkpoint created at step {step}: {ckpt_name}",
                data={"checkpoint_id": row.id, "step": step},
            )
    return key
