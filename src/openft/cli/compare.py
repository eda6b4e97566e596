"""``openft jobs compare A B``: two jobs' loss curves side by side.

Typically A is a job on the old server and B the job ``openft migrate`` re-created from it:
A need not be reachable, because the migration copied A's results CSV to this server and
pointed at it from B's metadata. Any two jobs of this server compare the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from openft.cli.migration import MIGRATED_FROM, SOURCE_METRICS, SOURCE_RESULTS
from openft.cli.remote import (
    DEFAULT_BASE_URL,
    ApiKeyOption,
    BaseUrlOption,
    JsonOption,
    connect,
    fail,
    print_table,
)
from openft.cli.results_csv import read_results_csv

if TYPE_CHECKING:
    from openai import OpenAI

CURVES = ("train_loss", "valid_loss")


@dataclass
class Curve:
    job_id: str
    origin: str
    """Where the numbers come from: the job's results file, its metrics events, or a migrated copy."""
    rows: list[dict[str, float]]
    final: dict[str, Any]


def compare(
    first: Annotated[str, typer.Argument(help="A job id: on this server, or a migrated source job.")],
    second: Annotated[str, typer.Argument(help="Another job id.")],
    rows: Annotated[int, typer.Option("--rows", min=2, help="Show at most this many steps.")] = 30,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Print two jobs' training and validation loss side by side, by step."""
    with connect(base_url, api_key) as client:
        a, b = curve(client, first), curve(client, second)
    if json_out:
        typer.echo(json.dumps({"jobs": [c.__dict__ for c in (a, b)]}, indent=2))
        return
    for c in (a, b):
        typer.echo(f"{c.job_id}: {c.origin}", err=True)
    by_step = [{int(r["step"]): r for r in c.rows} for c in (a, b)]
    steps = sorted(set(by_step[0]) | set(by_step[1]))
    shown = _spread(steps, rows)
    columns = [name for name in CURVES if any(name in r for c in (a, b) for r in c.rows)]
    print_table(
        ["step", *(f"{name} {tag}" for name in columns for tag in ("A", "B"))],
        (
            [step, *(_fmt(side.get(step, {}).get(name)) for name in columns for side in by_step)]
            for step in shown
        ),
        empty="neither job has recorded metrics yet",
    )
    for tag, c in (("A", a), ("B", b)):
        if c.final:
            typer.echo(f"final {tag} ({c.job_id}): " + " ".join(f"{k}={v}" for k, v in c.final.items()))


def curve(client: OpenAI, job_id: str) -> Curve:
    """The job's per-step metrics from this server, or from the copy a migration made of it."""
    import openai

    try:
        job = client.fine_tuning.jobs.retrieve(job_id).to_dict(mode="json")
    except openai.NotFoundError:
        return _migrated_curve(client, job_id)
    if job.get("result_files"):
        data = client.files.content(job["result_files"][0]).read()
        rows = read_results_csv(data)
        return Curve(job_id, f"results file {job['result_files'][0]}", rows, _last(rows))
    rows = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=1000):
        data = event.to_dict(mode="json").get("data") or {}
        if event.type == "metrics" and "step" in data:
            rows.append({k: float(v) for k, v in data.items() if isinstance(v, (int, float))})
    rows.sort(key=lambda r: r["step"])
    return Curve(job_id, f"metrics events ({job['status']})", rows, _last(rows))


def _migrated_curve(client: OpenAI, job_id: str) -> Curve:
    copies = list(client.fine_tuning.jobs.list(metadata={MIGRATED_FROM: job_id}, limit=10))
    if not copies:
        fail(f"no job {job_id} here, and no job here was migrated from it ('openft migrate' copies them)")
    metadata = copies[0].metadata or {}
    final = json.loads(metadata[SOURCE_METRICS]) if metadata.get(SOURCE_METRICS) else {}
    if not metadata.get(SOURCE_RESULTS):
        return Curve(job_id, f"migrated as {copies[0].id}; no results file was copied", [], final)
    rows = read_results_csv(client.files.content(metadata[SOURCE_RESULTS]).read())
    return Curve(
        job_id, f"migrated as {copies[0].id}; results copied to {metadata[SOURCE_RESULTS]}", rows, final
    )


def _last(rows: list[dict[str, float]]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for row in rows:
        final.update(row)
    return {k: (int(v) if k == "step" else round(v, 6)) for k, v in final.items() if k in ("step", *CURVES)}


def _spread(steps: list[int], limit: int) -> list[int]:
    """At most ``limit`` steps, evenly spaced, always keeping the first and the last."""
    if len(steps) <= limit:
        return steps
    picks = {round(i * (len(steps) - 1) / (limit - 1)) for i in range(limit)}
    return [steps[i] for i in sorted(picks)]


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
