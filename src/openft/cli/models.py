"""``openft models``: the model catalog (``OPENFT_BASE_MODELS``) this home's server offers."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for


def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the catalog as JSON")] = False,
    home: HomeOption = None,
) -> None:
    """List the base models by the names jobs, chat and ft: names use, with their sources and options."""
    catalog = settings_for(home).catalog
    if json_out:
        typer.echo(json.dumps({name: e.model_dump() for name, e in catalog.items()}, indent=2))
        return
    for name, entry in catalog.items():
        options = ", ".join(
            f"{k}={v}"
            for k, v in entry.model_dump(exclude={"source"}).items()
            if v is not None and v != "auto"
        )
        source = "" if entry.source == name else f" -> {entry.source}"
        typer.echo(f"{name}{source}" + (f"  ({options})" if options else ""))
