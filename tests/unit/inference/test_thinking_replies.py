"""A Qwen3-format model's reply: the ``<think>`` block is ``reasoning_content``, never ``content``
(whole or streamed), and ``reasoning_effort`` switches thinking off or is refused with a 400.

The model is the tiny Qwen3 (:mod:`openft.models.tiny_text`) taught two replies by heart, so what
it generates is known: ``<think>\\nthe sky is blue\\n</think>\\n\\nblue`` to one question, and to
another ``green`` after the empty block that Qwen3's template writes when thinking is off.
"""

from __future__ import annotations

from typing import Any

import openai.types.chat as sdk
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openft.datasets.formats import Message, TextPart
from openft.errors import InvalidRequest
from openft.inference.chat import build_prompt, create_completion, stream_completion
from openft.inference.registry import LoadedModel, ModelRef, Registry
from openft.models.render import render_chat
from openft.models.tiny_text import ensure_tiny_text
from openft.training.collate import collate_sft

try:
    from tests.openapi_schema import has_spec, validate_against
except ImportError:  # tests/ itself is on sys.path
    from openapi_schema import has_spec, validate_against  # type: ignore[no-redef]

QUESTION = "Colour of the sky?"
REASONING = "the sky is blue"
REPLY = f"<think>\n{REASONING}\n</think>\n\nblue"
UNTHOUGHT = "Colour of grass?"


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The tiny Qwen3 after learning its two replies by heart."""
    src = ensure_tiny_text("qwen3", tmp_path_factory.mktemp("qwen3-base"))
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    items = [
        render_chat(tok, [Message("user", (TextPart(q),)), Message("assistant", (TextPart(a),))])
        for q, a in ((QUESTION, REPLY), (UNTHOUGHT, "<think>\n\n</think>\n\ngreen"))
    ]
    batch = collate_sft(items, pad_id=tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(**batch).loss
        if loss.item() < 0.01:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.01, "the tiny model should have learnt the reply"
    out = tmp_path_factory.mktemp("qwen3-taught")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Registry(device="cpu", max_loaded=1).get(
        ModelRef(id="tiny-qwen3", base=str(out), weights_dir=None)
    )


def req(**kw: Any):
    from openft.protocol.chat import ChatCompletionRequest

    messages = kw.pop("messages", [{"role": "user", "content": QUESTION}])
    return ChatCompletionRequest.model_validate(
        {"model": "tiny-qwen3", "messages": messages, "temperature": 0, "max_completion_tokens": 24, **kw}
    )


def complete(loaded: LoadedModel, request) -> dict[str, Any]:
    body = create_completion(loaded, request, image_loader=_no_images).model_dump(mode="json")
    sdk.ChatCompletion.model_validate(body)
    if has_spec():
        validate_against("CreateChatCompletionResponse", body)
    return body


def stream(loaded: LoadedModel, request) -> list[dict[str, Any]]:
    chunks = [c.model_dump(mode="json") for c in stream_completion(loaded, request, image_loader=_no_images)]
    for body in chunks:
        sdk.ChatCompletionChunk.model_validate(body)
        if has_spec():
            validate_against("CreateChatCompletionStreamResponse", body)
    return chunks


def _no_images(url: str) -> bytes:
    raise AssertionError("no images here")


def prompt_text(loaded: LoadedModel, request) -> str:
    prompt, _ = build_prompt(loaded, request, image_loader=_no_images)
    return loaded.tokenizer.decode(prompt.input_ids)


def test_thinking_is_reasoning_content_not_content(qwen3: LoadedModel) -> None:
    body = complete(qwen3, req())
    message = body["choices"][0]["message"]
    assert message["content"] == "blue"
    assert message["reasoning_content"] == REASONING
    assert body["choices"][0]["finish_reason"] == "stop"
    # The SDK keeps the extension field (vLLM's name) for clients that want it.
    assert sdk.ChatCompletion.model_validate(body).choices[0].message.reasoning_content == REASONING


def test_streamed_thinking_never_arrives_as_content(qwen3: LoadedModel) -> None:
    chunks = stream(qwen3, req(stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = [d["content"] for d in deltas if d.get("content")]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    assert "".join(content) == "blue" and "".join(reasoning) == REASONING
    assert len(reasoning) > 1, "reasoning streams in pieces as it is generated"
    assert not any("think>" in c for c in content + reasoning)
    # Reasoning comes first, then the answer.
    kinds = [
        "r" if d.get("reasoning_content") else "c"
        for d in deltas
        if d.get("content") or d.get("reasoning_content")
    ]
    assert kinds == sorted(kinds, reverse=True)


@pytest.mark.parametrize("effort", ["none", "minimal"])
def test_reasoning_effort_none_turns_thinking_off(qwen3: LoadedModel, effort: str) -> None:
    ask = [{"role": "user", "content": UNTHOUGHT}]
    assert prompt_text(qwen3, req(messages=ask, reasoning_effort=effort)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    message = complete(qwen3, req(messages=ask, reasoning_effort=effort))["choices"][0]["message"]
    assert message["content"] == "green" and "reasoning_content" not in message


@pytest.mark.parametrize("effort", [None, "medium", "high"])
def test_thinking_stays_on(qwen3: LoadedModel, effort: str | None) -> None:
    assert prompt_text(qwen3, req(reasoning_effort=effort)).endswith("<|im_start|>assistant\n")
    assert (
        complete(qwen3, req(reasoning_effort=effort))["choices"][0]["message"]["reasoning_content"]
        == REASONING
    )


def test_low_effort_is_refused_with_the_values_that_work(qwen3: LoadedModel) -> None:
    with pytest.raises(InvalidRequest) as e:
        complete(qwen3, req(reasoning_effort="low"))
    assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_value"


def test_constrained_output_turns_thinking_off(qwen3: LoadedModel) -> None:
    json_out = {"response_format": {"type": "json_object"}}
    assert prompt_text(qwen3, req(**json_out)).endswith("<think>\n\n</think>\n\n")
    with pytest.raises(InvalidRequest) as e:
        prompt_text(qwen3, req(reasoning_effort="high", **json_out))
    assert e.value.param == "reasoning_effort"


def test_reasoning_content_sent_back_renders_like_the_inline_block(qwen3: LoadedModel) -> None:
    """A client that appends the reply message (with its ``reasoning_content``) to the next
    request gets the prompt Qwen3's template makes of it."""
    tool_turn = [
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "look it up",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "sky", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "blue"},
    ]
    text = prompt_text(qwen3, req(messages=tool_turn))
    # After the last user query, Qwen3 keeps the reasoning of the tool-calling turn.
    assert "<|im_start|>assistant\n<think>\nlook it up\n</think>\n\n<tool_call>" in text
    hf = qwen3.tokenizer.apply_chat_template(
        [{k: v for k, v in m.items()} for m in tool_turn], tokenize=False, add_generation_prompt=True
    )
    assert text == hf


def test_reasoning_content_on_a_model_without_reasoning_is_refused(loaded: LoadedModel) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "and?"},
    ]
    with pytest.raises(InvalidRequest) as e:
        prompt_text(loaded, req(messages=messages))
    assert e.value.param == "messages[1].reasoning_content"
    with pytest.raises(InvalidRequest) as e:
        prompt_text(loaded, req(reasoning_effort="high"))
    assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_parameter"
    prompt_text(loaded, req(reasoning_effort="none"))  # honoured: it does not reason
