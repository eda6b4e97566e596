"""``openft export MODEL --to DIR [--merged]``: a fine-tuned model as files other tools load.

Without ``--merged`` the model's own weights folder is written as is (a peft adapter plus the
processor, or full weights). With ``--merged`` an adapter is folded into its base and the
result saved as a plain transformers model with its processor, which transformers and vLLM
load directly — including LoRA on the vision tower, which vLLM would otherwise ignore.

The folder is portable: plain files with ordinary modes (0644, folders 0755; the blob store
keeps its copies read-only), and no absolute path of this machine inside — the base model is
named as the catalog names it (``openft-tiny-vlm``, a Hugging Face id), not by the local cache
folder it was loaded from (``openft.json``, peft's ``adapter_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from openft.cli.common import HomeOption, settings_for
from openft.cli.remote import JsonOption

FILE_MODE, DIR_MODE = 0o644, 0o755


def export(
    model: Annotated[str, typer.Argument(help="A fine-tuned or checkpoint model id (ft:...)")],
    to: Annotated[Path, typer.Option("--to", help="Output folder (must not exist or be empty)")],
    merged: Annotated[
        bool, typer.Option("--merged", help="Merge LoRA into the base and save full weights")
    ] = False,
    json_out: JsonOption = False,
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
    from openft.models.loader import resolve_base

    base = resolve_base(state.settings.source_of(base_name), state.settings.resolved_model_cache)
    if merged:
        from openft.adapters import merge
        from openft.models.loader import load_model

        loaded, processor = load_model(base, weights, device="cpu")
        standalone = merge(loaded)
        to.mkdir(parents=True, exist_ok=True)
        standalone.save_pretrained(to)
        processor.save_pretrained(to)
    else:
        _copy_plain(weights, to)
    # A catalog name or Hugging Face id travels as is; a local base folder by its folder name only.
    portable = Path(base_name).name if Path(base_name).is_absolute() else base_name
    files = _make_portable(to, local_paths={base: portable, str(Path(base).resolve()): portable})
    if json_out:
        typer.echo(json.dumps({"model": model, "path": str(to), "merged": merged, "files": files}, indent=2))
    else:
        typer.echo(str(to))


def _copy_plain(src: Path, dest: Path) -> None:
    """Copy file contents only (no modes, no links: a read-only or linked blob becomes a plain file)."""
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel.name == ".complete":
            continue
        if path.is_dir():
            (dest / rel).mkdir(parents=True, exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)


def _make_portable(root: Path, *, local_paths: dict[str, str]) -> list[str]:
    """Replace this machine's paths in JSON files with portable names; normal modes; list the files."""
    files = []
    os.chmod(root, DIR_MODE)
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            os.chmod(path, DIR_MODE)
            continue
        os.chmod(path, FILE_MODE)
        files.append(path.relative_to(root).as_posix())
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            fixed = _replace_paths(data, local_paths)
            if fixed != data:
                path.write_text(json.dumps(fixed, indent=2) + "\n")
    return files


def _replace_paths(value: Any, local_paths: dict[str, str]) -> Any:
    if isinstance(value, str):
        return local_paths.get(value.rstrip("/"), value)
    if isinstance(value, dict):
        return {k: _replace_paths(v, local_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_paths(v, local_paths) for v in value]
    return value
