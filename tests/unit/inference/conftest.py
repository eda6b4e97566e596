from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from openft.inference.registry import LoadedModel, ModelRef, Registry
from openft.models.tiny import ensure_tiny_vlm
from openft.settings import TINY_MODEL


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_vlm(tmp_path_factory.mktemp("inference-models"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry(device="cpu", max_loaded=2)


@pytest.fixture(scope="session")
def loaded(registry: Registry, tiny_dir: Path) -> LoadedModel:
    return registry.get(ModelRef(id=TINY_MODEL, base=str(tiny_dir), weights_dir=None))


def _png_data_url(size: tuple[int, int] = (112, 112), colour: tuple[int, int, int] = (200, 10, 10)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def png_url():
    """``png_url(size=(112, 112), colour=(200, 10, 10)) -> str``: a solid-colour PNG data URL."""
    return _png_data_url


@pytest.fixture(scope="session")
def image_loader():
    """The loader the API passes: helper B's ``load_image_url`` (data: URLs need no network)."""
    from openft.datasets.images import load_image_url

    return load_image_url
