"""``openft export MODEL --to DIR [--merged]``: a fine-tuned model as files other tools load.

Without ``--merged`` the model's own weights folder is written as is (a peft adapter plus the
processor, or full weights). With ``--merged`` an adapter is folded into its base and the
result saved as a plain transformers model with its processor, which transformers and vLLM
load directly — including LoRA on the vision tower, which vLLM would otherwise ignore.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for


def export(
    model: Annotated[str, typer.Argument(help="A fine-tuned or checkpoint model id (ft:...)")],
    to: Annotated[Path, typer.Option("--to", help="Output folder (must not exist or be empty)")],
    merged: Annotated[
        bool, typer.Option("--merged", help="Merge LoRA into the base and save full weights")
    ] = False,
    home: HomeOption = None,
) -> None:
    """Write MODEL's weights to DIR (adapter or full weights; --merged for a standalone model)."""
    from openft.storage import repo
    from openft.storage.home import open_home

    state = open_home(settings_for(home))
    with state.db.session() as s:
        row = repo.find_model(s, model_id=model)
        if row is None:
            typer.echo(f"error: no fine-tuned model named {model!r} (see GET /v1/models)", err=True)
            raise typer.Exit(2)
        weights_key, base_name = row.weights, row.base_model
    if to.exists() and any(to.iterdir()):
        typer.echo(f"error: {to} is not empty", err=True)
        raise typer.Exit(2)
    weights = state.blobs.materialize_dir(weights_key)
    if not merged:
        shutil.copytree(weights, to, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
        typer.echo(str(to))
        return

    from openft.adapters import merge
    from openft.models.loader import load_model, resolve_base

    base = resolve_base(base_name, state.settings.resolved_model_cache)
    loaded, processor = load_model(base, weights, device="cpu")
    standalone = merge(loaded)
    to.mkdir(parents=True, exist_ok=True)
    standalone.save_pretrained(to)
    processor.save_pretrained(to)
    typer.echo(str(to))
