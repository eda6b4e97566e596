"""The streamed reply equals the whole reply: content held back exactly while it may still turn
out to be a tool call, for every format and every way the text can be split into deltas."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from openft.inference.tools import ContentGate, ToolPlan, read_reply
from openft.models.tool_calls import FORMATS, ParsedCall

CALL = ParsedCall("get_weather", json.dumps({"city": "Paris"}))


def _plan(fmt: str, *, parse: bool = True, parallel: bool = True) -> ToolPlan:
    return ToolPlan(fmt=FORMATS[fmt], parse=parse, parallel=parallel, grammar=None, keep_tokens=frozenset())


def _replies(fmt: str) -> list[str]:
    f = FORMATS[fmt]
    calls = f.render([CALL, ParsedCall("add", '{"a": 1}')])
    return [
        "Plain answer, no call.",
        calls,
        "  " + calls,
        ("Let me look that up.\n\n" + calls) if f.marker else calls,
        calls[: len(calls) // 2],  # cut off by the token cap: stays content
        "{not a call} at all",
        "",
    ]


def _stream(plan: ToolPlan, text: str, cuts: list[int]) -> tuple[str, list[ParsedCall]]:
    gate = ContentGate(plan)
    sent = ""
    edges = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    for a, b in zip(edges, edges[1:], strict=False):
        sent += gate.feed(text[a:b])
    tail, reply = gate.finish()
    return sent + tail, list(reply.calls)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    which=st.integers(0, 6),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_stream_equals_whole_reply(fmt: str, which: int, cuts: list[int]) -> None:
    plan = _plan(fmt)
    text = _replies(fmt)[which]
    whole = read_reply(plan, text)
    content, calls = _stream(plan, text, cuts)
    assert content == (whole.content or "")
    assert calls == list(whole.calls)


def test_parallel_false_keeps_the_first_call_and_none_parses_nothing() -> None:
    text = FORMATS["hermes"].render([CALL, ParsedCall("add", "{}")])
    assert [c.name for c in read_reply(_plan("hermes", parallel=False), text).calls] == ["get_weather"]
    off = read_reply(_plan("hermes", parse=False), text)
    assert off.calls == () and off.content == text
