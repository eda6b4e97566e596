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


def test_a_folder_from_an_older_format_is_rebuilt(tmp_path: Path, tiny_path: Path) -> None:
    import json
    import shutil

    stale = tmp_path / TINY_MODEL
    shutil.copytree(tiny_path, stale)
    (stale / "model.safetensors").write_bytes(b"old weights")
    (stale / "openft-tiny.json").write_text(json.dumps({"name": TINY_MODEL, "format_version": "1"}))
    assert ensure_tiny_vlm(tmp_path) == stale
    assert _files(stale) == _files(tiny_path)  # the current build, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == [TINY_MODEL]  # the stale copy is gone


def test_patch_filters_see_colour_and_edges(tiny) -> None:
    """A red patch and a patch with a vertical edge give what the fixed filters promise."""
    model, _ = tiny
    conv = model.model.visual.patch_embed.proj
    flat = torch.zeros(1, 3, 2, 14, 14)
    flat[:, 0] = 1.0  # red channel up everywhere
    edge = torch.zeros(1, 3, 2, 14, 14)
    edge[..., 7:] = 1.0  # right half brighter: a vertical edge
    with torch.no_grad():
        f, e = conv(flat).flatten(), conv(edge).flatten()
    assert f[0] > 0 and abs(f[1]) < 1e-6 and abs(f[2]) < 1e-6  # channel means: red only
    assert abs(f[3:7]).max() < 1e-5  # a flat patch has no edges
    assert e[3] > 0 and abs(e[4]) < 1e-5  # whole-patch x-gradient sees it, the y-gradient does not
