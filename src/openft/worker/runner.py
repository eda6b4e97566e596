"""Run one claimed job: validate files -> resolve hyperparameters -> train -> record the model.

Every state change is a conditional update on a job this worker holds, so a cancel made
through the API meanwhile is never overwritten, and every step leaves an event behind.
"""

from __future__ import annotations

import io
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openft import ids
from openft.datasets.moderation import load_moderator
from openft.datasets.report import location
from openft.datasets.validate import ValidationResult, validate_file
from openft.errors import InvalidRequest, JobCancelled, JobFailed
from openft.protocol.fine_tuning import TERMINAL_STATUSES
from openft.settings import TINY_MODEL, Settings
from openft.storage import repo
from openft.storage.blobs import BlobStore
from openft.storage.db import Database
from openft.storage.tables import File, Job
from openft.training.config import LoraConfig, TrainConfig, default_training_type
from openft.training.hparams import DatasetStats, advice, base_learning_rate, resolve_hparams
from openft.worker.events import JobReporter
from openft.worker.queue import JobLease

log = logging.getLogger("openft.worker")

ACTIVE = ("validating_files", "queued", "running")
# Skips are reported one event each, up to this many; the summary event counts them all.
MAX_ISSUE_EVENTS = 50


@dataclass
class WorkerContext:
    settings: Settings
    db: Database
    blobs: BlobStore
    worker_id: str


def run_job(ctx: WorkerContext, job: Job, *, shutdown: threading.Event | None = None) -> None:
    """Run a job until it ends, pauses or is taken away. Never raises: a failing job must not take
    the worker down. ``shutdown`` set: stop at the next step, save state and requeue the job."""
    lease_seconds = ctx.settings.lease_seconds
    with JobLease(
        ctx.db, job_id=job.id, worker_id=ctx.worker_id, lease_seconds=lease_seconds, shutdown=shutdown
    ) as lease:
        try:
            _run(ctx, job, lease)
        except JobCancelled:
            if lease.lost.is_set():
                # Another worker owns the job now and continues from the saved state: leave it be.
                log.warning("job %s was taken over by another worker", job.id)
                return
            if lease.shutdown.is_set() and _status(ctx, job) in ACTIVE:
                with ctx.db.session() as s:
                    repo.transition(s, job_id=job.id, worker_id=ctx.worker_id, frm=ACTIVE, status="queued")
                    repo.release_job(s, job_id=job.id, worker_id=ctx.worker_id)
                    repo.append_event(
                        s,
                        job_id=job.id,
                        message="The worker stopped; the job is back in the "
                        "queue and continues from its saved state.",
                    )
                return
            if _status(ctx, job) == "paused":
                _event(ctx, job, "Training state saved; the job is paused.")
                with ctx.db.session() as s:
                    repo.release_job(s, job_id=job.id, worker_id=ctx.worker_id)
                return
            _event(ctx, job, "Training stopped at a step boundary after the job was cancelled.")
        except JobFailed as exc:
            _fail(ctx, job, code=exc.code or "failed", message=exc.message, param=exc.param)
        except Exception as exc:  # our bug or the environment's: record it, keep the worker alive
            log.exception("job %s crashed", job.id)
            _fail(
                ctx,
                job,
                code="server_error",
                message=f"Training failed with an internal error: {type(exc).__name__}: {exc}",
                param=None,
            )
    if _status(ctx, job) in TERMINAL_STATUSES:
        # Saved training state is only needed by a job that may still continue.
        shutil.rmtree(ctx.settings.work_dir / job.id, ignore_errors=True)


def _status(ctx: WorkerContext, job: Job) -> str:
    with ctx.db.session() as s:
        return repo.get_job(s, project_id=job.project_id, job_id=job.id).status


def _event(
    ctx: WorkerContext,
    job: Job,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
    once: str | None = None,
) -> None:
    """``once``: the event belongs to the job, not to this run; a resumed run does not repeat it."""
    with ctx.db.session() as s:
        repo.append_event(s, job_id=job.id, message=message, level=level, data=data, once=once)


def _move(ctx: WorkerContext, job: Job, frm: tuple[str, ...], **values: Any) -> None:
    with ctx.db.session() as s:
        if not repo.transition(s, job_id=job.id, worker_id=ctx.worker_id, frm=frm, **values):
            raise JobCancelled(job.id)


def _fail(ctx: WorkerContext, job: Job, *, code: str, message: str, param: str | None) -> None:
    with ctx.db.session() as s:
        if repo.transition(
            s,
            job_id=job.id,
            worker_id=ctx.worker_id,
            frm=ACTIVE,
            status="failed",
            error={"code": code, "message": message, "param": param},
            finished_at=repo.now(),
            estimated_finish=None,
        ):
            repo.append_event(s, job_id=job.id, level="error", message=message)


def _validate(ctx: WorkerContext, job: Job, file_id: str, *, param: str, processor: Any) -> ValidationResult:
    from openft.models.validation import model_validation_options

    with ctx.db.session() as s:
        row = s.get(File, file_id)
        assert row is not None  # checked at job creation; files are only soft-deleted
        sha = row.sha256
    options = model_validation_options(
        processor,
        moderator=load_moderator(ctx.settings.moderator) if ctx.settings.moderator else None,
        allow_private_networks=ctx.settings.allow_private_networks,
        image_sink=lambda _sha, data: ctx.blobs.put_bytes(
            data
        ),  # fetched images are kept; never re-downloaded
    )
    with ctx.blobs.open(sha) as fp:
        result = validate_file(io.BufferedReader(fp), method=job.method_type, options=options)  # type: ignore[arg-type]
    report = result.report
    summary = report.summary
    _event(
        ctx,
        job,
        f"Validated {param}: {summary['examples']} examples, {summary['usable_examples']} usable, "
        f"{summary['images']} images, {summary['skipped_examples']} skipped, {summary['errors']} errors.",
        data={"file": file_id, "summary": summary},
        once=f"validated:{param}",
    )
    shown = [i for i in report.issues if i.severity in ("skip", "warning")][:MAX_ISSUE_EVENTS]
    for n, issue in enumerate(shown):
        _event(
            ctx,
            job,
            f"{location(issue)}: {issue.message}",
            level="warn",
            data={"line": issue.line, "field": issue.field, "code": issue.code, "severity": issue.severity},
            once=f"issue:{param}:{n}",
        )
    if not report.ok:
        what = "training" if param == "training_file" else "validation"
        raise JobFailed(
            f"The job failed due to an invalid {what} file. {report.error_message()}",
            code=f"invalid_{param}",
            param=param,
        )
    return result


def _plan_memory(
    ctx: WorkerContext,
    job: Job,
    base: str,
    train: ValidationResult,
    *,
    batch_size: int,
    lora: LoraConfig | None,
) -> int | None:
    """Predict peak memory from the validation statistics before spending any compute: split the
    batch into micro-batches with gradient accumulation when it would not fit, or fail with advice.
    Returns the micro-batch size (None: the whole batch fits)."""
    from openft.models.loader import load_empty_model, resolve_device
    from openft.training.memory import available_bytes, plan_for_model

    device = resolve_device(ctx.settings.device)
    available = ctx.settings.memory_limit_bytes or available_bytes(device)
    tokens = train.report.summary["tokens"]
    seq_len = int(tokens.get("max") or 0)
    try:
        micro, accum, estimate = plan_for_model(
            load_empty_model(base),
            batch_size=batch_size,
            seq_len=seq_len,
            image_tokens=seq_len if train.report.summary["images"] else 0,
            lora_rank=lora.r if lora else None,
            lora_targets=lora.target_modules if lora else (),
            dpo=job.method_type == "dpo",
            gradient_checkpointing=device.startswith("cuda"),
            available=available,
        )
    except InvalidRequest as exc:
        raise JobFailed(
            f"The job would run out of memory on {device}: {exc.message}.",
            code="insufficient_memory",
            param="training_file",
        ) from exc
    gib = 1024**3
    message = (
        f"Estimated peak training memory {estimate.total / gib:.2f} GiB of {available / gib:.2f} GiB "
        f"available on {device} (longest example {seq_len} tokens)."
    )
    if accum > 1:
        message += (
            f" Training in micro-batches of {micro} with {accum} gradient-accumulation steps, so the "
            f"effective batch_size stays {batch_size}."
        )
    _event(
        ctx,
        job,
        message,
        data={
            "estimate_bytes": estimate.total,
            "available_bytes": available,
            "micro_batch_size": micro,
            "grad_accum_steps": accum,
        },
        once="memory-estimate",
    )
    return micro if accum > 1 else None


def _run(ctx: WorkerContext, job: Job, lease: JobLease) -> None:
    from openft.models.families import find_family
    from openft.models.loader import load_processor, resolve_base, weights_kind
    from openft.training.recipes import dpo, sft

    settings = ctx.settings
    if job.status == "running":
        _event(
            ctx,
            job,
            "The worker running this job stopped; another worker continues it from its last saved state.",
            level="warn",
        )

    base = resolve_base(job.base_model, settings.resolved_model_cache)
    processor = load_processor(base)
    train = _validate(ctx, job, job.training_file, param="training_file", processor=processor)
    valid = None
    if job.validation_file:
        valid = _validate(
            ctx, job, job.validation_file, param="validation_file", processor=processor
        ).examples
    if job.status == "validating_files":
        _move(ctx, job, ("validating_files",), status="queued")
        _event(ctx, job, "Files validated, moving job to queued state")

    init_weights = None
    if job.init_model:
        with ctx.db.session() as s:
            parent = repo.get_model(s, project_id=job.project_id, model_id=job.init_model)
            if parent is None:
                raise JobFailed(
                    f"Model {job.init_model} was deleted before training started.",
                    code="model_not_found",
                    param="model",
                )
            weights_key = parent.weights
        init_weights = ctx.blobs.materialize_dir(weights_key)
        _event(
            ctx,
            job,
            f"Starting from fine-tuned model {job.init_model} (base model {job.base_model}); it is "
            "also the reference model for DPO.",
            data={"parent_model": job.init_model},
            once="init-model",
        )

    training_type = job.options.get("training_type", "auto")
    parent_kind = weights_kind(init_weights) if init_weights else None
    if training_type == "auto":
        # Continue the way the parent was trained: an adapter on its base, or all weights.
        training_type = "full" if parent_kind == "full" else default_training_type(job.base_model)
    elif training_type == "lora" and parent_kind == "full":
        raise JobFailed(
            f"Model {job.init_model} was fully fine-tuned, and LoRA on top of it is not supported yet; "
            "continue it with training_type 'full' or 'auto'.",
            code="invalid_training_type",
            param="openft.training_type",
        )
    hp = resolve_hparams(
        job.hyperparameters,
        n_examples=len(train.examples),
        training_type=training_type,
        method=job.method_type,
        stats=DatasetStats.from_summary(train.report.summary),
    )
    family = find_family(processor)
    base_lr = base_learning_rate(
        training_type, family=family.name if family else None, pretrained=job.base_model != TINY_MODEL
    )
    _move(
        ctx,
        job,
        ("queued", "running"),
        status="running",
        started_at=job.started_at or repo.now(),
        hyperparameters=hp,
    )
    _event(
        ctx,
        job,
        f"Fine-tuning job started ({training_type}): n_epochs={hp['n_epochs']}, batch_size={hp['batch_size']}, "
        f"learning_rate_multiplier={hp['learning_rate_multiplier']} (base learning rate {base_lr:g}). {advice(hp)}",
        data={"hyperparameters": hp, "training_type": training_type, "base_learning_rate": base_lr},
        once="started",
    )

    lora = LoraConfig() if training_type == "lora" else None
    micro_batch = _plan_memory(ctx, job, base, train, batch_size=int(hp["batch_size"]), lora=lora)

    with ctx.db.session() as s:
        project = repo.get_project(s, project_id=job.project_id)
    model_name = ids.fine_tuned_model_name(
        base=job.base_model, project=project.name, suffix=job.suffix, job_id=job.id
    )
    reporter = JobReporter(ctx.db, ctx.blobs, job=job, model_name=model_name, lease=lease)
    cfg = TrainConfig(
        base_model=base,
        output_dir=settings.work_dir / job.id,
        n_epochs=int(hp["n_epochs"]),
        batch_size=int(hp["batch_size"]),
        learning_rate=base_lr * float(hp["learning_rate_multiplier"]),
        seed=job.seed,
        lora=lora,
        micro_batch_size=micro_batch,
        init_weights=Path(init_weights) if init_weights else None,
        device=settings.device,
        train_vision_tower=bool(job.options.get("train_vision_tower")),
        train_projector=bool(job.options.get("train_projector")),
    )
    # resume=True: a paused or interrupted job continues from the state saved in its work dir
    # (a fresh job has none and starts at step 0).
    if job.method_type == "dpo":
        result = dpo.run(
            cfg, train.examples, reporter, beta=float(hp["beta"]), valid_examples=valid, resume=True
        )
    else:
        result = sft.run(cfg, train.examples, reporter, valid_examples=valid, resume=True)

    weights_key = reporter.last_checkpoint_key or ctx.blobs.put_dir(result.weights_dir)
    csv_bytes = reporter.results_csv()
    csv_key = ctx.blobs.put_bytes(csv_bytes)
    with ctx.db.session() as s:
        results = repo.create_file(
            s,
            project_id=job.project_id,
            filename=f"{job.id}_results.csv",
            purpose="fine-tune-results",
            size=len(csv_bytes),
            sha256=csv_key,
        )
        if not repo.transition(
            s,
            job_id=job.id,
            worker_id=ctx.worker_id,
            frm=("running",),
            status="succeeded",
            fine_tuned_model=model_name,
            finished_at=repo.now(),
            estimated_finish=None,
            trained_tokens=result.trained_tokens,
            result_files=[results.id],
        ):
            raise JobCancelled(job.id)
        repo.register_model(s, job=job, model_name=model_name, weights=weights_key)
        repo.append_event(s, job_id=job.id, message=f"New fine-tuned model created: {model_name}")
        repo.append_event(s, job_id=job.id, message="The job has successfully completed")
