"""The recipes' render pre-pass: every example rendered once, by this process and forked workers.

Rendering (chat template, tokenizer, image decode and resize, patchify) is CPU work done once per
run before the first step; on one core a 448-px Qwen2-VL image costs ~20 ms, so a 50k-image
file keeps a GPU idle for minutes. :func:`render_all` spreads it over processes: fork hands the
processor and the examples to the workers for free (no pickling, no reload from disk); the
examples are cut into chunks that this process hands out in file order, each worker through its
own pipe, rendering one itself between receiving the workers' results. A worker that dies (the
out-of-memory killer's SIGKILL) has its chunks rendered by a new one; a chunk that kills two
fails the pre-pass with a :class:`JobFailed` that says so (:class:`_Workers`).

A result's large buffers (pixels: 4.6 MiB per 448-px image in fp32) do not cross a worker's pipe:
pickled through a pipe they cost the receiving process about as much CPU as rendering them
(64 KiB reads, several copies: 15-24 ms per 448-px image here against ~20 ms to render one, so two
processes were slower than one; bench/README.md). A worker pickles a chunk's results with protocol 5, writes the out-of-band
buffers into one file in ``/dev/shm`` (tmpfs: memory) and sends only its name; this process reads
them straight into fresh tensors and unlinks the file. Lifetime: the worker creates and closes the
file but never unlinks it once sent; this process unlinks every file it is sent, also the results
it discards after a failure or while it is unwinding, so none is left behind (a process killed
mid-render excepted: a worker's unsent file is removed when its death is seen, and the next pre-pass on the machine removes files left by a parent that no
longer exists, once they are :data:`STALE_AFTER_S` old). Without room there (``ENOSPC``, no ``/dev/shm``) the chunk goes through the
pipe as before. Not torch's own tensor sharing: it hands over one file descriptor per tensor,
which runs out at tens of thousands of images, and its tensors would keep ``/dev/shm`` charged
for the whole run.

An example that fails raises the same :class:`InvalidRequest` (message, param, code) as the serial
path, for the first failing example in file order: chunks are handed out in order and no process
starts an example after the earliest failure seen so far, so every example before it is rendered.

Pixels are also stored compactly: ``pixel_dtype`` (bf16 when the run autocasts to bf16) halves
host RAM. That is lossless *for that run*: every supported vision tower's first use of
``pixel_values`` is its patch-embedding convolution, which bf16 autocast rounds to bf16 anyway,
and rounding an already-bf16 value again is exact (``test_prerender`` checks the logits match).
"""

from __future__ import annotations

import copyreg
import io
import itertools
import math
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch

from openft.errors import InvalidRequest, JobFailed
from openft.models import render
from openft.threads import available_cores
from openft.training import distributed

T = TypeVar("T")
R = TypeVar("R")

MIN_EXAMPLES_PER_WORKER = 32
"""Auto sizing: a worker only pays for its fork and result copies with at least this many examples."""
PIXEL_KEYS = frozenset({"pixel_values"})
"""Vision tensors stored in ``pixel_dtype`` (image grids and masks keep their integer types)."""

CHUNK_MAX = 8
"""Examples per chunk at most: a chunk's pixels sit in one ``/dev/shm`` file until received."""
OUT_OF_BAND_MIN = 64 << 10
"""Bytes: a buffer at least this large goes through the shared-memory file, smaller ones in band."""
SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "openft-render-"
"""Names of the files in :data:`SHM_DIR` a pre-pass writes: ``openft-render-<parent pid>-...``."""
STALE_AFTER_S = 600.0
"""A file whose parent process is gone is removed only once this old: a parent in another pid
namespace sharing this ``/dev/shm`` looks gone from here, but reads its files within seconds."""

_PREPASS_LOCK = threading.Lock()
_run: _Run | None = None
"""The pre-pass being run; set before forking, so the workers inherit it."""


def render_workers(setting: int | None, n_items: int) -> int:
    """Processes for the pre-pass, this one included: ``setting`` when given (1 = serial), else
    this process's torch threads, which openft sizes to its share of the cores (``openft.threads``:
    ``openft serve`` splits them between its embedded workers and the API, a multi-process job
    between its ranks), at most the cores it may use and one per
    :data:`MIN_EXAMPLES_PER_WORKER` examples. This process renders too, when no result is waiting
    for it, so a dedicated 2-core worker renders on 2 processes (bench/README.md)."""
    if setting is not None:
        return max(1, setting)
    cores = min(torch.get_num_threads(), max(1, available_cores() // distributed.world_size()))
    return max(1, min(cores, n_items // MIN_EXAMPLES_PER_WORKER))


def render_all(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, pixel_dtype: torch.dtype | None = None
) -> list[R]:
    """``[fn(x) for x in items]`` (each result with its pixels in ``pixel_dtype``), on ``workers``
    processes (this one and ``workers - 1`` forked ones) when that is more than 1 and the platform
    can fork."""
    items = list(items)
    job = _compacting(fn, pixel_dtype)
    if workers <= 1 or len(items) < 2 or sys.platform != "linux":
        return [job(x) for x in items]
    return _forked(job, items, min(workers, len(items)))


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


@dataclass
class _Run:
    """One pre-pass, shared by this process and its forked workers."""

    job: Callable[[Any], Any]
    items: list[Any]
    chunk: int
    failed_at: Any  # multiprocessing.RawValue: an example that failed (len(items): none so far)
    parent: int = field(default_factory=os.getpid)  # the process that forks the workers
    n_chunks: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_chunks = math.ceil(len(self.items) / self.chunk)

    def fail(self, at: int) -> None:
        """Lower the mark. Without a lock (a worker killed holding it would stop every process): two
        processes failing at once may leave the later of their examples, still a failing one, so no
        example before the earliest failure is ever skipped."""
        if at < self.failed_at.value:
            self.failed_at.value = at

    def render(self, index: int) -> list[tuple[str, Any]]:
        """Chunk ``index`` as ``(kind, payload)`` pairs, up to and including its first failure."""
        out: list[tuple[str, Any]] = []
        for k in range(index * self.chunk, min((index + 1) * self.chunk, len(self.items))):
            if k >= self.failed_at.value:  # an earlier example failed: only it matters now
                break
            try:
                out.append(("ok", self.job(self.items[k])))
            except InvalidRequest as e:  # its keyword-only fields do not survive exception pickling
                out.append(("error", (e.message, e.param, e.code)))
            except Exception as e:
                out.append(("raise", e))
            else:
                continue
            self.fail(k)
            break
        return out


class _Shipped(NamedTuple):
    """A worker's chunk as sent through the pipe: its pickle, and the name of the file in
    :data:`SHM_DIR` that holds its out-of-band buffers (``sizes``, one after another), if any."""

    data: bytes
    segment: str | None
    sizes: tuple[int, ...]


def sweep_stale_segments(now: float | None = None) -> int:
    """Remove the files a killed pre-pass left in :data:`SHM_DIR` (its parent pid gone, the file
    older than :data:`STALE_AFTER_S`); the number removed. tmpfs is memory: left there, each
    killed run would keep its last chunks' pixels charged until a reboot."""
    now = time.time() if now is None else now
    removed = 0
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        parent = path.name[len(SEGMENT_PREFIX) :].split("-", 1)[0]
        try:
            if not parent.isdigit() or _alive(int(parent)) or now - path.stat().st_mtime < STALE_AFTER_S:
                continue
            path.unlink()
            removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _forked(job: Callable[[T], R], items: list[T], processes: int) -> list[R]:
    global _run
    sweep_stale_segments()
    # A few chunks per process (even finish times), small enough to bound the shared memory in flight.
    chunk = min(CHUNK_MAX, max(1, math.ceil(len(items) / (processes * 8))))
    context = multiprocessing.get_context("fork")
    with _PREPASS_LOCK:  # one pre-pass at a time: its workers must fork with this call's globals
        _run = run = _Run(job, items, chunk, context.RawValue("q", len(items)))
        try:
            done = _Workers(context, run, processes - 1).collect()
        finally:
            _run = None
    out: list[Any] = []
    for index in range(run.n_chunks):  # every chunk before the first failure was rendered
        for kind, payload in done[index]:
            if kind == "error":
                message, param, code = payload
                raise InvalidRequest(message, param=param, code=code)
            if kind == "raise":
                raise payload
            out.append(payload)
    return out


@dataclass
class _Worker:
    """A forked render process: the chunks sent to it, in the order it renders and replies."""

    process: Any  # multiprocessing.Process
    tasks: Connection  # this process -> worker: chunk indices, then None
    results: Connection  # worker -> this process: (index, _Shipped | Exception)
    assigned: deque[int] = field(default_factory=deque)


class _Workers:
    """This process and its forked workers rendering every chunk of ``run``.

    This process hands out the chunks in file order (each worker holds at most
    :data:`WORKER_DEPTH`, so it has the next one while this one is busy) and, between receiving
    the replies waiting, renders the next chunk itself (were it to render only when no reply
    waits, receiving a worker's results, as costly as rendering them, could take all its time).
    Each worker has its own pipes, so nothing is shared that a worker killed at any line could
    leave locked (``multiprocessing.Pool`` shares a result pipe and its lock, and
    loses the task of a worker that dies: the pre-pass then waited forever). A worker's death is
    seen on its process sentinel: the chunk it was rendering and those queued behind it go to
    a new worker (never to this process: a chunk that kills its renderer would kill the training
    job); a chunk that has killed :data:`MAX_KILLS` workers fails the pre-pass with
    :class:`JobFailed`. After a failure the workers are told to stop, each pipe is read to its end
    (unlinking the files of replies no longer needed) and every process joined: never terminated,
    which could kill a worker between writing a file and sending its name."""

    def __init__(self, context: Any, run: _Run, n: int) -> None:
        self.context, self.run, self.n = context, run, n
        self.workers: list[_Worker] = []
        self.todo: deque[int] = deque(range(run.n_chunks))  # not yet handed out, in file order
        self.retry: deque[int] = deque()  # a dead worker's chunks: for workers only
        self.kills: dict[int | None, int] = {}  # workers killed, by the chunk they were rendering
        self.done: dict[int, list[tuple[str, Any]]] = {}

    def collect(self) -> dict[int, list[tuple[str, Any]]]:
        """Every chunk's results by index, up to the first failing example."""
        try:
            for _ in range(self.n):
                self._start()
            while True:
                self._hand_out()
                if not any(w.assigned for w in self.workers) and self._next(self.retry) is None:
                    if self._next(self.todo) is None:
                        break
                ready = wait(self._watched(), timeout=0 if self.todo else None)
                for worker in list(self.workers):
                    if worker.results in ready or worker.process.sentinel in ready:
                        self._serve(worker, dead=worker.process.sentinel in ready)
                if self._next(self.todo) is not None:  # between receiving replies: a chunk of its own
                    index = self.todo.popleft()
                    self.done[index] = self.run.render(index)
        finally:
            self._stop()
        return self.done

    def _start(self) -> None:
        task_reader, task_writer = self.context.Pipe(duplex=False)
        result_reader, result_writer = self.context.Pipe(duplex=False)
        # The child closes its inherited copies of this process's ends (its siblings' too): a
        # worker then sees EOF on its task pipe if this process dies, and this one on the result pipe.
        theirs = [task_writer, result_reader] + [c for w in self.workers for c in (w.tasks, w.results)]
        process = self.context.Process(
            target=_worker_main, args=(task_reader, result_writer, theirs), name="openft-render", daemon=True
        )
        process.start()
        task_reader.close()
        result_writer.close()
        self.workers.append(_Worker(process, task_writer, result_reader))

    def _next(self, queue: deque[int]) -> int | None:
        """The next chunk of ``queue`` not wholly after the earliest failure (those are dropped)."""
        while queue:
            if queue[0] * self.run.chunk < self.run.failed_at.value:
                return queue[0]
            queue.popleft()
        return None

    def _hand_out(self) -> None:
        for worker in self.workers:
            while len(worker.assigned) < WORKER_DEPTH:
                queue = self.retry if self._next(self.retry) is not None else self.todo
                if self._next(queue) is None:
                    break
                try:
                    worker.tasks.send(queue[0])
                except OSError:  # it has died: its sentinel will say so
                    break
                worker.assigned.append(queue.popleft())

    def _watched(self) -> list[Any]:
        return [x for w in self.workers for x in (w.results, w.process.sentinel)]

    def _serve(self, worker: _Worker, *, dead: bool) -> None:
        """Receive what ``worker`` sent; if it has died, give its chunks to a new worker."""
        while worker.results.poll():  # a dead worker's last complete replies are still in its pipe
            try:
                index, reply = worker.results.recv()
            except (EOFError, OSError):  # it died mid-send (or sent its last): only its sentinel tells
                dead = True
                break
            worker.assigned.remove(index)
            if isinstance(reply, BaseException):  # its results could not be sent
                self.run.fail(index * self.run.chunk)
                raise reply
            if index * self.run.chunk <= self.run.failed_at.value:  # not wholly after a failure
                self.done[index] = _receive(reply)
            else:
                _release(reply)
            if not dead:
                break  # one reply at a time: the loop hands it new work meanwhile
        if not dead:
            return
        exitcode = self._forget(worker)
        # It was rendering the first of its chunks, the others queued behind it (none: it died
        # idle, or starting; counted too, so that workers which cannot start end the pre-pass).
        first = worker.assigned[0] if worker.assigned else None
        self.kills[first] = self.kills.get(first, 0) + 1
        if self.kills[first] >= MAX_KILLS:
            raise _killed(self.run, first, exitcode, self.kills[first])
        self.retry = deque(sorted([*self.retry, *worker.assigned]))
        self._start()

    def _forget(self, worker: _Worker) -> int | None:
        """Join ``worker`` (its pipe read to its end) and free what it held; its exit code."""
        worker.process.join()
        exitcode, pid = worker.process.exitcode, worker.process.pid
        # A file it wrote but did not send (killed between the two): every one it sent is unlinked.
        for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}{os.getpid()}-{pid}-*"):
            path.unlink(missing_ok=True)
        self.workers.remove(worker)
        worker.tasks.close()
        worker.results.close()
        worker.process.close()
        return exitcode

    def _stop(self) -> None:
        """Tell every worker to stop (skipping what it holds if unwinding), read its pipe to its
        end and join it."""
        if self.todo or self.retry or any(w.assigned for w in self.workers):  # unwinding
            self.run.fail(0)
        for worker in self.workers:
            try:
                worker.tasks.send(None)
            except OSError:  # it has died
                pass
        for worker in list(self.workers):
            while True:
                try:
                    _, reply = worker.results.recv()
                except (EOFError, OSError):
                    break
                if isinstance(reply, _Shipped):
                    _release(reply)
            self._forget(worker)


WORKER_DEPTH = 2
"""Chunks handed to a worker at a time: the next one is there when it finishes one."""
MAX_KILLS = 2
"""Workers a chunk may see killed before the pre-pass fails (once may be another job's memory)."""


def _killed(run: _Run, index: int | None, exitcode: int | None, kills: int) -> JobFailed:
    if exitcode is not None and exitcode < 0:
        how = f"was killed by signal {-exitcode} ({signal.Signals(-exitcode).name})"
        if -exitcode == signal.SIGKILL:
            how += ", most likely by the kernel's out-of-memory killer"
    else:
        how = f"exited with status {exitcode}"
    return JobFailed(
        f"A render worker process {how} {_doing(run, index)}, {kills} times. Give the openft "
        "worker more memory, or render on fewer processes (render_workers, or OPENFT_TORCH_THREADS "
        "on the worker: 1 renders in the training process only), or use smaller images in those "
        "examples.",
        code="render_worker_killed",
    )


def _doing(run: _Run, index: int | None) -> str:
    if index is None:
        return "while starting or between chunks"
    first = index * run.chunk
    return f"while rendering examples {first + 1}-{min(first + run.chunk, len(run.items))} of the file"


def _worker_main(tasks: Connection, results: Connection, theirs: list[Connection]) -> None:
    """A forked worker: render each chunk it is sent and reply, until None or EOF."""
    for conn in theirs:
        conn.close()
    _init_worker()
    assert _run is not None
    while True:
        try:
            index = tasks.recv()
        except EOFError:  # the parent is gone
            return
        if index is None:
            return
        try:
            reply: Any = _ship(_run.render(index))
        except Exception as e:  # a result that cannot be pickled: the parent raises it
            reply = e
        try:
            results.send((index, reply))
        except Exception as e:
            if isinstance(reply, _Shipped):
                _release(reply)
            if isinstance(e, OSError):  # the parent is gone
                return
            results.send((index, RuntimeError(f"a render worker's error cannot be sent: {reply!r}")))


def _init_worker() -> None:
    # A lock another thread of the parent held at the fork stays held forever in the child.
    render._TOKENIZER_LOCK = threading.RLock()
    torch.set_num_threads(1)  # the processes are the parallelism; image ops stay on their core


_PICKLING = copyreg.dispatch_table.copy()
_SEGMENTS = itertools.count()


def _ship(value: Any) -> _Shipped:
    """``value`` pickled (protocol 5) with its large buffers in a new file in :data:`SHM_DIR`, or
    all in band when that file cannot be written."""
    large: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND_MIN:
            return True
        large.append(buffer)
        return False

    data = _dumps(value, out_of_band)
    if not large:
        return _Shipped(data, None, ())
    segment = _write_segment([b.raw() for b in large])
    if segment is None:
        return _Shipped(_dumps(value, None), None, ())
    return _Shipped(data, segment, tuple(b.raw().nbytes for b in large))


def _dumps(value: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None) -> bytes:
    f = io.BytesIO()
    pickler = pickle.Pickler(f, protocol=5, buffer_callback=buffer_callback)
    pickler.dispatch_table = _PICKLING  # tensors by value, as numpy arrays (buffers out of band)
    pickler.dump(value)
    return f.getvalue()


def _write_segment(buffers: list[memoryview]) -> str | None:
    """A new file in :data:`SHM_DIR` holding ``buffers``; None (and no file) when it cannot be
    written. Closed but not unlinked: the receiver unlinks it once it has read it."""
    # The pre-pass's process, not getppid(): a worker orphaned by its death has init's (pid 1, alive).
    parent = _run.parent if _run is not None else os.getppid()
    name = f"{SEGMENT_PREFIX}{parent}-{os.getpid()}-{next(_SEGMENTS)}"
    path = SHM_DIR / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        with open(fd, "wb", buffering=0) as f:
            for buffer in buffers:
                while buffer:
                    buffer = buffer[f.write(buffer) :]
    except BaseException as e:
        path.unlink(missing_ok=True)
        if isinstance(e, OSError):  # ENOSPC: tmpfs full (containers often cap it at 64 MiB)
            return None
        raise
    return name


def _receive(shipped: _Shipped) -> Any:
    """A worker's chunk, its buffers read from the file straight into fresh tensors; the file
    unlinked."""
    if shipped.segment is None:
        return pickle.loads(shipped.data)
    buffers = []
    try:
        with open(SHM_DIR / shipped.segment, "rb", buffering=0) as f:
            for size in shipped.sizes:
                buffer = torch.empty(size, dtype=torch.uint8).numpy()  # not zeroed: read over
                view = memoryview(buffer)
                while view:
                    n = f.readinto(view)
                    if not n:
                        raise EOFError(f"{SHM_DIR / shipped.segment} is shorter than its worker wrote")
                    view = view[n:]
                buffers.append(buffer)
    finally:
        _release(shipped)
    return pickle.loads(shipped.data, buffers=buffers)


def _release(shipped: _Shipped) -> None:
    if shipped.segment is not None:
        (SHM_DIR / shipped.segment).unlink(missing_ok=True)


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
_PICKLING[torch.Tensor] = _by_value
