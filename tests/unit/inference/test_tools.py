"""The streamed reply equals the whole reply: content held back exactly while it may still turn
out to be a tool call, for every format and every way the text can be split into deltas."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openft.inference.tools import ContentGate, ToolPlan, read_reply
from openft.models.tool_calls import FORMATS, ParsedCall, ScanMemo

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


def _stream(
    plan: ToolPlan, text: str, cuts: list[int], *, truncated: bool = False
) -> tuple[str, list[ParsedCall], int]:
    """(content, calls as the deltas assemble them, how many argument pieces came)."""
    gate = ContentGate(plan)
    sent = ""
    calls: list[list[str]] = []
    pieces = 0
    edges = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})

    def take(content: str, deltas: list) -> None:
        nonlocal sent, pieces
        sent += content
        for d in deltas:
            if d.id is not None:  # a call's first delta: index, id, type, name, empty arguments
                assert d.index == len(calls) and d.type == "function" and d.function.arguments == ""
                calls.append([d.function.name, ""])
            else:
                assert d.function.name is None and d.function.arguments
                calls[d.index][1] += d.function.arguments
                pieces += 1

    for a, b in zip(edges, edges[1:], strict=False):
        take(*gate.feed(text[a:b]))
    content, deltas, _ = gate.finish(truncated=truncated)
    take(content, deltas)
    return sent, [ParsedCall(n, a) for n, a in calls], pieces


@settings(max_examples=80, deadline=None)
@given(
    fmt=st.sampled_from(sorted(FORMATS)),
    which=st.integers(0, 6),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_stream_equals_whole_reply(fmt: str, which: int, cuts: list[int]) -> None:
    plan = _plan(fmt)
    text = _replies(fmt)[which]
    truncated = which == 4  # the half call: the token cap cut it
    whole = read_reply(plan, text, truncated=truncated)
    content, calls, _ = _stream(plan, text, cuts, truncated=truncated)
    assert content == (whole.content or "")
    assert calls == list(whole.calls)


def test_a_call_cut_by_the_token_limit_comes_back_cut_as_openai_returns_it() -> None:
    text = FORMATS["hermes"].render([CALL])
    cut = text[: text.index("Paris") + 2]
    reply = read_reply(_plan("hermes"), cut, truncated=True)
    assert reply.content is None and reply.calls == (ParsedCall("get_weather", '{"city": "Pa'),)
    assert read_reply(_plan("hermes"), cut).calls == ()  # ended on its own: it is not a call


@pytest.mark.parametrize("fmt", sorted(f for f in FORMATS if f != "pythonic"))
def test_arguments_stream_in_pieces_token_by_token(fmt: str) -> None:
    text = FORMATS[fmt].render([CALL, ParsedCall("add", '{"a": 1, "b": [2, 3]}')])
    content, calls, pieces = _stream(_plan(fmt), text, list(range(0, len(text), 3)))
    assert calls == list(read_reply(_plan(fmt), text).calls) and not content
    assert pieces >= 8  # several pieces per call, not one piece at the end


def test_pythonic_arguments_come_whole_per_call() -> None:
    text = FORMATS["pythonic"].render([CALL, ParsedCall("add", '{"a": 1}')])
    _, calls, pieces = _stream(_plan("pythonic"), text, list(range(len(text))))
    assert calls == list(read_reply(_plan("pythonic"), text).calls) and pieces == 2


def test_parallel_false_keeps_the_first_call_and_none_parses_nothing() -> None:
    text = FORMATS["hermes"].render([CALL, ParsedCall("add", "{}")])
    assert [c.name for c in read_reply(_plan("hermes", parallel=False), text).calls] == ["get_weather"]
    off = read_reply(_plan("hermes", parse=False), text)
    assert off.calls == () and off.content == text


class _Rescanning(ContentGate):
    """The gate without its memo: every feed reads the whole reply again (as it did before)."""

    def feed(self, text: str) -> tuple[str, list]:
        self.memo = ScanMemo()
        return super().feed(text)


def _pieces(gate: ContentGate, text: str, step: int) -> list:
    """What each feed (``step`` characters a token) and the finish send, call ids left out."""
    out = []
    for a in range(0, len(text), step):
        content, deltas = gate.feed(text[a : a + step])
        out.append((content, [d.model_dump(exclude={"id"}) for d in deltas]))
    content, deltas, reply = gate.finish()
    return [*out, (content, [d.model_dump(exclude={"id"}) for d in deltas], reply)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_a_long_streamed_reply_is_read_once_not_at_every_token(fmt: str) -> None:
    """~6,000 characters of calls streamed 3 characters a token: the same content and argument
    pieces as reading the whole reply again at every token, while the scanners read each
    character about twice in all, once to find where a value ends and once to decode it (reading
    the reply again at every token cost ~n²/6 characters here, and 0.7 s for 6,000 characters)."""
    f = FORMATS[fmt]
    rows = [{"id": i, "name": f"item {i}", "tags": ["a", "b]{\\\""], "score": i / 8} for i in range(90)]
    calls = f.render([ParsedCall("save", json.dumps({"rows": rows})), CALL])
    text = "Saving the rows now.\n\n" + calls if f.marker else calls
    assert len(text) > 6000
    gate = ContentGate(_plan(fmt))
    streamed = _pieces(gate, text, 3)
    assert streamed == _pieces(_Rescanning(_plan(fmt)), text, 3)
    assert streamed[-1][2].calls == (ParsedCall("save", json.dumps({"rows": rows})), CALL)
    assert sum(len(d["function"]["arguments"] or "") for _, deltas, *_ in streamed for d in deltas) > 6000
    assert gate.memo.scanned <= 3 * len(text), (gate.memo.scanned, len(text))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_scans_with_a_memo_equal_fresh_scans_of_every_prefix(fmt: str) -> None:
    """The memo keeps only what later text cannot change: every prefix, well formed or broken,
    scans the same with the memo of the shorter prefixes as without."""
    f = FORMATS[fmt]
    calls = f.render([CALL, ParsedCall("add", '{"a": "x\\"}", "b": [1, {"c": null}]}')])
    for text in (*_replies(fmt), calls + " then junk", calls[:-1] + "?" + calls[-1], calls + calls):
        memo = ScanMemo()
        for end in range(len(text) + 1):
            assert f.scan(text[:end], memo) == f.scan(text[:end]), (text, end)
