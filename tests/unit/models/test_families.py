"""The family registry: lookup, parameter parts, and that the dataset validator knows every
family's placeholders."""

from __future__ import annotations

import io
import json

import pytest
from peft import LoraConfig, get_peft_model

from openft.datasets.moderation import NoopModerator
from openft.datasets.validate import DEFAULT_CONTROL_TOKENS, ValidationOptions, validate_file
from openft.errors import InvalidRequest
from openft.models.families import FAMILIES, LLAVA, QWEN2_VL, QWEN3_VL, family_of, find_family
from openft.models.loader import load_model
from openft.models.render import _encode_text, _protected_ids
from tests.unit.models.tiny_llava import build_processor, build_tiny_llava
from tests.unit.models.tiny_qwen_vl import build_tiny_qwen_vl


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory):
    return load_model(str(build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")), device="cpu")


def test_lookup_by_model_config_processor_and_name(tiny, llava) -> None:
    for (model, proc), fam in ((tiny, QWEN2_VL), (llava, LLAVA)):
        assert family_of(model) is fam and family_of(model.config) is fam and family_of(proc) is fam
    assert find_family("qwen2_5_vl") is QWEN2_VL and find_family("llava") is LLAVA
    assert find_family(tiny[1].tokenizer) is None  # a bare tokenizer: no family, generic rendering
    with pytest.raises(InvalidRequest, match="unsupported vision-language model family 'mllama'"):
        family_of("mllama")


def test_every_parameter_belongs_to_a_part(tiny, llava) -> None:
    for model, _ in (tiny, llava):
        fam = family_of(model)
        parts = {}
        for name, p in model.named_parameters():
            parts.setdefault(fam.component(name), 0)
            parts[fam.component(name)] += p.numel()
        assert set(parts) == {"vision_tower", "projector", "language_model", "lm_head"}, parts


def test_parts_survive_peft_wrapping(tmp_path) -> None:
    model, _ = load_model(str(build_tiny_llava(tmp_path / "m")), device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    fam = family_of(peft_model)
    assert fam is LLAVA
    assert {fam.component(n) for n, _ in peft_model.named_parameters()} == {
        "vision_tower",
        "projector",
        "language_model",
        "lm_head",
    }


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_validator_default_control_tokens_cover_each_family(fam) -> None:
    assert set(fam.placeholder_tokens) <= set(DEFAULT_CONTROL_TOKENS)
    assert set(fam.end_of_turn_candidates) <= set(DEFAULT_CONTROL_TOKENS)
    lines = [
        {"messages": [{"role": "user", "content": f"what is {tok}?"}, {"role": "assistant", "content": "ok"}]}
        for tok in fam.placeholder_tokens
    ]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    report = validate_file(
        io.BytesIO(raw),
        method="supervised",
        options=ValidationOptions(moderator=NoopModerator(), min_examples=1),
    ).report
    flagged = {i.line for i in report.issues if i.code == "control_token_in_content"}
    assert flagged == set(range(1, len(lines) + 1))


def test_a_placeholder_that_is_not_flagged_special_still_stays_text() -> None:
    """Some checkpoints ship ``<image>`` as a plain added token, which ``split_special_tokens``
    does not split; user text must still never produce it."""
    proc = build_processor()
    tok = proc.tokenizer
    tok.add_tokens(["<video>"])  # a non-special added token, standing in for such a placeholder
    video_id = tok.convert_tokens_to_ids("<video>")
    assert video_id in tok("a<video>b", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    protected = {**_protected_ids(proc, tok, LLAVA), video_id: "<video>"}
    ids = _encode_text(tok, "a<video>b<image><<video>>", protected)
    assert video_id not in ids and proc.image_token_id not in ids
    assert tok.decode(ids) == "a<video>b<image><<video>>"


@pytest.mark.parametrize(("family", "expected"), [("qwen2_5_vl", QWEN2_VL), ("qwen3_vl", QWEN3_VL)])
def test_qwen_vl_models_are_found_and_split_into_their_parts(tmp_path, family, expected) -> None:
    """Qwen2.5-VL is a Qwen2-VL-family model; Qwen3-VL its own family, whose learned position grid
    is vision tower and whose DeepStack mergers are projector, as its main merger is."""
    model, proc = load_model(str(build_tiny_qwen_vl(family, tmp_path / family)), device="cpu")
    assert family_of(model) is expected and family_of(proc) is expected and find_family(family) is expected
    assert type(proc).__name__ == ("Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor")
    parts: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        parts.setdefault(expected.component(name), set()).add(name)
    assert set(parts) == {"vision_tower", "projector", "language_model", "lm_head"}
    if family == "qwen3_vl":
        assert "model.visual.pos_embed.weight" in parts["vision_tower"]
        assert any(n.startswith("model.visual.deepstack_merger_list.1.") for n in parts["projector"])
    # Training (``training.trainable``) freezes and adapts by this answer, asking the model's family.
    from openft.training.trainable import part_of

    assert all(part_of(n, find_family(model)) == p for p, names in parts.items() if p != "lm_head" for n in names)


def test_qwen3_vl_template_is_the_published_one() -> None:
    """The chat template is Qwen/Qwen3-VL-8B-Instruct's, byte for byte (its length and SHA-256 as a
    public test pins them for the model's GGUF)."""
    import hashlib

    from tests.unit.models.tiny_qwen_vl import QWEN3_VL_TEMPLATE

    data = QWEN3_VL_TEMPLATE.encode()
    assert len(data) == 5292
    assert (
        hashlib.sha256(data).hexdigest() == "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    )
