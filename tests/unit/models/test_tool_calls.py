"""Tool-call formats: render then parse round-trips per format, plain text stays content, and a
call rendered by the tiny model's chat template is trained (masked as assistant output) and
parses back to the same call."""

from __future__ import annotations

import json

import pytest

from openft.datasets.formats import Message, TextPart
from openft.models.render import IGNORE_INDEX, render_chat
from openft.models.tool_calls import FORMATS, ParsedCall, format_for, new_call_id

CALLS = (
    ParsedCall(
        "get_weather", json.dumps({"city": "Zürich", "days": 3, "units": ["c", "f"]}, ensure_ascii=False)
    ),
    ParsedCall("add", json.dumps({"a": 1.5, "b": {"nested": [True, None]}})),
)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("n", [1, 2])
def test_render_then_parse_round_trips(name: str, n: int) -> None:
    fmt = FORMATS[name]
    calls = CALLS[:n]
    reply = fmt.parse(fmt.render(calls))
    assert reply.content is None
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        (c.name, json.loads(c.arguments)) for c in calls
    ]


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_plain_text_and_broken_calls_stay_content(name: str) -> None:
    fmt = FORMATS[name]
    for text in (
        "The weather is fine.",
        "",
        fmt.render(CALLS[:1])[:-3],
        fmt.render(CALLS[:1]) + " trailing words",
    ):
        reply = fmt.parse(text)
        assert reply.calls == () and reply.content == text


def test_text_before_a_hermes_call_is_content() -> None:
    fmt = FORMATS["hermes"]
    reply = fmt.parse("Let me check.\n" + fmt.render(CALLS))
    assert reply.content == "Let me check." and [c.name for c in reply.calls] == ["get_weather", "add"]


def test_arguments_are_the_models_own_json_text() -> None:
    # Re-serialising would turn an overflowing number into `Infinity`, which is not JSON.
    reply = FORMATS["hermes"].parse('<tool_call>\n{"name": "f", "arguments": {"x": 1e999}}\n</tool_call>')
    assert reply.calls[0].arguments == '{"x": 1e999}'
    assert (
        FORMATS["hermes"].parse('<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>').calls
        == ()
    )


def test_llama3_python_tag_and_parameters_key() -> None:
    reply = FORMATS["llama3_json"].parse(
        '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}; {"name": "g", "parameters": {}}'
    )
    assert [(c.name, c.arguments) for c in reply.calls] == [("f", '{"q": "x"}'), ("g", "{}")]


def test_format_detection_and_ids() -> None:
    assert format_for("mistral", None).name == "mistral"
    assert format_for(None, "{{ '[TOOL_CALLS] [' }}").name == "mistral"
    assert format_for(None, "<tool_call>\\n").name == "hermes"
    assert format_for(None, None).name == "hermes"
    ids = {new_call_id() for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("call_") and len(i) == 29 for i in ids)


def test_tiny_template_trains_the_call_it_serves(processor) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":2}'},
    }
    messages = [
        Message("user", (TextPart("Weather in Paris for two days?"),)),
        Message("assistant", (), tool_calls=(call,)),
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = render_chat(processor, messages, tools=tools)
    trained = [t for t, label in zip(r.input_ids, r.labels, strict=True) if label != IGNORE_INDEX]
    tokenizer = processor.tokenizer
    text = tokenizer.decode(trained, skip_special_tokens=True)
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # end of turn is trained
    reply = FORMATS["hermes"].parse(text)
    assert reply.content is None and len(reply.calls) == 1
    # Trained in the layout constrained decoding produces (tojson: ", " and ": ").
    assert reply.calls[0] == ParsedCall("get_weather", '{"city": "Paris", "days": 2}')


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("n", [1, 2])
def test_every_prefix_scans_to_a_prefix_of_the_calls(name: str, n: int) -> None:
    """What streaming relies on: read character by character, the calls seen so far only ever
    grow (names whole, arguments a prefix of the final text, for JSON formats), and the whole
    reply reads as exactly the parsed calls."""
    fmt = FORMATS[name]
    text = "Let me check." + fmt.render(CALLS[:n]) if fmt.marker else fmt.render(CALLS[:n])
    final = fmt.parse(text).calls
    assert fmt.scan(text).complete
    assert [c.name for c in final] == [c.name for c in CALLS[:n]]
    grew = 0
    previous: tuple = ()
    for end in range(len(text) + 1):
        found = fmt.scan(text[:end])
        calls = found.calls if found else ()
        assert found is None or not found.complete or all(c.complete for c in found.calls)
        assert len(calls) >= len(previous)
        for seen, done in zip(calls, final, strict=False):
            assert seen.name == done.name and done.arguments.startswith(seen.arguments)
        grew += calls != previous and len(calls) == len(previous)
        previous = calls
    if name != "pythonic":  # JSON arguments grow with the text; pythonic ones come whole
        assert grew > 10


def test_mistral_v11_layout() -> None:
    fmt = FORMATS["mistral_v11"]
    text = fmt.render(CALLS)
    assert text == (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Zürich", "days": 3, "units": ["c", "f"]}'
        '[TOOL_CALLS]add[ARGS]{"a": 1.5, "b": {"nested": [true, null]}}'
    )
    # Mistral Small 3.2 writes a call id between the name and the arguments; it is dropped.
    reply = fmt.parse('Sure.[TOOL_CALLS]add[CALL_ID]a1B2c3D4e[ARGS]{"a": 1}')
    assert reply.content == "Sure." and reply.calls == (ParsedCall("add", '{"a": 1}'),)
    for bad in ('[TOOL_CALLS][ARGS]{"a": 1}', '[TOOL_CALLS]add[ARGS]["a"]', "[TOOL_CALLS]add{}"):
        assert fmt.parse(bad).calls == ()
    assert format_for(None, "{{- '[TOOL_CALLS]' + name + '[ARGS]' }}").name == "mistral_v11"


def test_pythonic_layout() -> None:
    fmt = FORMATS["pythonic"]
    text = fmt.render(CALLS)
    assert (
        text
        == '[get_weather(city="Zürich", days=3, units=["c", "f"]), add(a=1.5, b={"nested": [True, None]})]'
    )
    reply = fmt.parse("[f(q='it''s', n=-2, x=None), g()]")
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [
        ("f", {"q": "its", "n": -2, "x": None}),
        ("g", {}),
    ]
    for bad in ("[f(1)]", "[f(a=b)]", "[f(a=1)] and more", "[f(**k)]", "[f(a={1, 2})]", "[]", "f(a=1)"):
        assert fmt.parse(bad).calls == () and fmt.parse(bad).content == bad
