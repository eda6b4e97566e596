"""``openft keys create --project NAME``: prints only the new key, for ``$(...)`` in scripts."""

from __future__ import annotations

from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for

app = typer.Typer(help="API keys (one project per key).", no_args_is_help=True)


@app.command("create")
def create(
    project: Annotated[str, typer.Option("--project", help="Project name; created if new.")],
    home: HomeOption = None,
) -> None:
    """Create an API key for PROJECT and print it (only the key, on stdout)."""
    from openft.storage import repo
    from openft.storage.home import open_home

    state = open_home(settings_for(home))
    with state.db.session() as s:
        key = repo.create_api_key(s, project_name=project)
    typer.echo(key)
