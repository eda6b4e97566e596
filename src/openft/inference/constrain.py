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
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from openft.errors import InvalidRequest
from openft.models.tool_calls import ToolCallFormat

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
    marker_token_id: int | None,
    param: str,
) -> str:
    """A grammar for a reply that is only tool calls in ``fmt``, one of ``tools`` each.

    ``tools`` holds (name, parameters schema, strict) per allowed function; every call's
    arguments match its function's schema. ``marker_token_id``: the format's marker when it is
    one special token (Mistral's ``[TOOL_CALLS]``), written by id since it has no text.
    """
    # One Lark alternative per function, each with its own arguments schema: the name decides
    # which schema the arguments follow (a JSON-schema anyOf over whole call objects would let
    # the engine merge the branches). The object's layout is tojson's, as templates render it.
    strict = any(s for _, _, s in tools)
    rules = []
    for name, parameters, _ in tools:
        head = fmt.call_json(name, 0)[: -len("0}")]  # '{"name": "f", "arguments": '
        args = "%json " + json.dumps(_with_layout(parameters or _EMPTY_OBJECT, strict))
        body = f'{_lit(head)} {args} "}}"'
        if fmt.call_open or fmt.call_close:
            body = f"{_lit(fmt.call_open)} {body} {_lit(fmt.call_close)}".strip()
        rules.append(body)
    call = " | ".join(f"({r})" for r in rules)
    sep = _lit(", " if fmt.array else fmt.separator)
    calls = f"call ({sep} call)*" if parallel else "call"
    body = f'"[" {calls} "]"' if fmt.array else calls
    marker = (
        f"<[{marker_token_id}]>" if marker_token_id is not None else _lit(fmt.marker) if fmt.array else ""
    )
    lark = f"start: {marker} {body}\ncall: {call}\n"
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), strict, param)


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
