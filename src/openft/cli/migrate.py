"""``openft migrate``: copy fine-tuning files and re-create jobs from OpenAI (or any OpenAI-wire server)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from openft.cli import migration
from openft.cli.remote import (
    DEFAULT_BASE_URL,
    BaseUrlOption,
    JsonOption,
    api_key_option,
    connect,
    console,
    fail,
    print_table,
)
from openft.cli.transfer import Progress
from openft.protocol.fine_tuning import JobStatus

if TYPE_CHECKING:
    from openft.cli.migration import FileStep, JobStep, Plan, Result

_SOURCE = "Source"
# Unlike the other remote commands, the destination key does not fall back to OPENAI_API_KEY:
# here that variable usually holds the *source* (OpenAI) key.
DestApiKeyOption = api_key_option(["OPENFT_API_KEY"], "Destination (openft) API key.")
STATUSES: tuple[str, ...] = JobStatus.__args__  # type: ignore[attr-defined]


def migrate(
    from_base_url: Annotated[
        str,
        typer.Option(
            "--from-base-url",
            envvar="OPENFT_FROM_BASE_URL",
            help="Source API root, e.g. https://api.openai.com/v1.",
            rich_help_panel=_SOURCE,
        ),
    ] = "https://api.openai.com/v1",
    from_api_key: Annotated[
        str | None,
        typer.Option(
            "--from-api-key",
            envvar=["OPENFT_FROM_API_KEY", "OPENAI_API_KEY"],
            help="Source API key (read access to Files and Fine-tuning).",
            rich_help_panel=_SOURCE,
            show_default=False,
        ),
    ] = None,
    model_map: Annotated[
        list[str] | None,
        typer.Option(
            "--model-map",
            help="SOURCE_MODEL=DESTINATION_MODEL; repeatable. Unmapped models keep their name "
            "when the destination lists it.",
            show_default=False,
        ),
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help=f"Only jobs in this status; repeatable ({', '.join(STATUSES)})."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: DestApiKeyOption = None,
) -> None:
    """Copy every fine-tune file and re-create every job from a source server on this one.

    Safe to repeat: a second run finds what the first copied and creates nothing new.
    """
    import openai

    try:
        mapping = migration.parse_model_map(model_map or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--model-map") from None
    bad = [s for s in status or [] if s not in STATUSES]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r} is not one of {', '.join(STATUSES)}", param_hint="--status")
    if not from_api_key:
        fail("no source key: pass --from-api-key or set OPENFT_FROM_API_KEY", code=2)
    if from_base_url.rstrip("/") == base_url.rstrip("/") and from_api_key == api_key:
        fail("the source and the destination are the same project: check --base-url and --api-key", code=2)
    # The SDK retries each request on 429/5xx with back-off; listing adds its own outer retries.
    source = openai.OpenAI(base_url=from_base_url, api_key=from_api_key, max_retries=3)
    with source, connect(base_url, api_key) as dest:
        try:
            the_plan = migration.plan(source, dest, model_map=mapping, statuses=set(status or []) or None)
        except migration.SourceAccessError as e:
            fail(str(e))
        except openai.APIConnectionError as e:
            if str(e.request.url).startswith(from_base_url.rstrip("/")):
                fail(f"cannot reach the source {from_base_url} ({e.message})")
            raise
        if dry_run:
            _report(the_plan, None, json_out=json_out, dry_run=True)
            return
        with _Bar(enabled=not json_out) as bar:
            result = migration.execute(source, dest, the_plan, bar)
    _report(the_plan, result, json_out=json_out, dry_run=False)
    if result.failures:
        raise typer.Exit(1)


def _report(the_plan: Plan, result: Result | None, *, json_out: bool, dry_run: bool) -> None:
    if json_out:
        out: dict[str, Any] = {"dry_run": dry_run, **the_plan.to_json()}
        if result is not None:
            out["result"] = result.to_json()
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    print_table(
        ["file", "filename", "bytes", "action", "destination"],
        (
            (f.source["id"], f.source["filename"], f.source["bytes"], _file_action(f, dry_run), f.dest_id)
            for f in the_plan.files
        ),
        empty="no fine-tune files on the source",
    )
    typer.echo("")
    print_table(
        ["job", "status", "method", "model", "hyperparameters", "action", "destination"],
        (
            (
                j.source_id,
                j.source.get("status"),
                j.method,
                f"{j.source.get('model')} -> {j.model}" if j.model else j.source.get("model"),
                " ".join(f"{k}={v}" for k, v in j.hyperparameters.items()),
                _job_action(j, dry_run),
                j.dest_id,
            )
            for j in the_plan.jobs
        ),
        empty="no fine-tuning jobs on the source",
    )
    skipped = [j for j in the_plan.jobs if j.action == "skip"]
    for j in skipped:
        typer.echo(f"skipped {j.source_id}: {j.reason}", err=True)
    for j in the_plan.jobs:
        for note in j.notes:
            typer.echo(f"note {j.source_id}: {note}", err=True)
    if result is not None:
        typer.echo(
            f"\ncopied {result.files_copied} file(s), created {result.jobs_created} job(s), "
            f"skipped {len(skipped)} job(s)",
        )
        for failure in result.failures:
            typer.echo(f"error: {failure}", err=True)
    else:
        todo = (
            sum(f.action == "copy" for f in the_plan.files),
            sum(j.action == "create" for j in the_plan.jobs),
        )
        typer.echo(f"\ndry run: would copy {todo[0]} file(s) and create {todo[1]} job(s); changed nothing")


def _file_action(step: FileStep, dry_run: bool) -> str:
    if step.action == "present":
        return f"present ({step.how})"
    return "copy" if dry_run else ("copied" if step.dest_id else "failed")


def _job_action(step: JobStep, dry_run: bool) -> str:
    if step.action == "create":
        return "create" if dry_run else ("created" if step.dest_id else "failed")
    return step.action


class _Bar(Progress):
    """A rich progress bar over bytes moved (each file is downloaded, then uploaded)."""

    def __init__(self, *, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._task: Any = None

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start_file(self, name: str, total: int) -> None:
        self._task = self._progress.add_task(f"copy {name}", total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)

    def done_file(self) -> None:
        if self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, completed=task.total)
        self._task = None
