"""Serving Qwen2.5-VL and Qwen3-VL through the continuous batcher: the same tokens as transformers'
own ``generate``, and batching changes no answer (M-RoPE positions with their per-request deltas,
Qwen2.5-VL's windowed vision attention, Qwen3-VL's DeepStack and interleaved M-RoPE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

from openft.inference.chat import build_prompt
from openft.inference.engine import SamplingParams, _model_vision_inputs, generate
from openft.inference.registry import LoadedModel, ModelRef, Registry
from openft.protocol.chat import ChatCompletionRequest
from tests.unit.inference.test_batcher import LOOSE, _TokenizerVocabOnly, ask, concurrently
from tests.unit.models.tiny_qwen_vl import FAMILIES, build_tiny_qwen_vl


@pytest.fixture(scope="module", params=FAMILIES)
def qwen_loaded(request, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = build_tiny_qwen_vl(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    return Registry(device="cpu").get(ModelRef(id=request.param, base=str(path), weights_dir=None))


@pytest.mark.parametrize("image", [None, (112, 56), (200, 200)])
def test_the_decode_loop_matches_transformers_generate(qwen_loaded, image_loader, png_url, image) -> None:
    content: object = LOOSE[1]
    if image is not None:
        content = [
            {"type": "text", "text": LOOSE[1]},
            {"type": "image_url", "image_url": {"url": png_url(image)}},
        ]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": content}]}
    )
    prompt, _ = build_prompt(qwen_loaded, request, image_loader=image_loader)
    ours: list[int] = []
    for ev in generate(qwen_loaded, prompt, SamplingParams(max_new_tokens=12, temperature=0, logprobs=True)):
        ours += [lp.token_id for lp in ev.logprobs]
    ids = torch.tensor([prompt.input_ids])
    with qwen_loaded.batcher.lock, torch.inference_mode():
        out = qwen_loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **_model_vision_inputs(prompt, qwen_loaded),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=sorted(qwen_loaded.eos_token_ids),
            pad_token_id=qwen_loaded.pad_token_id,
            logits_processor=LogitsProcessorList([_TokenizerVocabOnly(len(qwen_loaded.tokenizer))]),
        )
    theirs = [t for t in out[0, ids.shape[1] :].tolist() if t not in qwen_loaded.eos_token_ids]
    assert len(ours) >= 1 and ours == theirs[: len(ours)]


def test_batched_greedy_equals_alone_with_images(qwen_loaded, image_loader, png_url) -> None:
    cases = [
        {"text": LOOSE[0], "max_tokens": 16},
        {"text": LOOSE[3], "max_tokens": 12, "image": png_url((112, 112), (200, 10, 10))},
        {"text": LOOSE[1], "max_tokens": 20, "image": png_url((64, 192), (10, 10, 200)), "n": 2},
        {"text": LOOSE[2], "max_tokens": 8, "image": png_url((224, 160), (10, 200, 10))},
    ]

    def call(case: dict):
        kw = {k: v for k, v in case.items() if k != "text"}
        return lambda: ask(qwen_loaded, image_loader, case["text"], temperature=0, **kw)

    alone = [call(c)() for c in cases]
    together = concurrently([call(c) for c in cases])
    assert together == alone
    assert qwen_loaded.batcher.peak_rows > 1  # they really shared a batch
