"""All reads and writes of metadata, as keyword-only functions over a ``Session``.

Every lookup is scoped to a project: another project's rows are simply not found (404),
so isolation does not depend on each route remembering to check.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from openft import ids
from openft.errors import InvalidRequest, NotFound
from openft.protocol.checkpoints import CheckpointMetrics, FineTuningJobCheckpoint
from openft.protocol.events import FineTuningJobEvent
from openft.protocol.files import FileObject
from openft.protocol.fine_tuning import ACTIVE_STATUSES, TERMINAL_STATUSES, FineTuningJob, JobError
from openft.storage.blobs import BlobStore
from openft.storage.tables import ApiKey, Checkpoint, Event, File, FineTunedModel, Job, Project, StepMetric


def now() -> int:
    return int(time.time())


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


# ---------------------------------------------------------------- projects and keys


def create_api_key(s: Session, *, project_name: str) -> str:
    """Create the project if new and return a fresh key for it (only its hash is stored)."""
    project = s.scalar(select(Project).where(Project.name == project_name))
    if project is None:
        project = Project(id=ids.project_id(), name=project_name, created_at=now())
        s.add(project)
        s.flush()
    key = ids.api_key()
    s.add(ApiKey(project_id=project.id, key_hash=hash_key(key), prefix=key[:14], created_at=now()))
    return key


def list_api_keys(s: Session, *, project_name: str | None = None) -> list[tuple[ApiKey, Project]]:
    """Every key (revoked ones too) with its project, oldest first; optionally of one project."""
    q = select(ApiKey, Project).join(Project, Project.id == ApiKey.project_id)
    if project_name is not None:
        q = q.where(Project.name == project_name)
    return [(k, p) for k, p in s.execute(q.order_by(ApiKey.id))]


def revoke_api_key(s: Session, *, which: str) -> ApiKey:
    """Revoke one key named by its full text, its number or a prefix that matches only it."""
    if which.isdigit():
        rows = [r for r in [s.get(ApiKey, int(which))] if r is not None]
    elif len(which) > 32:  # a whole key: match its hash, never store or compare the text
        rows = list(s.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(which))))
    else:
        rows = list(s.scalars(select(ApiKey).where(ApiKey.prefix.startswith(which, autoescape=True))))
    if not rows:
        raise NotFound(f"No API key matches {which!r}; see 'openft keys list'.", param="key")
    if len(rows) > 1:
        raise InvalidRequest(
            f"{which!r} matches {len(rows)} keys ({', '.join(str(r.id) for r in rows)}); revoke by number.",
            param="key",
        )
    rows[0].revoked = True
    return rows[0]


def project_for_key(s: Session, *, key: str) -> Project | None:
    row = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked.is_(False)))
    return s.get(Project, row.project_id) if row else None


def get_project(s: Session, *, project_id: str) -> Project:
    project = s.get(Project, project_id)
    if project is None:
        raise NotFound(f"No such project: {project_id}")
    return project


# ---------------------------------------------------------------- pagination


def _after_clause(column_pairs: Sequence[tuple[Any, Any]], *, descending: bool):  # type: ignore[no-untyped-def]
    """Rows strictly after a cursor row in (k1, k2) order: a keyset, so pages never skip or repeat."""
    (c1, v1), (c2, v2) = column_pairs
    if descending:
        return or_(c1 < v1, and_(c1 == v1, c2 < v2))
    return or_(c1 > v1, and_(c1 == v1, c2 > v2))


# ---------------------------------------------------------------- files


def create_file(
    s: Session,
    *,
    project_id: str,
    filename: str,
    purpose: str,
    size: int,
    sha256: str,
    expires_at: int | None = None,
) -> File:
    row = File(
        id=ids.file_id(),
        project_id=project_id,
        filename=filename,
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        created_at=now(),
        created_ns=time.time_ns(),
        expires_at=expires_at,
    )
    s.add(row)
    s.flush()
    return row


def get_file(s: Session, *, project_id: str, file_id: str) -> File:
    row = s.get(File, file_id)
    if row is None or row.project_id != project_id or row.deleted:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return row


def file_blob(s: Session, *, file_id: str) -> str:
    """The blob key of a file, deleted or not: a job keeps reading the files it was created with
    (files are only soft-deleted). Raises ``NotFound`` for an id that never existed."""
    sha = s.scalar(select(File.sha256).where(File.id == file_id))
    if sha is None:
        raise NotFound(f"No such File object: {file_id}", param="file_id")
    return sha


def list_files(
    s: Session, *, project_id: str, purpose: str | None, limit: int, after: str | None, order: str
) -> tuple[list[File], bool]:
    desc = order == "desc"
    q = select(File).where(File.project_id == project_id, File.deleted.is_(False))
    if purpose:
        q = q.where(File.purpose == purpose)
    if after:
        cursor = get_file(s, project_id=project_id, file_id=after)
        q = q.where(
            _after_clause([(File.created_ns, cursor.created_ns), (File.id, cursor.id)], descending=desc)
        )
    keys = (File.created_ns.desc(), File.id.desc()) if desc else (File.created_ns, File.id)
    rows = list(s.scalars(q.order_by(*keys).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(s: Session, *, project_id: str, file_id: str) -> None:
    # Soft delete: running jobs keep reading the blob; the id is gone for the user at once.
    get_file(s, project_id=project_id, file_id=file_id).deleted = True


def file_to_protocol(row: File) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        filename=row.filename,
        purpose=row.purpose,  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------- jobs


def create_job(s: Session, **fields: Any) -> Job:
    row = Job(
        id=ids.job_id(),
        status="validating_files",
        created_at=now(),
        created_ns=time.time_ns(),
        result_files=[],
        **fields,
    )
    s.add(row)
    s.flush()
    append_event(s, job_id=row.id, message=f"Created fine-tuning job: {row.id}")
    append_event(s, job_id=row.id, message="Validating training file: " + row.training_file)
    return row


def get_job(s: Session, *, project_id: str, job_id: str) -> Job:
    row = s.get(Job, job_id)
    if row is None or row.project_id != project_id:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return row


def list_jobs(
    s: Session, *, project_id: str, limit: int, after: str | None, metadata: dict[str, str] | None
) -> tuple[list[Job], bool]:
    q = select(Job).where(Job.project_id == project_id)
    if after:
        cursor = get_job(s, project_id=project_id, job_id=after)
        q = q.where(
            _after_clause([(Job.created_ns, cursor.created_ns), (Job.id, cursor.id)], descending=True)
        )
    q = q.order_by(Job.created_ns.desc(), Job.id.desc())
    if metadata is None:
        rows = list(s.scalars(q.limit(limit + 1)))
        return rows[:limit], len(rows) > limit
    # JSON filtering differs between SQLite and PostgreSQL; filter in Python over the
    # project's jobs (a project's job count is small) so behaviour is identical on both.
    matched = [
        r
        for r in s.scalars(q)
        if (not metadata and not r.job_metadata)
        or (metadata and all((r.job_metadata or {}).get(k) == v for k, v in metadata.items()))
    ]
    return matched[:limit], len(matched) > limit


def job_to_protocol(row: Job, *, organization_id: str) -> FineTuningJob:
    hp = dict(row.hyperparameters)
    supervised_hp = {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    return FineTuningJob(
        id=row.id,
        created_at=row.created_at,
        error=JobError(**row.error) if row.error else None,
        fine_tuned_model=row.fine_tuned_model,
        finished_at=row.finished_at,
        hyperparameters=supervised_hp,
        model=row.model,
        organization_id=organization_id,
        result_files=list(row.result_files or []),
        status=row.status,  # type: ignore[arg-type]
        trained_tokens=row.trained_tokens,
        training_file=row.training_file,
        validation_file=row.validation_file,
        integrations=row.integrations or [],
        seed=row.seed,
        estimated_finish=row.estimated_finish if row.status in ("queued", "running") else None,
        method={"type": row.method_type, row.method_type: {"hyperparameters": hp}},
        metadata=row.job_metadata,
        user_provided_suffix=row.suffix,
    )


def cancel_job(s: Session, *, project_id: str, job_id: str) -> Job:
    """Cancel a job that has not finished. A running worker notices within a step and stops."""
    row = get_job(s, project_id=project_id, job_id=job_id)
    if row.status in TERMINAL_STATUSES:
        raise InvalidRequest(
            f"Job {job_id} has already {row.status if row.status != 'cancelled' else 'been cancelled'}; "
            "only validating_files, queued, running or paused jobs can be cancelled.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    row.status = "cancelled"
    row.finished_at = now()
    row.estimated_finish = None
    append_event(s, job_id=row.id, message="Fine-tuning job cancelled")
    return row


def pause_job(s: Session, *, project_id: str, job_id: str) -> Job:
    """Pause a queued or running job; a running worker saves full training state at the next step."""
    row = get_job(s, project_id=project_id, job_id=job_id)
    if row.status not in ("queued", "running"):
        raise InvalidRequest(
            f"Job {job_id} is {row.status}; only queued or running jobs can be paused.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    row.status = "paused"
    row.estimated_finish = None
    append_event(
        s, job_id=row.id, message="Fine-tuning job paused; resume it to continue from where it stopped."
    )
    return row


def resume_job(s: Session, *, project_id: str, job_id: str) -> Job:
    """Put a paused job back in the queue; the next worker continues from its saved state."""
    row = get_job(s, project_id=project_id, job_id=job_id)
    if row.status != "paused":
        raise InvalidRequest(
            f"Job {job_id} is {row.status}; only paused jobs can be resumed.",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
    row.status = "queued"
    row.worker_id = None
    row.lease_expires_at = None
    append_event(s, job_id=row.id, message="Fine-tuning job resumed")
    return row


def release_job(s: Session, *, job_id: str, worker_id: str) -> None:
    """Give up the claim on a job (e.g. after it paused) so any worker may take it later."""
    s.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id)
        .values(worker_id=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def jobs_held_by(s: Session, *, worker_prefixes: Sequence[str]) -> list[str]:
    """Ids of the active jobs whose worker id starts with one of ``worker_prefixes`` (``host:pid:``)."""
    if not worker_prefixes:
        return []
    held = or_(*(Job.worker_id.startswith(p, autoescape=True) for p in worker_prefixes))
    rows = s.scalars(
        select(Job.id).where(Job.status.in_(("validating_files", "running")), held).order_by(Job.id)
    )
    return list(rows)


Clock = Callable[[], float]
"""Seconds since the epoch (``time.time``); lease logic takes one so tests need not sleep."""


def claim_next_job(
    s: Session, *, worker_id: str, lease_seconds: float, clock: Clock = time.time
) -> Job | None:
    """Atomically take the oldest unclaimed (or abandoned) job; two workers never get the same one.

    The claim is a conditional UPDATE keyed on the job's previous owner and lease, so of two
    racing workers exactly one sees ``rowcount == 1``; it works the same on SQLite and PostgreSQL.
    It is made when the caller's session commits.
    """
    t = clock()
    candidates = s.scalars(
        select(Job)
        .where(
            Job.status.in_(ACTIVE_STATUSES),
            or_(Job.worker_id.is_(None), Job.lease_expires_at < t),
        )
        .order_by(Job.created_ns, Job.id)
        .limit(5)
    ).all()
    for job in candidates:
        owner_clause = Job.worker_id.is_(None) if job.worker_id is None else Job.worker_id == job.worker_id
        res = s.execute(
            update(Job)
            .where(Job.id == job.id, owner_clause, Job.status.in_(ACTIVE_STATUSES))
            .where(or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < t))
            .values(worker_id=worker_id, lease_expires_at=t + lease_seconds)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1:
            s.refresh(job)
            return job
    return None


def heartbeat(
    s: Session, *, job_id: str, worker_id: str, lease_seconds: float, clock: Clock = time.time
) -> str | None:
    """Extend the lease; returns the job's status (so the worker learns of a cancel), None if lost."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id)
        .values(lease_expires_at=clock() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        return None
    return s.scalar(select(Job.status).where(Job.id == job_id))


def transition(s: Session, *, job_id: str, worker_id: str, frm: Sequence[str], **values: Any) -> bool:
    """Move a job this worker owns from one of ``frm`` to new values; False if it changed meanwhile
    (e.g. the user cancelled), in which case nothing is written."""
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status.in_(tuple(frm)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


# ---------------------------------------------------------------- events


def append_event(
    s: Session,
    *,
    job_id: str,
    message: str,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
    once: str | None = None,
) -> bool:
    """Record an event; ``once`` is a key (``"metrics:12"``, ``"started"``) that makes it appear once
    per job: recording it again, as a resumed run does, changes nothing. Returns whether it was added.
    """
    values = {
        "id": ids.event_id(),
        "job_id": job_id,
        "created_at": now(),
        "level": level,
        "message": message,
        "type": type,
        "data": data,
        "dedup_key": once,
    }
    if once is None:
        s.add(Event(**values))
        s.flush()
        return True
    # Insert-if-absent on the unique (job_id, dedup_key) index: atomic on both databases, so two
    # writers racing (a worker and its replacement) still leave one row.
    dialect = {"sqlite": sqlite, "postgresql": postgresql}[s.get_bind().dialect.name]
    stmt = dialect.insert(Event.__table__).values(**values)
    stmt = stmt.on_conflict_do_nothing(index_elements=["job_id", "dedup_key"]).returning(Event.seq)
    return s.execute(stmt).first() is not None  # rowcount is not reliable under RETURNING


def _job_page(s: Session, table: Any, *, job_id: str, order: Any, limit: int, after: str | None, noun: str):  # type: ignore[no-untyped-def]
    """Newest-first page of a job's rows after the cursor row ``after`` (keyset on ``order``)."""
    q = select(table).where(table.job_id == job_id)
    if after:
        cursor = s.scalar(select(table).where(table.id == after, table.job_id == job_id))
        if cursor is None:
            raise NotFound(f"No such {noun}: {after}", param="after")
        q = q.where(order < getattr(cursor, order.key))
    rows = list(s.scalars(q.order_by(order.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_events(s: Session, *, job_id: str, limit: int, after: str | None) -> tuple[list[Event], bool]:
    return _job_page(s, Event, job_id=job_id, order=Event.seq, limit=limit, after=after, noun="event")


def event_to_protocol(row: Event) -> FineTuningJobEvent:
    return FineTuningJobEvent(
        id=row.id,
        created_at=row.created_at,
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        type=row.type,  # type: ignore[arg-type]
        data=row.data if row.data is not None else {},
    )


def record_step(s: Session, *, job_id: str, step: int, data: dict[str, Any]) -> None:
    s.merge(StepMetric(job_id=job_id, step=step, data=data))


def step_metrics(s: Session, *, job_id: str, after_step: int = 0) -> list[dict[str, Any]]:
    q = select(StepMetric).where(StepMetric.job_id == job_id, StepMetric.step > after_step)
    rows = s.scalars(q.order_by(StepMetric.step))
    return [{"step": r.step, **r.data} for r in rows]


# ---------------------------------------------------------------- checkpoints and models


def add_checkpoint(
    s: Session, *, job: Job, step: int, metrics: dict[str, Any], model_name: str, weights: str
) -> tuple[Checkpoint, bool]:
    """Record a checkpoint (and its servable model); ``(row, created)``. A step reported again
    after a crash replays the same epoch end: the existing row is updated, never duplicated."""
    existing = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step))
    if existing is not None:
        existing.metrics = metrics
        model = s.get(FineTunedModel, existing.model_name)
        if model is not None:
            model.weights = weights
        return existing, False
    row = Checkpoint(
        id=ids.checkpoint_id(),
        job_id=job.id,
        created_at=now(),
        step_number=step,
        metrics=metrics,
        model_name=model_name,
    )
    s.add(row)
    s.add(
        FineTunedModel(
            id=model_name,
            project_id=job.project_id,
            job_id=job.id,
            base_model=job.base_model,
            weights=weights,
            checkpoint_id=row.id,
            created_at=row.created_at,
        )
    )
    s.flush()
    return row, True


def prune_checkpoints(s: Session, *, job_id: str, keep: int) -> list[str]:
    """Keep the newest ``keep`` checkpoints of a job (as OpenAI: the last 3 epochs); returns the
    weights keys (directory manifests) of the removed ones, for ``delete_unreferenced``."""
    rows = list(
        s.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step_number.desc())
        )
    )
    removed = []
    for row in rows[keep:]:
        model = s.get(FineTunedModel, row.model_name)
        if model is not None:
            removed.append(model.weights)
            s.delete(model)
        s.delete(row)
    return removed


def delete_unreferenced(s: Session, blobs: BlobStore, *, weights: list[str]) -> int:
    """Delete the given weights directories' blobs that no live model or file still uses.

    Blobs are content-addressed and shared (every checkpoint of a base carries the same processor
    files), so a blob goes only when nothing else references it. Returns the number deleted.
    """
    s.flush()
    live: set[str] = set(s.scalars(select(File.sha256)))
    for key in s.scalars(select(FineTunedModel.weights).where(FineTunedModel.deleted.is_(False))):
        live.add(key)
        live.update(blobs.dir_members(key))
    deleted = 0
    for manifest in set(weights) - live:
        for member in [*blobs.dir_members(manifest), manifest]:
            if member not in live:
                blobs.delete(member)
                live.add(member)  # shared members of several removed dirs: delete once
                deleted += 1
    return deleted


def list_checkpoints(
    s: Session, *, job_id: str, limit: int, after: str | None
) -> tuple[list[Checkpoint], bool]:
    return _job_page(
        s,
        Checkpoint,
        job_id=job_id,
        order=Checkpoint.step_number,
        limit=limit,
        after=after,
        noun="checkpoint",
    )


def checkpoint_to_protocol(row: Checkpoint) -> FineTuningJobCheckpoint:
    metrics = {k: v for k, v in row.metrics.items() if k in CheckpointMetrics.model_fields}
    return FineTuningJobCheckpoint(
        id=row.id,
        created_at=row.created_at,
        fine_tuned_model_checkpoint=row.model_name,
        fine_tuning_job_id=row.job_id,
        step_number=row.step_number,
        metrics=CheckpointMetrics(**metrics),
    )


def register_model(s: Session, *, job: Job, model_name: str, weights: str) -> FineTunedModel:
    row = FineTunedModel(
        id=model_name,
        project_id=job.project_id,
        job_id=job.id,
        base_model=job.base_model,
        weights=weights,
        created_at=now(),
    )
    s.merge(row)
    s.flush()
    return row


def get_model(s: Session, *, project_id: str, model_id: str) -> FineTunedModel | None:
    row = s.get(FineTunedModel, model_id)
    if row is None or row.project_id != project_id or row.deleted:
        return None
    return row


def find_model(s: Session, *, model_id: str) -> FineTunedModel | None:
    """A live model by id in any project: for the operator's CLI on the server's own home."""
    row = s.get(FineTunedModel, model_id)
    return None if row is None or row.deleted else row


def list_models(s: Session, *, project_id: str) -> list[FineTunedModel]:
    q = select(FineTunedModel).where(
        FineTunedModel.project_id == project_id, FineTunedModel.deleted.is_(False)
    )
    return list(s.scalars(q.order_by(FineTunedModel.created_at, FineTunedModel.id)))
