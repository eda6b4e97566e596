"""The recipes' render pre-pass: every example rendered once, in a pool of worker processes.

Rendering (chat template, tokenizer, image decode and resize, patchify) is CPU work done once per
run before the first step; on one core a 448-px Qwen2-VL image costs tens of milliseconds, so a
50k-image file keeps a GPU idle for minutes. :func:`render_all` spreads it over forked worker
processes: fork hands the processor to the workers for free (no pickling, no reload from disk),
results come back in the input order, and each worker sends its tensors by value as numpy arrays
(torch's own pickling for multiprocessing would hand over one shared-memory file descriptor per
tensor, which runs out at tens of thousands of images; its plain pickling goes through
``torch.save`` and measured ~70 ms per 448-px image here, as slow as rendering it).

An example that fails raises the same :class:`InvalidRequest` (message, param, code) as the serial
path, for the first failing example in file order.

Pixels are also stored compactly: ``pixel_dtype`` (bf16 when the run autocasts to bf16) halves
host RAM. That is lossless *for that run*: every supported vision tower's first use of
``pixel_values`` is its patch-embedding convolution, which bf16 autocast rounds to bf16 anyway,
and rounding an already-bf16 value again is exact (``test_prerender`` checks the logits match).
"""

from __future__ import annotations

import math
import multiprocessing
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar

import torch

from openft.errors import InvalidRequest
from openft.models import render
from openft.threads import available_cores
from openft.training import distributed

T = TypeVar("T")
R = TypeVar("R")

MIN_EXAMPLES_PER_WORKER = 32
"""Auto sizing: a worker only pays for its fork and result copies with at least this many examples."""
PIXEL_KEYS = frozenset({"pixel_values"})
"""Vision tensors stored in ``pixel_dtype`` (image grids and masks keep their integer types)."""

_POOL_LOCK = threading.Lock()
_job: Callable[[Any], Any] | None = None
"""The render function of the pool being run; set before forking, so workers inherit it."""
_stop: Any = None
"""The pool's ``Event``, set once an example failed: workers skip what is left (inherited too)."""


def render_workers(setting: int | None, n_items: int) -> int:
    """Processes for the pre-pass: ``setting`` when given (1 = serial, in this process), else one
    per core this process may use (shared by the ranks of a multi-process job) but one, which is
    left to this process receiving the results, and no more than one per
    :data:`MIN_EXAMPLES_PER_WORKER` examples. Fewer than 2 workers means the serial path: on 2
    cores the copies back cost more than a second worker gains (measured: bench/README.md)."""
    if setting is not None:
        return max(1, setting)
    cores = max(1, available_cores() // distributed.world_size() - 1)
    workers = min(cores, n_items // MIN_EXAMPLES_PER_WORKER)
    return workers if workers >= 2 else 1


def render_all(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, pixel_dtype: torch.dtype | None = None
) -> list[R]:
    """``[fn(x) for x in items]`` (each result with its pixels in ``pixel_dtype``), on ``workers``
    processes when that is more than 1 and the platform can fork."""
    items = list(items)
    job = _compacting(fn, pixel_dtype)
    if workers <= 1 or len(items) < 2 or sys.platform != "linux":
        return [job(x) for x in items]
    return list(_forked(job, items, min(workers, len(items))))


def compact(value: Any, pixel_dtype: torch.dtype | None) -> Any:
    """``value`` (a ``Rendered``, or a tuple of them such as a DPO pair) with its pixel tensors in
    ``pixel_dtype`` (None: unchanged)."""
    if pixel_dtype is None:
        return value
    if isinstance(value, tuple):
        return tuple(compact(v, pixel_dtype) for v in value)
    vision = getattr(value, "vision", None)
    if vision:
        for key in PIXEL_KEYS & set(vision):
            if vision[key].is_floating_point():
                vision[key] = vision[key].to(pixel_dtype)
    return value


def _compacting(fn: Callable[[T], R], pixel_dtype: torch.dtype | None) -> Callable[[T], R]:
    if pixel_dtype is None:
        return fn
    return lambda x: compact(fn(x), pixel_dtype)


def _forked(job: Callable[[T], R], items: list[T], workers: int) -> Iterator[R]:
    global _job, _stop
    chunk = max(1, math.ceil(len(items) / (workers * 8)))  # a few chunks per worker: even finish times
    context = multiprocessing.get_context("fork")
    with _POOL_LOCK:  # one pool at a time: its workers must fork with this call's globals
        _job, _stop = job, context.Event()
        try:
            yield from _collect(context.Pool(workers, initializer=_init_worker), items, chunk, _stop)
        finally:
            _job = _stop = None


def _collect(pool: Any, items: list[Any], chunk: int, stop: Any) -> Iterator[Any]:
    """Results in order; the first failure in file order raised as the serial loop raises it.

    After a failure the rest is still drained (the workers skip it) and the pool is closed and
    joined, never terminated: ``Pool.terminate`` stops reading results, then waits for the result
    pipe's lock, which a worker blocked writing a large result holds (it hung a CI run)."""
    failure: tuple[str, str | None, str | None] | None = None
    try:
        for kind, payload in pool.imap(_run_one, items, chunksize=chunk):
            if kind == "error" and failure is None:
                failure = payload
                stop.set()
            elif kind == "ok" and failure is None:
                yield payload
    finally:
        stop.set()  # also when the caller stops early or a worker raised something else
        pool.close()
        pool.join()
    if failure is not None:
        message, param, code = failure
        raise InvalidRequest(message, param=param, code=code)


def _init_worker() -> None:
    # A lock another thread of the parent held at the fork stays held forever in the child.
    render._TOKENIZER_LOCK = threading.RLock()
    torch.set_num_threads(1)  # the pool is the parallelism; image ops stay on their core
    ForkingPickler.register(torch.Tensor, _by_value)  # in this worker only: results go by value


def _by_value(t: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
    flat = t.detach().contiguous().reshape(-1)
    try:
        data = flat.numpy()
    except TypeError:  # no numpy dtype (bf16): its bits as integers of the same width
        data = flat.view(_SAME_WIDTH_INT[flat.element_size()]).numpy()
    return _from_array, (data, str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _from_array(data: Any, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _run_one(item: Any) -> tuple[str, Any]:
    assert _job is not None and _stop is not None
    if _stop.is_set():  # an earlier example failed: the pool is only being drained
        return "skipped", None
    try:
        return "ok", _job(item)
    except InvalidRequest as e:  # its keyword-only fields do not survive exception pickling
        return "error", (e.message, e.param, e.code)
