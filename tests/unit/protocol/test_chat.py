"""Chat completion wire types: request parsing/ranges, and responses that the SDK and the spec accept."""

from __future__ import annotations

from typing import Any

import openai.types.chat as sdk
import pytest
from pydantic import ValidationError

from openft.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    CompletionMessage,
    ImageContentPart,
    PromptTokensDetails,
    TextContentPart,
    TokenLogprob,
    TopLogprob,
    Usage,
)

try:
    from tests.openapi_schema import has_spec, validate_against
except ImportError:  # tests/ itself is on sys.path (rootdir conftest without a package)
    from openapi_schema import has_spec, validate_against  # type: ignore[no-redef]

needs_spec = pytest.mark.skipif(not has_spec(), reason="shared/reference/openai-openapi.yaml not found")

USER = [{"role": "user", "content": "hi"}]


def _req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def _error_locs(**kw: Any) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        _req(**kw)
    return [e["loc"] for e in info.value.errors()]


# ------------------------------------------------------------------------------- requests


def test_minimal_request_defaults() -> None:
    req = _req()
    assert req.messages[0].content == "hi"
    assert req.max_new_tokens is None
    assert req.stop_sequences == ()
    assert req.include_usage is False
    assert req.temperature is None and req.n is None


def test_parts_and_image_detail() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is it?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
                    ],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
            ],
        }
    )
    parts = req.messages[1].content
    assert isinstance(parts, list)
    assert isinstance(parts[0], TextContentPart)
    assert isinstance(parts[1], ImageContentPart) and parts[1].image_url.detail == "auto"
    assert isinstance(parts[2], ImageContentPart) and parts[2].image_url.detail == "low"


def test_max_tokens_alias_and_stop_forms() -> None:
    assert _req(max_tokens=7).max_new_tokens == 7
    assert _req(max_tokens=7, max_completion_tokens=3).max_new_tokens == 3
    assert _req(stop="END").stop_sequences == ("END",)
    assert _req(stop=["a", "", "b"]).stop_sequences == ("a", "b")
    assert _req(stream=True, stream_options={"include_usage": True}).include_usage is True


def test_off_values_of_unsupported_parameters_pass() -> None:
    _req(service_tier="auto", modalities=["text"], prompt_cache_key="k", store=False).refuse_unsupported()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("verbosity", "low"),
        ("service_tier", "priority"),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("store", True),
        ("prompt_cache_retention", "24h"),
        ("made_up_param", 1),
    ],
)
def test_unsupported_parameters_are_refused_by_name(field: str, value: Any) -> None:
    from openft.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        _req(**{field: value}).refuse_unsupported()
    assert info.value.param == field and info.value.code == "unsupported_parameter"
    assert "openft" in info.value.message and field in info.value.message


def test_unsupported_message_field_is_refused() -> None:
    from openft.errors import InvalidRequest

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "audio": {"id": "a"}, "content": "x"}]
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": msgs}).refuse_unsupported()
    assert info.value.param == "messages[1].audio"


def test_tool_choice_must_name_a_given_tool() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    named = {"type": "function", "function": {"name": "g"}}
    assert _error_locs(tools=[tool], tool_choice=named) == [()]
    assert _error_locs(tool_choice="required") == [()]
    assert _error_locs(tools=[{"type": "custom", "custom": {"name": "x"}}])[0][:3] == ("tools", 0, "type")
    assert _req(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}}).tool_choice


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("n", 0),
        ("n", 129),
        ("max_completion_tokens", 0),
        ("max_tokens", -1),
        ("top_logprobs", 21),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
    ],
)
def test_range_violations_name_the_field(field: str, value: Any) -> None:
    locs = _error_locs(**{field: value, "logprobs": True})
    assert locs and all(loc[0] == field for loc in locs)


def test_stop_at_most_four() -> None:
    locs = _error_locs(stop=["a", "b", "c", "d", "e"])
    assert {loc[0] for loc in locs} == {"stop"}


def test_top_logprobs_needs_logprobs() -> None:
    assert _error_locs(top_logprobs=2) == [("top_logprobs",)]
    assert _req(top_logprobs=2, logprobs=True).top_logprobs == 2


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "function", "content": "x", "name": "f"}],
        [{"role": "user"}],
        [{"role": "tool", "content": "x"}],
        [
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
            }
        ],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "ultra"}}]}],
    ],
)
def test_bad_messages_are_rejected_under_messages(messages: list[dict[str, Any]]) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    assert all(e["loc"][0] == "messages" for e in info.value.errors())


def test_response_format_type_checked() -> None:
    assert _req(response_format={"type": "json_object"}).response_format.type == "json_object"
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }
    assert _req(response_format=schema).response_format.json_schema.schema_ == {"type": "object"}
    assert _error_locs(response_format={"type": "xml"}) == [("response_format",)]


@needs_spec
def test_spec_valid_request_parses() -> None:
    body = {
        "model": "ft:openft-tiny-vlm:p::abc",
        "messages": [
            {"role": "developer", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Colour?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/a.png", "detail": "high"},
                    },
                ],
            },
        ],
        "max_completion_tokens": 5,
        "temperature": 0,
        "top_p": 0.5,
        "n": 2,
        "stop": ["\n"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 1,
        "logprobs": True,
        "top_logprobs": 3,
        "user": "u",
        "metadata": {"k": "v"},
    }
    validate_against("CreateChatCompletionRequest", body)
    assert ChatCompletionRequest.model_validate(body).n == 2


# ------------------------------------------------------------------------------ responses


def _logprobs() -> ChoiceLogprobs:
    top = TopLogprob(token="Hi", logprob=-0.1, bytes=[72, 105])
    return ChoiceLogprobs(
        content=[TokenLogprob(token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=[top])]
    )


def _response(**kw: Any) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id="chatcmpl-abc",
        created=1700000000,
        model="ft:openft-tiny-vlm:p::abc",
        choices=[
            Choice(
                index=0, message=CompletionMessage(content="Hi"), finish_reason="stop", logprobs=_logprobs()
            ),
            Choice(index=1, message=CompletionMessage(content=""), finish_reason="length"),
        ],
        **kw,
    )


USAGE = Usage(
    prompt_tokens=20,
    completion_tokens=3,
    total_tokens=23,
    prompt_tokens_details=PromptTokensDetails(image_tokens=16),
)


@pytest.mark.parametrize("usage", [USAGE, None])
def test_response_shape(usage: Usage | None) -> None:
    body = _response(usage=usage).model_dump(mode="json")
    sdk.ChatCompletion.model_validate(body)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi", "refusal": None}
    assert body["choices"][1]["logprobs"] is None
    assert "system_fingerprint" not in body
    assert ("usage" in body) is (usage is not None)
    if has_spec():
        validate_against("CreateChatCompletionResponse", body)


def _chunks() -> list[ChatCompletionChunk]:
    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id="chatcmpl-abc", created=1700000000, model="m", choices=choices, usage=usage
        )

    return [
        chunk([ChunkChoice(index=0, delta=ChunkDelta(role="assistant", content=""))]),
        chunk([ChunkChoice(index=0, delta=ChunkDelta(content="Hi"), logprobs=_logprobs())]),
        chunk([ChunkChoice(index=0, delta=ChunkDelta(), finish_reason="stop")]),
        chunk([], usage=USAGE),
    ]


def test_chunk_shapes() -> None:
    bodies = [c.model_dump(mode="json") for c in _chunks()]
    for body in bodies:
        parsed = sdk.ChatCompletionChunk.model_validate(body)
        assert parsed.object == "chat.completion.chunk"
        if has_spec():
            validate_against("CreateChatCompletionStreamResponse", body)
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert bodies[0]["usage"] is None and bodies[0]["choices"][0]["finish_reason"] is None
    assert bodies[2]["choices"][0]["delta"] == {}
    assert bodies[3]["choices"] == [] and bodies[3]["usage"]["total_tokens"] == 23


@needs_spec
def test_spec_helper_catches_violations() -> None:
    body = _response(usage=USAGE).model_dump(mode="json")
    body["choices"][0]["finish_reason"] = "done"
    del body["created"]
    with pytest.raises(AssertionError, match="created") as info:
        validate_against("CreateChatCompletionResponse", body)
    assert "finish_reason" in str(info.value)
