"""The model catalog (``OPENFT_BASE_MODELS``) and the one length limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer

from openft.models.tiny_text import ensure_tiny_text
from openft.models.validation import length_limit
from openft.settings import ModelEntry, Settings


def test_list_entries_are_named_by_hf_id_or_folder_name(tmp_path: Path) -> None:
    folder = tmp_path / "my-llama"
    folder.mkdir()
    s = Settings(home=tmp_path, base_models=["Qwen/Qwen2.5-7B-Instruct", str(folder)])
    assert s.base_model_ids == ["openft-tiny-vlm", "Qwen/Qwen2.5-7B-Instruct", "my-llama"]
    assert s.source_of("my-llama") == str(folder)
    assert s.source_of("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_object_form_with_aliases_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = {
        "gpt-4o-mini-2024-07-18": "Qwen/Qwen2.5-7B-Instruct",
        "llama": {"source": "/models/llama", "max_length": 8192, "training_type": "lora", "lora_rank": 8},
    }
    monkeypatch.setenv("OPENFT_BASE_MODELS", json.dumps(catalog))
    s = Settings(home=tmp_path)
    assert s.base_model_ids == ["openft-tiny-vlm", "gpt-4o-mini-2024-07-18", "llama"]
    assert s.source_of("gpt-4o-mini-2024-07-18") == "Qwen/Qwen2.5-7B-Instruct"
    assert s.catalog["llama"] == ModelEntry(
        source="/models/llama", max_length=8192, training_type="lora", lora_rank=8
    )
    assert s.source_of("ft-era-name-not-in-catalog") == "ft-era-name-not-in-catalog"


@pytest.mark.parametrize(
    "entry",
    [{"source": "x", "bogus": 1}, {"source": "x", "dtype": "float16"}, {"source": "x", "max_length": 0}],
)
def test_bad_options_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: dict) -> None:
    monkeypatch.setenv("OPENFT_BASE_MODELS", json.dumps({"m": entry}))
    with pytest.raises(ValidationError):
        Settings(home=tmp_path)


def test_models_cli_lists_the_catalog(tmp_path: Path) -> None:
    env = {
        "OPENFT_BASE_MODELS": json.dumps(
            {"gpt-4o-mini-2024-07-18": {"source": "/m/q", "learning_rate": 0.0002}}
        ),
        "PYTHONPATH": str(Path(__file__).resolve().parents[3] / "src"),
    }
    out = subprocess.run(
        [sys.executable, "-m", "openft.cli.main", "models", "--home", str(tmp_path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    listed = json.loads(out.stdout)
    assert list(listed) == ["openft-tiny-vlm", "gpt-4o-mini-2024-07-18"]
    assert listed["gpt-4o-mini-2024-07-18"]["source"] == "/m/q"
    assert listed["gpt-4o-mini-2024-07-18"]["learning_rate"] == 0.0002


def test_length_limit_job_then_catalog_then_model(tmp_path: Path) -> None:
    path = ensure_tiny_text("llama3", tmp_path)
    tok, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    assert length_limit(tok, config) == length_limit(tok, config, job=None, catalog=None)
    assert length_limit(tok, config).tokens == config.max_position_embeddings == 4096
    assert length_limit(tok, config).source == "model"
    assert (length_limit(tok, config, catalog=512).tokens, length_limit(tok, config, catalog=512).source) == (
        512,
        "catalog",
    )
    assert length_limit(tok, config, job=100, catalog=512).source == "job"
