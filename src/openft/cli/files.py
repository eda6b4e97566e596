"""``openft files``: upload, list, inspect, download and delete files on a server."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated

import typer

from openft.cli.remote import (
    DEFAULT_BASE_URL,
    ApiKeyOption,
    BaseUrlOption,
    JsonOption,
    LimitOption,
    connect,
    print_fields,
    print_json,
    print_table,
    timestamp,
)

app = typer.Typer(help="Upload and manage training files (the Files API).", no_args_is_help=True)

FileId = Annotated[str, typer.Argument(help="File id (file-...).", show_default=False)]


@app.command("upload")
def upload(
    path: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="File to upload (e.g. JSONL).")
    ],
    purpose: Annotated[str, typer.Option(help="fine-tune, vision, user_data, ...")] = "fine-tune",
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Upload PATH and print its file id."""
    with connect(base_url, api_key) as client:
        f = client.files.create(file=path, purpose=purpose)  # type: ignore[arg-type]
    if json_out:
        print_json(f)
    else:
        typer.echo(f.id)


@app.command("list")
def list_files(
    purpose: Annotated[str | None, typer.Option(help="Only files with this purpose.")] = None,
    limit: LimitOption = 100,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List files, newest first."""
    with connect(base_url, api_key) as client:
        filters = {"purpose": purpose} if purpose else {}
        files = list(itertools.islice(client.files.list(limit=min(limit, 1000), **filters), limit))
    if json_out:
        print_json(files)
        return
    print_table(
        ["id", "filename", "purpose", "bytes", "created"],
        ((f.id, f.filename, f.purpose, f.bytes, timestamp(f.created_at)) for f in files),
        empty="no files",
    )


@app.command("get")
def get(
    file_id: FileId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Show one file's metadata."""
    with connect(base_url, api_key) as client:
        f = client.files.retrieve(file_id)
    if json_out:
        print_json(f)
        return
    print_fields(
        [
            ("id", f.id),
            ("filename", f.filename),
            ("purpose", f.purpose),
            ("bytes", f.bytes),
            ("created", timestamp(f.created_at)),
            ("expires", timestamp(f.expires_at) if getattr(f, "expires_at", None) else None),
        ]
    )


@app.command("content")
def content(
    file_id: FileId,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", dir_okay=False, help="Write here instead of stdout.")
    ] = None,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Download a file's exact bytes (to stdout, or -o PATH)."""
    with connect(base_url, api_key) as client:
        data = client.files.content(file_id).content
    if output is None:
        stdout = typer.get_binary_stream("stdout")
        stdout.write(data)
        stdout.flush()
    else:
        output.write_bytes(data)
        typer.echo(f"wrote {len(data):,} bytes to {output}", err=True)


@app.command("delete")
def delete(
    file_id: FileId,
    json_out: JsonOption = False,
    base_url: BaseUrlOption = DEFAULT_BASE_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Delete a file."""
    with connect(base_url, api_key) as client:
        deleted = client.files.delete(file_id)
    if json_out:
        print_json(deleted)
    else:
        typer.echo(f"deleted {file_id}")
