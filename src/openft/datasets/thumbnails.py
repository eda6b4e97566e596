"""Small previews of the inline images a validation report talks about (for the dashboard)."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterable
from typing import Any, BinaryIO

from PIL import Image

from openft.datasets.images import ImageRejected, decode_data_url

_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
THUMB_SIDE = 96


def value_at(record: Any, path: str) -> Any:
    """The value at a report field path such as ``messages[0].content[1].image_url.url``; None if absent."""
    node = record
    for name, index in _STEP.findall(path):
        if name:
            node = node.get(name) if isinstance(node, dict) else None
        else:
            i = int(index)
            node = node[i] if isinstance(node, list) and i < len(node) else None
        if node is None:
            return None
    return node


def thumbnail(url: str, side: int = THUMB_SIDE) -> str | None:
    """A PNG data URL at most ``side`` pixels wide/high of an inline image; None for remote URLs
    (never fetched here) and for bytes that are not an image."""
    if not url.startswith("data:"):
        return None
    try:
        data = decode_data_url(url)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
            small = im.convert("RGB")
            small.thumbnail((side, side))
    except (ImageRejected, OSError, ValueError, Image.DecompressionBombError):
        return None
    out = io.BytesIO()
    small.save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def thumbnails_for(fp: BinaryIO, wanted: Iterable[tuple[int, str]]) -> dict[tuple[int, str], str]:
    """Thumbnails of the images at (line, field path) pairs of a JSONL file, read in one pass."""
    by_line: dict[int, list[str]] = {}
    for line, path in wanted:
        by_line.setdefault(line, []).append(path)
    found: dict[tuple[int, str], str] = {}
    for number, raw in enumerate(fp, start=1):
        paths = by_line.get(number)
        if not paths:
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        for path in paths:
            url = value_at(record, path)
            thumb = thumbnail(url) if isinstance(url, str) else None
            if thumb:
                found[(number, path)] = thumb
    return found
