"""Reading JSONL: UTF-8, one JSON object per non-blank line, streamed line by line.

Line numbers are 1-based and count every physical line, blank ones included, so they match
what the user sees in an editor. Blank (whitespace-only) lines are allowed and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

_BOM = b"\xef\xbb\xbf"


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


def parse_line(raw: bytes) -> tuple[dict | None, str | None]:
    """Parse one line into a dict, or return what is wrong with it and what to do."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, (f"the line is not valid UTF-8 (byte {e.start}); save the file with UTF-8 encoding")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        return None, "the JSON is nested too deeply; flatten the example"
    except ValueError as e:  # JSONDecodeError, huge integers, NaN/Infinity
        return None, f"the line is not valid JSON ({e}); write one complete JSON object per line"
    if not isinstance(value, dict):
        return None, (
            f"expected a JSON object per line, got {type(value).__name__}; "
            'write each example as {"messages": [...]} on its own line'
        )
    return value, None


def _raw_lines(fp: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, stripped bytes) for every non-blank line."""
    for number, raw in enumerate(fp, start=1):
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        raw = raw.strip()
        if raw:
            yield number, raw


def read_jsonl(fp: BinaryIO) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line, record, None)`` for good lines and ``(line, None, error)`` for bad ones."""
    for number, raw in _raw_lines(fp):
        record, error = parse_line(raw)
        yield number, record, error


def scan_jsonl(fp: BinaryIO) -> JsonlScan:
    """Count records and find the first malformed line, streaming (used at upload time)."""
    count = 0
    first_error: tuple[int, str] | None = None
    for number, raw in _raw_lines(fp):
        count += 1
        if first_error is None:
            _, error = parse_line(raw)
            if error is not None:
                first_error = (number, error)
    return JsonlScan(lines=count, first_error=first_error)
