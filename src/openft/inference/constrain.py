"""Constrained decoding: grammars for ``response_format`` and forced tool calls, applied per token.

Why llguidance (guidance-ai/llguidance, MIT), after comparing it with xgrammar and outlines-core
(``bench/constrained_decoding.py --engines``; figures in the README): it names the JSON-schema
keywords it cannot enforce (the other two accepted ``if``/``then`` silently), which is what a
strict schema's 400 needs; it compiles a schema lazily in milliseconds (outlines-core builds its
whole index up front: seconds at a 32k vocabulary); it needs no torch/CUDA build (xgrammar pulls
triton and a TVM runtime); it reads a Hugging Face fast tokenizer directly; vLLM, SGLang and
llama.cpp ship it. xgrammar computed masks faster on a synthetic 32k vocabulary (13 us against
0.9 ms per token here): if mask time ever dominates on large vocabularies, revisit.

The engine (``inference.engine._Chooser``) already picks every token itself; a
:class:`Constraint` masks the logits before that choice and advances with the chosen token. When
the grammar is complete the only allowed token is end-of-turn.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from openft.errors import InvalidRequest
from openft.models.tool_calls import MistralArgsFormat, PythonicFormat, ToolCallFormat

# Chat templates serialise JSON with Jinja's ``tojson`` (", " and ": ", no newlines); forced
# output uses the same layout, so what is served looks like what was trained.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

_tokenizers: weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def ll_tokenizer(tokenizer: Any, eos_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a HF fast tokenizer (built once per tokenizer, ~10 ms to 1 s)."""
    with _tokenizers_lock:
        found = _tokenizers.get(tokenizer)
        if found is None:
            if not getattr(tokenizer, "is_fast", False):
                raise InvalidRequest(
                    "constrained decoding (response_format, tool_choice) needs a model with a fast "
                    "(tokenizer.json) tokenizer",
                    param="model",
                )
            found = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=sorted(eos_ids))
            _tokenizers[tokenizer] = found
        return found


def json_grammar(schema: dict[str, Any] | None, *, strict: bool, param: str) -> str:
    """A grammar for one JSON value matching ``schema`` (None: any JSON object)."""
    return _checked(
        llguidance.LLMatcher.grammar_from_json_schema(_with_layout(schema, strict)), strict, param
    )


def tool_grammar(
    fmt: ToolCallFormat,
    tools: Sequence[tuple[str, dict[str, Any] | None, bool]],
    *,
    parallel: bool,
    tokens: Mapping[str, tuple[int, bool]],
    lazy: bool = False,
    content_schema: dict[str, Any] | None = None,
    param: str,
) -> str:
    """A grammar for tool calls in ``fmt``, one of ``tools`` each.

    ``tools`` holds (name, parameters schema, strict) per allowed function; every call's
    arguments match its function's schema (keywords a non-strict schema uses that the engine
    cannot enforce are skipped). ``tokens``: the tokenizer's added tokens, text -> (id, special):
    format text that is one added token (Qwen's ``<tool_call>``, Mistral's ``[TOOL_CALLS]``) may
    be written as that token, which is how a fine-tuned model writes it; a special token can only
    be written so. ``lazy`` (``tool_choice: "auto"``): the reply is free text or calls, and only
    calls are constrained; ``content_schema``: the free text must be JSON of that schema
    (``response_format`` next to ``auto``).
    """
    if isinstance(fmt, PythonicFormat):
        raise InvalidRequest(
            "this model writes tool calls as Python code (the pythonic format); openft cannot "
            "constrain those yet: use tool_choice 'auto' without strict tools",
            param="tool_choice",
            code="unsupported_for_model",
        )

    def lit(text: str) -> str:
        return _lit_tokens(text, tokens)

    # One Lark alternative per function, each with its own arguments schema: the name decides
    # which schema the arguments follow (a JSON-schema anyOf over whole call objects would let
    # the engine merge the branches). The object's layout is tojson's, as templates render it.
    # ``tail``: a call after its format's marker, where each call starts with the marker.
    strict = any(s for _, _, s in tools)
    marker = fmt.marker
    calls_start_with_marker = bool(marker) and not fmt.array
    rules, tails = [], []
    for name, parameters, tool_strict in tools:
        args = "%json " + json.dumps(_with_layout(parameters or _EMPTY_OBJECT, tool_strict))
        if isinstance(fmt, MistralArgsFormat):
            tail = f"{lit(name)} {lit(fmt.args_marker)} {args}"
        else:
            head = fmt.call_json(name, 0)[: -len("0}")]  # '{"name": "f", "arguments": '
            tail = f"{lit(fmt.call_open[len(marker) :] if calls_start_with_marker else fmt.call_open)} "
            tail += f'{lit(head)} {args} "}}" {lit(fmt.call_close)}'
        tails.append(tail)
        rules.append(f"{lit(marker)} {tail}" if calls_start_with_marker else tail)
    call = " | ".join(f"({r})" for r in rules)
    sep = _lit(", ") if fmt.array else lit(fmt.separator)
    more = f"({sep} call)*" if parallel else ""
    if fmt.array:  # marker [call, call]
        after_marker = f'"[" call {more} "]"'
        section = f"{lit(marker)} after_marker"
    elif marker:  # marker+call marker+call
        after_marker = f"({' | '.join(f'({t})' for t in tails)}) {more}"
        section = f"call {more}"
    else:  # the reply is the calls
        after_marker, section = "", f"call {more}"
    lark = f"section: {section}\ncall: {call}\n"
    if after_marker:
        lark += f"after_marker: {after_marker}\n"
    if not lazy:
        lark = "start: section\n" + lark
    elif content_schema is not None:  # JSON content or calls
        if not marker:
            raise InvalidRequest(
                "response_format with strict tools and tool_choice 'auto' needs a model whose tool "
                "calls start with a marker; this model's calls are bare JSON too, so a reply could "
                "be read either way: set tool_choice to 'none' or 'required', or drop strict",
                param="response_format",
            )
        lark = (
            f"start: content | section\ncontent: %json {json.dumps(_with_layout(content_schema, strict))}\n"
            + lark
        )
    elif marker:
        # Text that never spells the marker, or text up to the marker and calls after it. The
        # text ends at the marker by a stop string: a lexer does not backtrack out of free text.
        # A marker that is one added token ends text unambiguously (text is bytes, never tokens).
        starts = ["TEXT", "before_marker after_marker"]
        if marker in tokens:
            token_id, special = tokens[marker]
            starts.append(f"TEXT? <[{token_id}]> after_marker")
        lark = (
            f"start: {' | '.join(starts)}\n"
            f"TEXT: /(.|\\n)+/ & ~/(.|\\n)*{re.escape(marker)}(.|\\n)*/\n"
            f"before_marker[stop={json.dumps(marker)}]: /(.|\\n)*/\n" + lark
        )
    else:
        lark = f"start: TEXT? | section\nTEXT: /\\s*[^\\s{re.escape(fmt.opening)}](.|\\n)*/\n" + lark
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), strict, param)


def _lit_tokens(text: str, tokens: Mapping[str, tuple[int, bool]]) -> str:
    """``text`` as a Lark expression, each added token in it also (special: only) as itself."""
    found = [t for t in tokens if t and t in text]
    if not found:
        return _lit(text)
    pieces = re.split("(" + "|".join(re.escape(t) for t in sorted(found, key=len, reverse=True)) + ")", text)
    out = []
    for piece in pieces:
        if piece in tokens:
            token_id, special = tokens[piece]
            out.append(f"<[{token_id}]>" if special else f"(<[{token_id}]> | {_lit(piece)})")
        elif piece:
            out.append(_lit(piece))
    return " ".join(out)


def _lit(text: str) -> str:
    return json.dumps(text) if text else ""


def _with_layout(schema: dict[str, Any] | None, strict: bool) -> dict[str, Any]:
    out = dict(schema) if schema is not None else {"type": "object"}
    # Not strict: keywords the engine cannot enforce are skipped (the value is still valid JSON
    # of the right shape); strict: they are refused, as OpenAI refuses them in strict mode.
    out["x-guidance"] = {**_JSON_LAYOUT, "lenient": not strict}
    return out


def _checked(grammar: str, strict: bool, param: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    # Token ids (<[id]>) come from the model's own vocabulary; checked with the tokenizer later.
    messages = [m for m in messages if not m.startswith("no tokenizer")]
    if is_error or (strict and messages):
        detail = "; ".join(messages) or "invalid schema"
        raise InvalidRequest(
            f"{param}: the schema uses features openft cannot enforce ({detail}); remove them"
            + (" or set strict to false" if strict else ""),
            param=param,
            code="unsupported_schema",
        )
    return grammar


class Constraint:
    """One choice's grammar state: which tokens may come next, advanced token by token."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, eos_ids: Sequence[int]) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self._eos = min(eos_ids)
        self._shifts = torch.arange(32, dtype=torch.int32)
        if self._matcher.is_error():
            raise InvalidRequest(f"invalid grammar: {self._matcher.get_error()}", param="response_format")

    def allowed(self, vocab: int) -> torch.Tensor:
        """Boolean mask over the first ``vocab`` token ids: which may be chosen next."""
        if self._matcher.is_error() or self._matcher.is_stopped():
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[self._eos] = True
            return mask
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> self._shifts) & 1
        mask = bits.flatten()[:vocab].bool()
        if mask.shape[0] < vocab:
            mask = torch.cat([mask, torch.zeros(vocab - mask.shape[0], dtype=torch.bool)])
        if not bool(mask.any()):
            mask[self._eos] = True
        return mask

    def advance(self, token: int) -> None:
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token)
