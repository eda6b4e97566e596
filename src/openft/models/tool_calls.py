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
``mistral_v11``
    Mistral tekken v11+ (Mistral Small 3.1/3.2, Magistral, Devstral): ``[TOOL_CALLS]f[ARGS]{...}``
    per call (see :class:`MistralArgsFormat`).
``phi4_mini``
    Phi-4-mini: ``functools[{"name": "f", "arguments": {...}}, ...]``.
``pythonic``
    ``[f(a=1, b="x"), g()]`` (Llama 3.2 / Llama 4 pythonic tool calling; see
    :class:`PythonicFormat`).

Arguments are JSON objects in the text; they are returned to clients as that text (a JSON
string, as OpenAI sends ``arguments``), exactly as the model wrote it (``pythonic``: the JSON
object of the Python literals). :meth:`ToolCallFormat.scan` reads a reply that is still being
generated, so calls can be streamed as they are written; :meth:`ToolCallFormat.parse` is the
same reading of the whole reply. A streamed reply is scanned again at every token, so ``scan``
takes a :class:`ScanMemo` that keeps what earlier scans of the same reply read for good: each
scan then reads only the new text.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
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
class PartialCall:
    """A call as far as a reply has written it: the name is whole, the arguments may not be."""

    name: str
    arguments: str
    """The arguments text so far. JSON formats: a prefix of the final arguments, so it can be
    streamed as it grows; ``pythonic``: empty until the call is closed, then the whole object."""
    complete: bool


@dataclass(frozen=True)
class Scan:
    """What a reply (or the part of it generated so far) holds."""

    start: int
    """Where the call section starts; ``text[:start]`` is content."""
    calls: tuple[PartialCall, ...]
    complete: bool
    """The section ends where the text ends and every call in it is closed."""


_INCOMPLETE = -1  # a scanner's answer: the text ends before the thing being read does


@dataclass
class _Walk:
    """A bracket (or string) walk that stopped where the text ended, ready to go on."""

    at: int
    """The next character to read."""
    depth: int = 0
    quote: str = ""
    skip: int = 0
    """A character before this was escaped by a backslash."""
    end: int = _INCOMPLETE


@dataclass
class _ObjectRead:
    """A call object read as far as the text went: the fields read whole, where the next starts,
    and the key whose value has begun but not ended (``pending``: key, where the value starts)."""

    pos: int
    fields: dict[str, tuple[Any, str]] = field(default_factory=dict)
    pending: tuple[str, int] | None = None
    result: tuple[PartialCall | None, int] | None = None
    done: bool = False


@dataclass
class ScanMemo:
    """What the scans of one growing reply (a streamed one) have read for good, so the next scan
    starts where the last one stopped instead of at the start of the reply.

    Sound because the scanners read left to right and decide nothing from where the text ends
    except "incomplete": whatever they settled on a prefix (where the section starts, a whole
    call, a whole field, how far a bracket walk got) is what they settle on any longer text that
    starts with it, and a reply that cannot be calls can never become calls. So a memo must only
    ever see one reply, each time with more text at its end."""

    scanned: int = 0
    """Characters read so far by the marker search, the value walks and the JSON decoding (the
    parts whose cost grows with the reply): a measure of work that does not depend on the clock."""
    start: int | None = None
    searched: int = 0
    """Text before this holds no start of the marker."""
    broken: bool = False
    walks: dict[tuple[int, str], _Walk] = field(default_factory=dict)
    objects: dict[int, _ObjectRead] = field(default_factory=dict)
    calls: dict[int, tuple[tuple[PartialCall, ...], int]] = field(default_factory=dict)
    """Per call section: the calls read whole and where the next one starts."""

    def resume(self, section: int) -> tuple[list[PartialCall], int] | None:
        """The calls of the section at ``section`` that an earlier scan read whole, and where
        the next one starts; None if it read none whole."""
        if section not in self.calls:
            return None
        whole, pos = self.calls[section]
        return list(whole), pos


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    """Registry key (``hermes``, ``llama3_json``, ...)."""
    marker: str
    """Text that starts the tool-call part of a reply; text before it is ``content``. Empty: the
    reply must *be* the calls (Llama 3 JSON, pythonic)."""
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

    # ------------------------------------------------------------------ writing

    def render(self, calls: Sequence[ParsedCall]) -> str:
        """The assistant text for ``calls``, as the family's chat template writes them."""
        objs = [self.call_json(c.name, json.loads(c.arguments)) for c in calls]
        if self.array:
            return self.marker + "[" + ", ".join(objs) + "]"
        return self.separator.join(self.call_open + o + self.call_close for o in objs)

    def call_json(self, name: str, arguments: Any) -> str:
        """One call object, serialised as Jinja's ``tojson`` does in chat templates."""
        return json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)

    # ------------------------------------------------------------------ reading

    def parse(self, text: str, memo: ScanMemo | None = None) -> ParsedReply:
        """Split ``text`` into content and calls. Text that is not a well-formed call section
        stays content, whole: nothing a model wrote is dropped."""
        found = self.scan(text, memo)
        if found is None or not found.complete or not found.calls:
            return ParsedReply(content=text, calls=())
        calls = tuple(ParsedCall(c.name, c.arguments) for c in found.calls)
        return ParsedReply(content=text[: found.start].rstrip() or None, calls=calls)

    def scan(self, text: str, memo: ScanMemo | None = None) -> Scan | None:
        """The call section of ``text`` read as far as it goes (``text`` may be a reply still
        being generated). None: there is no call section, or what is there cannot become one.
        ``memo``: the one the scans of this reply's shorter prefixes used (streaming); the answer
        is the same as without it, and only the text they did not read whole is read."""
        memo = ScanMemo() if memo is None else memo
        if memo.broken:
            return None
        start = self.section_start(text, memo)
        if start is None:
            return None
        read = self._scan_section(text, start, memo)
        if read is None:
            memo.broken = True  # what is in the way stays in the text: never calls
            return None
        calls, complete = read
        return Scan(start=start, calls=tuple(calls), complete=complete)

    def section_start(self, text: str, memo: ScanMemo | None = None) -> int | None:
        """Where the call section starts, or None if ``text`` has none (yet)."""
        if memo is not None and memo.start is not None:
            return memo.start
        memo = ScanMemo() if memo is None else memo
        if self.marker:
            at = text.find(self.marker, memo.searched)
            memo.scanned += len(text) - memo.searched
            # The next search starts where a marker cut by the end of the text could start.
            memo.searched = max(memo.searched, len(text) - len(self.marker) + 1)
            if at < 0:
                return None
        else:
            at = _skip_ws(text, 0)
            if not any(text.startswith(p, at) for p in (self.opening, *self.optional_prefixes)):
                return None
        memo.start = at
        return at

    @property
    def opening(self) -> str:
        """What a markerless reply that is a call starts with."""
        return "{"

    def may_start_section(self, text: str) -> bool:
        """Markerless formats: ``text`` (all of the reply so far) may still turn into calls."""
        head = text.lstrip()
        return not head or any(
            p.startswith(head) or head.startswith(p) for p in (self.opening, *self.optional_prefixes)
        )

    def _scan_section(self, text: str, pos: int, memo: ScanMemo) -> tuple[list[PartialCall], bool] | None:
        if self.marker:
            if self.array:
                pos += len(self.marker)
        else:
            for prefix in self.optional_prefixes:
                if text.startswith(prefix, pos):
                    pos = _skip_ws(text, pos + len(prefix))
        if self.array:
            return self._scan_calls(text, pos, memo, open_="", close="", sep=",", begin="[", end="]")
        return self._scan_calls(
            text,
            pos,
            memo,
            open_=self.call_open.strip(),
            close=self.call_close.strip(),
            sep=self.separator.strip(),
            begin="",
            end="",
        )

    def _scan_calls(
        self,
        text: str,
        pos: int,
        memo: ScanMemo,
        *,
        open_: str,
        close: str,
        sep: str,
        begin: str,
        end: str,
    ) -> tuple[list[PartialCall], bool] | None:
        """Calls ``begin open_ {...} close sep open_ {...} close ... end``, read as far as the
        text goes; None when something else is in the way."""
        section = pos
        if resumed := memo.resume(section):
            calls, pos = resumed
        else:
            calls = []
            pos = _skip_ws(text, pos)
            if begin:
                pos = _expect(text, pos, begin)
                if pos is None or pos == _INCOMPLETE:
                    return None if pos is None else (calls, False)
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                return calls, bool(calls) and not end
            if end and calls and text.startswith(end, pos):
                pos = _skip_ws(text, pos + len(end))
                return (calls, True) if pos >= len(text) else None
            for token in (sep if calls else "", open_):
                if token:
                    pos = _expect(text, pos, token)
                    if pos is None or pos == _INCOMPLETE:
                        return None if pos is None else (calls, False)
                    pos = _skip_ws(text, pos)
            found = self._scan_object(text, pos, memo)
            if found is None:
                return None
            call, obj_end = found
            if call is not None:
                calls.append(call)
            if obj_end == _INCOMPLETE:
                return calls, False
            if call is None:
                return None
            pos = _skip_ws(text, obj_end)
            if close:
                pos = _expect(text, pos, close)
                if pos is None or pos == _INCOMPLETE:
                    return None if pos is None else (calls, False)
            memo.calls[section] = (tuple(calls), pos)

    def _scan_object(self, text: str, pos: int, memo: ScanMemo) -> tuple[PartialCall | None, int] | None:
        """The call object at ``pos``: the call (None until its name is read) and where the object
        ends (``_INCOMPLETE`` if it goes past the text). None: not a call object. ``arguments``
        is the model's own text of the arguments object (valid JSON, kept byte for byte:
        re-serialising would turn ``1e999`` into ``Infinity``, which is not JSON)."""
        if pos >= len(text):
            return None, _INCOMPLETE
        if text[pos] != "{":
            return None
        read = memo.objects.setdefault(pos, _ObjectRead(pos + 1))
        if read.done:
            return read.result
        keys = (self.arguments_key, "arguments", "parameters")
        fields = read.fields  # grows only by fields read whole, which later text cannot change
        partial_args = ""
        pos = read.pending[1] if read.pending else _skip_ws(text, read.pos)
        ended = False
        while pos < len(text):
            if read.pending:
                key, start = read.pending
            else:
                if text[pos] == "}":
                    ended = True
                    pos += 1
                    break
                if fields:
                    pos = _expect(text, pos, ",")
                    if pos is None or pos == _INCOMPLETE:
                        if pos is None:
                            return None
                        break
                    pos = _skip_ws(text, pos)
                if pos >= len(text):
                    break
                if text[pos] != '"':
                    return None
                key_end = _value_end(text, pos, memo)
                if key_end == _INCOMPLETE:
                    break
                key = json.loads(text[pos:key_end])
                pos = _expect(text, _skip_ws(text, key_end), ":")
                if pos is None:
                    return None
                start = _skip_ws(text, pos) if pos != _INCOMPLETE else len(text)
                if start < len(text):  # the value has begun: later scans go on from it
                    read.pending = (key, start)
            value_end = _value_end(text, start, memo)
            if value_end is None:
                return None
            if value_end == _INCOMPLETE:
                if key in keys and text.startswith("{", start):
                    partial_args = text[start:]
                break
            try:
                value, stop = _STRICT.raw_decode(text, start)
            except ValueError:  # JSONDecodeError and rejected constants
                return None
            memo.scanned += stop - start
            if stop != value_end:
                return None
            fields[key] = (value, text[start:stop])
            read.pending, read.pos = None, stop
            pos = _skip_ws(text, stop)
        name = fields.get("name")
        if name is not None and not isinstance(name[0], str):
            return None
        args = next((fields[k] for k in keys if k in fields), None)
        if not ended:
            call = PartialCall(name[0], args[1] if args else partial_args, False) if name else None
            return call, _INCOMPLETE
        read.done, read.result = True, _whole_call(name, args, pos)
        return read.result


def _whole_call(
    name: tuple[Any, str] | None, args: tuple[Any, str] | None, end: int
) -> tuple[PartialCall, int] | None:
    """A closed call object's call: it needs a name and an arguments object."""
    if name is None or args is None:
        return None
    value, raw = args
    if isinstance(value, str):  # some models write the arguments as a JSON string
        try:
            value, raw = _strict_loads(value), value
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return PartialCall(name[0], raw, True), end


@dataclass(frozen=True)
class MistralArgsFormat(ToolCallFormat):
    """Mistral's tekken v11+ layout (Mistral Small 3.1/3.2, Magistral, Devstral, Ministral):
    each call is ``[TOOL_CALLS]name[ARGS]{...}``, parallel calls one after the other. Small 3.2
    writes ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``; the id is read and dropped (openft gives
    calls its own ids). All three markers are control tokens in the real tokenizers."""

    args_marker: str = "[ARGS]"
    id_marker: str = "[CALL_ID]"

    def render(self, calls: Sequence[ParsedCall]) -> str:
        return "".join(
            self.marker + c.name + self.args_marker + json.dumps(json.loads(c.arguments), ensure_ascii=False)
            for c in calls
        )

    def _scan_section(self, text: str, pos: int, memo: ScanMemo) -> tuple[list[PartialCall], bool] | None:
        section = pos
        calls, pos = memo.resume(section) or ([], pos)
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                return calls, bool(calls)
            pos = _expect(text, pos, self.marker)
            if pos is None or pos == _INCOMPLETE:
                return None if pos is None else (calls, False)
            head = _NAME.match(text, pos)
            pos = head.end()
            name = head.group()
            if pos >= len(text) or any(m.startswith(text[pos:]) for m in (self.args_marker, self.id_marker)):
                return calls, False  # the name (or the marker after it) is still being written
            if text.startswith(self.id_marker, pos):
                id_end = text.find(self.args_marker, pos)
                memo.scanned += (id_end if id_end >= 0 else len(text)) - pos
                if id_end < 0:
                    return (calls, False) if name else None
                pos = id_end
            if not name or not text.startswith(self.args_marker, pos):
                return None
            start = pos + len(self.args_marker)
            if start < len(text) and text[start] != "{":
                return None
            end = _value_end(text, start, memo)
            if end is None:
                return None
            if end == _INCOMPLETE:
                calls.append(PartialCall(name, text[start:], False))
                return calls, False
            memo.scanned += end - start
            try:
                value = _strict_loads(text[start:end])
            except ValueError:
                return None
            if not isinstance(value, dict):
                return None
            calls.append(PartialCall(name, text[start:end], True))
            pos = end
            memo.calls[section] = (tuple(calls), pos)


@dataclass(frozen=True)
class PythonicFormat(ToolCallFormat):
    """Python call syntax, ``[get_weather(city="Paris", days=2), add(a=1, b=2)]`` (Llama 3.2 and
    Llama 4 "pythonic" tool calling, vLLM's ``pythonic`` parser): the reply is one list of calls
    with keyword arguments whose values are Python literals. Arguments are returned as the JSON
    object of those values; they are not JSON text in the reply, so each call's arguments come
    whole once its ``)`` is written."""

    def render(self, calls: Sequence[ParsedCall]) -> str:
        items = []
        for c in calls:
            args = json.loads(c.arguments)
            items.append(c.name + "(" + ", ".join(f"{k}={_py(v)}" for k, v in args.items()) + ")")
        return "[" + ", ".join(items) + "]"

    @property
    def opening(self) -> str:
        return "["

    def _scan_section(self, text: str, pos: int, memo: ScanMemo) -> tuple[list[PartialCall], bool] | None:
        for prefix in self.optional_prefixes:
            if text.startswith(prefix, pos):
                pos = _skip_ws(text, pos + len(prefix))
        section = pos
        if resumed := memo.resume(section):
            calls, pos = resumed
        else:
            calls = []
            pos = _expect(text, pos, "[")
            if pos is None or pos == _INCOMPLETE:
                return None if pos is None else (calls, False)
        while True:
            pos = _skip_ws(text, pos)
            if pos >= len(text):
                return calls, False
            if calls and text[pos] == "]":
                return (calls, True) if not text[pos + 1 :].strip() else None
            if calls:
                pos = _expect(text, pos, ",")
                if pos is None:
                    return None
                pos = _skip_ws(text, pos)
            head = _NAME.match(text, pos)
            name, pos = head.group(), head.end()
            if pos >= len(text):
                return calls, False
            if not name or text[pos] != "(":
                return None
            end = _py_call_end(text, pos, memo)
            if end is None:
                return None
            if end == _INCOMPLETE:
                calls.append(PartialCall(name, "", False))
                return calls, False
            memo.scanned += end - pos
            args = _py_kwargs(text[pos:end])
            if args is None:
                return None
            calls.append(PartialCall(name, args, True))
            pos = end
            memo.calls[section] = (tuple(calls), pos)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*|")


def _py(value: Any) -> str:
    """A JSON value as a Python literal."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(str(k))}: {_py(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _py_call_end(text: str, pos: int, memo: ScanMemo) -> int | None:
    """End of the parenthesised argument list at ``pos`` (Python strings and brackets aware)."""
    end = _balanced_end(text, pos, "\"'", memo)
    return end if end == _INCOMPLETE or text[end - 1] == ")" else None


def _balanced_end(text: str, pos: int, quotes: str, memo: ScanMemo) -> int:
    """After the bracket that closes the one at ``pos`` (or, if a string in ``quotes`` starts at
    ``pos``, after the quote that closes it), skipping strings in ``quotes``; ``_INCOMPLETE`` if
    the text ends first. Which bracket closes is checked by the caller's parser afterwards.
    Jumps from one structural character to the next, and a walk cut by the end of the text goes
    on from there at the next scan (``memo``): a streamed value is read once, not at every token."""
    walk = memo.walks.setdefault((pos, quotes), _Walk(pos))
    if walk.end != _INCOMPLETE:
        return walk.end
    for m in (_STRUCTURE_PY if "'" in quotes else _STRUCTURE_JSON).finditer(text, walk.at):
        at, ch = m.start(), m.group()
        if at < walk.skip:
            continue
        if walk.quote:
            if ch == "\\":
                walk.skip = at + 2
            elif ch == walk.quote:
                walk.quote = ""
                if walk.depth == 0:  # the value was this string
                    walk.end = at + 1
                    break
        elif ch in quotes:
            walk.quote = ch
        elif ch in "([{":
            walk.depth += 1
        elif ch in ")]}":
            walk.depth -= 1
            if walk.depth == 0:
                walk.end = at + 1
                break
    stop = len(text) if walk.end == _INCOMPLETE else walk.end
    memo.scanned += stop - walk.at
    walk.at = stop
    return walk.end


_STRUCTURE_JSON = re.compile(r'[\[\]{}()"\\]')
_STRUCTURE_PY = re.compile(r"[\[\]{}()\"'\\]")


def _py_kwargs(args: str) -> str | None:
    """``(a=1, b="x")`` as the JSON object ``{"a": 1, "b": "x"}``; None unless every argument is
    a keyword with a literal value that JSON can hold."""
    try:
        call = ast.parse("f" + args, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        return None
    try:
        values = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        return json.dumps(values, ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError, SyntaxError):  # not a literal, or not JSON (a set, NaN...)
        return None


def _expect(text: str, pos: int, token: str) -> int | None:
    """After ``token`` at ``pos``; ``_INCOMPLETE`` if the text ends inside it; None if absent."""
    if text.startswith(token, pos):
        return pos + len(token)
    if token.startswith(text[pos:]):
        return _INCOMPLETE
    return None


def _value_end(text: str, pos: int, memo: ScanMemo) -> int | None:
    """End of the JSON value at ``pos`` by its structure (strings, brackets), ``_INCOMPLETE`` if
    the text ends first (a number or literal at the very end may go on), None if no value can
    start there. The value's validity is checked by the JSON decoder afterwards."""
    if pos >= len(text):
        return _INCOMPLETE
    if text[pos] in '"{[':
        return _balanced_end(text, pos, '"', memo)
    m = _SCALAR.match(text, pos)
    memo.scanned += m.end() - pos
    if not m.group():
        return None
    return _INCOMPLETE if m.end() >= len(text) else m.end()


_SCALAR = re.compile(r"[-+0-9.eEa-zA-Z]*")


def _strict_loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(parse_constant=_reject_constant)


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
MISTRAL_V11 = MistralArgsFormat(
    name="mistral_v11",
    marker="[TOOL_CALLS]",
    array=False,
    marker_tokens=("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
)
PYTHONIC = PythonicFormat(name="pythonic", marker="", array=False)

FORMATS: dict[str, ToolCallFormat] = {
    f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, MISTRAL_V11, PHI4_MINI, PYTHONIC)
}


def get_format(name: str) -> ToolCallFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown tool-call format {name!r}; known: {', '.join(FORMATS)}") from None


# What a chat template's source says about the format it writes (checked in this order).
_TEMPLATE_SIGNS: tuple[tuple[str, str], ...] = (
    ("[ARGS]", "mistral_v11"),
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
