"""The built-in tiny text models by name: ``openft-tiny-<format>`` as a catalog source is built
offline, trained as a random-init model, and not listed unless the catalog names it."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from openft.models.families import find_chat_format
from openft.models.loader import resolve_base
from openft.models.thinking import thinking_of
from openft.models.tiny_text import FORMATS
from openft.settings import TINY_MODEL, TINY_TEXT_MODELS, Settings
from openft.training.plan import default_training_type, is_tiny


def test_one_name_per_text_format() -> None:
    assert sorted(TINY_TEXT_MODELS) == sorted(f.model_name for f in FORMATS.values())


def test_a_name_resolves_to_its_generated_model(tmp_path: Path) -> None:
    folder = Path(resolve_base("openft-tiny-qwen3", tmp_path))
    assert folder == tmp_path / "openft-tiny-qwen3" and (folder / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    assert find_chat_format(tok).name == "chatml" and thinking_of(tok) is not None
    assert resolve_base("openft-tiny-qwen3", tmp_path) == str(folder)  # built once
    assert resolve_base("openft-tiny-nope", tmp_path) == "openft-tiny-nope"  # an HF id, as is


def test_listed_only_when_the_catalog_names_it(monkeypatch) -> None:
    monkeypatch.delenv("OPENFT_BASE_MODELS", raising=False)
    assert list(Settings().catalog) == [TINY_MODEL]
    monkeypatch.setenv("OPENFT_BASE_MODELS", '["openft-tiny-qwen3", "openft-tiny-llama3"]')
    catalog = Settings().catalog
    assert list(catalog) == [TINY_MODEL, "openft-tiny-qwen3", "openft-tiny-llama3"]
    assert catalog["openft-tiny-qwen3"].source == "openft-tiny-qwen3"


def test_random_init_text_models_train_in_full() -> None:
    for name in TINY_TEXT_MODELS:
        assert is_tiny(name) and default_training_type(name) == "full"
    assert default_training_type("Qwen/Qwen3-8B") == "lora"
