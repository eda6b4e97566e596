"""Reading JSONL: UTF-8, one JSON object per non-blank line, streamed line by line.

Line numbers are 1-based and count every physical line, blank ones included, so they match
what the user sees in an editor. Blank (whitespace-only) lines are allowed and skipped.

Memory is bounded by design: a line longer than ``max_line_bytes`` is reported (and skipped)
without ever being held whole, and a record nested deeper than :data:`MAX_JSON_DEPTH` is
reported instead of handed to code that would recurse through it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from openft.protocol.common import MAX_JSON_DEPTH, json_depth

_BOM = b"\xef\xbb\xbf"

MAX_LINE_BYTES = 160 * 1024 * 1024
"""Default longest line: one example with 10 data-URL images of 10 MB each, plus its text."""

_READ = 1024 * 1024


@dataclass
class JsonlScan:
    """Outcome of a quick upload-time check.

    ``lines`` counts the non-blank lines (the records) of the whole file; ``first_error`` is
    ``(line, message)`` for the first line that is not a JSON object, or None.
    """

    lines: int
    first_error: tuple[int, str] | None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def too_long_message(limit: int) -> str:
    return (
        f"the line is longer than the {limit}-byte limit; one example per line, with images as "
        "HTTP URLs or within 10 MB each (raise OPENFT_MAX_LINE_BYTES for longer examples)"
    )


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """Parse one line into a dict, or return what is wrong with it and what to do."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"the line is not valid UTF-8 (byte {e.start}); save the file with UTF-8 encoding")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return None, f"the JSON is nested too deeply (limit {MAX_JSON_DEPTH} levels); flatten the example"
    except ValueError as e:  # JSONDecodeError, huge integers, NaN/Infinity
        return None, f"the line is not valid JSON ({e}); write one complete JSON object per line"
    if not isinstance(value, dict):
        return None, (
            f"expected a JSON object per line, got {type(value).__name__}; "
            'write each example as {"messages": [...]} on its own line'
        )
    if (depth := json_depth(value)) > MAX_JSON_DEPTH:
        return None, (
            f"the JSON is nested {depth} levels deep, more than the limit of {MAX_JSON_DEPTH}; flatten the example"
        )
    return value, None


def _raw_lines(fp: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, stripped bytes) for every non-blank line; ``None`` for a line over
    the limit, whose bytes are read and dropped in chunks, never held whole."""
    number = 0
    while True:
        raw = fp.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := fp.readline(_READ)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        raw = raw.strip()
        if raw:
            yield number, raw


def read_jsonl(
    fp: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line, record, None)`` for good lines and ``(line, None, error)`` for bad ones."""
    for number, raw in _raw_lines(fp, max_line_bytes):
        if raw is None:
            yield number, None, too_long_message(max_line_bytes)
            continue
        record, error = parse_line(raw)
        yield number, record, error


class JsonlScanner:
    """Upload-time check fed with chunks as they arrive: counts records and finds the first bad
    line without holding more than one line (at most ``max_line_bytes``) in memory.

    ``too_long`` is set as soon as a line passes the limit, so a caller can stop reading a
    file that can never be accepted.
    """

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.lines = 0
        self.first_error: tuple[int, str] | None = None
        self.too_long = False
        self._number = 0
        self._buf = bytearray()
        self._skipping = False  # inside an over-long line: drop bytes until its newline

    def feed(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                self._buf += piece
                if len(self._buf) > self.max_line_bytes:
                    self._overflow()
            if end < 0:
                return
            self._end_line()
            start = end + 1

    def finish(self) -> JsonlScan:
        if self._buf or self._skipping:
            self._end_line()
        return JsonlScan(lines=self.lines, first_error=self.first_error)

    def _overflow(self) -> None:
        self._skipping, self.too_long = True, True
        self._buf = bytearray()
        self._error(self._number + 1, too_long_message(self.max_line_bytes))

    def _end_line(self) -> None:
        self._number += 1
        raw = bytes(self._buf)
        self._buf = bytearray()
        if self._skipping:
            self._skipping = False
            self.lines += 1
            return
        if self._number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        raw = raw.strip()
        if not raw:
            return
        self.lines += 1
        if self.first_error is None:
            _, error = parse_line(raw)
            if error is not None:
                self._error(self._number, error)

    def _error(self, line: int, message: str) -> None:
        if self.first_error is None:
            self.first_error = (line, message)


def scan_jsonl(fp: BinaryIO, *, max_line_bytes: int = MAX_LINE_BYTES) -> JsonlScan:
    """Count records and find the first malformed line, streaming."""
    scanner = JsonlScanner(max_line_bytes=max_line_bytes)
    while chunk := fp.read(_READ):
        scanner.feed(chunk)
    return scanner.finish()
