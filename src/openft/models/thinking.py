"""Reasoning ("thinking") blocks of models whose chat template has them (Qwen3's ``<think>``).

A Qwen3-format model answers ``<think>\\nreasoning\\n</think>\\n\\nanswer``. Client code written for
OpenAI reads ``message.content`` as the answer, so serving splits the reply: the answer is
``content``, the reasoning goes to ``reasoning_content`` (the field vLLM and DeepSeek's API use
for reasoning models), streamed as ``delta.reasoning_content`` and never as content deltas.

Training data written the same way (an assistant ``content`` holding a ``<think>`` block) is
rendered the way the model's own template renders it: the template splits the block off into
``reasoning_content`` itself, which it cannot do on openft's inert placeholders, so
:func:`split_thinking` does that split first with the template's own rule and the template gets
``reasoning_content``. Qwen3's template then keeps the reasoning only for the assistant turns after
the last user query (earlier turns lose it), exactly as ``apply_chat_template`` does.

The switch: templates that read ``enable_thinking`` (Qwen3) take ``enable_thinking=False``, which
ends the generation prompt with an empty ``<think>\\n\\n</think>\\n\\n`` block, so the model answers
at once. ``reasoning_effort`` maps onto it (:func:`enable_thinking_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from openft.errors import InvalidRequest

OPEN = "<think>"
CLOSE = "</think>"

THINKING_OFF_EFFORTS = ("none", "minimal")
"""``reasoning_effort`` values that turn thinking off: no reasoning, or as little as possible
(Qwen3 reasons at full length or not at all, so the least it can do is none)."""
THINKING_ON_EFFORTS = ("medium", "high", "xhigh", "max")
"""Values that keep thinking on: the default effort and more (the model's one thinking mode is
its most)."""


@dataclass(frozen=True)
class Thinking:
    """What a model's chat template does with reasoning blocks."""

    switch: bool
    """The template reads ``enable_thinking`` (it can be turned off in the generation prompt)."""


def thinking_of(processor: Any) -> Thinking | None:
    """The reasoning support of a model's chat template; None when it has none.

    A template that splits ``</think>`` blocks off into ``reasoning_content`` (Qwen3, and its
    descendants) has it; one that only mentions the tags as text does not.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or CLOSE not in template or "reasoning_content" not in template:
        return None
    return Thinking(switch="enable_thinking" in template)


def split_thinking(text: str) -> tuple[str | None, str]:
    """``(reasoning, content)`` of an assistant message written with its ``<think>`` block inline,
    by Qwen3's template rule: the reasoning is what precedes ``</think>`` (after ``<think>``),
    newlines trimmed; the content what follows the last ``</think>``, leading newlines dropped.
    No ``</think>``: ``(None, text)``."""
    if CLOSE not in text:
        return None, text
    reasoning = text.split(CLOSE)[0].rstrip("\n").split(OPEN)[-1].lstrip("\n")
    return reasoning, text.split(CLOSE)[-1].lstrip("\n")


def split_reply(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """A generated reply as ``(reasoning_content, content)``.

    The reply is reasoning when it starts with ``<think>`` (leading whitespace aside), or when the
    prompt already opened the block (``opened``). Reasoning runs to ``</think>``; with no
    ``</think>`` (the token cap hit while thinking) all of it is reasoning and the content is
    empty. Newlines around the reasoning and before the content are dropped (the template writes
    them). A reply without a block is all content: ``(None, text)``.
    """
    head = text.lstrip()
    if not opened and not head.startswith(OPEN):
        return None, text
    body = text if opened else head[len(OPEN) :]
    if CLOSE not in body:
        return body.strip("\n"), ""
    reasoning, _, content = body.partition(CLOSE)
    return reasoning.strip("\n"), content.lstrip("\n")


class ThinkingStream:
    """:func:`split_reply` on a reply that arrives in pieces: ``feed`` returns the reasoning and
    the content that can be sent now, ``finish`` the rest. The pieces joined are exactly what
    :func:`split_reply` returns for the whole text (a tag split across pieces, or newlines that
    may turn out to be trimmed, are held back until the next piece decides)."""

    def __init__(self, *, opened: bool = False) -> None:
        self.text = ""
        self._opened = opened
        self._reasoning_sent = 0  # characters of split_reply(...)[0] already sent
        self._content_sent = 0

    def feed(self, text: str) -> tuple[str, str]:
        self.text += text
        return self._emit(final=False)

    def finish(self) -> tuple[str, str]:
        return self._emit(final=True)

    @property
    def reasoning(self) -> str | None:
        return split_reply(self.text, opened=self._opened)[0]

    def _emit(self, *, final: bool) -> tuple[str, str]:
        reasoning, content = self._stable(final)
        r = reasoning[self._reasoning_sent :]
        c = content[self._content_sent :]
        self._reasoning_sent += len(r)
        self._content_sent += len(c)
        return r, c

    def _stable(self, final: bool) -> tuple[str, str]:
        """The reasoning and content that no later piece can change."""
        if final:
            reasoning, content = split_reply(self.text, opened=self._opened)
            return reasoning or "", content
        head = self.text.lstrip()
        if not self._opened:
            if not head or (len(head) < len(OPEN) and OPEN.startswith(head)):
                return "", ""  # may still become <think>
            if not head.startswith(OPEN):
                return "", self.text
            body = head[len(OPEN) :]
        else:
            body = self.text
        if CLOSE in body:
            reasoning, _, content = body.partition(CLOSE)
            # Leading newlines of the content are dropped; hold them until text follows.
            return reasoning.strip("\n"), content.lstrip("\n")
        # Still thinking: hold a partial </think> and trailing newlines (trimmed if it closes).
        keep = len(body) - _partial_suffix(body, CLOSE)
        return body[:keep].lstrip("\n").rstrip("\n") if body[:keep].strip("\n") else "", ""


def enable_thinking_for(thinking: Thinking | None, reasoning_effort: str | None) -> bool | None:
    """``enable_thinking`` for the chat template from the request's ``reasoning_effort``.

    None: leave the template's default (thinking on for Qwen3). A model without reasoning accepts
    only ``none`` (it does not reason); ``low`` is refused for a model whose thinking is on or off:
    it asks for less reasoning than the model's one thinking mode, but some, which it cannot do.
    """
    if reasoning_effort is None:
        return None
    if thinking is None or not thinking.switch:
        if reasoning_effort == "none":
            return None
        raise InvalidRequest(
            f"'reasoning_effort' {reasoning_effort!r} is not supported by openft for this model: it has no "
            "reasoning control (only chat templates with enable_thinking, like Qwen3's, have one); remove it "
            "or send 'none'",
            param="reasoning_effort",
            code="unsupported_parameter",
        )
    if reasoning_effort in THINKING_OFF_EFFORTS:
        return False
    if reasoning_effort in THINKING_ON_EFFORTS:
        return True
    raise InvalidRequest(
        f"reasoning_effort {reasoning_effort!r} is not supported by this model: its thinking is either on "
        "(the model's own length) or off; send 'none' or 'minimal' for no thinking, 'medium' (the default) "
        "for thinking",
        param="reasoning_effort",
        code="unsupported_value",
    )


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
