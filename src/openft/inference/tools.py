"""Tools and structured output for one chat request: the grammar to decode with, and the reply
split into ``content`` and ``tool_calls`` (whole, or streamed as OpenAI streams it).

Who decides what:

- ``tool_choice: "none"``: replies are never parsed into calls (tools are still rendered).
- ``"auto"`` (the default with tools): free decoding; a reply in the family's tool-call format
  (``models.tool_calls``) becomes ``tool_calls`` with ``finish_reason: "tool_calls"``; anything
  else stays ``content``.
- ``"required"`` / a named function: decoding is constrained to calls in that format whose
  arguments match the function's schema (one call when ``parallel_tool_calls`` is false).
- ``response_format`` ``json_object`` / ``json_schema``: the content is constrained to JSON
  (matching the schema), unless a tool call is forced.
- ``parallel_tool_calls: false`` without a forced call: only the first parsed call is returned.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from openft.inference import constrain
from openft.inference.engine import TokenConstraint
from openft.inference.registry import LoadedModel
from openft.models.families import find_family
from openft.models.tool_calls import (
    ParsedCall,
    ParsedReply,
    PartialCall,
    ScanMemo,
    ToolCallFormat,
    format_for,
    new_call_id,
)
from openft.protocol.chat import (
    ChatCompletionRequest,
    ChunkFunctionCall,
    ChunkToolCall,
    FinishReason,
    FunctionCall,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    NamedToolChoice,
    ToolCall,
)


@dataclass(frozen=True)
class ToolPlan:
    """How one request's replies are decoded and read back."""

    fmt: ToolCallFormat
    parse: bool
    """Parse replies into tool calls (tools given and ``tool_choice`` is not ``none``)."""
    parallel: bool
    grammar: str | None
    """llguidance grammar every choice is decoded under; None = free decoding."""
    keep_tokens: frozenset[int]


def plan(loaded: LoadedModel, request: ChatCompletionRequest) -> ToolPlan:
    """Build (and check: unsupported schema features are a 400) what the request asks for."""
    tokenizer = loaded.tokenizer
    family = find_family(loaded.model)
    template = getattr(loaded.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    fmt = format_for(family.tool_format if family else None, template if isinstance(template, str) else None)
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", ()))
    keep = frozenset(vocab[t] for t in fmt.marker_tokens if t in vocab and vocab[t] in special)
    added = {t: (i, i in special) for t, i in tokenizer.get_added_vocab().items()}
    parallel = request.parallel_tool_calls is not False
    parse = bool(request.tools) and request.tool_choice != "none"
    choice = request.tool_choice
    content_schema = None
    if isinstance(request.response_format, JsonObjectFormat):
        content_schema, content_strict = {"type": "object"}, True
    elif isinstance(request.response_format, JsonSchemaResponseFormat):
        spec = request.response_format.json_schema
        content_schema, content_strict = spec.schema_ or {"type": "object"}, bool(spec.strict)
    grammar = None
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    lazy = _lazy(request)
    if request.tools and (forced or lazy):
        wanted = [
            (t.function.name, t.function.parameters, bool(t.function.strict))
            for t in request.tools
            if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name
        ]
        grammar = constrain.tool_grammar(
            fmt,
            wanted,
            parallel=parallel,
            tokens=added,
            lazy=lazy,
            content_schema=content_schema if lazy else None,
            param="tools",
        )
    elif content_schema is not None:
        param = (
            "response_format"
            if isinstance(request.response_format, JsonObjectFormat)
            else ("response_format.json_schema.schema")
        )
        grammar = constrain.json_grammar(content_schema, strict=content_strict, param=param)
    return ToolPlan(fmt=fmt, parse=parse, parallel=parallel, grammar=grammar, keep_tokens=keep)


def is_constrained(request: ChatCompletionRequest) -> bool:
    """Whether replies are decoded under a grammar (a forced tool call, or JSON output): the
    reply must start with the call or the JSON at once."""
    choice = request.tool_choice
    forced = bool(request.tools) and (choice == "required" or isinstance(choice, NamedToolChoice))
    json_output = isinstance(request.response_format, JsonObjectFormat | JsonSchemaResponseFormat)
    # The lazy grammar of "auto" with strict tools lets free text through, but not a thinking
    # block's tokens (format tokens outside the grammar are masked), so thinking is off there too.
    return forced or json_output or _lazy(request)


def _lazy(request: ChatCompletionRequest) -> bool:
    """``tool_choice: "auto"`` with a strict tool: free text or calls, and a call to a strict tool
    follows its schema (OpenAI's rule for strict functions); without strict tools "auto" decodes
    freely."""
    return (
        bool(request.tools)
        and request.tool_choice in (None, "auto")
        and any(t.function.strict for t in request.tools or ())
    )


def constraint_factory(loaded: LoadedModel, tool_plan: ToolPlan) -> Callable[[], TokenConstraint] | None:
    """``SamplingParams.constraint`` for the plan (None when decoding is free)."""
    if tool_plan.grammar is None:
        return None
    eos = sorted(loaded.eos_token_ids)
    tokenizer = constrain.ll_tokenizer(loaded.tokenizer, eos)
    return functools.partial(constrain.Constraint, tokenizer, tool_plan.grammar, eos)


def read_reply(
    tool_plan: ToolPlan, text: str, *, truncated: bool = False, memo: ScanMemo | None = None
) -> ParsedReply:
    """The whole reply as content and calls (calls only if the plan parses them). ``truncated``
    (the token limit ended it): a call section cut short gives the calls read so far, arguments
    cut where the text ends, as OpenAI returns a call cut by ``max_tokens``. ``memo``: the
    streamed scans' (see :class:`ScanMemo`)."""
    if not tool_plan.parse:
        return ParsedReply(content=text, calls=())
    reply = tool_plan.fmt.parse(text, memo)
    if not reply.calls and truncated:
        found = tool_plan.fmt.scan(text, memo)
        if found is not None and found.calls:
            calls = tuple(ParsedCall(c.name, c.arguments) for c in found.calls)
            reply = ParsedReply(content=text[: found.start].rstrip() or None, calls=calls)
    if reply.calls and not tool_plan.parallel:
        reply = ParsedReply(content=reply.content, calls=reply.calls[:1])
    return reply


def finish_reason(reply: ParsedReply, engine_reason: FinishReason) -> FinishReason:
    """``length`` when the token limit cut the reply (calls or not), else ``tool_calls`` if any."""
    if engine_reason == "length" or not reply.calls:
        return engine_reason
    return "tool_calls"


def message_calls(reply: ParsedReply) -> list[ToolCall] | None:
    if not reply.calls:
        return None
    return [
        ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in reply.calls
    ]


@dataclass
class _Sent:
    """A call already announced in the stream, and how much of its arguments went out."""

    name: str
    arguments: str = ""


class ContentGate:
    """Streams a reply as OpenAI does: content as it comes, holding back anything that may still
    turn out to be a tool call; each call as soon as its name is written (index, id, type, name,
    ``arguments: ""``), then its arguments in pieces as they are generated.

    ``feed(text)`` returns what can be sent now; once the reply is complete, ``finish()`` parses
    it like a non-streamed reply and returns the rest. Content and argument pieces add up to
    exactly the non-streamed ``content`` and ``arguments``. The one exception is a reply decoded
    freely (no grammar) that starts a call and then breaks the format: the calls already
    announced stand, and the rest of the text follows as content, where the whole reply would be
    content.
    """

    def __init__(self, tool_plan: ToolPlan) -> None:
        self.plan = tool_plan
        self.text = ""
        self.memo = ScanMemo()
        """What the scans of this reply read for good: each ``feed`` reads only the new text."""
        self._sent = 0
        self._calls: list[_Sent] = []
        self._not_calls = False  # the reply can no longer be calls: all of it is content

    def feed(self, text: str) -> tuple[str, list[ChunkToolCall]]:
        self.text += text
        if not self.plan.parse or self._not_calls:
            return self._send(len(self.text)), []
        fmt, text = self.plan.fmt, self.text
        found = fmt.scan(text, self.memo)
        if found is not None:
            return self._send(self._before_space(found.start)), self._deltas(found.calls)
        if self._calls:  # a call went out and the format broke: finish() decides
            return "", []
        if fmt.section_start(text, self.memo) is not None or (
            not fmt.marker and not fmt.may_start_section(text)
        ):
            self._not_calls = True
            return self._send(len(text)), []
        if not fmt.marker:
            return "", []
        # Whitespace before a call is not content (the parser strips it), so hold it too.
        return self._send(self._before_space(len(text) - _partial_suffix(text, fmt.marker))), []

    def finish(self, *, truncated: bool = False) -> tuple[str, list[ChunkToolCall], ParsedReply]:
        reply = read_reply(self.plan, self.text, truncated=truncated, memo=self.memo)
        if not reply.calls:
            return self._send(len(self.text)), [], reply
        content = self._send(len(reply.content or ""))
        calls = [PartialCall(c.name, c.arguments, True) for c in reply.calls]
        return content, self._deltas(calls), reply

    def _deltas(self, calls: Sequence[PartialCall]) -> list[ChunkToolCall]:
        out = []
        for i, call in enumerate(calls if self.plan.parallel else calls[:1]):
            if i >= len(self._calls):
                self._calls.append(_Sent(call.name))
                out.append(
                    ChunkToolCall(
                        index=i,
                        id=new_call_id(),
                        type="function",
                        function=ChunkFunctionCall(name=call.name, arguments=""),
                    )
                )
            sent = self._calls[i]
            if len(call.arguments) > len(sent.arguments) and call.arguments.startswith(sent.arguments):
                piece = call.arguments[len(sent.arguments) :]
                sent.arguments = call.arguments
                out.append(ChunkToolCall(index=i, function=ChunkFunctionCall(arguments=piece)))
        return out

    def _before_space(self, end: int) -> int:
        """``len(self.text[:end].rstrip())``, or where sending got to if that is further (then
        nothing more goes out either way): nothing is copied, and the walk stops at what was sent."""
        while end > self._sent and self.text[end - 1].isspace():
            end -= 1
        return end

    def _send(self, end: int) -> str:
        if end <= self._sent:
            return ""
        out = self.text[self._sent : end]
        self._sent = end
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
