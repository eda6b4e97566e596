"""Results CSVs (one row of metrics per step), as OpenAI and openft serve them."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from typing import Any

MAX_METADATA_VALUE = 512
"""OpenAI's (and openft's) limit on one metadata value."""


def read_results_csv(data: bytes) -> list[dict[str, float]]:
    """The rows of a results CSV as numbers (blank cells left out).

    OpenAI serves result files base64-encoded; openft serves the CSV itself. Both are read.
    """
    text = data.decode("utf-8", errors="replace").strip()
    if text and not text.startswith("step"):
        try:
            decoded = base64.b64decode(text, validate=False).decode("utf-8").strip()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if decoded.startswith("step"):
            text = decoded
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        parsed = {}
        for key, value in row.items():
            try:
                parsed[str(key)] = float(value)
            except (TypeError, ValueError):
                continue
        if "step" in parsed:
            rows.append(parsed)
    return rows


def final_metrics(rows: list[dict[str, float]], job: dict[str, Any]) -> str:
    """The last value of each column (validation is not logged every step), as JSON within 512 chars."""
    last: dict[str, float | int] = {}
    for row in rows:
        last.update(row)
    if "step" in last:
        last["step"] = int(last["step"])
    if job.get("trained_tokens"):
        last["trained_tokens"] = int(job["trained_tokens"])
    compact = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in last.items()}
    text = json.dumps(compact, separators=(",", ":"))
    while len(text) > MAX_METADATA_VALUE and len(compact) > 1:
        compact.popitem()
        text = json.dumps(compact, separators=(",", ":"))
    return text if compact else ""
