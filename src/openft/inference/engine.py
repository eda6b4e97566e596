"""Token generation: one path that both streaming and non-streaming answers go through.

Why it is built this way:

- **Requests share one decode loop per model** (:mod:`openft.inference.batcher`): each choice
  is a row of a continuously batched forward pass, prefilled through the model's own forward
  (so each family computes its vision features and positions itself), then decoded together
  with every other active row.
- **We choose every token ourselves.** :class:`_Chooser` sees the model's raw logits for its
  row, applies ``logit_bias`` and the penalties, samples with temperature / top-p from a
  *per-choice* ``torch.Generator`` (so a ``seed`` reproduces whatever else shares the batch),
  and records log probabilities. Temperature 0 is plain argmax: deterministic. A grammar
  (``response_format``, forced tool calls; see ``inference.constrain``) masks the logits right
  before that choice, so a constrained reply is sampled from the same distribution restricted to
  what the grammar allows.
- **Text comes out of one assembler.** :class:`TextAssembler` turns token ids into text
  incrementally (holding back incomplete UTF-8) and cuts at stop strings, holding back any tail
  that could still become a stop string, so no text past a stop string is ever released. The
  non-streamed answer is the concatenation of exactly the deltas a stream would send, so the two
  are equal by construction.
- **The decode loop runs on its own thread**; a request's events reach the caller through a
  queue. If the caller stops iterating (a client gone), the request's rows leave the batch at
  the next step.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from openft.inference.batcher import Request, Row

if TYPE_CHECKING:
    from openft.inference.registry import LoadedModel

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


class TokenConstraint(Protocol):
    """A grammar's state for one choice (``inference.constrain.Constraint``)."""

    def allowed(self, vocab: int) -> torch.Tensor:
        """Boolean mask over token ids ``0..vocab-1``: which may come next."""
        ...

    def advance(self, token: int) -> None: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens for one request (already validated and defaulted by ``inference.chat``)."""

    max_new_tokens: int
    """Cap on generated tokens per choice (end-of-turn token included)."""
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``."""
    seed: int | None = None
    """Seeds the request's own ``torch.Generator``; None = a fresh random seed."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first occurrence of any of them."""
    logprobs: bool = False
    """Record each chosen token's log probability (raw model distribution, before bias/temperature)."""
    top_logprobs: int = 0
    """With ``logprobs``: also the ``top_logprobs`` most likely tokens per position."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it already occurs in this choice's output."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in this choice's output."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before choosing."""
    constraint: Callable[[], TokenConstraint] | None = None
    """Makes a fresh grammar state per choice; None = unconstrained."""
    keep_tokens: frozenset[int] = frozenset()
    """Special tokens kept in the decoded text (a tool-call format's marker, e.g. ``[TOOL_CALLS]``);
    all other special tokens are dropped from it."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token and its log probability, with the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """New text for choice ``index``, with the log probabilities of the tokens behind it."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ChoiceFinished:
    """Choice ``index`` is done. ``logprobs`` holds tokens not yet attached to any text
    (e.g. the ones that spelled a stop string)."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


Event = TextDelta | ChoiceFinished


# ----------------------------------------------------------------------------- text assembly


_MAX_PENDING = 6
"""Tokens to wait for a U+FFFD tail to complete (a UTF-8 character is at most 4 bytes)."""


class TextAssembler:
    """Incremental detokenizer with stop strings.

    ``add(token_id)`` returns the text that can be released now (possibly ``""``); ``finish()``
    releases what was held back. Text that might be the start of a stop string is held until it
    is known not to be; when a stop string appears, the text before it is released and
    ``stopped`` becomes true.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        # vLLM-style offsets: decode(ids[prefix:]) minus decode(ids[prefix:read]) is the new text,
        # so a token whose text depends on its neighbour (a split UTF-8 character) comes out right.
        self._prefix = 0
        self._read = 0
        self.text = ""
        """Decoded text so far (cut at the stop string once one is found)."""
        self._released = 0
        self._checked = 0
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._decode_new(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, *, final: bool) -> None:
        if self._read == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for the rest unless this is the end,
        # or unless more tokens are pending than any character needs (then the bytes are invalid).
        pending = len(self._ids) - self._read
        if len(after) > len(before) and (final or not after.endswith("\ufffd") or pending >= _MAX_PENDING):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)

    def _release(self, *, final: bool) -> str:
        if self._stop:
            # Any new match must end after what was already checked, so start just before it.
            start = max(0, self._checked - self._longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            self._checked = len(self.text)
            if hits:
                cut = min(hits)
                self.stopped = True
                self.text = self.text[:cut]
                return self._take(cut)
        if final:
            return self._take(len(self.text))
        return self._take(len(self.text) - self._held_tail())

    def _held_tail(self) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self._released)
        out = self.text[self._released : upto]
        self._released = upto
        return out


# ------------------------------------------------------------------------------ token choice


class _Chooser:
    """Picks the next token of one choice from the model's raw logits."""

    def __init__(
        self,
        params: SamplingParams,
        generator: torch.Generator,
        *,
        vocab_limit: int | None,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.params = params
        self.constraint = constraint
        self.generator = generator
        self.vocab_limit = vocab_limit
        self.counts: Counter[int] = Counter()

    def pick(self, raw: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The chosen token for logits ``raw`` ([vocab]) and, if asked for, its log probability."""
        raw = raw.float()
        if self.vocab_limit is not None and self.vocab_limit < raw.shape[-1]:
            # Padded embedding rows beyond the tokenizer's vocabulary are never valid output;
            # slicing them off (a view) keeps token ids unchanged.
            raw = raw[: self.vocab_limit]
        p = self.params
        penalize = bool(self.counts) and bool(p.presence_penalty or p.frequency_penalty)
        logits = raw.clone() if (p.logit_bias or penalize or self.constraint) else raw
        for token_id, bias in p.logit_bias:
            if token_id < logits.shape[-1]:
                logits[token_id] += bias
        if penalize:
            ids = torch.tensor(list(self.counts), device=logits.device)
            freq = torch.tensor(
                [self.counts[i] for i in self.counts], device=logits.device, dtype=logits.dtype
            )
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq
        if self.constraint is not None:
            allowed = self.constraint.allowed(logits.shape[-1]).to(logits.device)
            logits.masked_fill_(~allowed, -math.inf)
        token = self._choose(logits)
        if self.constraint is not None:
            self.constraint.advance(token)
        self.counts[token] += 1
        info = None
        if p.logprobs:
            lp = torch.log_softmax(raw, dim=-1)
            top: tuple[tuple[int, float], ...] = ()
            if p.top_logprobs:
                values, indices = torch.topk(lp, k=min(p.top_logprobs, lp.shape[-1]))
                top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
            info = TokenLogprob(token_id=token, logprob=float(lp[token]), top=top)
        return token, info

    def _choose(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Drop a token when the tokens ranked above it already reach top_p (the first is always kept).
            drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))


# ---------------------------------------------------------------------------------- generate


@dataclass
class Prompt:
    """What to generate from: token ids plus the vision tensors ``render_chat`` produced."""

    input_ids: list[int]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)


_END = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class GenerationCancelled(Exception):
    """The caller's ``cancel`` flag stopped generation before every choice was finished."""

    def __init__(self, tokens: int, budget: int) -> None:
        super().__init__(f"generation cancelled after {tokens} of at most {budget} tokens")
        self.tokens = tokens
        self.budget = budget


def generate(
    loaded: LoadedModel,
    prompt: Prompt,
    params: SamplingParams,
    *,
    n: int = 1,
    cancel: threading.Event | None = None,
) -> Iterator[Event]:
    """Yield ``TextDelta``/``ChoiceFinished`` events for ``n`` choices (interleaved by index).

    The choices are rows of the model's shared decode loop (:mod:`openft.inference.batcher`),
    batched with whatever else is being generated. Each choice ends with exactly one
    ``ChoiceFinished``. Closing the iterator early, or setting ``cancel`` from any thread (the
    API does when the client disconnects), takes the request's rows out of the batch at the next
    step; with ``cancel`` set before every choice finished, the iterator raises
    :class:`GenerationCancelled`. Rows still waiting for a place in the batch never start.
    """
    events: queue.Queue[Any] = queue.Queue()
    cancel = cancel or threading.Event()
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    left = [n]
    left_lock = threading.Lock()
    cancelled = [0]

    def on_finish(choice: _Choice, reason: str | None, error: BaseException | None) -> None:
        if error is not None:
            events.put(_Failed(error))
        elif reason is not None:
            choice.finish(reason)  # type: ignore[arg-type]
        with left_lock:
            left[0] -= 1
            cancelled[0] += reason is None and error is None
            last = left[0] == 0
        if last and cancelled[0]:
            # Logged here, on the decode loop's thread, once the request's last row has left: the
            # caller may already be gone (a closed stream never reads another event).
            log.info(
                "generation for %s cancelled after %d of at most %d tokens; its rows left the batch",
                loaded.ref.id,
                sum(c.count for c in choices),
                n * params.max_new_tokens,
            )
        if last:
            events.put(_END)

    key = object()
    rows: list[Row] = []
    choices: list[_Choice] = []
    for index in range(n):
        # Choice i samples from its own generator seeded from (seed, i): the whole answer
        # replays from `seed`, whatever else shares the batch.
        generator = torch.Generator(device=loaded.device).manual_seed(seed + index)
        choice = _Choice(loaded, params, index, generator, events.put)
        row = Row(
            request=key,
            pick=choice.pick,
            finish=functools.partial(on_finish, choice),
            max_new_tokens=params.max_new_tokens,
            cancelled=cancel,
            adapter=loaded.adapter,
        )
        choice.row = row
        rows.append(row)
        choices.append(choice)
    loaded.batcher.submit(
        Request(
            input_ids=list(prompt.input_ids), model_inputs=_model_vision_inputs(prompt, loaded), rows=rows
        )
    )
    finished = 0
    try:
        while True:
            item = events.get()
            if item is _END:
                break
            if isinstance(item, _Failed):
                raise item.error
            finished += isinstance(item, ChoiceFinished)
            yield item
        if finished < n:  # rows only end without finishing when `cancel` was set
            raise GenerationCancelled(sum(c.count for c in choices), n * params.max_new_tokens)
    finally:
        cancel.set()


def _decoder(tokenizer: Any, keep: frozenset[int]) -> Callable[[list[int]], str]:
    if not keep:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    drop = frozenset(getattr(tokenizer, "all_special_ids", ())) - keep
    return lambda ids: tokenizer.decode(
        [i for i in ids if i not in drop], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


class _Choice:
    """One choice's side of generation: picks its tokens and turns them into events."""

    def __init__(
        self,
        loaded: LoadedModel,
        params: SamplingParams,
        index: int,
        generator: torch.Generator,
        emit: Callable[[Event], None],
    ) -> None:
        tokenizer = loaded.tokenizer
        self.index, self.emit = index, emit
        self.eos = loaded.eos_token_ids
        self.chooser = _Chooser(
            params,
            generator,
            vocab_limit=len(tokenizer),
            constraint=params.constraint() if params.constraint is not None else None,
        )
        self.assembler = TextAssembler(_decoder(tokenizer, params.keep_tokens), params.stop)
        self.pending: list[TokenLogprob] = []
        self.count = 0
        self.row: Row | None = None

    def pick(self, raw: torch.Tensor) -> bool:
        """Choose the next token from ``raw`` logits; True when the choice is complete."""
        token, info = self.chooser.pick(raw)
        assert self.row is not None
        self.row.next_token = token
        self.count += 1
        if token in self.eos:
            return True
        if info is not None:
            self.pending.append(info)
        text = self.assembler.add(token)
        if text:
            self.emit(TextDelta(self.index, text, tuple(self.pending)))
            self.pending.clear()
        return self.assembler.stopped

    def finish(self, reason: FinishReason) -> None:
        if reason == "length":  # ran into max_new_tokens: release the text held back so far
            text = self.assembler.finish()
            if text:
                self.emit(TextDelta(self.index, text, tuple(self.pending)))
                self.pending.clear()
        self.emit(ChoiceFinished(self.index, reason, self.count, tuple(self.pending)))


def _model_vision_inputs(prompt: Prompt, loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """``render_chat`` gives per-conversation tensors; the model wants a batch of one.

    ``pixel_values``/``image_grid_thw`` are already flat over images (the model's format), but
    token-aligned tensors (``mm_token_type_ids``: one entry per input id) need a batch dim.
    """
    out: dict[str, torch.Tensor] = {}
    seq = len(prompt.input_ids)
    for key, value in prompt.vision.items():
        if value.dim() == 1 and value.shape[0] == seq:
            value = value.unsqueeze(0)
        if value.is_floating_point():
            value = value.to(device=loaded.device, dtype=loaded.dtype)
        else:
            value = value.to(loaded.device)
        out[key] = value
    return out


# ------------------------------------------------------------------------------ token bytes


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the byte-level BPE alphabet back to raw bytes."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The exact bytes a token stands for (byte-level BPE tokens may hold part of a character)."""
    if _is_byte_level(tokenizer) and token_id not in getattr(tokenizer, "all_special_ids", ()):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in _BYTE_DECODER for ch in piece):
            return bytes(_BYTE_DECODER[ch] for ch in piece)
    return tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(backend.decoder)
