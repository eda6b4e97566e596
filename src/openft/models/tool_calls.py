"""Tool-call formats: how each model family writes tool calls in its assistant text.

Training and serving must agree on one format per family: training renders ``tool_calls``
through the family's chat template (which writes them in this format), and serving parses the
generated text back into OpenAI ``tool_calls`` with :func:`ToolCallFormat.parse`. Constrained
decoding builds its grammar from the same pieces (``section_open``, ``call_open``, ...), so a
forced call is always parseable.

Registry keys (``Family.tool_format`` names one of them):

``hermes``
    Hermes / Qwen2.5 / Qwen3 (ChatML): each call is
    ``<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>``; parallel calls follow one
    another separated by a newline. Text before the first ``<tool_call>`` is ``content``.
``llama3_json``
    Llama 3.1 / 3.2 / 3.3 JSON tool calling: the reply *is* the call,
    ``{"name": "f", "parameters": {...}}`` (optionally after ``<|python_tag|>``); several calls
    are separated by ``; ``. A reply that is not such an object is plain content.
``mistral``
    Mistral (v3 tokenizer templates: Mistral 7B v0.3, Nemo, Small): ``[TOOL_CALLS]`` then a JSON
    array ``[{"name": "f", "arguments": {...}}, ...]``. ``[TOOL_CALLS]`` is a control token in
    real Mistral tokenizers (kept in the decoded text for parsing; see ``marker_tokens``).
``phi4_mini``
    Phi-4-mini: ``functools[{"name": "f", "arguments": {...}}, ...]``.

Arguments are JSON objects in the text; they are returned to clients as that text (a JSON
string, as OpenAI sends ``arguments``), exactly as the model wrote it.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str
    """The arguments object as a JSON string."""


@dataclass(frozen=True)
class ParsedReply:
    content: str | None
    """Text outside the calls (null when the reply is only calls)."""
    calls: tuple[ParsedCall, ...]


def new_call_id() -> str:
    """``call_`` + 24 random letters/digits, like OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    """Registry key (``hermes``, ``llama3_json``, ...)."""
    marker: str
    """Text that starts the tool-call part of a reply; text before it is ``content``. Empty: the
    reply must *be* the calls (Llama 3 JSON)."""
    array: bool
    """True: after ``marker`` comes one JSON array of call objects (Mistral, Phi-4-mini).
    False: call objects one after the other, each wrapped in ``call_open``/``call_close`` and
    separated by ``separator``."""
    call_open: str = ""
    call_close: str = ""
    separator: str = ""
    arguments_key: str = "arguments"
    """Key of the arguments object inside a call (Llama 3 says ``parameters``)."""
    marker_tokens: tuple[str, ...] = ()
    """Special tokens that are part of the format: kept in decoded text so the parser sees them."""
    optional_prefixes: tuple[str, ...] = ()
    """Text the model may put before the calls that carries no meaning (Llama's ``<|python_tag|>``)."""

    def render(self, calls: Sequence[ParsedCall]) -> str:
        """The assistant text for ``calls``, as the family's chat template writes them."""
        objs = [self.call_json(c.name, json.loads(c.arguments)) for c in calls]
        if self.array:
            return self.marker + "[" + ", ".join(objs) + "]"
        return self.separator.join(self.call_open + o + self.call_close for o in objs)

    def call_json(self, name: str, arguments: Any) -> str:
        """One call object, serialised as Jinja's ``tojson`` does in chat templates."""
        return json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)

    def parse(self, text: str) -> ParsedReply:
        """Split ``text`` into content and calls. Text that is not a well-formed call section
        stays content, whole: nothing a model wrote is dropped."""
        plain = ParsedReply(content=text, calls=())
        if self.marker:
            at = text.find(self.marker)
            if at < 0:
                return plain
            head = text[:at]
            # Wrapped calls keep the marker (it is each call's opening); an array skips it.
            rest = text[at + len(self.marker) :] if self.array else text[at:]
        else:
            head, rest = "", text.lstrip()
            for prefix in self.optional_prefixes:
                if rest.startswith(prefix):
                    rest = rest[len(prefix) :]
        calls = self._parse_array(rest) if self.array else self._parse_sequence(rest)
        if not calls:
            return plain
        return ParsedReply(content=head.rstrip() or None, calls=calls)

    def _parse_array(self, rest: str) -> tuple[ParsedCall, ...]:
        pos = _skip_ws(rest, 0)
        if not rest.startswith("[", pos):
            return ()
        calls, pos = self._calls(rest, pos + 1, open_="", close="", sep=",", end="]")
        return calls if calls and rest.startswith("]", pos) and not rest[pos + 1 :].strip() else ()

    def _parse_sequence(self, rest: str) -> tuple[ParsedCall, ...]:
        open_, close, sep = self.call_open.strip(), self.call_close.strip(), self.separator.strip()
        calls, pos = self._calls(rest, 0, open_=open_, close=close, sep=sep, end="")
        return calls if pos >= len(rest) else ()

    def _calls(
        self, rest: str, pos: int, *, open_: str, close: str, sep: str, end: str
    ) -> tuple[tuple[ParsedCall, ...], int]:
        """Calls from ``pos`` on, each ``open_ {...} close``, ``sep`` between them, until ``end``
        (or the end of the text); ``()`` if anything else is in the way."""
        calls: list[ParsedCall] = []
        pos = _skip_ws(rest, pos)
        while pos < len(rest) and not (end and rest.startswith(end, pos)):
            for token in (sep if calls else "", open_):
                if token:
                    if not rest.startswith(token, pos):
                        return (), pos
                    pos = _skip_ws(rest, pos + len(token))
            found = self._call_at(rest, pos)
            if found is None:
                return (), pos
            call, pos = found
            calls.append(call)
            pos = _skip_ws(rest, pos)
            if close:
                if not rest.startswith(close, pos):
                    return (), pos
                pos = _skip_ws(rest, pos + len(close))
        return tuple(calls), pos

    def _call_at(self, text: str, pos: int) -> tuple[ParsedCall, int] | None:
        """The call object starting at ``pos`` and where it ends. ``arguments`` is the model's own
        text of the arguments object (valid JSON, kept byte for byte: re-serialising would turn
        ``1e999`` into ``Infinity``, which is not JSON)."""
        members = _object_members(text, pos)
        if members is None:
            return None
        fields, end = members
        name = fields.get("name")
        args = fields.get(self.arguments_key) or fields.get("arguments") or fields.get("parameters")
        if name is None or not isinstance(name[0], str) or args is None:
            return None
        value, raw = args
        if isinstance(value, str):  # some models write the arguments as a JSON string
            try:
                value, raw = _strict_loads(value), value
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        return ParsedCall(name=name[0], arguments=raw), end


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)


def _object_members(text: str, pos: int) -> tuple[dict[str, tuple[Any, str]], int] | None:
    """Parse the JSON object at ``pos``: key -> (value, the value's source text), and its end."""
    if not text.startswith("{", pos):
        return None
    out: dict[str, tuple[Any, str]] = {}
    pos = _skip_ws(text, pos + 1)
    try:
        while not text.startswith("}", pos):
            if out:
                if not text.startswith(",", pos):
                    return None
                pos = _skip_ws(text, pos + 1)
            key, pos = _STRICT.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not isinstance(key, str) or not text.startswith(":", pos):
                return None
            start = _skip_ws(text, pos + 1)
            value, pos = _STRICT.raw_decode(text, start)
            out[key] = (value, text[start:pos])
            pos = _skip_ws(text, pos)
    except ValueError:  # JSONDecodeError and rejected constants
        return None
    return out, pos + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


HERMES = ToolCallFormat(
    name="hermes",
    marker="<tool_call>",
    array=False,
    call_open="<tool_call>\n",
    call_close="\n</tool_call>",
    separator="\n",
)
LLAMA3_JSON = ToolCallFormat(
    name="llama3_json",
    marker="",
    array=False,
    separator="; ",
    arguments_key="parameters",
    marker_tokens=("<|python_tag|>",),
    optional_prefixes=("<|python_tag|>",),
)
MISTRAL = ToolCallFormat(name="mistral", marker="[TOOL_CALLS]", array=True, marker_tokens=("[TOOL_CALLS]",))
PHI4_MINI = ToolCallFormat(name="phi4_mini", marker="functools", array=True)

FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, PHI4_MINI)}


def get_format(name: str) -> ToolCallFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown tool-call format {name!r}; known: {', '.join(FORMATS)}") from None


# What a chat template's source says about the format it writes (checked in this order).
_TEMPLATE_SIGNS: tuple[tuple[str, str], ...] = (
    ("[TOOL_CALLS]", "mistral"),
    ("functools", "phi4_mini"),
    ("<tool_call>", "hermes"),
    ('"parameters": ', "llama3_json"),
)


def format_for(family_format: str | None, chat_template: str | None) -> ToolCallFormat:
    """The tool-call format to serve and train with: the family's, else the one the chat template
    writes, else ``hermes`` (the most common open format, and openft's built-in model's)."""
    if family_format:
        return get_format(family_format)
    for sign, name in _TEMPLATE_SIGNS:
        if chat_template and sign in chat_template:
            return FORMATS[name]
    return HERMES
