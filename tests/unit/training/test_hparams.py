from __future__ import annotations

import pytest

from openft.training.config import TrainConfig, default_training_type
from openft.training.hparams import base_learning_rate, resolve_hparams

AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


@pytest.mark.parametrize(
    ("n_examples", "epochs", "batch"),
    [
        (1, 25, 1),
        (3, 25, 1),
        (10, 10, 1),
        (33, 3, 1),
        (34, 3, 1),
        (500, 3, 1),
        (1000, 3, 2),
        (5000, 3, 10),
        (8333, 3, 17),
        (8334, 2, 17),
        (20000, 1, 32),
        (100000, 1, 32),
    ],
)
def test_auto_table(n_examples: int, epochs: int, batch: int) -> None:
    got = resolve_hparams(AUTO, n_examples=n_examples, training_type="lora")
    assert got == {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": 1.0}


def test_explicit_values_win_and_missing_means_auto() -> None:
    got = resolve_hparams(
        {"n_epochs": 7, "learning_rate_multiplier": 0.5}, n_examples=50, training_type="full"
    )
    assert got == {"n_epochs": 7, "batch_size": 1, "learning_rate_multiplier": 0.5}


def test_dpo_adds_beta() -> None:
    assert resolve_hparams(AUTO, n_examples=50, training_type="lora", method="dpo")["beta"] == 0.1
    assert resolve_hparams({"beta": 0.3}, n_examples=50, training_type="lora", method="dpo")["beta"] == 0.3
    assert "beta" not in resolve_hparams(AUTO, n_examples=50, training_type="lora")


def test_base_learning_rates() -> None:
    assert base_learning_rate("full") == 1e-3 and base_learning_rate("lora") == 2e-4
    with pytest.raises(ValueError):
        base_learning_rate("qlora")


def test_default_training_type_and_frozen_config(tmp_path) -> None:
    assert default_training_type("openft-tiny-vlm") == "full"
    assert default_training_type(str(tmp_path / "cache" / "openft-tiny-vlm")) == "full"
    assert default_training_type("Qwen/Qwen2-VL-2B-Instruct") == "lora"
    cfg = TrainConfig(
        base_model="x", output_dir=tmp_path, n_epochs=1, batch_size=1, learning_rate=1e-3, seed=0
    )
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]
