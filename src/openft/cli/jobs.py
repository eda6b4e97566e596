"""``openft jobs``: create, watch and control fine-tuning jobs on a server."""

from __future__ import annotations

import itertools
import json
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from openft.cli.compare import compare as compare_jobs
from openft.cli.remote import (
    DEFAULT_BASE_URL,
    ApiKeyOption,
    BaseUrlOption,
    IntervalOption,
    JsonOption,
    LimitOption,
    connect,
    print_fields,
    print_json,
    print_table,
    timestamp,
    to_dict,
)
from openft.protocol.fine_tuning import TERMINAL_STATUSES

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent

app = typer.Typer(help="Create, watch and control fine-tuning jobs.", no_args_is_help=True)
app.command("compare")(compare_jobs)

JobId = Annotated[str, typer.Argument(help="Job id (ftjob-...).", show_default=False)]
_HP = "Hyperparameters (default: auto)"
_EXT = "openft extensions"


@app.command("create")
def create(
    training_file: Annotated[
        str, typer.Option(help="Training file id (purpose fine-tune).", show_default=False)
    ],
    model: Annotated[str, typer.Option(help="Base model, or one of your ft: models.", show_default=False)],
    validation_file: Annotated[str | None, typer.Option(help="Validation file id.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Up to 64 chars, part of the model name.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: random, recorded).")] = None,
    method: Annotated[Literal["supervised", "dpo"], typer.Option(help="Training method.")] = "supervised",
    n_epochs: Annotated[int | None, typer.Option(min=1, rich_help_panel=_HP)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, rich_help_panel=_HP)] = None,
    learning_rate_multiplier: Annotated[float | None, typer.Option(rich_help_panel=_HP)] = None,
    beta: Annotated[float | None, typer.Option(help="DPO only.", rich_help_panel=_HP)] = None,
    training_type: Annotated[
        Literal["auto", "lora", "full"] | None,
        typer.Option(
            help="LoRA or full fine-tuning (default: auto).",
            rich_help_panel=_EXT,
        ),
    ] = None,
    train_vision_tower: Annotated[
        bool,
        typer.Option("--train-vision-tower", help="Also train the vision encoder.", rich_help_panel=_EXT),
    ] = False,
    train_projector: Annotated[
        bool,
        typer.Option(
            "--train-projector", help="Also train the vision-language projector.", rich_help_panel=_EXT
        ),
    ] = False,
    parallelism: Annotated[
        Literal["auto", "ddp", "fsdp"] | None,
        typer.Option(
            help="On a worker with --nproc N: ddp, or fsdp to shard a full fine-tune (default: auto).",
            rich_help_panel=_EXT,
        ),
    ] = None,
    loss_kernel: Annotated[
        Literal["auto", "chunked", "plain", "liger"] | None,
        typer.Option(
            help="How the loss meets the vocabulary: chunked (no full-vocabulary logits), liger "
            "(CUDA workers with openft[gpu]), plain (the model's logits) (default: auto).",
            rich_help_panel=_EXT,
        ),
    ] = None,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Start a fine-tuning job and print its id."""
    if beta is not None and method != "dpo":
        raise typer.BadParameter("only applies with --method dpo", param_hint="--beta")
    hyperparameters = {
        k: v
        for k, v in {
            "n_epochs": n_epochs,
            "batch_size": batch_size,
            "learning_rate_multiplier": learning_rate_multiplier,
            "beta": beta,
        }.items()
        if v is not None
    }
    options: dict[str, Any] = {}
    if training_type is not None:
        options["training_type"] = training_type
    if train_vision_tower:
        options["train_vision_tower"] = True
    if train_projector:
        options["train_projector"] = True
    if parallelism is not None:
        options["parallelism"] = parallelism
    if loss_kernel is not None:
        options["loss_kernel"] = loss_kernel
    optional = {
        k: v
        for k, v in {"validation_file": validation_file, "suffix": suffix, "seed": seed}.items()
        if v is not None
    }
    with connect(base_url, api_key) as client:
        job = client.fine_tuning.jobs.create(
            training_file=training_file,
            model=model,
            method={"type": method, method: {"hyperparameters": hyperparameters}},  # type: ignore[misc]
            extra_body={"openft": options} if options else None,
            **optional,  # type: ignore[arg-type]
        )
    if json_out:
        print_json(job)
    else:
        typer.echo(job.id)


@app.command("list")
def list_jobs(
    limit: LimitOption = 20,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List jobs, newest first."""
    with connect(base_url, api_key) as client:
        jobs = list(itertools.islice(client.fine_tuning.jobs.list(limit=min(limit, 1000)), limit))
    if json_out:
        print_json(jobs)
        return
    print_table(
        ["id", "status", "model", "fine_tuned_model", "created"],
        ((j.id, j.status, j.model, j.fine_tuned_model, timestamp(j.created_at)) for j in jobs),
        empty="no jobs",
    )


@app.command("get")
def get(
    job_id: JobId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Show one job."""
    with connect(base_url, api_key) as client:
        job = client.fine_tuning.jobs.retrieve(job_id)
    if json_out:
        print_json(job)
    else:
        _print_job(job)


def _print_job(job: FineTuningJob) -> None:
    raw = to_dict(job)
    method = (raw.get("method") or {}).get("type", "supervised")
    hp = (
        ((raw.get("method") or {}).get(method) or {}).get("hyperparameters")
        or raw.get("hyperparameters")
        or {}
    )
    error = raw.get("error") or {}
    print_fields(
        [
            ("id", job.id),
            ("status", job.status),
            ("model", job.model),
            ("fine_tuned_model", job.fine_tuned_model),
            ("method", method),
            ("hyperparameters", " ".join(f"{k}={v}" for k, v in hp.items())),
            ("training_file", job.training_file),
            ("validation_file", job.validation_file),
            ("seed", job.seed),
            ("trained_tokens", job.trained_tokens),
            ("created", timestamp(job.created_at)),
            ("finished", timestamp(job.finished_at)),
            ("error", _error_line(error) if error.get("message") else None),
        ]
    )


def _error_line(error: dict[str, Any]) -> str:
    extra = ", ".join(f"{k}: {error[k]}" for k in ("code", "param") if error.get(k))
    return f"{error['message']} ({extra})" if extra else error["message"]


def _control(action: str, job_id: str, base_url: str, api_key: str | None, json_out: bool) -> None:
    with connect(base_url, api_key) as client:
        job = getattr(client.fine_tuning.jobs, action)(job_id)
    if json_out:
        print_json(job)
    else:
        typer.echo(f"{job.id} {job.status}")


@app.command("cancel")
def cancel(
    job_id: JobId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a job that has not finished."""
    _control("cancel", job_id, base_url, api_key, json_out)


@app.command("pause")
def pause(
    job_id: JobId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Pause a queued or running job (training state is saved)."""
    _control("pause", job_id, base_url, api_key, json_out)


@app.command("resume")
def resume(
    job_id: JobId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Resume a paused job from where it stopped."""
    _control("resume", job_id, base_url, api_key, json_out)


@app.command("events")
def events(
    job_id: JobId,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    interval: IntervalOption = 2.0,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Print a job's events, oldest first."""
    seen: set[str] = set()
    with connect(base_url, api_key) as client:
        while True:
            # Read the status before the events, so the events of a finished job are complete.
            status = client.fine_tuning.jobs.retrieve(job_id).status if follow else None
            for event in _new_events(client, job_id, seen):
                typer.echo(json.dumps(to_dict(event), ensure_ascii=False) if json_out else _event_line(event))
            if not follow or status in TERMINAL_STATUSES:
                return
            time.sleep(interval)


def _new_events(client: OpenAI, job_id: str, seen: set[str]) -> list[FineTuningJobEvent]:
    """Events not in ``seen``, oldest first. The API lists newest first, so stop at the first seen one."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.id in seen:
            break
        fresh.append(event)
    seen.update(e.id for e in fresh)
    return fresh[::-1]


def _event_line(event: FineTuningJobEvent) -> str:
    return f"{timestamp(event.created_at)}  {event.level:5}  {event.message}"


@app.command("checkpoints")
def checkpoints(
    job_id: JobId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List a job's checkpoints (each one is a servable model), by step."""
    with connect(base_url, api_key) as client:
        ckpts = sorted(
            client.fine_tuning.jobs.checkpoints.list(job_id, limit=100), key=lambda c: c.step_number
        )
    if json_out:
        print_json(ckpts)
        return

    def loss(value: float | None) -> str:
        return "" if value is None else f"{value:.4f}"

    print_table(
        ["step", "model", "train_loss", "valid_loss", "created"],
        (
            (
                c.step_number,
                c.fine_tuned_model_checkpoint,
                loss(c.metrics.train_loss),
                loss(c.metrics.valid_loss),
                timestamp(c.created_at),
            )
            for c in ckpts
        ),
        empty="no checkpoints",
    )


@app.command("wait")
def wait(
    job_id: JobId,
    json_out: JsonOption = False,
    interval: IntervalOption = 2.0,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Wait for a job to finish; exit 0 if it succeeded, 1 otherwise."""
    last = None
    with connect(base_url, api_key) as client:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status != last:
                typer.echo(f"{job.id}: {job.status}", err=True)
                last = job.status
            if job.status in TERMINAL_STATUSES:
                break
            time.sleep(interval)
    if json_out:
        print_json(job)
    else:
        error = to_dict(job).get("error") or {}
        print_fields(
            [
                ("status", job.status),
                ("fine_tuned_model", job.fine_tuned_model),
                ("error", _error_line(error) if error.get("message") else None),
            ]
        )
    raise typer.Exit(0 if job.status == "succeeded" else 1)
