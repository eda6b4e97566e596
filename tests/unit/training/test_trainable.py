"""What trains, per combination of LoRA / full and the vision-tower / projector switches."""

from __future__ import annotations

from pathlib import Path

import pytest

from openft.adapters import apply_lora
from openft.errors import InvalidRequest
from openft.models.loader import load_model, resolve_base
from openft.training.config import LoraConfig
from openft.training.trainable import (
    describe_trainable,
    lora_plan,
    parameter_counts,
    part_of,
    projector_roots,
    set_full_trainable,
)


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("model.visual.blocks.0.attn.qkv", "vision_tower"),
        ("model.visual.blocks.0.mlp.fc1.weight", "vision_tower"),
        ("model.visual.blocks.3.mlp.gate_proj", "vision_tower"),  # Qwen2.5-VL reuses LLM names
        ("model.visual.patch_embed.proj.weight", "vision_tower"),
        ("model.visual.merger.mlp.0.weight", "projector"),
        ("model.visual.deepstack_merger_list.0.linear_fc1", "projector"),  # Qwen3-VL
        ("base_model.model.model.visual.merger.ln_q.weight", "projector"),  # under peft
        ("model.language_model.layers.0.self_attn.q_proj", "language_model"),
        ("model.language_model.embed_tokens.weight", "language_model"),
        ("lm_head.weight", "language_model"),
        ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", "vision_tower"),  # LLaVA
        ("model.multi_modal_projector.linear_1", "projector"),
        ("model.connector.modality_projection.proj", "projector"),  # Idefics3
        ("model.text_model.layers.0.mlp.down_proj", "language_model"),
        ("model.layers.0.self_attn.visual_gate", "language_model"),  # "visual" only as a whole segment
    ],
)
def test_part_of(name: str, part: str) -> None:
    assert part_of(name) == part


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("cache"))


def _trainable_parts(model) -> dict[str, set[str]]:
    """part -> the set of trainable parameter name shapes, e.g. {'lora_A', 'full'}."""
    out: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "lora" if ".lora_" in name else "saved" if "modules_to_save" in name else "full"
            out.setdefault(part_of(name), set()).add(kind)
    return out


LORA = LoraConfig(r=4, alpha=8)


@pytest.mark.parametrize(
    ("train_vision_tower", "train_projector", "want"),
    [
        (False, False, {"language_model": {"lora"}}),
        (True, False, {"language_model": {"lora"}, "vision_tower": {"lora"}}),
        (False, True, {"language_model": {"lora"}, "projector": {"saved"}}),
        (True, True, {"language_model": {"lora"}, "vision_tower": {"lora"}, "projector": {"saved"}}),
    ],
)
def test_lora_combinations(base: str, train_vision_tower: bool, train_projector: bool, want) -> None:
    model, _ = load_model(base, device="cpu", trainable=True)
    plan = lora_plan(model, LORA, train_vision_tower=train_vision_tower, train_projector=train_projector)
    # Full paths only: a bare name would also hit same-named vision layers.
    assert all(t.startswith(("model.language_model.", "model.visual.")) for t in plan.target_modules)
    assert not any("merger" in t for t in plan.target_modules)
    n_lm = sum(part_of(t) == "language_model" for t in plan.target_modules)
    assert n_lm == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert sum(part_of(t) == "vision_tower" for t in plan.target_modules) == (8 if train_vision_tower else 0)
    assert plan.modules_to_save == (("model.visual.merger",) if train_projector else ())
    peft_model = apply_lora(model, plan)
    assert _trainable_parts(peft_model) == want
    counts = parameter_counts(peft_model)
    assert counts["language_model"][0] > 0
    assert (counts["projector"][0] == counts["projector"][1]) == train_projector  # no double count
    assert (counts["vision_tower"][0] > 0) == train_vision_tower
    assert "trainable parameters (LoRA)" in describe_trainable(peft_model, lora=True)


def test_lora_keeps_user_modules_to_save(base: str) -> None:
    model, _ = load_model(base, device="cpu", trainable=True)
    lora = LoraConfig(r=4, alpha=8, modules_to_save=("embed_tokens", "lm_head"))
    plan = lora_plan(model, lora, train_vision_tower=False, train_projector=True)
    assert plan.modules_to_save == ("embed_tokens", "lm_head", "model.visual.merger")
    peft_model = apply_lora(model, plan)
    assert _trainable_parts(peft_model) == {"language_model": {"lora", "saved"}, "projector": {"saved"}}


def test_lora_targets_must_exist_in_the_language_model(base: str) -> None:
    model, _ = load_model(base, device="cpu", trainable=True)
    with pytest.raises(InvalidRequest, match="LoRA targets"):
        lora_plan(model, LoraConfig(target_modules=("qkv",)), train_vision_tower=False, train_projector=False)


@pytest.mark.parametrize("train_vision_tower", [False, True])
def test_full_fine_tuning(base: str, train_vision_tower: bool) -> None:
    model, _ = load_model(base, device="cpu", trainable=True)
    set_full_trainable(model, train_vision_tower=train_vision_tower)
    counts = parameter_counts(model)
    assert counts["language_model"][0] == counts["language_model"][1] > 0
    assert counts["projector"][0] == counts["projector"][1] > 0  # full FT always trains the projector
    assert counts["vision_tower"][0] == (counts["vision_tower"][1] if train_vision_tower else 0)
    assert projector_roots(model) == ["model.visual.merger"]
    line = describe_trainable(model, lora=False)
    assert line.startswith("trainable parameters (full fine-tuning)") and "vision tower" in line


def test_text_only_model_is_all_language(tmp_path: Path) -> None:
    import torch

    m = torch.nn.Sequential()
    m.add_module("embed_tokens", torch.nn.Embedding(4, 2))
    m.add_module("q_proj", torch.nn.Linear(2, 2))
    set_full_trainable(m, train_vision_tower=False)
    assert parameter_counts(m) == {"language_model": (14, 14), "projector": (0, 0), "vision_tower": (0, 0)}
    assert projector_roots(m) == []
    with pytest.raises(InvalidRequest, match="no vision projector"):
        lora_plan(m, LoraConfig(target_modules=("q_proj",)), train_vision_tower=False, train_projector=True)
