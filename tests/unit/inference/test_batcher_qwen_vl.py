"""Serving Qwen2.5-VL and Qwen3-VL through the continuous batcher: the same tokens as transformers'
own ``generate``, and batching changes no answer (M-RoPE positions with their per-request deltas,
Qwen2.5-VL's windowed vision attention, Qwen3-VL's DeepStack and interleaved M-RoPE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from openft.inference.registry import LoadedModel, ModelRef, Registry
from tests.unit.inference.test_batcher import LOOSE, ask, assert_decode_loop_matches_generate, concurrently
from tests.unit.models.tiny_qwen_vl import FAMILIES, build_tiny_qwen_vl


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_loaded(request, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = build_tiny_qwen_vl(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    return Registry(device="cpu").get(ModelRef(id=request.param, base=str(path), weights_dir=None))


@pytest.mark.parametrize("image", [None, (112, 56), (200, 200)])
def test_the_decode_loop_matches_transformers_generate(qwen_loaded, image_loader, png_url, image) -> None:
    assert_decode_loop_matches_generate(qwen_loaded, image_loader, png_url(image) if image else None)


def test_batched_greedy_equals_alone_with_images(qwen_loaded, image_loader, png_url) -> None:
    cases = [
        {"text": LOOSE[0], "max_tokens": 16},
        {"text": LOOSE[3], "max_tokens": 12, "image": png_url((112, 112), (200, 10, 10))},
        {"text": LOOSE[1], "max_tokens": 20, "image": png_url((64, 192), (10, 10, 200)), "n": 2},
        {"text": LOOSE[2], "max_tokens": 8, "image": png_url((224, 160), (10, 200, 10))},
    ]

    def call(case: dict):
        kw = {k: v for k, v in case.items() if k != "text"}
        return lambda: ask(qwen_loaded, image_loader, case["text"], temperature=0, **kw)

    alone = [call(c)() for c in cases]
    together = concurrently([call(c) for c in cases])
    assert together == alone
    assert qwen_loaded.batcher.peak_rows > 1  # they really shared a batch
