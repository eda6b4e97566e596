from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from openft.models.loader import load_model, resolve_base


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("tiny-cache")))


@pytest.fixture(scope="session")
def tiny(tiny_path: Path):
    """(model, processor) of the tiny VLM on CPU."""
    return load_model(str(tiny_path), device="cpu")


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory: pytest.TempPathFactory):
    """(model, processor) of the tiny Gemma 3 (``tiny_gemma3.py``) on CPU."""
    from tests.unit.models.tiny_gemma3 import build_tiny_gemma3

    return load_model(str(build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")), device="cpu")


@pytest.fixture(scope="session")
def processor(tiny):
    return tiny[1]


def _png(size: tuple[int, int] = (112, 112), colour: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def png():
    """``png(size=(112, 112), colour=(200, 10, 10)) -> bytes`` of a solid-colour PNG."""
    return _png
