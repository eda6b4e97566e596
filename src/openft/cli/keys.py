"""``openft keys create|list|revoke``: API keys, one project each. Only a key's hash and its
first characters are stored, so ``list`` shows prefixes (the dashboard shows the same prefix for
the key it uses) and a lost key cannot be shown again: create a new one and revoke the old."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for
from openft.cli.remote import JsonOption as JsonFlag

app = typer.Typer(help="API keys (one project per key).", no_args_is_help=True)


def _state(home):  # type: ignore[no-untyped-def]
    from openft.storage.home import open_home

    return open_home(settings_for(home))


def _row(key, project) -> dict:  # type: ignore[no-untyped-def]
    return {
        "id": key.id,
        "prefix": key.prefix,
        "project": project.name,
        "project_id": project.id,
        "created_at": key.created_at,
        "revoked": key.revoked,
    }


@app.command("create")
def create(
    project: Annotated[str, typer.Option("--project", help="Project name; created if new.")],
    json_out: JsonFlag = False,
    home: HomeOption = None,
) -> None:
    """Create an API key for PROJECT and print it (only the key, on stdout)."""
    from openft.storage import repo

    with _state(home).db.session() as s:
        key = repo.create_api_key(s, project_name=project)
    typer.echo(json.dumps({"key": key, "prefix": key[:14], "project": project}) if json_out else key)


@app.command("list")
def list_keys(
    project: Annotated[str | None, typer.Option("--project", help="Only this project's keys.")] = None,
    json_out: JsonFlag = False,
    home: HomeOption = None,
) -> None:
    """List keys (number, prefix, project, created, revoked); never the keys themselves."""
    from openft.storage import repo

    with _state(home).db.session(readonly=True) as s:
        rows = [_row(k, p) for k, p in repo.list_api_keys(s, project_name=project)]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no keys" + (f" for project {project!r}" if project else ""), err=True)
        return
    typer.echo(f"{'id':>4}  {'prefix':<16} {'project':<20} {'created (UTC)':<19}  status")
    for r in rows:
        created = datetime.fromtimestamp(r["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        status = "revoked" if r["revoked"] else "active"
        typer.echo(f"{r['id']:>4}  {r['prefix'] + '…':<16} {r['project']:<20} {created:<19}  {status}")


@app.command("revoke")
def revoke(
    key: Annotated[
        str, typer.Argument(help="The key's number (see 'keys list'), its unique prefix, or the key.")
    ],
    json_out: JsonFlag = False,
    home: HomeOption = None,
) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    from openft.errors import OpenFTError
    from openft.storage import repo

    try:
        with _state(home).db.session() as s:
            row = repo.revoke_api_key(s, which=key)
            project = repo.get_project(s, project_id=row.project_id)
            out = _row(row, project)
    except OpenFTError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        json.dumps(out) if json_out else f"revoked key {out['id']} ({out['prefix']}…) of {out['project']}"
    )
