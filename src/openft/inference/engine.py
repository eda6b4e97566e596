"""Token generation: one loop that both streaming and non-streaming answers go through.

Why it is built this way:

- **HF ``generate`` does the model-specific work** (KV cache, M-RoPE position ids for Qwen2-VL,
  dropping ``pixel_values`` after the prefill, peft wrappers), so any architecture that
  ``load_model`` returns can be served without a hand-written decode loop per family.
- **We choose every token ourselves.** ``generate`` runs in greedy mode with one logits
  processor, :class:`_Chooser`, that sees the model's raw logits, applies ``logit_bias`` and the
  penalties, samples with temperature / top-p from a *per-request* ``torch.Generator`` (so a
  ``seed`` reproduces regardless of what other threads do with the global RNG), records log
  probabilities, and returns a one-hot score row so that greedy ``argmax`` picks exactly that
  token. Temperature 0 is plain argmax: deterministic.
- **Text comes out of one assembler.** :class:`TextAssembler` turns token ids into text
  incrementally (holding back incomplete UTF-8) and cuts at stop strings, holding back any tail
  that could still become a stop string, so no text past a stop string is ever released. The
  non-streamed answer is the concatenation of exactly the deltas a stream would send, so the two
  are equal by construction.
- **``generate`` blocks, so it runs on a worker thread** that pushes events into a queue; the
  caller iterates them. The worker holds the model's lock for the whole request (Qwen2-VL keeps
  ``rope_deltas`` on the module between steps, so two interleaved generations would corrupt each
  other). If the caller stops iterating, a stopping criterion sees the cancel flag at the next
  token and the worker releases the lock.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

if TYPE_CHECKING:
    from openft.inference.registry import LoadedModel

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


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


class _Chooser(LogitsProcessor):
    """Picks the next token from the raw logits; returns a one-hot row so greedy takes it."""

    def __init__(
        self,
        params: SamplingParams,
        generator: torch.Generator,
        *,
        vocab_limit: int | None,
        on_token: Callable[[int, TokenLogprob | None], bool],
        forced_token: int,
    ) -> None:
        self.params = params
        self.generator = generator
        self.vocab_limit = vocab_limit
        self.on_token = on_token  # returns True when the choice is complete
        self.forced_token = forced_token
        self.done = False
        self.counts: Counter[int] = Counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.done:  # generate() may ask once more before it checks the stopping criteria
            return self._one_hot(scores, self.forced_token)
        raw = scores[0].float()
        if self.vocab_limit is not None and self.vocab_limit < raw.shape[-1]:
            # Padded embedding rows beyond the tokenizer's vocabulary are never valid output;
            # slicing them off (a view) keeps token ids unchanged.
            raw = raw[: self.vocab_limit]
        p = self.params
        penalize = bool(self.counts) and bool(p.presence_penalty or p.frequency_penalty)
        logits = raw.clone() if (p.logit_bias or penalize) else raw
        for token_id, bias in p.logit_bias:
            if token_id < logits.shape[-1]:
                logits[token_id] += bias
        if penalize:
            ids = torch.tensor(list(self.counts), device=logits.device)
            freq = torch.tensor(
                [self.counts[i] for i in self.counts], device=logits.device, dtype=logits.dtype
            )
            logits[ids] -= p.presence_penalty + p.frequency_penalty * freq
        token = self._choose(logits)
        self.counts[token] += 1
        info = None
        if p.logprobs:
            lp = torch.log_softmax(raw, dim=-1)
            top: tuple[tuple[int, float], ...] = ()
            if p.top_logprobs:
                values, indices = torch.topk(lp, k=min(p.top_logprobs, lp.shape[-1]))
                top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
            info = TokenLogprob(token_id=token, logprob=float(lp[token]), top=top)
        self.done = self.on_token(token, info)
        return self._one_hot(scores, token)

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

    @staticmethod
    def _one_hot(scores: torch.FloatTensor, token: int) -> torch.FloatTensor:
        out = torch.full_like(scores, -math.inf)
        out[:, token] = 0.0
        return out


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.predicate(), dtype=torch.bool, device=input_ids.device)


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
    """Yield ``TextDelta``/``ChoiceFinished`` events for ``n`` choices, one choice after the other.

    Each choice ends with exactly one ``ChoiceFinished``. Closing the iterator early, or setting
    ``cancel`` from any thread (the API does when the client disconnects), stops the worker at its
    next token and releases the model; with ``cancel`` set before every choice finished, the
    iterator raises :class:`GenerationCancelled`. A request still waiting for the model's lock
    when ``cancel`` is set never starts.
    """
    events: queue.Queue[Any] = queue.Queue()
    cancel = cancel or threading.Event()
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    produced = [0]  # tokens generated over all choices (read after the worker ends)

    def count(k: int) -> None:
        produced[0] += k

    def work() -> None:
        finished = 0
        try:
            with loaded.lock, torch.inference_mode():
                # One generator for all choices: choices differ, and the whole answer replays from `seed`.
                generator = torch.Generator(device=loaded.device).manual_seed(seed)
                for index in range(n):
                    if cancel.is_set():
                        break
                    finished += _generate_choice(
                        loaded, prompt, params, index, generator, events.put, cancel, count
                    )
            if finished < n:
                log.info(
                    "generation for %s cancelled after %d of at most %d tokens; the model is free",
                    loaded.ref.id,
                    produced[0],
                    n * params.max_new_tokens,
                )
        except BaseException as exc:  # handed to the caller's thread and raised there
            events.put(_Failed(exc))
        finally:
            events.put(_END)

    worker = threading.Thread(target=work, name=f"openft-generate-{loaded.ref.id}", daemon=True)
    worker.start()
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
        if finished < n:  # the worker only ends early when `cancel` was set
            raise GenerationCancelled(produced[0], n * params.max_new_tokens)
    finally:
        cancel.set()


def _generate_choice(
    loaded: LoadedModel,
    prompt: Prompt,
    params: SamplingParams,
    index: int,
    generator: torch.Generator,
    emit: Callable[[Event], None],
    cancel: threading.Event,
    count: Callable[[int], None],
) -> bool:
    """Generate choice ``index``; False when ``cancel`` stopped it first."""
    tokenizer = loaded.tokenizer
    assembler = TextAssembler(
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        params.stop,
    )
    pending: list[TokenLogprob] = []
    state: dict[str, Any] = {"count": 0, "reason": None}
    eos = loaded.eos_token_ids

    def on_token(token: int, info: TokenLogprob | None) -> bool:
        state["count"] += 1
        count(1)
        if token in eos:
            state["reason"] = "stop"
            return True
        if info is not None:
            pending.append(info)
        text = assembler.add(token)
        if text:
            emit(TextDelta(index, text, tuple(pending)))
            pending.clear()
        if assembler.stopped:
            state["reason"] = "stop"
            return True
        return False

    chooser = _Chooser(
        params,
        generator,
        vocab_limit=len(tokenizer),
        on_token=on_token,
        forced_token=min(eos),
    )
    model = loaded.model
    input_ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=loaded.device)
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=False,  # _Chooser already picked; greedy just reads its one-hot row
        num_beams=1,
        num_return_sequences=1,
        eos_token_id=sorted(eos),
        pad_token_id=loaded.pad_token_id,
        # Explicit neutral values so a model's own generation_config (e.g. Qwen's
        # repetition_penalty) does not reshape the logits before _Chooser sees them. Sampling
        # warpers (temperature, top_k, top_p) are never applied with do_sample=False.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
    )
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        **_model_vision_inputs(prompt, loaded),
        generation_config=config,
        logits_processor=LogitsProcessorList([chooser]),
        stopping_criteria=StoppingCriteriaList([_StopWhen(lambda: chooser.done or cancel.is_set())]),
    )
    if cancel.is_set() and state["reason"] is None:
        return False
    if state["reason"] is None:  # ran into max_new_tokens (or the context window)
        state["reason"] = "length"
        text = assembler.finish()
        if text:
            emit(TextDelta(index, text, tuple(pending)))
            pending.clear()
    emit(ChoiceFinished(index, state["reason"], state["count"], tuple(pending)))
    return True


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
