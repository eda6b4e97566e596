"""Continuous batching: one decode loop per loaded model, shared by every request for it.

Why not ``model.generate`` per request (what openft did before) or transformers' own continuous
batching (``generate_batch`` / ``ContinuousBatchingManager``)? The first serves one request at a
time. The second (transformers 5.24) takes only ``input_ids`` — no ``pixel_values``, no M-RoPE
positions for Qwen2-VL, no peft adapters per request — and its per-request logits processing
cannot carry our sampling state (per-request generators, penalties, constrained decoding). What
we need from it is small, so it is built here on the model's plain ``forward``:

- **Prefill** runs per request, through the model's own forward (so each family computes its
  own vision features and positions; Qwen2-VL leaves its M-RoPE ``rope_deltas`` on the module,
  which we read right away). The ``n`` choices of a request share that prefill: its KV cache is
  copied per choice.
- **Decode** runs one step for all active rows together: the batch KV cache is left-padded to a
  common length, the attention mask hides the padding, and positions are passed explicitly per
  row (``t`` for ordinary RoPE, ``t + rope_delta`` on all three M-RoPE axes), which is what
  ``generate`` would compute for each row alone. A new row joins at the next step (its cache is
  padded in); a finished or cancelled row leaves at once.
- **Adapters**: rows of different LoRA fine-tunes of one base batch together through peft's
  mixed-adapter forward (``adapter_names``, one per row).
- **Every token is chosen by the row itself** (:class:`Row.pick`), from the raw logits, with
  its own sampler state, so batching never changes what a request would get alone (greedy:
  the same tokens; sampled: the same tokens for the same seed, up to float rounding).
- **Fairness**: rows are admitted round-robin across requests, so one ``n=128`` request cannot
  hold every slot while others wait.

Caches whose layers are not plain ``DynamicLayer`` (sliding-window, hybrid) cannot be padded
and stacked this way; such models decode one row at a time through the same loop.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from openft.errors import RateLimited

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One choice being generated. ``pick(raw_logits)`` chooses (and records) the next token,
    sets ``next_token`` and says whether the row is done; ``finish(reason, error)`` is called
    exactly once when the row leaves: reason "stop" or "length", or None when it was cancelled
    or failed (then ``error`` is set)."""

    request: object
    """Rows of one request share this key (fair admission)."""
    pick: Callable[[torch.Tensor], bool]
    finish: Callable[[str | None, BaseException | None], None]
    max_new_tokens: int
    cancelled: threading.Event
    adapter: str | None = None
    """peft adapter name for this row; None = the model as loaded."""
    generated: int = 0
    next_token: int = -1
    length: int = 0
    """Real (unpadded) positions used so far: the next token's position."""
    rope_delta: int = 0
    finished: bool = False
    """Set when ``finish`` has been called (it is called once, through :func:`_close`)."""


@dataclass
class Request:
    """A prompt and its rows, queued until the loop prefills it."""

    input_ids: list[int]
    model_inputs: dict[str, torch.Tensor]
    rows: list[Row]


def _stackable(cache: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _find_rope_holder(model: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if hasattr(module, "rope_deltas"):
            return module
    return None


class Batcher:
    """The decode loop of one loaded model (a daemon thread, started on first use)."""

    def __init__(
        self, model: Any, *, device: torch.device, max_rows: int = 32, max_waiting: int = 512
    ) -> None:
        self.model = model
        self.device = device
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self._rope: torch.nn.Module | None = None  # the module keeping Qwen2-VL's M-RoPE deltas
        # A peft model runs rows of different LoRA adapters in one forward (``adapter_names``).
        self._peft = hasattr(model, "peft_config")
        self._stackable: bool | None = None  # learned from the first prefill
        self._cond = threading.Condition()
        self._waiting: OrderedDict[object, deque[tuple[Request, Row]]] = OrderedDict()
        self._rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cached positions], 0 = padding
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # held while the model runs (forward, adapter loading)
        self.peak_rows = 0
        """Most rows ever decoded together (observability; tests)."""

    def set_model(self, model: Any) -> None:
        """Switch to ``model`` (the same weights wrapped with adapters); hold :attr:`lock`."""
        self.model = model
        self._peft = hasattr(model, "peft_config")
        self._rope = _find_rope_holder(model)

    def adapters_in_use(self) -> set[str]:
        """Adapters of rows decoding or waiting (they must stay attached)."""
        with self._cond:
            waiting = {row.adapter for q in self._waiting.values() for _, row in q}
        return {a for a in waiting | {row.adapter for row in self._rows} if a is not None}

    @property
    def lock(self) -> threading.Lock:
        """Held around every forward pass; take it to change the model (e.g. load an adapter)."""
        return self._lock

    def submit(self, request: Request) -> None:
        """Queue a request's rows; refuses (429, retryable) when the queue is full."""
        with self._cond:
            self._purge_cancelled()
            waiting = sum(len(q) for q in self._waiting.values())
            if waiting and waiting + len(request.rows) > self.max_waiting:
                raise RateLimited(
                    f"The model is busy: {waiting} sequences are waiting to be generated; retry shortly.",
                    code="model_busy",
                )
            queue = self._waiting.setdefault(request.rows[0].request, deque())
            queue.extend((request, row) for row in request.rows)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="openft-batcher", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _purge_cancelled(self) -> None:
        """Finish waiting rows whose client went away, so they hold no place in the queue."""
        for key in list(self._waiting):
            queue = self._waiting[key]
            kept = deque(item for item in queue if not item[1].cancelled.is_set())
            for _, row in queue:
                if row.cancelled.is_set():
                    _close(row, None, None)
            if kept:
                self._waiting[key] = kept
            else:
                del self._waiting[key]

    def active_rows(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        self._rope = _find_rope_holder(self.model)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._rows and not self._waiting:
                        if not self._cond.wait(timeout=60):
                            self._thread = None  # idle: let the thread end
                            return
                    admitted = self._admit()
                try:
                    with self._lock:
                        for request, rows in admitted:
                            self._prefill(request, rows)
                        if self._rows:
                            self._step()
                except BaseException as exc:  # a bug or OOM: fail every row, keep serving
                    log.exception("batched generation failed")
                    self._fail_all(exc, [row for _, rows in admitted for row in rows])

    def _admit(self) -> list[tuple[Request, list[Row]]]:
        """Take waiting rows round-robin over requests up to the free slots (under ``_cond``)."""
        # One row until the first prefill shows whether caches can be stacked, then all slots.
        limit = self.max_rows if self._stackable else 1
        free = limit - len(self._rows)
        taken: OrderedDict[int, tuple[Request, list[Row]]] = OrderedDict()
        while free > 0 and self._waiting:
            key, queue = next(iter(self._waiting.items()))
            request, row = queue.popleft()
            if not queue:
                del self._waiting[key]
            else:
                self._waiting.move_to_end(key)  # next request's turn
            if row.cancelled.is_set():
                _close(row, None, None)
                continue
            taken.setdefault(id(request), (request, []))[1].append(row)
            free -= 1
        return list(taken.values())

    def _forward(self, **inputs: Any) -> Any:
        return self.model(**inputs, use_cache=True, return_dict=True)

    @contextlib.contextmanager
    def _only_adapter(self, adapter: str | None) -> Iterator[None]:
        if not self._peft:
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    def _adapters(self, rows: list[Row]) -> dict[str, Any]:
        """``adapter_names`` for a peft-wrapped model: each row's adapter, or none (the base)."""
        if not self._peft:
            return {}
        return {"adapter_names": [r.adapter or "__base__" for r in rows]}

    def _prefill(self, request: Request, rows: list[Row]) -> None:
        for row in [r for r in rows if r.cancelled.is_set()]:  # gone while waiting: never starts
            _close(row, None, None)
        rows = [r for r in rows if not r.cancelled.is_set()]
        if not rows:
            return
        ids = torch.tensor([request.input_ids], dtype=torch.long, device=self.device)
        if self._rope is not None:
            self._rope.rope_deltas = None  # this request's own positions, not a previous one's
        # A prefill is one request: its adapter is made the active one rather than named per row,
        # because a LoRA on the vision tower sees image patches, not rows, and peft's
        # ``adapter_names`` must have one entry per input of every adapted layer.
        with self._only_adapter(rows[0].adapter):
            out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), **request.model_inputs)
        cache, logits = out.cache, out.logits[0, -1]
        if self._stackable is None:
            self._stackable = _stackable(cache)
        delta = 0
        if self._rope is not None and self._rope.rope_deltas is not None:
            delta = int(self._rope.rope_deltas.reshape(-1)[0])
        for i, row in enumerate(rows):
            row.length, row.rope_delta = len(request.input_ids), delta
            done = self._choose(row, logits)
            if done is not None:
                done()
                continue
            row_cache = cache if i == len(rows) - 1 else _copy_cache(cache)
            self._join(row, row_cache)

    def _choose(self, row: Row, logits: torch.Tensor) -> Callable[[], None] | None:
        """Let ``row`` pick its next token. When the row is done, returns how to finish it, to be
        called once it has left the batch (so a caller woken by it never sees it still there)."""
        if row.cancelled.is_set():
            return lambda: _close(row, None, None)
        done = row.pick(logits)
        row.generated += 1
        if done:
            return lambda: _close(row, "stop", None)
        if row.generated >= row.max_new_tokens:
            return lambda: _close(row, "length", None)
        return None

    def _join(self, row: Row, cache: Any) -> None:
        """Add a prefilled row to the batch: pad its cache or the batch's to one length."""
        length = cache.get_seq_length()
        mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._rows = cache, mask, [row]
            return
        current = self._mask.shape[1]
        width = max(current, length)
        for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._rows.append(row)
        self.peak_rows = max(self.peak_rows, len(self._rows))

    def _step(self) -> None:
        rows = self._rows
        tokens = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.cat(
            [self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], dim=1
        )
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self.device)
        if self._rope is not None:  # M-RoPE: text tokens advance all three axes alike
            deltas = torch.tensor([[r.rope_delta] for r in rows], dtype=torch.long, device=self.device)
            positions = (positions + deltas).unsqueeze(0).expand(3, -1, -1)
        extra = self._adapters(rows)
        out = self._forward(
            input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self._cache, **extra
        )
        self._cache, self._mask = out.cache, mask
        logits = out.logits[:, -1]
        keep: list[int] = []
        finishing: list[Callable[[], None]] = []
        for i, row in enumerate(rows):
            row.length += 1
            done = self._choose(row, logits[i])
            if done is None:
                keep.append(i)
            else:
                finishing.append(done)
        if finishing:
            self._drop(keep)
            for done in finishing:
                done()

    def _drop(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        mask = self._mask.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight: cut them off.
        first = int(mask.any(dim=0).nonzero()[0])
        if first:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            mask = mask[:, first:]
        self._mask = mask
        self._rows = [self._rows[i] for i in keep]

    def _fail_all(self, exc: BaseException, admitted: list[Row]) -> None:
        """Fail every row this loop holds: decoding, waiting, and admitted but not yet joined."""
        with self._cond:
            rows = list(self._rows) + [row for q in self._waiting.values() for _, row in q]
            self._waiting.clear()
        rows += [row for row in admitted if row not in rows and not row.finished]
        self._rows, self._cache, self._mask = [], None, None
        for row in rows:
            _close(row, None, exc)


def _close(row: Row, reason: str | None, error: BaseException | None) -> None:
    if not row.finished:
        row.finished = True
        row.finish(reason, error)


def _left_pad(t: torch.Tensor, width: int, *, dim: int = -2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


def _copy_cache(cache: Any) -> Any:
    return copy.deepcopy(cache)
