"""Loading a processor whose video half needs torchvision (Qwen2.5-VL's, Qwen3-VL's) where
torchvision is missing: ``AutoProcessor`` raises, openft's loader gives the same processor
without the video half, which renders images exactly as the real one and saves and reloads as
the real class."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.utils import is_torchvision_available

from openft.datasets.formats import ImagePart, Message, TextPart
from openft.models.families import family_of
from openft.models.loader import load_processor
from openft.models.render import render_chat
from tests.unit.models.tiny_qwen_vl import FAMILIES, build_processor, build_tiny_qwen_vl

CLASS = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _chat() -> list[Message]:
    buf = io.BytesIO()
    Image.new("RGB", (150, 90), (30, 160, 200)).save(buf, "PNG")
    image = ImagePart(url="data:image/png;base64,...", data=buf.getvalue(), detail="auto")
    return [Message("user", (image, TextPart("What colour?"))), Message("assistant", (TextPart("blue"),))]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_qwen_vl_processor_loads_without_torchvision(tmp_path, family) -> None:
    folder = build_tiny_qwen_vl(family, tmp_path / family)
    if not is_torchvision_available():  # what the loader works around
        with pytest.raises(Exception):  # noqa: B017 - transformers raises OSError or AttributeError
            AutoProcessor.from_pretrained(folder)
    proc = load_processor(str(folder))
    assert type(proc).__name__ == CLASS[family] and family_of(proc).name == family.replace("2_5", "2")

    expected = render_chat(build_processor(family), _chat())
    for loaded in (proc, _saved_and_reloaded(proc, tmp_path / "again")):
        got = render_chat(loaded, _chat())
        assert got.input_ids == expected.input_ids and got.labels == expected.labels
        assert got.vision.keys() == expected.vision.keys()
        assert all(torch.equal(got.vision[k], expected.vision[k]) for k in expected.vision)


def _saved_and_reloaded(proc, folder):
    proc.save_pretrained(folder)
    assert f'"processor_class": "{type(proc).__name__}"' in (folder / "processor_config.json").read_text()
    return load_processor(str(folder))
