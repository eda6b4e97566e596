"""Chat completions against the tiny random-weight VLM: structure, determinism, stream == non-stream.

The weights are random, so these tests pin behaviour (caps, stops, seeds, counts), never content.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import openai.types.chat as sdk
import pytest
import torch

from openft.errors import InvalidRequest
from openft.inference import engine
from openft.inference.chat import DEFAULT_MAX_TOKENS, create_completion, stream_completion
from openft.inference.registry import LoadedModel
from openft.inference.stream import sse_lines
from openft.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse

try:
    from tests.openapi_schema import has_spec, validate_against
except ImportError:  # tests/ itself is on sys.path (rootdir conftest without a package)
    from openapi_schema import has_spec, validate_against  # type: ignore[no-redef]

HELLO = [{"role": "user", "content": "Hello, what colour is the sky?"}]


def req(messages: list[dict[str, Any]] | None = None, **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "openft-tiny-vlm", "messages": messages or HELLO, **kw}
    )


@pytest.fixture()
def complete(loaded: LoadedModel, image_loader):
    def run(request: ChatCompletionRequest) -> ChatCompletionResponse:
        response = create_completion(loaded, request, image_loader=image_loader)
        body = response.model_dump(mode="json")
        sdk.ChatCompletion.model_validate(body)
        if has_spec():
            validate_against("CreateChatCompletionResponse", body)
        return response

    return run


@pytest.fixture()
def stream(loaded: LoadedModel, image_loader):
    def run(request: ChatCompletionRequest) -> list[ChatCompletionChunk]:
        chunks = list(stream_completion(loaded, request, image_loader=image_loader))
        for chunk in chunks:
            body = chunk.model_dump(mode="json")
            sdk.ChatCompletionChunk.model_validate(body)
            if has_spec():
                validate_against("CreateChatCompletionStreamResponse", body)
        return chunks

    return run


def joined(chunks: list[ChatCompletionChunk], index: int = 0) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index == index:
                text += choice.delta.content or ""
                reason = choice.finish_reason or reason
    return text, reason


def test_greedy_is_deterministic(complete) -> None:
    a = complete(req(temperature=0, max_completion_tokens=12))
    b = complete(req(temperature=0, max_completion_tokens=12))
    assert a.id != b.id and a.id.startswith("chatcmpl-")
    assert a.model == "openft-tiny-vlm"
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason in ("stop", "length")


def test_max_tokens_gives_length_and_true_usage(complete, loaded: LoadedModel) -> None:
    # Forbid the end-of-turn token so the cap is what stops it.
    no_eos = {str(t): -100 for t in loaded.eos_token_ids}
    r = complete(req(temperature=0, max_completion_tokens=5, logit_bias=no_eos))
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5
    text = loaded.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    n_prompt = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    legacy = complete(req(temperature=0, max_tokens=3, logit_bias=no_eos))
    assert legacy.usage is not None and legacy.usage.completion_tokens == 3


def test_end_of_turn_gives_stop(complete, loaded: LoadedModel) -> None:
    eos = min(loaded.eos_token_ids)
    r = complete(req(temperature=0, max_completion_tokens=5, logit_bias={str(eos): 100}))
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == ""
    assert r.usage is not None and r.usage.completion_tokens == 1


def test_default_cap(loaded: LoadedModel, image_loader) -> None:
    from openft.inference.chat import build_prompt, sampling_params

    request = req()
    prompt, _ = build_prompt(loaded, request, image_loader=image_loader)
    assert (
        sampling_params(loaded, request, prompt_tokens=len(prompt.input_ids)).max_new_tokens
        == DEFAULT_MAX_TOKENS
    )


def test_stop_string_cuts_the_text(complete) -> None:
    base = complete(req(temperature=0, max_completion_tokens=30)).choices[0].message.content
    assert base and len(base) >= 4, "the tiny model should say something"
    stop = base[2:4]
    cut = complete(req(temperature=0, max_completion_tokens=30, stop=[stop, "\u2603never"]))
    assert cut.choices[0].message.content == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"stop": "STOPSLOT"},  # replaced by a string taken from the greedy answer
        {"logprobs": True, "top_logprobs": 3},
        {"max_completion_tokens": 4},
    ],
)
def test_stream_equals_non_stream_at_temperature_0(complete, stream, extra: dict[str, Any]) -> None:
    kw: dict[str, Any] = {"temperature": 0, "max_completion_tokens": 40, **extra}
    if kw.get("stop") == "STOPSLOT":
        text = complete(req(**{**kw, "stop": None})).choices[0].message.content or ""
        kw["stop"] = text[3:5] or "x"
    full = complete(req(**kw))
    chunks = stream(req(stream=True, stream_options={"include_usage": True}, **kw))
    text, reason = joined(chunks)
    assert text == full.choices[0].message.content
    assert reason == full.choices[0].finish_reason
    # Shape: role first, finish last, then the usage chunk.
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-2].choices[0].finish_reason == reason and chunks[-2].choices[0].delta.content is None
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert len({(c.id, c.created) for c in chunks}) == 1
    assert full.usage is not None
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    if kw.get("logprobs"):
        streamed = [lp for c in chunks for ch in c.choices if ch.logprobs for lp in ch.logprobs.content or []]
        assert full.choices[0].logprobs is not None
        assert streamed == full.choices[0].logprobs.content


def test_stream_without_include_usage_has_no_usage_chunk(stream) -> None:
    chunks = stream(req(stream=True, temperature=0, max_completion_tokens=3))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_sse_of_a_real_stream(loaded: LoadedModel, image_loader, complete) -> None:
    request = req(stream=True, temperature=0, max_completion_tokens=8, stream_options={"include_usage": True})
    raw = list(sse_lines(stream_completion(loaded, request, image_loader=image_loader)))
    assert raw[-1] == b"data: [DONE]\n\n"
    bodies = [json.loads(line[6:]) for line in raw[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in bodies if c["choices"])
    assert text == complete(req(temperature=0, max_completion_tokens=8)).choices[0].message.content


def test_logprobs(complete, loaded: LoadedModel) -> None:
    no_eos = {str(t): -100 for t in loaded.eos_token_ids}
    r = complete(
        req(temperature=0, max_completion_tokens=6, logprobs=True, top_logprobs=2, logit_bias=no_eos)
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.token == bytes(item.bytes or []).decode("utf-8", errors="replace")
    # Greedy without bias on real tokens: the chosen token is the most likely one.
    assert all(item.logprob == pytest.approx(item.top_logprobs[0].logprob) for item in content)
    assert complete(req(temperature=0, max_completion_tokens=2)).choices[0].logprobs is None


def test_logprobs_are_the_models_raw_distribution(loaded: LoadedModel, image_loader) -> None:
    from openft.inference.chat import build_prompt

    request = req(temperature=0, max_completion_tokens=1, logprobs=True)
    prompt, _ = build_prompt(loaded, request, image_loader=image_loader)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([prompt.input_ids])).logits[0, -1].float()
    logits[len(loaded.tokenizer) :] = float("-inf")
    expected = torch.log_softmax(logits, -1)
    r = create_completion(loaded, request, image_loader=image_loader)
    first = int(torch.argmax(expected))
    if first in loaded.eos_token_ids:
        pytest.skip("the tiny model ends its turn at once; nothing to compare")
    got = r.choices[0].logprobs.content[0]  # type: ignore[union-attr,index]
    assert got.logprob == pytest.approx(float(expected[first]), abs=1e-4)


def test_image_message(complete, stream, png_url) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is this?"},
                {"type": "image_url", "image_url": {"url": png_url(), "detail": "low"}},
            ],
        }
    ]
    with_image = complete(req(messages, temperature=0, max_completion_tokens=6))
    text_only = complete(
        req([{"role": "user", "content": "What colour is this?"}], temperature=0, max_completion_tokens=6)
    )
    assert with_image.usage is not None and text_only.usage is not None
    details = with_image.usage.prompt_tokens_details
    assert details is not None and details.image_tokens == 16  # 112x112 -> 8x8 patches -> 16 merged
    # Image tokens plus <|vision_start|>/<|vision_end|> are the whole difference.
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 16 + 2
    text, _ = joined(stream(req(messages, stream=True, temperature=0, max_completion_tokens=6)))
    assert text == with_image.choices[0].message.content


def test_n_choices(complete, stream, loaded: LoadedModel) -> None:
    no_eos = {str(t): -100 for t in loaded.eos_token_ids}
    r = complete(req(n=3, temperature=1, seed=5, max_completion_tokens=4, logit_bias=no_eos))
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens == 12  # summed over choices
    greedy = complete(req(n=2, temperature=0, max_completion_tokens=8))
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks = stream(req(n=2, stream=True, seed=5, temperature=1, max_completion_tokens=4, logit_bias=no_eos))
    for i in (0, 1):
        role = [c for c in chunks if c.choices and c.choices[0].index == i and c.choices[0].delta.role]
        assert len(role) == 1
    streamed = [joined(chunks, i)[0] for i in (0, 1)]
    again = complete(req(n=2, seed=5, temperature=1, max_completion_tokens=4, logit_bias=no_eos))
    assert streamed == [c.message.content for c in again.choices]


def test_seed_reproduces_sampling(complete) -> None:
    kw = {"temperature": 1, "max_completion_tokens": 20}
    a = complete(req(seed=1234, **kw)).choices[0].message.content
    b = complete(req(seed=1234, **kw)).choices[0].message.content
    assert a == b
    others = {complete(req(seed=s, **kw)).choices[0].message.content for s in range(1, 6)}
    assert len(others) > 1, "different seeds should (almost surely) sample differently"


def test_top_p_zero_is_greedy(complete) -> None:
    greedy = complete(req(temperature=0, max_completion_tokens=10)).choices[0].message.content
    nucleus = (
        complete(req(temperature=1.5, top_p=0, seed=3, max_completion_tokens=10)).choices[0].message.content
    )
    assert nucleus == greedy


def test_penalties_change_greedy_repetition(complete, loaded: LoadedModel) -> None:
    no_eos = {str(t): -100 for t in loaded.eos_token_ids}
    plain = complete(req(temperature=0, max_completion_tokens=10, logit_bias=no_eos, logprobs=True))
    penalised = complete(
        req(temperature=0, max_completion_tokens=10, logit_bias=no_eos, logprobs=True, frequency_penalty=2)
    )
    ids = lambda r: [t.token for t in r.choices[0].logprobs.content]  # noqa: E731
    assert len(set(ids(penalised))) >= len(set(ids(plain)))


def test_request_errors(loaded: LoadedModel, image_loader, png_url) -> None:
    with pytest.raises(InvalidRequest) as info:
        create_completion(loaded, req(max_completion_tokens=10**6), image_loader=image_loader)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest) as info:
        create_completion(loaded, req(logit_bias={"999999": 1}), image_loader=image_loader)
    assert info.value.param == "logit_bias"
    image = {"type": "image_url", "image_url": {"url": png_url()}}
    with pytest.raises(InvalidRequest) as info:
        create_completion(
            loaded, req([{"role": "system", "content": [image]}, *HELLO]), image_loader=image_loader
        )
    assert info.value.param == "messages[0].content[0]"
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    with pytest.raises(InvalidRequest) as info:
        # Raised when the stream is created, before any chunk: the API can still answer 400.
        stream_completion(
            loaded, req([{"role": "user", "content": [bad]}], stream=True), image_loader=image_loader
        )
    assert info.value.param == "messages[0].content[0].image_url.url"
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(InvalidRequest) as info:
        create_completion(loaded, req(long), image_loader=image_loader)
    assert info.value.param == "messages"


def test_tool_choice_none_never_constrains_or_parses(complete, stream) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    r = req(tools=[tool], tool_choice="none", temperature=0, max_completion_tokens=5)
    out = complete(r)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert "tool_calls" not in out.model_dump(mode="json")["choices"][0]["message"]
    assert joined(stream(r))[0] == out.choices[0].message.content


def test_conversation_with_all_roles(complete) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]},
        {"role": "user", "content": "Thanks"},
    ]
    r = complete(req(messages, temperature=0, max_completion_tokens=3))
    assert r.usage is not None and r.usage.prompt_tokens > 20


def test_abandoned_stream_releases_the_model(loaded: LoadedModel, image_loader, complete) -> None:
    no_eos = {str(t): -100 for t in loaded.eos_token_ids}
    chunks = stream_completion(
        loaded,
        req(stream=True, temperature=0, max_completion_tokens=2000, logit_bias=no_eos),
        image_loader=image_loader,
    )
    next(chunks)
    next(chunks)
    chunks.close()  # what the server does when the client goes away
    done = threading.Event()

    def other() -> None:
        complete(req(temperature=0, max_completion_tokens=2))
        done.set()

    worker = threading.Thread(target=other)
    worker.start()
    worker.join(timeout=120)
    assert done.is_set(), "the cancelled generation still holds the model lock"


def test_engine_events_directly(loaded: LoadedModel) -> None:
    ids = loaded.tokenizer("hello", add_special_tokens=False)["input_ids"]
    params = engine.SamplingParams(
        max_new_tokens=3, temperature=0, logit_bias=tuple((t, -100.0) for t in loaded.eos_token_ids)
    )
    events = list(engine.generate(loaded, engine.Prompt(input_ids=ids), params, n=2))
    finished = [e for e in events if isinstance(e, engine.ChoiceFinished)]
    assert [(f.index, f.finish_reason, f.completion_tokens) for f in finished] == [
        (0, "length", 3),
        (1, "length", 3),
    ]
    assert events[-1] is finished[-1]
