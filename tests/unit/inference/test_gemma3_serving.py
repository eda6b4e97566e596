"""Serving Gemma 3 through the continuous batcher: the prefill gives image tokens Gemma 3's
bidirectional attention (``token_type_ids``), decode steps (which carry no ``token_type_ids``) stay
what ``generate`` does, and LoRA fine-tunes of the base batch with it without changing answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from openft.adapters import merge
from openft.inference.chat import build_prompt
from openft.inference.engine import SamplingParams, _model_vision_inputs, generate
from openft.inference.registry import LoadedModel, ModelRef, Registry
from openft.models.loader import load_model
from openft.protocol.chat import ChatCompletionRequest
from tests.unit.inference.test_batcher import ask, assert_prompt_decodes_as_generate, concurrently
from tests.unit.models.tiny_gemma3 import TOKENS_PER_IMAGE, build_tiny_gemma3


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry(device="cpu", max_loaded=1)


@pytest.fixture(scope="module")
def base(registry: Registry, gemma3_dir: Path) -> LoadedModel:
    return registry.get(ModelRef(id="gemma3", base=str(gemma3_dir), weights_dir=None))


@pytest.fixture(scope="module")
def adapter_dir(gemma3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA fine-tune of the language model and the vision tower, with random non-zero weights."""
    torch.manual_seed(7)
    model, _ = load_model(str(gemma3_dir), device="cpu")
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=r".*(language_model.*\.(q_proj|v_proj|down_proj)|vision_tower.*\.(q_proj|fc1))",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(20.0)  # big enough to change greedy answers
    out = tmp_path_factory.mktemp("gemma3-adapter")
    peft_model.save_pretrained(str(out))
    return out


def image_request(
    png_url, size: tuple[int, int], text: str = "What colour is it?", **kw
) -> ChatCompletionRequest:
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": png_url(size)}}]
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}], **kw}
    )


def test_prefill_attends_bidirectionally_within_the_image(base, image_loader, png_url):
    """The first token's log-probability is the one of Gemma 3's own forward with
    ``token_type_ids`` (image tokens see each other both ways), not of a causal-only forward."""
    request = image_request(png_url, (90, 60))
    prompt, n_image = build_prompt(base, request, image_loader=image_loader)
    assert n_image == TOKENS_PER_IMAGE and "token_type_ids" in prompt.vision
    first = next(
        lp
        for ev in generate(base, prompt, SamplingParams(max_new_tokens=1, temperature=0, logprobs=True))
        for lp in ev.logprobs
    )
    inputs = {"input_ids": torch.tensor([prompt.input_ids]), **_model_vision_inputs(prompt, base)}
    with base.batcher.lock, torch.inference_mode():
        bidirectional = torch.log_softmax(base.model(**inputs).logits[0, -1].float(), -1)
        inputs.pop("token_type_ids")
        causal = torch.log_softmax(base.model(**inputs).logits[0, -1].float(), -1)
    # A random tiny model: the mask moves this log-probability by ~1e-4, and the same forward on
    # the same machine reproduces it to the last bit.
    assert first.token_id == int(bidirectional.argmax())
    assert first.logprob == pytest.approx(float(bidirectional[first.token_id]), abs=1e-6)
    assert abs(first.logprob - float(causal[first.token_id])) > 1e-5


@pytest.mark.parametrize("size", [None, (90, 60), (900, 300)])
def test_the_decode_loop_matches_transformers_generate(base, image_loader, png_url, size):
    """Our prefill (with ``token_type_ids``) and decode steps (without, as ``generate`` does after
    its first step) give ``generate``'s greedy tokens; (900, 300) at detail high has crops."""
    if size is None:
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "what colour is the sky"}]}
        )
    else:
        content = [
            {"type": "text", "text": "What colour?"},
            {"type": "image_url", "image_url": {"url": png_url(size), "detail": "high"}},
        ]
        request = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": content}]}
        )
    prompt, _ = build_prompt(base, request, image_loader=image_loader)
    assert_prompt_decodes_as_generate(base, prompt, max_new_tokens=10)


def test_base_and_lora_fine_tune_answer_images_together_as_alone(
    registry, base, gemma3_dir, adapter_dir, image_loader, png_url
):
    tuned = registry.get(ModelRef(id="ft:gemma3", base=str(gemma3_dir), weights_dir=adapter_dir))
    assert tuned.batcher is base.batcher

    # Reference: the fine-tune merged into a plain copy of the base, asked alone.
    model, processor = load_model(str(gemma3_dir), adapter_dir, device="cpu")
    merged = LoadedModel(
        ref=ModelRef(id="ref", base=str(gemma3_dir), weights_dir=adapter_dir),
        model=merge(model),
        processor=processor,
    )
    images = [png_url((90, 60), (200, 10, 10)), png_url((40, 80), (10, 10, 200))]
    texts = ["what colour is it", "hello"]
    reference = [
        ask(merged, image_loader, t, image=i, temperature=0, max_tokens=8)
        for t, i in zip(texts, images, strict=True)
    ]
    plain = [
        ask(base, image_loader, t, image=i, temperature=0, max_tokens=8)
        for t, i in zip(texts, images, strict=True)
    ]
    assert reference != plain  # the adapter matters

    calls = [
        lambda m=m, t=t, i=i: ask(m, image_loader, t, image=i, temperature=0, max_tokens=8)
        for m in (tuned, base)
        for t, i in zip(texts, images, strict=True)
    ]
    assert concurrently(calls) == reference + plain
