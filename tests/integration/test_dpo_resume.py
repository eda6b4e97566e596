"""DPO stop-then-resume replays the uninterrupted run, with the starting model as the reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from openft.errors import JobCancelled
from openft.models.loader import load_model, resolve_base
from openft.training.collate import collate_preference
from openft.training.config import LoraConfig
from openft.training.loss import sequence_logprobs
from openft.training.recipes import dpo
from openft.training.reporter import ListReporter
from openft.training.state import read_extra
from tests.integration.test_dpo_recipe import _cfg, _pair, _prompt

KEYS = ("train_loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy")
VALID_KEYS = ("valid_loss", "valid_reward_margin", "full_valid_loss", "full_valid_reward_margin")


@pytest.fixture(scope="module")
def base() -> str:
    from tests.conftest import model_cache

    return resolve_base("openft-tiny-vlm", model_cache())


def _data() -> tuple[list, list]:
    rng = random.Random(11)
    train = [_pair(i + 1, *_prompt(rng)) for i in range(12)]
    valid = [_pair(i + 1, *_prompt(rng)) for i in range(3)]
    return train, valid


def _starting_reference(base: str, pairs: list) -> torch.Tensor:
    """The reference log-probs of the untrained base model, scored from scratch."""
    model, processor = load_model(base, device="cpu")
    rendered = [dpo._render_pair(processor, p, 2048, "line") for p in pairs]
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    # Independently of the recipe's scorer: full-vocabulary logits, padded batches.
    out = []
    with torch.no_grad():
        for chosen, rejected in rendered:
            batch = collate_preference([chosen], [rejected], pad_id)
            labels = batch.pop("labels")
            out.append(sequence_logprobs(model(**batch, use_cache=False).logits, labels))
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_stop_then_resume_replays_the_uninterrupted_run(base: str, tmp_path: Path, kind: str) -> None:
    train, valid = _data()
    # LoRA with dropout: the resumed run must also restore the RNG to draw the same masks.
    extra = (
        {"lora": LoraConfig(r=4, alpha=8, dropout=0.1, modules_to_save=("lm_head",))}
        if kind == "lora"
        else {}
    )
    cfg = {"n_epochs": 2, "valid_every": 2, "learning_rate": 3e-4, **extra}

    whole = ListReporter()
    want = dpo.run(_cfg(base, tmp_path / "whole", **cfg), train, whole, beta=0.1, valid_examples=valid)

    out = tmp_path / "paused"
    first = ListReporter(stop_after=4)  # mid-epoch 2 (an epoch is 3 steps)
    with pytest.raises(JobCancelled):
        dpo.run(_cfg(base, out, **cfg), train, first, beta=0.1, valid_examples=valid)
    assert (out / "state" / "state.json").exists() and (out / "step-3").is_dir()
    reference_file = out / dpo.REFERENCE_FILE
    if kind == "full":
        # The saved reference is the starting model's, not the partly trained one's.
        saved = dpo._read_reference(reference_file, read_extra(out / "state")["fingerprint"])
        assert saved is not None
        assert torch.allclose(saved[0], _starting_reference(base, train), atol=1e-4)
        assert torch.allclose(saved[1], _starting_reference(base, valid), atol=1e-4)
    else:
        assert not reference_file.exists()  # the reference is the model with its adapter disabled
    second = ListReporter()
    got = dpo.run(_cfg(base, out, **cfg), train, second, beta=0.1, valid_examples=valid, resume=True)

    assert [s["step"] for s in second.steps] == [5, 6]
    assert any("resumed at step 4 of 6" in m for _, m in second.messages)
    for x, y in zip(whole.steps, first.steps + second.steps, strict=True):
        assert set(x) == set(y)
        for key in KEYS + VALID_KEYS:
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
        assert x["trained_tokens"] == y["trained_tokens"]
    assert got.steps == want.steps == 6 and got.trained_tokens == want.trained_tokens
    assert [c["step"] for c in second.checkpoints] == [6]
    assert sorted(p.name for p in out.iterdir()) == ["step-3", "step-6"]  # done: state removed


@pytest.mark.slow
def test_resume_without_the_saved_reference_rescores_the_starting_model(base: str, tmp_path: Path) -> None:
    train, _ = _data()
    cfg = {"n_epochs": 2, "learning_rate": 1e-3}
    whole = ListReporter()
    dpo.run(_cfg(base, tmp_path / "whole", **cfg), train, whole, beta=0.1)

    out = tmp_path / "paused"
    with pytest.raises(JobCancelled):
        dpo.run(_cfg(base, out, **cfg), train, ListReporter(stop_after=2), beta=0.1)
    (out / dpo.REFERENCE_FILE).unlink()  # lost: rescoring must use the starting weights, not state
    second = ListReporter()
    dpo.run(_cfg(base, out, **cfg), train, second, beta=0.1, resume=True)
    assert any("scoring 12 pairs with the starting model" in m for _, m in second.messages)
    assert [s["step"] for s in second.steps] == [3, 4, 5, 6]
    for x, y in zip(whole.steps[2:], second.steps, strict=True):
        for key in KEYS:
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)


@pytest.mark.slow
def test_state_of_other_settings_is_not_resumed(base: str, tmp_path: Path) -> None:
    train, _ = _data()
    out = tmp_path / "out"
    with pytest.raises(JobCancelled):
        dpo.run(_cfg(base, out, n_epochs=2), train, ListReporter(stop_after=2), beta=0.1)
    changed = ListReporter(stop_after=1)
    with pytest.raises(JobCancelled):
        dpo.run(_cfg(base, out, n_epochs=2), train, changed, beta=0.2, resume=True)
    assert [s["step"] for s in changed.steps] == [1]
    assert any(level == "warn" and "starting from the beginning" in m for level, m in changed.messages)
