"""Run one claimed job: validate files -> resolve hyperparameters -> train -> record the model.

Every state change is a conditional update on a job this worker holds, so a cancel made
through the API meanwhile is never overwritten, and every step leaves an event behind.
"""

from __future__ import annotations

import dataclasses
import functools
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
from openft.errors import JobCancelled, JobFailed
from openft.protocol.fine_tuning import ACTIVE_STATUSES as ACTIVE
from openft.protocol.fine_tuning import TERMINAL_STATUSES, OpenFTOptions
from openft.settings import Settings
from openft.storage import repo
from openft.storage.blobs import BlobStore
from openft.storage.db import Database
from openft.storage.tables import Job
from openft.training.plan import DatasetStats, JobFacts, plan_loss_kernel, plan_parallelism, plan_training
from openft.worker.events import JobReporter
from openft.worker.queue import JobLease

log = logging.getLogger("openft.worker")

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


def _validate(
    ctx: WorkerContext, job: Job, file_id: str, *, param: str, processor: Any, max_length: int
) -> ValidationResult:
    from openft.models.validation import model_validation_options

    with ctx.db.session() as s:
        sha = repo.file_blob(s, file_id=file_id)
    options = model_validation_options(
        processor,
        max_length=max_length,
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
        f"Validated {param}: {summary.examples} examples, {summary.usable_examples} usable, "
        f"{summary.images} images, {summary.skipped_examples} skipped, {summary.errors} errors.",
        data={"file": file_id, "summary": summary.to_dict()},
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


def _run(ctx: WorkerContext, job: Job, lease: JobLease) -> None:
    from openft.models.families import find_family
    from openft.models.loader import (
        load_config,
        load_empty_model,
        load_processor,
        resolve_base,
        resolve_device,
        weights_kind,
    )
    from openft.models.validation import length_limit
    from openft.training import distributed
    from openft.training.recipes import dpo, sft

    settings = ctx.settings
    if job.status == "running":
        _event(
            ctx,
            job,
            "The worker running this job stopped; another worker continues it from its last saved state.",
            level="warn",
        )

    entry = settings.catalog.get(job.base_model)
    base = resolve_base(settings.source_of(job.base_model), settings.resolved_model_cache)
    processor = load_processor(base)
    options = OpenFTOptions.model_validate(job.options)  # stored from the request's own model
    limit = length_limit(
        processor,
        load_config(base),
        job=options.max_length,
        catalog=entry.max_length if entry else None,
    )
    _event(
        ctx,
        job,
        f"Length limit {limit.describe()}: longer examples are truncated from the end to it.",
        data={"max_length": limit.tokens, "max_length_source": limit.source},
        once="length-limit",
    )
    train = _validate(
        ctx, job, job.training_file, param="training_file", processor=processor, max_length=limit.tokens
    )
    valid = None
    if job.validation_file:
        valid = _validate(
            ctx,
            job,
            job.validation_file,
            param="validation_file",
            processor=processor,
            max_length=limit.tokens,
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

    facts = JobFacts(
        base_model=job.base_model,
        method=job.method_type,  # type: ignore[arg-type]
        requested=job.hyperparameters,
        training_type=options.training_type,
        train_vision_tower=options.train_vision_tower,
        train_projector=options.train_projector,
        cache_vision_features=options.cache_vision_features,
        loss_kernel=options.loss_kernel,
        init_model=job.init_model,
        parent_kind=weights_kind(init_weights) if init_weights else None,  # type: ignore[arg-type]
        max_length=limit.tokens,
        catalog_training_type=entry.training_type if entry else "auto",
        catalog_learning_rate=entry.learning_rate if entry else None,
        lora_rank=entry.lora_rank if entry else None,
        bf16={"bfloat16": True, "float32": False}.get(entry.dtype) if entry else None,
    )
    stats = DatasetStats.from_summary(train.report.summary)
    family = find_family(processor)
    plan = plan_training(facts, stats, family=family.name if family else None)
    _move(
        ctx,
        job,
        ("queued", "running"),
        status="running",
        started_at=job.started_at or repo.now(),
        hyperparameters=plan.hyperparameters.to_dict(),
    )
    _event(ctx, job, plan.announcement(), data=plan.to_dict(), once="started")

    # Predict peak memory from the validation statistics before spending any compute, and with it
    # how the job's processes split the work (FSDP2 when full training does not fit one device).
    # The loss kernel sizes the logits in that plan; one this worker cannot run (Liger without
    # CUDA or liger-kernel) fails the job here, before anything loads: only the worker knows.
    empty = load_empty_model(base)
    device = resolve_device(settings.device)
    loss_kernel = plan_loss_kernel(empty, plan, device=device)
    parallel = plan_parallelism(
        empty,
        plan,
        stats,
        requested=options.parallelism,
        nproc=settings.nproc,
        dpo=job.method_type == "dpo",
        device=device,
        limit_bytes=settings.memory_limit_bytes,
        loss_kernel=loss_kernel,
    )
    memory = parallel.memory
    if settings.nproc > 1 or options.parallelism != "auto":  # a plain one-process job needs no word
        _event(
            ctx,
            job,
            parallel.announcement(),
            level="warn" if parallel.parallelism == "single" else "info",
            data=parallel.to_dict(),
            once="parallelism",
        )
    _event(ctx, job, memory.announcement(), data=memory.to_dict(), once="memory-estimate")

    with ctx.db.session() as s:
        project = repo.get_project(s, project_id=job.project_id)
    model_name = ids.fine_tuned_model_name(
        base=job.base_model, project=project.name, suffix=job.suffix, job_id=job.id
    )
    cfg = plan.train_config(
        base_model=base,
        output_dir=settings.work_dir / job.id,
        seed=job.seed,
        device=settings.device,
        init_weights=Path(init_weights) if init_weights else None,
        micro_batch_size=memory.micro_batch_size,
        gradient_checkpointing=memory.gradient_checkpointing,
        parallelism=parallel.parallelism,
    )
    reporter = JobReporter(
        ctx.db, ctx.blobs, job=job, model_name=model_name, lease=lease, keep_checkpoints=cfg.keep_checkpoints
    )
    cuda = resolve_device(settings.device).startswith("cuda")
    if settings.nproc > 1 and cuda:
        cfg = dataclasses.replace(cfg, device="cuda")  # each rank's own GPU (its LOCAL_RANK), not cuda:N
    # resume=True: a paused or interrupted job continues from the state saved in its work dir
    # (a fresh job has none and starts at step 0).
    if job.method_type == "dpo":
        recipe = functools.partial(
            dpo.run, cfg, train.examples, beta=plan.hyperparameters.beta, valid_examples=valid, resume=True
        )
    else:
        recipe = functools.partial(sft.run, cfg, train.examples, valid_examples=valid, resume=True)
    if settings.nproc > 1:
        result = distributed.launch(
            recipe,
            reporter,
            nproc=settings.nproc,
            cuda=cuda,
        )
    else:
        result = recipe(reporter=reporter)

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
