"""The DPO reference is the starting model and never moves, in every way a run can start.

A spy on ``dpo_loss`` records the policy and reference log-probs of every step. Each case checks:
the first step's policy equals the reference (loss = log 2: the reference *is* the starting
model), the reference values are the same at every step and equal an independent scoring of the
starting model, and the policy did move.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from openft.datasets.formats import Message, PreferenceExample, TextPart
from openft.models.loader import load_model, resolve_base
from openft.models.render import render_chat
from openft.training import loss as loss_module
from openft.training.config import LoraConfig, TrainConfig
from openft.training.recipes import dpo
from openft.training.reporter import ListReporter

PROMPTS = ["red?", "the green one?", "is it blue or not?", "what is the yellow thing here?"]


def _pairs() -> list[PreferenceExample]:
    return [
        PreferenceExample(
            line=i + 1,
            prompt=(Message("user", (TextPart(p),)),),
            preferred=Message("assistant", (TextPart("yes " * (i + 1)),)),
            non_preferred=Message("assistant", (TextPart("no"),)),
        )
        for i, p in enumerate(PROMPTS)
    ]


@pytest.fixture(scope="module")
def base() -> str:
    from tests.conftest import model_cache

    return resolve_base("openft-tiny-vlm", model_cache())


@pytest.fixture(scope="module")
def adapter_dir(base: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for an SFT job's LoRA output: random (non-zero) adapter weights over the base."""
    out = tmp_path_factory.mktemp("sft-adapter")
    model, processor = load_model(base, device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model,
        PeftLoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(str(out))
    processor.save_pretrained(out)
    (out / "openft.json").write_text(json.dumps({"kind": "adapter", "base_model": base}))
    return out


def _score_starting_model(base: str, init: Path | None) -> list[float]:
    """Reply log-probs of every pair under a freshly loaded starting model, sorted."""
    model, processor = load_model(base, init, device="cpu")
    out = []
    for ex in _pairs():
        for reply in (ex.preferred, ex.non_preferred):
            r = render_chat(processor, (*ex.prompt, reply))
            ids, labels = torch.tensor([r.input_ids]), torch.tensor([r.labels])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            out.append(loss_module.sequence_logprobs(logits, labels).item())
    return sorted(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("training", "init", "expect_disabled_adapter"),
    [
        ("full", None, False),
        ("lora", None, True),
        ("lora", "adapter", False),  # SFT adapter continued: disable_adapter() would be the base
        ("full", "adapter", False),  # SFT adapter merged, then all weights train
    ],
)
def test_reference_is_the_starting_model_and_never_moves(
    base: str,
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    training: str,
    init: str | None,
    expect_disabled_adapter: bool,
) -> None:
    calls: list[torch.Tensor] = []

    def spy(pc, pr, rc, rr, beta):  # noqa: ANN001, ANN202
        calls.append(torch.stack([pc.detach(), pr.detach(), rc.detach(), rr.detach()]).cpu())
        return loss_module.dpo_loss(pc, pr, rc, rr, beta)

    monkeypatch.setattr(dpo, "dpo_loss", spy)
    init_weights = adapter_dir if init == "adapter" else None
    cfg = TrainConfig(
        base_model=base,
        output_dir=tmp_path / "out",
        n_epochs=4,
        batch_size=len(PROMPTS),
        learning_rate=1e-3 if training == "full" else 1e-2,
        seed=0,
        device="cpu",
        init_weights=init_weights,
        # embed_tokens/lm_head train in full: disable_adapter() must switch those back too.
        lora=LoraConfig(r=4, alpha=8, modules_to_save=("embed_tokens", "lm_head"))
        if training == "lora"
        else None,
    )
    assert dpo.reference_is_disabled_adapter(cfg) is expect_disabled_adapter
    reporter = ListReporter()
    dpo.run(cfg, _pairs(), reporter, beta=0.1)

    assert len(calls) == 4
    assert reporter.steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    refs = [sorted(c[2:].flatten().tolist()) for c in calls]
    for later in refs[1:]:
        assert later == pytest.approx(refs[0], abs=1e-4)
    assert refs[0] == pytest.approx(_score_starting_model(base, init_weights), abs=1e-3)
    policy_moved = (calls[-1][:2].sort().values - calls[0][:2].sort().values).abs().max().item()
    assert policy_moved > 0.05, policy_moved
    if init == "adapter":  # and the reference is the SFT model, not the bare base
        assert refs[0] != pytest.approx(_score_starting_model(base, None), abs=1e-2)
