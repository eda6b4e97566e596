from __future__ import annotations

import threading
from pathlib import Path

import torch

from openft.datasets.formats import ImagePart, Message, TextPart
from openft.models.loader import load_model, resolve_base
from openft.models.render import render_chat
from openft.models.tiny import TinyVLProcessor, ensure_tiny_vlm
from openft.settings import TINY_MODEL


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic(tmp_path: Path, tiny_path: Path) -> None:
    again = ensure_tiny_vlm(tmp_path / "b")
    assert again == tmp_path / "b" / TINY_MODEL
    a, b = _files(tiny_path), _files(again)
    assert sorted(a) == sorted(b)
    assert {"model.safetensors", "tokenizer.json", "config.json", "processor_config.json"} <= set(a)
    for name in a:
        assert a[name] == b[name], name


def test_ensure_is_idempotent_and_safe_when_racing(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_vlm(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / TINY_MODEL] * 2
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL]  # no temp folders left behind
    assert ensure_tiny_vlm(tmp_path) == tmp_path / TINY_MODEL


def test_resolve_base(tmp_path: Path, tiny_path: Path) -> None:
    assert resolve_base(str(tiny_path), tmp_path) == str(tiny_path)
    assert resolve_base("Qwen/Qwen2-VL-2B-Instruct", tmp_path) == "Qwen/Qwen2-VL-2B-Instruct"


def test_loads_through_the_generic_path_and_runs_an_image(tiny, png) -> None:
    model, processor = tiny
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert isinstance(processor, TinyVLProcessor)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    r = render_chat(
        processor,
        [
            Message("user", (ImagePart(url="x", data=png()), TextPart("What colour?"))),
            Message("assistant", (TextPart("red"),)),
        ],
    )
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([r.input_ids]),
            pixel_values=r.vision["pixel_values"],
            image_grid_thw=r.vision["image_grid_thw"],
            mm_token_type_ids=r.vision["mm_token_type_ids"][None],
        )
    assert out.logits.shape == (1, len(r.input_ids), 2048)


def test_load_model_trainable(tiny_path: Path) -> None:
    model, _ = load_model(str(tiny_path), device="cpu", trainable=True)
    assert model.training
