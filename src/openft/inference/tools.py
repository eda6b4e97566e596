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
from collections.abc import Callable
from dataclasses import dataclass

from openft.inference import constrain
from openft.inference.engine import TokenConstraint
from openft.inference.registry import LoadedModel
from openft.models.families import find_family
from openft.models.tool_calls import ParsedReply, ToolCallFormat, format_for, new_call_id
from openft.protocol.chat import (
    ChatCompletionRequest,
    ChunkFunctionCall,
    ChunkToolCall,
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
    parallel = request.parallel_tool_calls is not False
    parse = bool(request.tools) and request.tool_choice != "none"
    grammar = None
    choice = request.tool_choice
    if request.tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        wanted = [
            (t.function.name, t.function.parameters, bool(t.function.strict))
            for t in request.tools
            if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name
        ]
        marker_id = vocab.get(fmt.marker) if fmt.marker and vocab.get(fmt.marker) in special else None
        grammar = constrain.tool_grammar(
            fmt, wanted, parallel=parallel, marker_token_id=marker_id, param="tools"
        )
    elif isinstance(request.response_format, JsonObjectFormat):
        grammar = constrain.json_grammar(None, strict=True, param="response_format")
    elif isinstance(request.response_format, JsonSchemaResponseFormat):
        spec = request.response_format.json_schema
        grammar = constrain.json_grammar(
            spec.schema_, strict=bool(spec.strict), param="response_format.json_schema.schema"
        )
    return ToolPlan(fmt=fmt, parse=parse, parallel=parallel, grammar=grammar, keep_tokens=keep)


def is_constrained(request: ChatCompletionRequest) -> bool:
    """Whether replies are decoded under a grammar (a forced tool call, or JSON output): the
    reply must start with the call or the JSON at once."""
    choice = request.tool_choice
    forced = bool(request.tools) and (choice == "required" or isinstance(choice, NamedToolChoice))
    return forced or isinstance(request.response_format, JsonObjectFormat | JsonSchemaResponseFormat)


def constraint_factory(loaded: LoadedModel, tool_plan: ToolPlan) -> Callable[[], TokenConstraint] | None:
    """``SamplingParams.constraint`` for the plan (None when decoding is free)."""
    if tool_plan.grammar is None:
        return None
    eos = sorted(loaded.eos_token_ids)
    tokenizer = constrain.ll_tokenizer(loaded.tokenizer, eos)
    return functools.partial(constrain.Constraint, tokenizer, tool_plan.grammar, eos)


def read_reply(tool_plan: ToolPlan, text: str) -> ParsedReply:
    """The whole reply as content and calls (calls only if the plan parses them)."""
    if not tool_plan.parse:
        return ParsedReply(content=text, calls=())
    reply = tool_plan.fmt.parse(text)
    if reply.calls and not tool_plan.parallel:
        reply = ParsedReply(content=reply.content, calls=reply.calls[:1])
    return reply


def message_calls(reply: ParsedReply) -> list[ToolCall] | None:
    if not reply.calls:
        return None
    return [
        ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
        for c in reply.calls
    ]


def call_deltas(reply: ParsedReply) -> list[list[ChunkToolCall]]:
    """Per call, as OpenAI streams it: id, type and name (arguments "") first, then the arguments."""
    out: list[list[ChunkToolCall]] = []
    for i, c in enumerate(reply.calls):
        out.append(
            [
                ChunkToolCall(
                    index=i,
                    id=new_call_id(),
                    type="function",
                    function=ChunkFunctionCall(name=c.name, arguments=""),
                )
            ]
        )
        out.append([ChunkToolCall(index=i, function=ChunkFunctionCall(arguments=c.arguments))])
    return out


class ContentGate:
    """Streams content while holding back anything that may still turn out to be a tool call.

    ``feed(text)`` returns the content that can be sent now; once the reply is complete,
    ``finish()`` parses it like a non-streamed reply and returns the rest of the content and the
    calls. The content sent in total is exactly the non-streamed ``content``.
    """

    def __init__(self, tool_plan: ToolPlan) -> None:
        self.plan = tool_plan
        self.text = ""
        self._sent = 0

    def feed(self, text: str) -> str:
        self.text += text
        if not self.plan.parse:
            return self._send(len(self.text))
        return self._send(self._safe_end())

    def finish(self) -> tuple[str, ParsedReply]:
        reply = read_reply(self.plan, self.text)
        end = len(reply.content or "") if reply.calls else len(self.text)
        return self._send(end), reply

    def _safe_end(self) -> int:
        fmt, text = self.plan.fmt, self.text
        if not fmt.marker:  # the reply itself is the call: hold it while it may still be one
            head = text.lstrip()
            if (
                not head
                or head.startswith("{")
                or any(p.startswith(head) or head.startswith(p) for p in fmt.optional_prefixes)
            ):
                return 0
            return len(text)
        at = text.find(fmt.marker)
        if at < 0:
            at = len(text) - _partial_suffix(text, fmt.marker)
        # Whitespace before a call is not content (the parser strips it), so hold it too.
        return len(text[:at].rstrip())

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
