"""Options and settings shared by every command."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="openft home (database, blobs, models). Default: $OPENFT_HOME or ./.openft"),
]


def settings_for(home: Path | None, **overrides: object):  # type: ignore[no-untyped-def]
    """Settings from the environment, with ``--home`` (and other flags) taking precedence."""
    from openft.settings import Settings

    if home is not None:
        # Child processes (embedded workers) inherit the same home through the environment.
        os.environ["OPENFT_HOME"] = str(home)
        overrides["home"] = home
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
