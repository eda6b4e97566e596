"""The Idefics3 / SmolVLM family outside rendering: loading a SmolVLM checkpoint without
torchvision, the family's facts, validation against the model, and the memory plan."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from transformers import AutoProcessor

from openft.datasets.moderation import NoopModerator
from openft.datasets.validate import validate_file
from openft.models.families import SMOLVLM, family_of, find_family
from openft.models.loader import load_empty_model, load_processor
from openft.models.validation import model_validation_options
from tests.unit.models.tiny_smolvlm import TILE, TOKENS_PER_TILE, build_tiny_smolvlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "tiny-smolvlm")


def test_checkpoint_loads_without_torchvision_and_saves_as_smolvlm(folder: Path, tmp_path: Path) -> None:
    """``AutoProcessor`` cannot build SmolVLM's processor here (its video half needs torchvision);
    the loader falls back to the images-only one, which expands images the same way and saves as a
    normal ``SmolVLMProcessor`` checkpoint."""
    with pytest.raises((AttributeError, ImportError, OSError, ValueError)):
        AutoProcessor.from_pretrained(folder)
    proc = load_processor(str(folder))
    assert type(proc).__name__ == "SmolVLMProcessor" and "video_processor" not in type(proc).get_attributes()
    assert family_of(proc) is SMOLVLM
    proc.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "processor_config.json").read_text())["processor_class"] == (
        "SmolVLMProcessor"
    )
    again = load_processor(str(tmp_path / "copy"))
    # The checkpoint's settings survive (image_seq_len is not among the default's)
    assert proc.image_seq_len == again.image_seq_len == TOKENS_PER_TILE != 169
    assert again.chat_template == proc.chat_template
    assert again.image_processor.max_image_size == {"longest_edge": TILE}


def test_family_lookup_and_parts(folder: Path) -> None:
    model = load_empty_model(str(folder))
    assert family_of(model) is SMOLVLM and find_family("idefics3") is SMOLVLM
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts[SMOLVLM.component(name)] = parts.get(SMOLVLM.component(name), 0) + p.numel()
    assert set(parts) == {"vision_tower", "projector", "language_model", "lm_head"}, parts
    assert SMOLVLM.end_of_turn(load_processor(str(folder)).tokenizer) == "<end_of_utterance>"


def test_validation_against_the_model_flags_every_vision_marker(folder: Path) -> None:
    """User text with a tile marker is flagged, also where transformers does not list the marker
    among the tokenizer's special tokens."""
    proc = load_processor(str(folder))
    markers = ["<row_2_col_1>", "<global-img>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    lines = [
        {"messages": [{"role": "user", "content": f"what is {m}?"}, {"role": "assistant", "content": "ok"}]}
        for m in markers
    ]
    raw = "".join(json.dumps(line) + "\n" for line in lines).encode()
    opts = model_validation_options(proc, moderator=NoopModerator(), min_examples=1)
    report = validate_file(io.BytesIO(raw), method="supervised", options=opts).report
    flagged = {i.line for i in report.issues if i.code == "control_token_in_content"}
    assert flagged == set(range(1, len(markers) + 1))


def test_memory_plan_counts_the_patches_behind_each_image_token(folder: Path) -> None:
    """SmolVLM's connector folds scale_factor**2 encoder patches into one image token, so the
    vision tower's activations are planned for that many patches per token."""
    from openft.training.plan import JobFacts, plan_memory, plan_training

    model = load_empty_model(str(folder))
    plan = plan_training(
        JobFacts(base_model=str(folder), method="supervised"), _stats(images=64), family="smolvlm"
    )
    with_images = plan_memory(model, plan, _stats(images=64), dpo=False, device="cpu", limit_bytes=10**12)
    text_only = plan_memory(model, plan, _stats(images=0), dpo=False, device="cpu", limit_bytes=10**12)

    # The vision tower's share, from the pure estimator: 16x (scale_factor**2) the patches of a
    # one-patch-per-token family.
    from dataclasses import asdict

    from openft.training.memory import estimate_peak_bytes, model_facts

    assert SMOLVLM.patches_per_token(model.config) == model.config.scale_factor**2 == 4
    facts = asdict(model_facts(model))
    assert facts.get("vision_layers")

    def vision_bytes(patches: int) -> int:
        kw = dict(
            seq_len=512,
            batch_size=1,
            image_tokens=patches,
            gradient_checkpointing=False,
            lora=False,
            dpo=False,
        )
        return estimate_peak_bytes(**facts, **kw).breakdown["vision_activations"]

    assert vision_bytes(512 * 4) == 4 * vision_bytes(512) > 0
    assert with_images.estimate_bytes > text_only.estimate_bytes


def _stats(*, images: int):
    from openft.training.hparams import DatasetStats

    return DatasetStats(
        examples=64,
        tokens_mean=400.0,
        tokens_p95=500,
        tokens_max=512,
        examples_with_images=images,
        images=images,
    )


def test_idefics3_goes_through_the_same_code_path(tmp_path: Path) -> None:
    """Idefics3 (the architecture SmolVLM derives from; its processor has no video half, so
    ``AutoProcessor`` loads it): same family, same tile expansion and ``detail`` rule, one training
    step's loss and a generation."""
    import torch

    from openft.datasets.formats import ImagePart, Message, TextPart
    from openft.models.loader import load_model
    from openft.models.render import render_chat
    from openft.training.collate import collate_sft
    from tests.unit.models.tiny_smolvlm import TOKENS_PER_TILE, build_tiny_idefics3

    model, proc = load_model(str(build_tiny_idefics3(tmp_path / "tiny-idefics3")), device="cpu")
    assert type(model).__name__ == "Idefics3ForConditionalGeneration" and family_of(proc) is SMOLVLM
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (90, 60), (200, 10, 10)).save(buf, "PNG")

    def msgs(detail: str) -> list[Message]:
        image = ImagePart(url="data:", data=buf.getvalue(), detail=detail)  # type: ignore[arg-type]
        return [Message("user", (image, TextPart("colour?"))), Message("assistant", (TextPart("red"),))]

    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    high, low = render_chat(proc, msgs("high")), render_chat(proc, msgs("low"))
    assert (
        high.input_ids.count(image_id) == 5 * TOKENS_PER_TILE
        and low.input_ids.count(image_id) == TOKENS_PER_TILE
    )
    text = proc.tokenizer.decode(high.input_ids)
    assert text.startswith("<|begin_of_text|>User:<fake_token_around_image><row_1_col_1>")
    assert proc.tokenizer.decode([i for i in high.labels if i != -100]) == " red<end_of_utterance>"
    loss = model(**collate_sft([high, low], pad_id=proc.tokenizer.pad_token_id)).loss
    assert torch.isfinite(loss)
    prompt = render_chat(proc, msgs("high")[:1], add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt.input_ids]), **prompt.vision, max_new_tokens=3)
    assert out.shape[1] > len(prompt.input_ids)
