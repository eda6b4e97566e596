"""``openft validate FILE``: check a training file offline, as the worker will.

Exit status: 0 trainable, 1 not trainable, 2 usage error (typer's own, e.g. no such file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for


def validate(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="JSONL training file")
    ],
    method: Annotated[str, typer.Option(help="Training method: supervised or dpo")] = "supervised",
    model: Annotated[
        str | None, typer.Option(help="Base model (a catalog name), for token counts and the length limit")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Length limit as the job's openft.max_length sets it (with --model)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    home: HomeOption = None,
) -> None:
    """Validate a training file offline and print a report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from openft.datasets.lines import scan_jsonl
    from openft.datasets.moderation import load_moderator
    from openft.datasets.report import location
    from openft.datasets.validate import ValidationOptions, validate_file

    if method not in ("supervised", "dpo"):
        raise typer.BadParameter("use 'supervised' or 'dpo'", param_hint="--method")
    err = Console(stderr=True)
    settings = settings_for(home)
    with file.open("rb") as fp:
        total = scan_jsonl(fp).lines
    with Progress(
        TextColumn("validating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("validate", total=total)
        progress = {
            "progress": lambda n: bar.update(task, completed=n),
            "allow_private_networks": settings.allow_private_networks,
            "moderator": load_moderator(settings.moderator) if settings.moderator else None,
        }
        if model:
            # The model's own processor: token counts, context and control tokens as training sees them.
            from openft.models.loader import load_config, load_processor, resolve_base
            from openft.models.validation import length_limit, model_validation_options

            base = resolve_base(settings.source_of(model), settings.resolved_model_cache)
            processor = load_processor(base)
            entry = settings.catalog.get(model)
            limit = length_limit(
                processor, load_config(base), job=max_length, catalog=entry.max_length if entry else None
            )
            options = model_validation_options(processor, max_length=limit.tokens, **progress)
        else:
            if max_length is not None:
                raise typer.BadParameter("needs --model", param_hint="--max-length")
            limit = None
            options = ValidationOptions(**progress)
        with file.open("rb") as fp:
            report = validate_file(fp, method=method, options=options).report  # type: ignore[arg-type]

    if json_out:
        out_json = report.to_dict()
        if limit is not None:
            out_json["max_length"] = {"tokens": limit.tokens, "source": limit.source}
        typer.echo(json.dumps(out_json, indent=2, ensure_ascii=False))
    else:
        out = Console()
        s = report.summary
        verdict = "[green]trainable[/green]" if report.ok else "[red]not trainable[/red]"
        out.print(f"{file.name} ({report.method}): {verdict}")
        if limit is not None:
            out.print(f"  length limit for {model}: {limit.describe()}")
        out.print(
            f"  examples {s.examples}, usable {s.usable_examples}, skipped {s.skipped_examples}, "
            f"with images {s.examples_with_images} ({s.images} images), errors {s.errors}"
        )
        t = s.tokens
        if t.total is not None:
            out.print(
                f"  tokens ({t.source}): total {t.total:,}, min {t.min}, mean {t.mean}, "
                f"p50 {t.p50}, p95 {t.p95}, max {t.max}; "
                f"trained per epoch {t.trained_tokens_per_epoch:,}"
                + (f", at most {t.trained_max:,} trained in one sequence" if t.trained_max is not None else "")
            )
        if report.issues:
            counts = ", ".join(f"{code} {n}" for code, n in report.counts_by_code().items())
            out.print(f"  issues: {counts}")
        for issue in report.issues[:50]:
            style = {"error": "red", "skip": "yellow", "warning": "dim"}[issue.severity]
            out.print(
                f"  [{style}]{issue.severity:7}[/{style}] {location(issue)}: {issue.message} ({issue.code})"
            )
        if len(report.issues) > 50:
            out.print(f"  ... and {len(report.issues) - 50} more (use --json for all)")
    raise typer.Exit(0 if report.ok else 1)


def register(app: typer.Typer) -> None:
    """Add ``validate`` to the ``openft`` command group."""
    app.command("validate")(validate)
