"""Plumbing for the commands that talk to an openft server over HTTP: files, jobs, chat.

They go through the official openai SDK, exactly as user code does, so the CLI exercises
the same wire contract. This module is the CLI's one error translator for remote calls:
an API refusal becomes ``error: <message> (param: X)`` on stderr and exit status 1, never
a traceback. The SDK is imported inside functions so ``openft --help`` stays instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_PANEL = "Connection"

BaseUrlOption = Annotated[
    str,
    typer.Option(
        "--base-url",
        envvar="OPENFT_BASE_URL",
        help="openft API root.",
        rich_help_panel=_PANEL,
    ),
]


def api_key_option(envvar: list[str], help: str) -> Any:  # noqa: A002
    """The ``--api-key`` option, read from the first of ``envvar`` that is set."""
    return Annotated[
        str | None,
        typer.Option("--api-key", envvar=envvar, help=help, rich_help_panel=_PANEL, show_default=False),
    ]


ApiKeyOption = api_key_option(
    ["OPENFT_API_KEY", "OPENAI_API_KEY"], "API key (make one with 'openft keys create --project NAME')."
)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
LimitOption = Annotated[int, typer.Option("--limit", min=1, help="Show at most this many.")]
IntervalOption = Annotated[
    float, typer.Option("--interval", min=0.05, help="Seconds between polls.", hidden=True)
]


def fail(message: str, code: int = 1) -> NoReturn:
    """One readable line on stderr, then exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def describe_api_error(exc: Exception) -> str:
    """The server's own message plus the offending parameter, from an ``openai.APIStatusError``."""
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    if not message:
        message = getattr(exc, "message", None) or str(exc)
    param = getattr(exc, "param", None)
    return f"{message} (param: {param})" if param else str(message)


@contextmanager
def connect(base_url: str, api_key: str | None) -> Iterator[OpenAI]:
    """An SDK client for the server; API and connection errors inside the block exit cleanly."""
    import openai

    if not api_key:
        fail(
            "no API key: pass --api-key or set OPENFT_API_KEY "
            "(create one with 'openft keys create --project NAME')",
            code=2,
        )
    client = openai.OpenAI(base_url=base_url, api_key=api_key)
    try:
        with client:
            yield client
    except openai.APIStatusError as e:
        fail(describe_api_error(e))
    except openai.APIConnectionError as e:
        fail(f"cannot reach {base_url} ({e.message}); is 'openft serve' running there?")


# ---------------------------------------------------------------- output


def to_dict(obj: Any) -> Any:
    """An SDK model (or list of them) as plain JSON-ready data, exactly as the server sent it."""
    if isinstance(obj, list):
        return [to_dict(o) for o in obj]
    if hasattr(obj, "to_dict"):
        return obj.to_dict(mode="json")
    return obj


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(to_dict(obj), indent=2, ensure_ascii=False))


def timestamp(ts: int | float | None) -> str:
    """Unix seconds as local ``YYYY-MM-DD HH:MM:SS``; blank when absent."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def console(*, stderr: bool = False):  # type: ignore[no-untyped-def]
    """A rich console; when output is piped, wide enough that ids are never cut or wrapped."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    wide = None if stream.isatty() else 400
    return Console(file=stream, width=wide, highlight=False, soft_wrap=False)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, empty: str) -> None:
    """A borderless table on stdout, or ``empty`` when there are no rows."""
    from rich import box
    from rich.table import Table

    rows = list(rows)
    if not rows:
        typer.echo(empty, err=True)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, name in enumerate(columns):
        table.add_column(name, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console().print(table)


def print_fields(fields: Iterable[tuple[str, object]]) -> None:
    """``key: value`` lines, skipping empty values."""
    pairs = [(k, v) for k, v in fields if v not in (None, "", [], {})]
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        typer.echo(f"{key + ':':{width + 1}} {value}")
