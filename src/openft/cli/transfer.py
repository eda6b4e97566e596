"""Moving files between two OpenAI-wire servers through the SDK: streamed, retried, with progress.

Nothing here holds a file's content in memory: downloads stream to a temporary file (or only
into a hash), uploads stream from that file.
"""

from __future__ import annotations

import hashlib
import io
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from openai import OpenAI

CHUNK = 1024 * 1024
T = TypeVar("T")


def with_retries(
    call: Callable[[], T], *, attempts: int = 5, sleep: Callable[[float], None] = time.sleep
) -> T:
    """``call()``, retried with exponential back-off and jitter on 429, 5xx and broken downloads.

    The SDK already retries each request ``max_retries`` times (connection errors included, so
    those are not retried again here: an unreachable server fails in seconds, not minutes);
    this outer loop keeps a long listing alive through a rate-limit window longer than the
    SDK's own back-off, and restarts a download whose body broke off (which the SDK cannot see).
    """
    import openai

    for attempt in range(attempts):
        try:
            return call()
        except (openai.RateLimitError, openai.InternalServerError, BrokenStream):
            if attempt == attempts - 1:
                raise
            sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def paginate(first: Callable[[], Any], *, sleep: Callable[[float], None] = time.sleep) -> Iterator[dict]:
    """Every item of a cursor-paginated SDK list, page by page, as plain dicts."""
    page = with_retries(first, sleep=sleep)
    while True:
        for item in page.data:
            yield item.to_dict(mode="json")
        if not page.has_next_page():
            return
        page = with_retries(page.get_next_page, sleep=sleep)


class Progress:
    """What ``execute`` reports while it copies; the CLI draws a bar from it."""

    def start_file(self, name: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def done_file(self) -> None: ...


class TransferError(Exception):
    """A copy came out wrong (sizes disagree) or could not be made."""


class BrokenStream(TransferError):
    """A download's body broke off half-way."""


def copy_file(
    src: OpenAI,
    dst: OpenAI,
    source: dict[str, Any],
    *,
    purpose: str,
    progress: Progress,
) -> str:
    """Stream one source file to a temporary file, then upload it from there; returns the new id.

    Neither side's content is ever held in memory whole. The bytes are checked against the
    size the source announced and the size the destination reports.
    """
    name = source["filename"]

    def fetch(path: Path) -> int:
        progress.start_file(name, 2 * int(source["bytes"]))  # download, then upload
        return download(src, source["id"], path, progress.advance)[0]

    with tempfile.TemporaryDirectory(prefix="openft-migrate-") as tmp:
        path = Path(tmp) / "content"
        size = with_retries(lambda: fetch(path))  # a download cut off half-way starts over
        if size != source["bytes"]:
            raise TransferError(f"downloaded {size} bytes, the source announced {source['bytes']}")
        return upload(dst, path, name, purpose, progress, started=True)


def upload(
    dst: OpenAI, path: Path, name: str, purpose: str, progress: Progress, *, started: bool = False
) -> str:
    """Upload a local file under ``name``, streamed; checks the size the destination stored."""
    size = path.stat().st_size
    if not started:
        progress.start_file(name, size)
    with ReportingFile(path, progress.advance) as fh:
        uploaded = dst.files.create(file=(name, fh), purpose=purpose)  # type: ignore[arg-type]
    progress.done_file()
    if uploaded.bytes != size:
        raise TransferError(f"the destination stored {uploaded.bytes} bytes of {size}")
    return uploaded.id


class ReportingFile(io.FileIO):
    """A file whose reads advance the progress bar (httpx streams multipart uploads by reading)."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(path, "rb")
        self._on_read = on_read

    def read(self, size: int = -1) -> bytes:
        chunk = super().read(size)
        self._on_read(len(chunk or b""))
        return chunk or b""


def download(
    client: OpenAI, file_id: str, path: Path | None, on_chunk: Callable[[int], None] | None = None
) -> tuple[int, str]:
    """Stream a file's content (to ``path`` if given); returns its size and sha256."""
    digest, size = hashlib.sha256(), 0
    with client.with_streaming_response.files.content(file_id) as response:
        out = path.open("wb") if path else None
        try:
            for chunk in response.iter_bytes(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out:
                    out.write(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
        except Exception as e:
            # The SDK wraps errors of the request, not of reading its body: a connection that
            # drops mid-stream surfaces as the HTTP library's own error. Make it retryable.
            if not type(e).__module__.startswith(("httpx", "httpcore")):
                raise
            raise BrokenStream(f"reading {file_id} broke off after {size} bytes: {e}") from e
        finally:
            if out:
                out.close()
    return size, digest.hexdigest()


def hash_remote(client: OpenAI, file_id: str) -> str:
    return with_retries(lambda: download(client, file_id, None))[1]
