"""Tools, structured output and refused parameters through the openai SDK against ``openft serve``.

The model is the untrained built-in ``openft-tiny-vlm`` sampling at temperature 1: whatever it
writes, constrained decoding must make every forced tool call and every strict ``json_schema``
reply valid.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

MODEL = "openft-tiny-vlm"
ASK = [{"role": "user", "content": "What is the weather in Paris, and what is 2 plus 3?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "number"}, "exact": {"type": "boolean"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
ASK_JSON = [{"role": "system", "content": "Reply in JSON."}, *ASK]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ANSWER = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["colour", "count", "ok", "tags"],
    "additionalProperties": False,
}
SAMPLES = 12
CAP = 1500  # random strings end when the model happens to pick a quote: leave room


@pytest.fixture(scope="module")
def client(api_server):
    return api_server.client("chat-tools")


def _sample(client, seed: int, messages: list[dict[str, Any]] = ASK, **kw: Any) -> Any:
    """One reply sampled at temperature 1 from the untrained model, with room to finish."""
    return client.chat.completions.create(
        model=MODEL, messages=messages, temperature=1, max_completion_tokens=CAP, seed=seed, **kw
    )


def _valid_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.slow  # samples 12 replies of up to 1,500 constrained tokens (minutes on 2 cores)
def test_required_tool_choice_always_yields_valid_calls(client) -> None:
    seen = set()
    for seed in range(SAMPLES):
        out = _sample(client, seed, tools=TOOLS, tool_choice="required")
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        seen |= {name for name, _ in _valid_calls(choice.message.tool_calls)}
    assert seen == {"get_weather", "add"}  # both tools are reachable, not one hard-wired


@pytest.mark.slow  # samples 6 replies of up to 1,500 constrained tokens
def test_named_function_and_no_parallel_calls(client) -> None:
    for seed in range(SAMPLES // 2):
        out = _sample(
            client,
            seed,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "add"}},
            parallel_tool_calls=False,
        )
        calls = _valid_calls(out.choices[0].message.tool_calls)
        assert len(calls) == 1 and calls[0][0] == "add"


@pytest.mark.slow  # samples 12 replies of up to 1,500 constrained tokens
def test_strict_json_schema_replies_always_validate(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    for seed in range(SAMPLES):
        out = _sample(client, seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), ANSWER)


@pytest.mark.slow  # samples 6 replies of up to 1,500 constrained tokens
def test_json_object_replies_are_objects(client) -> None:
    # An open-ended object from a random model may run into the token cap (finish "length", as
    # OpenAI's would); every reply that ended on its own must be a JSON object.
    ended = 0
    for seed in range(6):
        out = _sample(client, seed, ASK_JSON, response_format={"type": "json_object"})
        choice = out.choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(choice.message.content), dict)
    assert ended >= 3


def test_json_object_needs_the_word_json_in_the_messages(client) -> None:
    # OpenAI's rule, with its words: the word may be in any message, in any case, in a text part.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"})
    assert e.value.param == "messages" and e.value.type == "invalid_request_error"
    assert e.value.body["message"] == (
        "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
        "'json_object'."
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "Answer as Json please"}]}]
    out = client.chat.completions.create(
        model=MODEL, messages=parts, response_format={"type": "json_object"}, max_completion_tokens=2
    )
    assert out.choices[0].message.content.startswith("{")


@pytest.mark.slow  # samples a reply of up to 1,500 constrained tokens twice
def test_streamed_tool_calls_match_the_whole_reply(client) -> None:
    args = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1,
        max_completion_tokens=CAP,
        seed=3,
    )
    whole = client.chat.completions.create(**args).choices[0]
    calls: dict[int, dict[str, str]] = {}
    pieces = 0
    finish = None
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for d in c.delta.tool_calls or ():
                if d.index not in calls:  # a call's first delta: id, type and name, arguments ""
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and d.function.name is None
                    calls[d.index]["arguments"] += d.function.arguments
                    pieces += 1
    assert finish == "tool_calls"
    assert pieces >= 3 * len(calls)  # arguments come as they are generated, not whole at the end
    assert [calls[i] for i in sorted(calls)] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls
    ]


def test_unsupported_schema_features_are_named(client) -> None:
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "if": {}, "then": {}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt)
    assert e.value.param == "response_format.json_schema.schema" and e.value.code == "unsupported_schema"
    assert '"if"' in e.value.message and '"then"' in e.value.message


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "hello"}),
        ("reasoning_effort", "high"),
        ("service_tier", "flex"),
        ("verbosity", "low"),
        ("web_search_options", {"search_context_size": "low"}),
        ("functions", [{"name": "f", "parameters": {"type": "object"}}]),
        ("function_call", "auto"),
        ("store", True),
        ("prompt_cache_retention", "24h"),
        ("moderation", {"model": "omni-moderation-latest"}),
    ],
)
def test_each_unsupported_parameter_is_refused(client, param: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_completion_tokens=2, extra_body={param: value}
        )
    assert e.value.param == param and e.value.code == "unsupported_parameter"
    assert e.value.type == "invalid_request_error" and "not supported by openft" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"


def test_bad_tool_choice_and_unknown_parameter(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert "nope" in e.value.message and "get_weather" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, extra_body={"top_k": 5})
    assert e.value.param == "top_k" and "Unrecognized request argument" in e.value.message
