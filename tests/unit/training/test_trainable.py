"""What trains, per combination of LoRA / full and the vision-tower / projector switches."""

from __future__ import annotations

from pathlib import Path

import pytest

from openft.adapters import apply_lora
from openft.errors import InvalidRequest
from openft.models.families import LLAVA, QWEN2_VL, QWEN3_VL, Family, find_family
from openft.models.loader import load_model, resolve_base
from openft.training.config import LoraConfig
from openft.training.memory import ModelFacts, lora_trainable_params, model_facts
from openft.training.trainable import (
    describe_trainable,
    lora_plan,
    parameter_counts,
    part_of,
    projector_roots,
    set_full_trainable,
)


@pytest.mark.parametrize(
    ("family", "name", "part"),
    [
        (QWEN2_VL, "model.visual.blocks.0.attn.qkv", "vision_tower"),
        (QWEN2_VL, "model.visual.blocks.0.mlp.fc1.weight", "vision_tower"),
        (QWEN2_VL, "model.visual.blocks.3.mlp.gate_proj", "vision_tower"),  # Qwen2.5-VL reuses LLM names
        (QWEN2_VL, "model.visual.patch_embed.proj.weight", "vision_tower"),
        (QWEN2_VL, "model.visual.merger.mlp.0.weight", "projector"),
        (QWEN2_VL, "model.visual.merger", "projector"),  # a module's own name, no trailing dot
        (QWEN3_VL, "model.visual.deepstack_merger_list.0.linear_fc1", "projector"),  # DeepStack
        (QWEN3_VL, "model.visual.pos_embed.weight", "vision_tower"),
        (QWEN2_VL, "base_model.model.model.visual.merger.ln_q.weight", "projector"),  # under peft
        (QWEN2_VL, "model.language_model.layers.0.self_attn.q_proj", "language_model"),
        (QWEN2_VL, "model.language_model.embed_tokens.weight", "language_model"),
        (QWEN2_VL, "lm_head.weight", "language_model"),
        (LLAVA, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", "vision_tower"),
        (LLAVA, "model.multi_modal_projector.linear_1", "projector"),
        (LLAVA, "model.language_model.layers.0.mlp.down_proj", "language_model"),
        # A text model (no vision family) is all language model, whatever its layers are called.
        (None, "model.layers.0.self_attn.q_proj", "language_model"),
        (None, "model.vision_tower.layers.0.q_proj", "language_model"),
        (None, "lm_head.weight", "language_model"),
    ],
)
def test_part_of_asks_the_family(family: Family | None, name: str, part: str) -> None:
    assert part_of(name, family) == part
    if family is not None:  # the registry's own answer, lm_head folded into the language model
        assert family.component(name) in (
            (part,) if part != "language_model" else ("language_model", "lm_head")
        )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("cache"))


def _trainable_parts(model) -> dict[str, set[str]]:
    """part -> the set of trainable parameter name shapes, e.g. {'lora_A', 'full'}."""
    out: dict[str, set[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = "lora" if ".lora_" in name else "saved" if "modules_to_save" in name else "full"
            out.setdefault(part_of(name, find_family(model)), set()).add(kind)
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
    n_lm = sum(part_of(t, QWEN2_VL) == "language_model" for t in plan.target_modules)
    assert n_lm == 2 * 7  # 2 layers x q/k/v/o/gate/up/down
    assert sum(part_of(t, QWEN2_VL) == "vision_tower" for t in plan.target_modules) == (
        8 if train_vision_tower else 0
    )
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


# Pinned from the name-regex implementation this registry lookup replaced: the same layers train and
# the memory planner sees the same numbers, for each vision family and a text model.
PINNED = {
    "qwen2_vl": {
        "counts": {"language_model": 820352, "projector": 98816, "vision_tower": 142208},
        "roots": ["model.visual.merger"],
        "lora_targets": (14, 22),  # language model only / with the vision tower
        "lora_params": 1792,
        "facts": ModelFacts(1061376, 1061376, 4, 128, 2, 2048, 256, 64, 2),
    },
    "llava": {
        "counts": {"language_model": 557696, "projector": 24832, "vision_tower": 105984},
        "roots": ["model.multi_modal_projector"],
        "lora_targets": (14, 26),
        "lora_params": 1792,
        "facts": ModelFacts(688512, 688512, 4, 128, 2, 1024, 256, 64, 2),
    },
    "qwen3_vl": {  # DeepStack mergers are projector, the learned position grid is vision tower
        "counts": {"language_model": 819968, "projector": 297216, "vision_tower": 181696},
        "roots": ["model.visual.merger", "model.visual.deepstack_merger_list"],
        "lora_targets": (14, 22),
        "lora_params": 1792,
        "facts": ModelFacts(1298880, 1298880, 4, 128, 2, 2048, 256, 64, 2),
    },
    "text": {
        "counts": {"language_model": 205120, "projector": 0, "vision_tower": 0},
        "roots": [],
        "lora_targets": (14, 14),  # no vision tower: the switch adds nothing
        "lora_params": 896,
        "facts": ModelFacts(205120, 205120, 4, 64, 2, 1024, 128, None, None),
    },
}


@pytest.fixture(scope="module")
def three_models(base: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from openft.models.tiny_text import ensure_tiny_text
    from tests.unit.models.tiny_llava import build_tiny_llava
    from tests.unit.models.tiny_qwen_vl import build_tiny_qwen_vl

    tmp = tmp_path_factory.mktemp("three")
    return {
        "qwen2_vl": base,
        "llava": str(build_tiny_llava(tmp / "llava")),
        "qwen3_vl": str(build_tiny_qwen_vl("qwen3_vl", tmp / "qwen3-vl")),
        "text": str(ensure_tiny_text("llama3", tmp / "text")),
    }


@pytest.mark.parametrize("kind", sorted(PINNED))
def test_selection_and_memory_facts_per_family(three_models: dict[str, str], kind: str) -> None:
    want = PINNED[kind]
    model, _ = load_model(three_models[kind], device="cpu", trainable=True)
    assert model_facts(model) == want["facts"]
    assert lora_trainable_params(model, ("q_proj", "k_proj", "v_proj", "o_proj")) == want["lora_params"]
    set_full_trainable(model, train_vision_tower=False)
    counts = parameter_counts(model)
    assert {p: n for p, (_, n) in counts.items()} == want["counts"]
    assert counts["vision_tower"][0] == 0 and counts["language_model"][0] == want["counts"]["language_model"]
    assert projector_roots(model) == want["roots"]
    for train_vision_tower, n_targets in zip((False, True), want["lora_targets"], strict=True):
        plan = lora_plan(model, LORA, train_vision_tower=train_vision_tower, train_projector=False)
        assert len(plan.target_modules) == n_targets


def test_lora_train_projector_saves_qwen3_deepstack_mergers_one_by_one(three_models: dict[str, str]) -> None:
    """Qwen3-VL's projector includes a ModuleList of DeepStack mergers, which peft cannot wrap as a
    whole: each merger is saved (and trained) on its own, the merger's copy counted once."""
    model, _ = load_model(three_models["qwen3_vl"], device="cpu", trainable=True)
    plan = lora_plan(model, LORA, train_vision_tower=False, train_projector=True)
    n = len(model.get_submodule("model.visual.deepstack_merger_list"))
    assert n > 0
    assert plan.modules_to_save == (
        "model.visual.merger",
        *(f"model.visual.deepstack_merger_list.{i}" for i in range(n)),
    )
    peft_model = apply_lora(model, plan)
    trained, total = parameter_counts(peft_model)["projector"]
    assert trained == total > 0
