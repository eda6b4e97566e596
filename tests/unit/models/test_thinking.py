"""Reasoning blocks (``openft.models.thinking``): splitting a reply into reasoning and answer, the
same whole or streamed in any pieces, and ``reasoning_effort`` -> ``enable_thinking``."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openft.errors import InvalidRequest
from openft.models.thinking import (
    Thinking,
    ThinkingStream,
    enable_thinking_for,
    split_reply,
    split_thinking,
)

PROFILE = settings(
    derandomize=bool(os.environ.get("CI")),
    database=None if os.environ.get("CI") else settings.default.database,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nsky is blue\n</think>\n\nblue", False, ("sky is blue", "blue")),
        ("  <think>r</think>a", False, ("r", "a")),
        ("<think>\n\n</think>\n\nblue", False, ("", "blue")),
        ("blue", False, (None, "blue")),
        ("blue <think>x</think>", False, (None, "blue <think>x</think>")),  # not a leading block
        ("<think>\nstill going", False, ("still going", "")),  # the token cap hit while thinking
        ("reasoning\n</think>\n\nanswer", True, ("reasoning", "answer")),  # the prompt opened it
        ("<think>r</think>\n\n<tool_call>\n{}\n</tool_call>", False, ("r", "<tool_call>\n{}\n</tool_call>")),
    ],
)
def test_split_reply(text: str, opened: bool, expected: tuple[str | None, str]) -> None:
    assert split_reply(text, opened=opened) == expected


def test_split_thinking_follows_qwen3s_template_rule() -> None:
    # content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') / [-1].lstrip('\n')
    assert split_thinking("<think>\nwhy\n\n</think>\n\n  answer\n") == ("why", "  answer\n")
    assert split_thinking("no block") == (None, "no block")
    assert split_thinking("a</think>b</think>c") == ("a", "c")


@PROFILE
@given(
    parts=st.lists(
        st.one_of(
            st.sampled_from(["<think>", "</think>", "</th", "ink>", "\n\n", "<"]),
            st.text(alphabet="<>/thinkab \n", max_size=6),
        ),
        max_size=12,
    ),
    prefix=st.sampled_from(["", "<think>", "\n<think>\n", "<thi"]),
    opened=st.booleans(),
)
def test_streamed_pieces_join_to_the_whole_split(parts: list[str], prefix: str, opened: bool) -> None:
    parts = [prefix, *parts]
    stream = ThinkingStream(opened=opened)
    reasoning = content = ""
    for p in parts:
        r, c = stream.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = stream.finish()
    reasoning, content = reasoning + r, content + c
    want_r, want_c = split_reply("".join(parts), opened=opened)
    assert (reasoning, content) == (want_r or "", want_c)
    assert stream.reasoning == want_r


def test_stream_never_sends_tags_as_content() -> None:
    stream = ThinkingStream()
    sent = [stream.feed(p) for p in ["<th", "ink>", "\nstep", " one\n", "</th", "ink>\n", "\n", "blue"]]
    sent.append(stream.finish())
    assert "".join(c for _, c in sent) == "blue"
    assert "".join(r for r, _ in sent) == "step one"
    assert all("<" not in c for _, c in sent)


@pytest.mark.parametrize(
    ("effort", "enable"),
    [(None, None), ("none", False), ("minimal", False), ("medium", True), ("high", True), ("max", True)],
)
def test_reasoning_effort_maps_onto_enable_thinking(effort: str | None, enable: bool | None) -> None:
    assert enable_thinking_for(Thinking(switch=True), effort) is enable


def test_reasoning_effort_that_cannot_be_honoured_is_refused() -> None:
    with pytest.raises(InvalidRequest) as e:
        enable_thinking_for(Thinking(switch=True), "low")
    assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_value"
    assert "'none'" in e.value.message and "'medium'" in e.value.message
    # A model without a thinking switch: only "none" (it does not reason) is honoured.
    assert enable_thinking_for(None, "none") is None
    for effort in ("minimal", "medium", "high"):
        with pytest.raises(InvalidRequest) as e:
            enable_thinking_for(None, effort)
        assert e.value.param == "reasoning_effort" and e.value.code == "unsupported_parameter"
