"""When the frozen-feature cache turns on, and what it serves: the decisions (frozen parts, dropout,
host budget) and the features themselves on the tiny Qwen2-VL, without training."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from openft.datasets.formats import ImagePart, Message, TextPart
from openft.errors import InvalidRequest
from openft.models.families import find_family
from openft.models.loader import load_model, resolve_base
from openft.models.render import Rendered, render_chat
from openft.training import vision_cache
from openft.training.memory import vision_cache_bytes
from openft.training.reporter import ListReporter
from openft.training.setup import Feeder
from openft.training.trainable import part_of
from tests.conftest import model_cache


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    """openft-tiny-vlm with only the language model trainable (the default LoRA plan's split)."""
    model, processor = load_model(
        resolve_base("openft-tiny-vlm", model_cache()), device="cpu", trainable=True
    )
    family = find_family(model)
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name, family) == "language_model")
    model.train()
    return model, processor


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), colour).save(buf, "PNG")
    return buf.getvalue()


def _rendered(processor: Any, colours: list[tuple[int, int, int]]) -> list[Rendered]:
    return [
        render_chat(
            processor,
            [
                Message("user", (ImagePart(url="data:", data=_png(c)), TextPart("colour?"))),
                Message("assistant", (TextPart("red"),), weight=1),
            ],
        )
        for c in colours
    ]


def _feeder(processor: Any, cache: vision_cache.VisionCache | None) -> Feeder:
    return Feeder(
        device=torch.device("cpu"),
        pad_id=processor.tokenizer.pad_token_id,
        packing=False,
        mrope=True,
        labelled_logits=True,
        autocast=contextlib.nullcontext,
        vision=cache,
    )


def test_the_cache_size_is_one_row_per_image_token_and_deepstack_layer() -> None:
    # Qwen2-VL-2B at 448 px: 256 tokens x 1536 hidden in bf16.
    assert vision_cache_bytes(image_tokens=256, hidden_size=1536, dtype_bytes=2) == 786_432
    assert vision_cache_bytes(image_tokens=256, hidden_size=1536, layers=4, dtype_bytes=2) == 4 * 786_432


def test_a_trained_tower_is_not_cached(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    model.get_submodule("model.visual.blocks").requires_grad_(True)  # train_vision_tower
    rep = ListReporter()
    assert vision_cache.vision_cache_for(model, torch.device("cpu"), "auto", rep, dtype_bytes=4) is None
    assert any("the vision tower trains" in m for _, m in rep.messages)
    with pytest.raises(InvalidRequest, match="not possible") as e:
        vision_cache.vision_cache_for(model, torch.device("cpu"), "on", rep, dtype_bytes=4)
    assert e.value.param == "openft.cache_vision_features"


def test_a_trained_projector_runs_on_cached_tower_outputs(tiny: tuple[Any, Any]) -> None:
    """``train_projector``: the second forward (rows swapped) takes the tower's output from the cache
    and gives the logits and the projector gradients of the model without the cache."""
    model, processor = tiny
    merger = model.get_submodule("model.visual.merger")
    merger.requires_grad_(True)
    items = _rendered(processor, [(200, 0, 0), (0, 0, 200)])
    plain = _feeder(processor, None)

    def step(feeder: Feeder, rows: list[Rendered]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = feeder.forward(model, feeder.collate(rows)).logits
        (logits.float() ** 2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in merger.parameters()]  # type: ignore[union-attr]

    want = step(plain, items[::-1])
    cache = vision_cache.vision_cache_for(model, torch.device("cpu"), "on", ListReporter(), dtype_bytes=4)
    assert cache is not None and cache.split is not None
    assert cache.split.projectors == (merger,) and cache.split.rows_per_token == 4
    assert cache.split.row_width == model.config.vision_config.embed_dim  # the tower's width, not the text's
    rep = ListReporter()
    cache.admit(items, rep)
    assert any("the tower's outputs of 2 distinct image sets" in m for _, m in rep.messages)
    fed = _feeder(processor, cache)
    step(fed, items)  # fills the cache
    got = step(fed, items[::-1])
    assert cache.tower_calls == 1 and cache.hits == 2
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got[1])


def test_fsdp_and_off_do_not_cache(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    rep = ListReporter()
    assert vision_cache.vision_cache_for(model, torch.device("cpu"), "off", rep, dtype_bytes=4) is None
    assert (
        vision_cache.vision_cache_for(model, torch.device("cpu"), "auto", rep, dtype_bytes=4, sharded=True)
        is None
    )
    assert any("sharded (FSDP)" in m for _, m in rep.messages)


def test_over_the_host_budget_auto_falls_back_and_says_so(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, processor = tiny
    items = _rendered(processor, [(200, 0, 0), (0, 0, 200)])
    per_item = (
        sum(1 for t in items[0].input_ids if t == model.config.image_token_id)
        * model.config.text_config.hidden_size
        * 4
    )
    # Room for one item's features within the budget, not two.
    monkeypatch.setattr(
        vision_cache,
        "available_bytes",
        lambda device: int(1.5 * per_item / vision_cache.HOST_BUDGET_FRACTION),
    )
    rep = ListReporter()
    cache = vision_cache.vision_cache_for(model, torch.device("cpu"), "auto", rep, dtype_bytes=4)
    assert cache is not None
    cache.admit(items, rep)
    assert not cache.enabled
    assert any("over the" in m and "host budget" in m for _, m in rep.messages)
    assert cache.tag({}, items) == {}  # nothing tagged: batches run the tower
    forced = vision_cache.vision_cache_for(model, torch.device("cpu"), "on", ListReporter(), dtype_bytes=4)
    assert forced is not None
    forced.admit(items, rep)
    assert forced.enabled


def test_a_tower_with_dropout_runs_in_eval_mode_when_forced(tiny: tuple[Any, Any]) -> None:
    """``auto`` declines a frozen tower with active dropout; ``on`` caches its eval-mode features,
    so a training-mode forward (miss, then hit) gives exactly the eval-mode model's logits."""
    model, processor = tiny
    merger = model.get_submodule("model.visual.merger.mlp")
    merger.insert(0, nn.Dropout(0.5))
    rep = ListReporter()
    assert vision_cache.vision_cache_for(model, torch.device("cpu"), "auto", rep, dtype_bytes=4) is None
    assert any("active dropout (Dropout p=0.5)" in m for _, m in rep.messages)

    items = _rendered(processor, [(200, 0, 0), (0, 0, 200)])
    plain = _feeder(processor, None)
    model.eval()
    with torch.no_grad():
        want = plain.forward(model, plain.collate(items)).logits
    model.train()
    cache = vision_cache.vision_cache_for(model, torch.device("cpu"), "on", ListReporter(), dtype_bytes=4)
    assert cache is not None
    cache.admit(items, ListReporter())
    fed = _feeder(processor, cache)
    with torch.no_grad():
        first = fed.forward(model, fed.collate(items)).logits
        again = fed.forward(model, fed.collate(items[::-1])).logits  # rows swapped: served per example
    assert cache.tower_calls == 1 and cache.hits == 2
    torch.testing.assert_close(first, want, rtol=0, atol=1e-6)
    n = want.shape[0] // 2
    torch.testing.assert_close(again, torch.cat([want[n:], want[:n]]), rtol=0, atol=1e-6)
    cache.close()
    assert "get_image_features" not in vars(model.model)  # the model's own method is back
