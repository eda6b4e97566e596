"""Qwen2.5-VL and Qwen3-VL rendering facts: the ``detail`` rule on their pixel budgets (28 and
32 pixels per image token) and large pictures keeping the processor's budget."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from openft.datasets.formats import ImagePart, Message, TextPart
from openft.models.render import render_chat
from tests.unit.models.tiny_qwen_vl import FAMILIES, build_processor, pixels_per_token


def _picture(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (40, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def _tokens(proc, data: bytes, detail: str) -> int:
    image = ImagePart(url="data:image/png;base64,...", data=data, detail=detail)  # type: ignore[arg-type]
    return render_chat(proc, [Message("user", (image, TextPart("?")))]).n_image_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_detail_follows_the_pixel_budget(family) -> None:
    """max_pixels = 64 tokens' worth: a 448x448 picture is scaled into it at "high"/"auto"
    (64 tokens); "low" caps the budget at max_pixels // 4 (16 tokens)."""
    proc = build_processor(family)
    big = _picture(448)
    assert [_tokens(proc, big, d) for d in ("high", "auto", "low")] == [64, 64, 16]
    unit = pixels_per_token(family)  # within the budget a picture keeps its own grid
    assert _tokens(proc, _picture(6 * unit), "high") == 36


@pytest.mark.parametrize("family", FAMILIES)
def test_a_picture_larger_than_the_decode_budget_keeps_the_processors_budget(family) -> None:
    """Real Qwen checkpoints allow up to 12.8 M (Qwen2.5-VL) or 16.8 M (Qwen3-VL) pixels, more
    than openft's 2048x2048 decode budget: the processor, not the decode, decides the size (in
    transformers 5 the budget is ``size["longest_edge"]``; ``max_pixels`` is gone)."""
    proc = build_processor(family)
    proc.image_processor.size = {**dict(proc.image_processor.size), "longest_edge": 3000 * 3000}
    data = _picture(2200)
    direct = proc(text=[proc.image_token], images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    expected = int(direct["image_grid_thw"].prod()) // 4
    assert expected > (2048 // pixels_per_token(family)) ** 2  # more than a 2048x2048 decode allows
    assert _tokens(proc, data, "high") == expected
