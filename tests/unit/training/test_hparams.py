from __future__ import annotations

import ast
import inspect

import pytest

from openft.datasets.report import Summary, TokenSummary
from openft.training import hparams
from openft.training.config import TrainConfig
from openft.training.hparams import DatasetStats, Hyperparameters, advice, base_learning_rate, resolve_hparams

AUTO = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}


def stats(n: int, mean: float, p95: int, *, images_per_example: int = 0) -> DatasetStats:
    with_images = n if images_per_example else 0
    return DatasetStats(
        examples=n,
        tokens_mean=mean,
        tokens_p95=p95,
        tokens_max=2 * p95,
        examples_with_images=with_images,
        images=with_images * images_per_example,
    )


# Dataset shapes (tokens per example; image tokens included, a DPO pair counts both sequences).
SHORT_TEXT = {"mean": 120, "p95": 200}
LONG_TEXT = {"mean": 3000, "p95": 6000}
IMAGES = {"mean": 900, "p95": 1200, "images_per_example": 1}
MANY_IMAGES = {"mean": 4000, "p95": 5000, "images_per_example": 4}
SHORT_PAIRS = {"mean": 300, "p95": 500}


@pytest.mark.parametrize(
    ("n_examples", "epochs", "batch"),
    [
        (1, 25, 1),
        (3, 25, 1),
        (10, 10, 1),
        (20, 5, 1),
        (33, 3, 1),
        (34, 3, 1),
        (50, 3, 1),
        (100, 3, 1),
        (500, 3, 1),
        (999, 3, 1),
        (1000, 3, 2),
        (5000, 3, 8),
        (8333, 3, 16),
        (8334, 2, 16),
        (20000, 1, 32),
        (100000, 1, 32),
    ],
)
def test_auto_table_without_stats(n_examples: int, epochs: int, batch: int) -> None:
    """Only the example count: the cookbook epochs, 0.2 % batches rounded down to a power of two."""
    got = resolve_hparams(AUTO, n_examples=n_examples, training_type="lora")
    assert got.to_dict() == {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": 1.0}


@pytest.mark.parametrize(
    ("shape", "training_type", "method", "n_examples", "epochs", "batch"),
    [
        # short text: the cookbook epochs; batches grow up to 64 (text only)
        (SHORT_TEXT, "lora", "supervised", 10, 10, 1),
        (SHORT_TEXT, "lora", "supervised", 20, 5, 1),
        (SHORT_TEXT, "lora", "supervised", 50, 3, 1),
        (SHORT_TEXT, "lora", "supervised", 100, 3, 1),
        (SHORT_TEXT, "lora", "supervised", 1000, 3, 2),
        (SHORT_TEXT, "lora", "supervised", 5000, 3, 8),
        (SHORT_TEXT, "lora", "supervised", 20000, 1, 32),
        (SHORT_TEXT, "lora", "supervised", 100000, 1, 64),
        (SHORT_TEXT, "full", "supervised", 100000, 1, 32),  # 8,192 // 200 = 40 -> 32
        # long text: fewer boosted epochs (never below 3), batches capped at 16k tokens (p95 6k -> 2)
        (LONG_TEXT, "lora", "supervised", 10, 4, 1),
        (LONG_TEXT, "lora", "supervised", 20, 3, 1),
        (LONG_TEXT, "lora", "supervised", 50, 3, 1),
        (LONG_TEXT, "lora", "supervised", 100, 3, 1),
        (LONG_TEXT, "lora", "supervised", 1000, 3, 2),
        (LONG_TEXT, "lora", "supervised", 5000, 3, 2),
        (LONG_TEXT, "lora", "supervised", 20000, 1, 2),
        (LONG_TEXT, "lora", "supervised", 100000, 1, 2),
        (LONG_TEXT, "full", "supervised", 100000, 1, 1),  # 8,192 // 6,000 = 1
        # one image each: cookbook epochs (no long-example cap), at most 32, 16k tokens -> 8
        (IMAGES, "lora", "supervised", 10, 10, 1),
        (IMAGES, "lora", "supervised", 20, 5, 1),
        (IMAGES, "lora", "supervised", 50, 3, 1),
        (IMAGES, "lora", "supervised", 100, 3, 1),
        (IMAGES, "lora", "supervised", 1000, 3, 2),
        (IMAGES, "lora", "supervised", 5000, 3, 8),
        (IMAGES, "lora", "supervised", 20000, 1, 8),
        (IMAGES, "lora", "supervised", 100000, 1, 8),
        (IMAGES, "full", "supervised", 100000, 1, 4),  # 8,192 // 1,200 = 6 -> 4
        # four images each: still the cookbook epochs (image tokens are not trained on)
        (MANY_IMAGES, "lora", "supervised", 10, 10, 1),
        (MANY_IMAGES, "lora", "supervised", 20000, 1, 2),
        (MANY_IMAGES, "full", "supervised", 20000, 1, 1),
        # DPO: the clamp counts two sequences per pair (32 pairs for text), tokens per pair
        (SHORT_PAIRS, "lora", "dpo", 10, 10, 1),
        (SHORT_PAIRS, "lora", "dpo", 20, 5, 1),
        (SHORT_PAIRS, "lora", "dpo", 50, 3, 1),
        (SHORT_PAIRS, "lora", "dpo", 100, 3, 1),
        (SHORT_PAIRS, "lora", "dpo", 1000, 3, 2),
        (SHORT_PAIRS, "lora", "dpo", 5000, 3, 8),
        (SHORT_PAIRS, "lora", "dpo", 20000, 1, 32),
        (SHORT_PAIRS, "lora", "dpo", 100000, 1, 32),
        (SHORT_PAIRS, "full", "dpo", 100000, 1, 16),  # 8,192 // 500 = 16
        (IMAGES, "lora", "dpo", 100000, 1, 8),
        (LONG_TEXT, "lora", "dpo", 10, 4, 1),
    ],
)
def test_auto_table_with_stats(
    shape: dict, training_type: str, method: str, n_examples: int, epochs: int, batch: int
) -> None:
    got = resolve_hparams(
        AUTO,
        n_examples=n_examples,
        training_type=training_type,
        method=method,
        stats=stats(n_examples, **shape),
    )
    expected: dict[str, int | float] = {
        "n_epochs": epochs,
        "batch_size": batch,
        "learning_rate_multiplier": 1.0,
    }
    if method == "dpo":
        expected["beta"] = 0.1
    assert got.to_dict() == expected
    assert type(got.n_epochs) is int and type(got.batch_size) is int
    assert type(got.learning_rate_multiplier) is float


def test_dpo_without_stats_counts_pairs_double() -> None:
    got = resolve_hparams(AUTO, n_examples=100000, training_type="lora", method="dpo")
    assert got.to_dict() == {"n_epochs": 1, "batch_size": 16, "learning_rate_multiplier": 1.0, "beta": 0.1}


@pytest.mark.parametrize("n_examples", [1, 10, 20, 33, 1000, 100000])
@pytest.mark.parametrize("shape", [SHORT_TEXT, LONG_TEXT, IMAGES, MANY_IMAGES])
def test_stats_never_raise_epochs_and_batches_are_powers_of_two(n_examples: int, shape: dict) -> None:
    plain = resolve_hparams(AUTO, n_examples=n_examples, training_type="lora")
    for training_type in ("lora", "full"):
        for method in ("supervised", "dpo"):
            got = resolve_hparams(
                AUTO,
                n_examples=n_examples,
                training_type=training_type,
                method=method,
                stats=stats(n_examples, **shape),
            )
            assert min(3, plain.n_epochs) <= got.n_epochs <= plain.n_epochs
            b = int(got.batch_size)
            assert 1 <= b <= 64 and b & (b - 1) == 0


def test_long_example_epoch_cap_is_gradual() -> None:
    # 10 text examples: 100 tokens each keep the boost; 2k tokens (20k in all) -> ceil(5.12) = 6.
    assert resolve_hparams({}, n_examples=10, training_type="lora", stats=stats(10, 100, 150)).n_epochs == 10
    assert resolve_hparams({}, n_examples=10, training_type="lora", stats=stats(10, 2000, 3000)).n_epochs == 6
    assert (
        resolve_hparams({}, n_examples=10, training_type="lora", stats=stats(10, 20000, 30000)).n_epochs == 3
    )


def test_explicit_values_win_and_missing_means_auto() -> None:
    got = resolve_hparams(
        {"n_epochs": 7, "learning_rate_multiplier": 0.5}, n_examples=50, training_type="full"
    )
    assert got.to_dict() == {"n_epochs": 7, "batch_size": 1, "learning_rate_multiplier": 0.5}


def test_user_values_pass_through_whatever_the_stats() -> None:
    given = {"n_epochs": 40, "batch_size": 256, "learning_rate_multiplier": 3, "beta": 2}
    got = resolve_hparams(
        given, n_examples=10, training_type="full", method="dpo", stats=stats(10, **LONG_TEXT)
    )
    assert got.to_dict() == {"n_epochs": 40, "batch_size": 256, "learning_rate_multiplier": 3.0, "beta": 2.0}
    assert type(got.learning_rate_multiplier) is float and type(got.beta) is float


def test_auto_fields_mixed_with_given_ones() -> None:
    s = stats(5000, **LONG_TEXT)
    got = resolve_hparams(
        {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": None},
        n_examples=5000,
        training_type="lora",
        stats=s,
    )
    assert got.to_dict() == {"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 1.0}
    got = resolve_hparams(
        {"batch_size": 12, "beta": "auto"}, n_examples=10, training_type="lora", method="dpo", stats=s
    )
    assert got.to_dict() == {"n_epochs": 4, "batch_size": 12, "learning_rate_multiplier": 1.0, "beta": 0.1}


def test_dpo_adds_beta() -> None:
    assert resolve_hparams(AUTO, n_examples=50, training_type="lora", method="dpo").beta == 0.1
    assert resolve_hparams({"beta": 0.3}, n_examples=50, training_type="lora", method="dpo").beta == 0.3
    assert resolve_hparams(AUTO, n_examples=50, training_type="lora").beta is None


def test_unknown_training_type() -> None:
    with pytest.raises(ValueError, match="training type"):
        resolve_hparams(AUTO, n_examples=50, training_type="qlora")


def test_stats_from_validation_summary() -> None:
    summary = Summary(
        examples=12,
        usable_examples=10,
        examples_with_images=6,
        images=9,
        skipped_examples=2,
        errors=0,
        tokens=TokenSummary(
            source="model",
            total=9000,
            min=100,
            mean=900.0,
            max=3000,
            p50=700,
            p95=2500,
            trained_tokens_per_epoch=9000,
        ),
    )
    s = DatasetStats.from_summary(summary)
    assert s == DatasetStats(
        examples=10, tokens_mean=900.0, tokens_p95=2500, tokens_max=3000, examples_with_images=6, images=9
    )
    assert s.image_heavy
    with pytest.raises(AttributeError):
        s.images = 1  # type: ignore[misc]


def test_stats_from_empty_summary() -> None:
    empty = TokenSummary("estimate", None, None, None, None, None, None, trained_tokens_per_epoch=0)
    summary = Summary(0, 0, 0, 0, 0, 0, tokens=empty)
    s = DatasetStats.from_summary(summary)
    assert (s.tokens_mean, s.tokens_p95, s.tokens_max, s.image_heavy) == (0.0, 0, 0, False)
    # no token numbers: no token caps, only the example count
    assert resolve_hparams(AUTO, n_examples=20000, training_type="lora", stats=s).batch_size == 32


def test_base_learning_rate_refuses_an_unknown_training_type() -> None:
    with pytest.raises(ValueError):
        base_learning_rate("qlora", family=None, pretrained=True)


@pytest.mark.parametrize(
    ("training_type", "family", "pretrained", "rate"),
    [
        ("full", None, False, 1e-3),  # openft-tiny-vlm (random init)
        ("lora", None, False, 2e-4),
        ("full", "qwen2_vl", False, 1e-3),  # the tiny model is a qwen2_vl: pretrained decides
        ("full", "qwen2_vl", True, 1e-5),
        ("lora", "qwen2_vl", True, 2e-4),
        ("full", "llava", True, 2e-5),
        ("lora", "llava", True, 2e-4),
        ("full", None, True, 1e-5),
        ("full", "something_new", True, 1e-5),
        ("lora", None, True, 2e-4),
    ],
)
def test_base_learning_rate_table(
    training_type: str, family: str | None, pretrained: bool, rate: float
) -> None:
    assert base_learning_rate(training_type, family=family, pretrained=pretrained) == rate


def test_advice_names_the_adjustments() -> None:
    text = advice(Hyperparameters(**{"n_epochs": 10, "batch_size": 1, "learning_rate_multiplier": 1.0}))
    assert "raise n_epochs by 1-2 (to 11-12)" in text
    assert "lower it by 1-2 (to 8-9)" in text
    assert "raise learning_rate_multiplier (e.g. to 2)" in text
    assert "beta" not in text
    one = advice(Hyperparameters(**{"n_epochs": 1, "batch_size": 32, "learning_rate_multiplier": 1.0}))
    assert "to 2-3" in one and "lower learning_rate_multiplier instead (e.g. to 0.5)" in one
    assert "lower it to 1" in advice(
        Hyperparameters(**{"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 0.5})
    )
    dpo = advice(
        Hyperparameters(**{"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": 0.1})
    )
    assert "beta=0.1: raise it to stay closer to the base model" in dpo


def test_hparams_is_pure() -> None:
    tree = ast.parse(inspect.getsource(hparams))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported <= {"__future__", "math", "dataclasses", "typing", "openft"}
    ours = {
        n.module
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("openft")
    }
    assert ours == {"openft.datasets.report"}  # the typed validation summary: torch-free by contract


def test_train_config_is_frozen(tmp_path) -> None:
    cfg = TrainConfig(
        base_model="x", output_dir=tmp_path, n_epochs=1, batch_size=1, learning_rate=1e-3, seed=0
    )
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("n_examples", "epochs", "batch"),
    [
        (240, 20, 8),  # 4,800 passes in batches of 8
        (100, 25, 4),  # epochs capped at 25; 100 // 16 = 6 -> batch 4
        (20, 25, 1),  # too few for batches
        (2000, 3, 8),  # already 6,000 passes under the cookbook rule
    ],
)
def test_random_init_base_gets_more_and_steadier_training_on_images(n_examples, epochs, batch):
    images = stats(n_examples, 40, 60, images_per_example=1)
    hp = resolve_hparams(AUTO, n_examples=n_examples, training_type="full", stats=images, pretrained=False)
    assert (hp.n_epochs, hp.batch_size) == (epochs, batch)
    assert hp.learning_rate_multiplier == 1.0


def test_random_init_rule_leaves_text_pretrained_and_given_numbers_alone():
    text = stats(240, 40, 60)
    images = stats(240, 40, 60, images_per_example=1)
    cookbook = resolve_hparams(AUTO, n_examples=240, training_type="full", stats=images)
    assert (cookbook.n_epochs, cookbook.batch_size) == (3, 1)  # pretrained: the cookbook rule
    on_text = resolve_hparams(AUTO, n_examples=240, training_type="full", stats=text, pretrained=False)
    assert (on_text.n_epochs, on_text.batch_size) == (3, 1)
    given = resolve_hparams(
        {"n_epochs": 2, "batch_size": 1}, n_examples=240, training_type="full", stats=images, pretrained=False
    )
    assert (given.n_epochs, given.batch_size) == (2, 1)
