"""Streaming multipart upload: the file part goes straight into a blob as the bytes arrive.

Starlette's form parser would spool the whole file to a temp file first (after which we would
read it twice more: to scan the JSONL and to hash and copy it into the blob store). Here one pass
does everything, off the event loop: each batch of received bytes is hashed, written to the
blob's temp file and fed to the JSONL line scanner in a worker thread, so the API stays
responsive during large uploads, memory stays bounded (one JSONL line at most), and a file that
can never be accepted (a line over the limit) is refused without reading the rest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio.to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from openft.datasets.lines import JsonlScan, JsonlScanner
from openft.errors import InvalidRequest
from openft.storage.blobs import BlobStore, BlobWriter

_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
_BATCH = 1024 * 1024  # bytes handed to the worker thread at a time


@dataclass
class Upload:
    """What arrived: the form's text fields, and the stored file (if the request had one)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    key: str | None = None
    size: int = 0
    scan: JsonlScan | None = None
    """Line check of a ``.jsonl`` file; None for other files."""


class _Sink:
    """The file part's destination: blob writer plus (for .jsonl) the line scanner."""

    def __init__(self, writer: BlobWriter, scanner: JsonlScanner | None) -> None:
        self.writer, self.scanner = writer, scanner

    def write(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.writer.write(piece)
            if self.scanner is not None:
                self.scanner.feed(piece)


async def receive_upload(
    stream: AsyncIterator[bytes],
    content_type: str,
    *,
    blobs: BlobStore,
    max_bytes: int,
    max_line_bytes: int,
) -> Upload:
    """Parse a ``multipart/form-data`` body with one file part, storing the file as a blob.

    Raises ``InvalidRequest`` for malformed forms and for a JSONL line over ``max_line_bytes``
    (as soon as it is seen), ``PayloadTooLarge`` past ``max_bytes``. Nothing is stored unless
    the whole file arrived.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not content_type.startswith("multipart/form-data") or not boundary:
        raise InvalidRequest("Send the upload as multipart/form-data with 'file' and 'purpose' parts.")
    result = Upload()
    part: dict[str, object] = {}
    header_name, header_value = bytearray(), bytearray()
    pending: list[bytes] = []
    sink: _Sink | None = None
    writer: BlobWriter | None = None

    def on_part_begin() -> None:
        part.clear()
        part["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        part["headers"][bytes(header_name).lower()] = bytes(header_value)  # type: ignore[index]
        header_name.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal sink, writer
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))  # type: ignore[attr-defined]
        name = options.get(b"name", b"").decode("utf-8", "replace")
        part["name"] = name
        if b"filename" in options:
            if name != "file" or sink is not None:
                raise InvalidRequest("Send exactly one file, in the part named 'file'.", param="file")
            result.filename = options[b"filename"].decode("utf-8", "replace") or "upload"
            writer = blobs.writer(max_bytes=max_bytes)
            scanner = (
                JsonlScanner(max_line_bytes=max_line_bytes)
                if result.filename.lower().endswith(".jsonl")
                else None
            )
            sink = _Sink(writer, scanner)
            part["file"] = True
        else:
            if len(result.fields) >= _MAX_FIELDS:
                raise InvalidRequest(f"Too many form fields (at most {_MAX_FIELDS}).")
            part["data"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.get("file"):
            pending.append(data[start:end])
            return
        buf: bytearray = part["data"]  # type: ignore[assignment]
        buf.extend(data[start:end])
        if len(buf) > _MAX_FIELD_BYTES:
            raise InvalidRequest(f"Form field '{part['name']}' is over {_MAX_FIELD_BYTES} bytes.")

    def on_part_end() -> None:
        if not part.get("file"):
            result.fields[str(part["name"])] = bytes(part["data"]).decode("utf-8", "replace")  # type: ignore[arg-type]

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    async def flush(sink: _Sink) -> None:
        batch = list(pending)
        pending.clear()
        await anyio.to_thread.run_sync(sink.write, batch)
        _refuse_long_line(sink)

    try:
        async for chunk in stream:
            parser.write(chunk)
            if sink is not None and sum(map(len, pending)) >= _BATCH:
                await flush(sink)
        parser.finalize()
        if sink is None or writer is None:
            raise InvalidRequest("Missing the 'file' part of the multipart upload.", param="file")
        await flush(sink)
        if sink.scanner is not None:
            result.scan = sink.scanner.finish()
        result.key, result.size = await anyio.to_thread.run_sync(writer.commit)
        return result
    except FormParserError as e:
        raise InvalidRequest(f"Malformed multipart upload: {e}.", param="file") from None
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)  # drops the temp file unless committed


def _refuse_long_line(sink: _Sink) -> None:
    scanner = sink.scanner
    if scanner is not None and scanner.too_long and scanner.first_error is not None:
        line, what = scanner.first_error
        raise InvalidRequest(
            f"Invalid file format for Fine-Tuning API: line {line}: {what}",
            param="file",
            code="invalid_file_format",
        )
