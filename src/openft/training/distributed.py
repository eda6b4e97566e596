"""Multi-process jobs on torch.distributed: everything the recipes need to run on N ranks.

A job on N processes (``openft worker --nproc N``) is launched by :func:`launch` the way torchrun
launches a script: N fresh processes (``spawn``), each given the standard environment
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``)
and joining one process group through ``env://`` (NCCL, one GPU per rank; gloo on CPU). We spawn
them ourselves rather than through elastic's agent because the worker that holds the job's lease
must stay their parent: rank 0's :class:`~openft.training.reporter.Reporter` calls (events,
metrics, checkpoints, "should I stop?") travel over a pipe to the worker's real reporter, and a
lost rank is the job queue's business (restart from saved state), not a rendezvous'.

Inside the ranks the recipes stay single-process code with a few calls into this module:

- data parallel: :func:`wrap` puts the model in DDP; each rank takes :func:`share` of every global
  batch (same batches, same order as one process), scales its loss by :func:`world_size` (DDP
  averages gradients, the token-weighted shares already sum to one over all ranks), and reduces
  only on the last micro-batch (:func:`accumulating`); :func:`all_sum` makes the reported loss the
  global one;
- fully sharded data parallel (``cfg.parallelism == "fsdp"``, full fine-tuning): :func:`shard` applies
  FSDP2 (``fully_shard``) per decoder layer, per vision block and at the root, so each rank holds
  1/N of the weights, gradients and AdamW state; every forward and backward is then a collective, so
  all ranks run the same number of micro-batches (:func:`rank_micro_batches` pads with weight-0
  stand-ins), evaluate together, write their shards of the resumable state
  (``training.sharded_state``) and, at each epoch end, gather the full weights for rank 0 to write
  the servable checkpoint one file at a time (``training.fsdp_io.save_servable``); each rank reads
  only its own slices of the pretrained weights (safetensors; else rank 0 reads them and the
  others get their shards from it, :func:`shard`);
- rank 0 alone reports, evaluates (all ranks under FSDP) and writes state (every rank under FSDP)
  and checkpoints (:func:`is_main`); every rank loads the saved state on resume; a cancel or pause is rank 0's answer, broadcast so all ranks stop
  at the same step boundary;
- a rank that dies without a word (SIGKILL, segfault) takes the others down with it; the launcher
  then restarts all N from the last saved state, up to :data:`MAX_RESTARTS` times (torchrun's
  ``--max-restarts``). If the worker itself dies, the ranks notice their parent is gone and exit;
  the lease expires and another worker resumes the job.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from openft.errors import JobCancelled
from openft.models.families import find_family
from openft.training.collate import micro_batches
from openft.training.reporter import Reporter
from openft.training.trainable import part_of

log = logging.getLogger("openft.training")

MAX_RESTARTS = 3
"""A job whose ranks die this many times in a row (without a word) fails."""
SURVIVOR_GRACE_SECONDS = 5.0
"""After one rank dies, the others get this long to notice (their collectives fail) before SIGKILL."""

T = TypeVar("T")
Parallelism = Literal["ddp", "fsdp"]


class RanksLost(RuntimeError):
    """Ranks died :data:`MAX_RESTARTS` times without reporting an error."""


# -- inside a rank ------------------------------------------------------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that reports, evaluates and writes files."""
    return rank() == 0


def share(batch_ids: Sequence[int]) -> list[int]:
    """This rank's part of a global batch (strided, so lengths stay balanced across ranks)."""
    return list(batch_ids[rank() :: world_size()])


def rank_micro_batches(
    batch_ids: Sequence[int], size: int | None, *, lockstep: bool
) -> list[tuple[list[int], bool]]:
    """This rank's :func:`share` of a global batch cut into micro-batches of ``size``, each with
    whether it counts. A rank with no share runs one stand-in example (``False``: weight 0) so it
    still joins the gradient reduction. ``lockstep`` (FSDP, where every forward and backward
    gathers weights collectively): every rank runs as many micro-batches as rank 0, whose strided
    share is the longest, padding with stand-ins."""
    mine = share(batch_ids)
    stand_in = (list(batch_ids[:1]), False)
    chunks = [(c, True) for c in micro_batches(mine, size)] if mine else [stand_in]
    if lockstep:
        most = len(micro_batches(batch_ids[:: world_size()], size))
        chunks += [stand_in] * (most - len(chunks))
    return chunks


def sharded(model: Any) -> bool:
    """``model`` is FSDP2-sharded (its forward, backward and state gathers are collectives)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(
    model: torch.nn.Module, device: torch.device, *, vision_blocks: bool, bf16: bool
) -> torch.nn.Module:
    """FSDP2 over ``model`` in place when there are several ranks: ``fully_shard`` on every
    transformer block (the classes transformers lists in ``_no_split_modules``: decoder layers and
    vision blocks), then on the root (embeddings, head, norms, projector and whatever is left).
    Each block's weights are gathered just before it runs and freed after, its gradients
    reduce-scattered as soon as its backward ends, and the optimizer, built afterwards, sees only
    this rank's shards (DTensors). The model moves to ``device`` shard by shard.

    ``vision_blocks``: shard the vision tower's blocks too. Only when every example has an image:
    a block's weights are gathered when it runs, so a rank whose micro-batch has no image would
    skip a gather its peers wait in. Otherwise the tower joins the root group, gathered by every
    rank at each forward; its unused gradients are reduced as zeros (``reduce_scatter_unused_params``,
    DDP's ``find_unused_parameters``). ``bf16`` (CUDA): weights gathered and computed in bf16,
    gradients reduced in fp32, fp32 master shards for AdamW.

    No rank needs the whole model: when every rank passes the architecture with its parameters on
    the meta device (``load_model(weights=False)``, weights in safetensors: ``fsdp_io.slices_cover``),
    each reads its own slices of them after sharding (:func:`_load_slices`). Otherwise (``.bin``
    weights, an adapter merged into the base) only rank 0 loads them, the others pass the meta
    architecture and receive their shards from rank 0's full weights (:func:`_load_from_rank0`),
    one tensor at a time, so no rank but 0 ever holds the full model.
    """
    if world_size() == 1:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _align_with_rank0(model)
    # Built without weights on every rank: each reads its own slices from the safetensors
    # (``training.fsdp_io``). Else rank 0's full tensors (references, no copy), kept past
    # ``fully_shard``, which replaces the parameters with this rank's shards; sent to the other
    # ranks below, then dropped.
    sliced = agree(all(p.is_meta for p in model.parameters()))
    from openft.training import fsdp_io

    fsdp_io.stored_names(model)  # looked up by class name, which fully_shard changes
    full = model.state_dict() if is_main() and not sliced else {}

    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None
    )
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    family = find_family(model)
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if type(module).__name__ not in block_classes or any(name.startswith(f"{b}.") for b, _ in blocks):
            continue  # not a block, or inside one already taken
        if part_of(name, family) == "language_model" or vision_blocks:
            blocks.append((name, module))
    for _, module in blocks:
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_reduce_scatter_unused_params(True)  # type: ignore[operator]
    if sliced:
        _load_slices(model, device)
    else:
        _load_from_rank0(model, full, device)
    del full
    log.info("FSDP2 over %d ranks: %d blocks sharded, plus the root", world_size(), len(blocks))
    return model


def _align_with_rank0(model: torch.nn.Module) -> None:
    """Give a meta-device rank's parameters and buffers rank 0's dtypes (``fully_shard`` needs the
    same on every rank; a config built without weights may not say what the loaded checkpoint holds),
    and refuse clearly when the two ranks built different architectures."""
    mine = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    theirs = [mine]
    dist.broadcast_object_list(theirs, src=0)
    if theirs[0].keys() != mine.keys():
        odd = sorted(set(theirs[0]) ^ set(mine))[:5]
        raise RuntimeError(f"rank {rank()} built another model than rank 0 (differs in {odd})")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta and t.dtype != theirs[0][name]:
            t.data = t.data.to(theirs[0][name])  # free on the meta device


def _load_slices(model: torch.nn.Module, device: torch.device) -> None:
    """Every rank's shards read from the safetensors the model was configured from (its
    ``name_or_path``), each rank only its own rows (``fsdp_io.load_slices``). Buffers were
    computed when the model was built (rotary ``inv_freq``): kept across ``to_empty``, which
    allocates the sharded storage; persistent ones are then read whole."""
    from openft.training import fsdp_io

    kept = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in kept:
                buf.copy_(kept[name])
    fsdp_io.load_slices(model, str(model.name_or_path))  # type: ignore[attr-defined]


def _load_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor], device: torch.device) -> None:
    """Every rank's shards from rank 0's ``full`` state dict (``set_model_state_dict`` with
    ``broadcast_from_rank0``: each full tensor is broadcast in turn and each rank keeps its slice).
    A meta-device rank first allocates its (sharded) storage with ``to_empty``. Buffers are not
    sharded and non-persistent ones (rotary ``inv_freq``) are not in any state dict: each is
    broadcast whole from rank 0, which computed them while loading."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    with torch.no_grad():
        for _, buf in model.named_buffers():
            dist.broadcast(buf, src=0)


def reshard(model: torch.nn.Module) -> None:
    """Put a sharded model's parameters back to their shards. A forward without backward (evaluation,
    DPO's reference scoring) leaves the root group gathered, its modules holding the full tensors:
    the optimizer must be built over (and states read from) the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gather a sharded model's full weights onto rank 0's CPU (other ranks get an empty dict), one
    parameter at a time. A collective: every rank must call it.

    Only where the servable checkpoint cannot be written a file at a time
    (``fsdp_io.save_servable``: a model whose saved names need more than renaming): rank 0's host
    memory then holds the full trained weights (4 bytes per parameter in fp32) once per epoch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision that gates a collective, e.g. a timed save)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP over ``model`` when there are several ranks (else ``model`` itself, as is a model
    already :func:`shard`-ed). Call it for the forward/backward only: saving and evaluating keep
    using the bare model (same names as one process).

    ``find_unused_parameters``: a text-only batch leaves the vision tower without gradients, on some
    ranks but not others. ``forward_sync_buffers=False`` (buffers are synced once, at wrapping):
    ranks run different numbers of micro-batches, so no collective may hide in a forward.
    """
    if world_size() == 1 or sharded(model):
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None,
        find_unused_parameters=True,
        forward_sync_buffers=False,
    )


@contextlib.contextmanager
def accumulating(model: torch.nn.Module, *, last: bool) -> Iterator[None]:
    """Backward without DDP's gradient all-reduce unless this is the rank's ``last`` micro-batch.
    FSDP reduce-scatters after every micro-batch instead: accumulating unsharded gradients would
    hold a full copy of them, the memory sharding exists to save."""
    no_sync = getattr(model, "no_sync", None)
    with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
        yield


def all_sum(*values: float) -> list[float]:
    """Sum each value over all ranks (one collective): per-rank shares of a metric become the global one."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def gather(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's ``parts``, concatenated (on the CPU): per-item values such as DPO rewards."""
    mine = torch.cat(parts).detach().cpu() if parts else torch.zeros(0)
    if world_size() == 1:
        return mine
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    return torch.cat(everyone)


def unwrap(model: Any) -> Any:
    """The model inside DDP (or ``model`` itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


class _RankReporter:
    """Rank 0 reports through ``inner``; other ranks stay silent. ``should_stop`` is rank 0's
    answer broadcast to all, so every rank stops (and rank 0 saves) at the same step boundary."""

    def __init__(self, inner: Reporter | None) -> None:
        self._inner = inner

    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        if self._inner is not None:
            self._inner.on_message(message, level, once=once)

    def on_step(self, metrics: dict[str, float | int]) -> None:
        if self._inner is not None:
            self._inner.on_step(metrics)

    def on_checkpoint(
        self, weights_dir: Any, *, step: int, epoch: int, metrics: dict[str, float | int]
    ) -> None:
        if self._inner is not None:
            self._inner.on_checkpoint(weights_dir, step=step, epoch=epoch, metrics=metrics)

    def should_stop(self) -> bool:
        flag = torch.tensor(
            [int(self._inner is not None and self._inner.should_stop())], device=_collective_device()
        )
        dist.broadcast(flag, src=0)
        return bool(flag.item())


class _PipeReporter:
    """Rank 0's side of the worker's reporter: each call waits for the worker's answer (so a
    checkpoint folder is stored before rank 0 may prune it), and the worker's exceptions come back."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        self._conn.send(("call", name, args, kwargs))
        kind, value = self._conn.recv()
        if kind == "raise":
            raise value
        return value

    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        self._call("on_message", message, level, once=once)

    def on_step(self, metrics: dict[str, float | int]) -> None:
        self._call("on_step", metrics)

    def on_checkpoint(
        self, weights_dir: Any, *, step: int, epoch: int, metrics: dict[str, float | int]
    ) -> None:
        self._call("on_checkpoint", weights_dir, step=step, epoch=epoch, metrics=metrics)

    def should_stop(self) -> bool:
        return bool(self._call("should_stop"))


def _rank_main(env: dict[str, str], conn: Connection, train: Callable[..., Any], threads: int) -> None:
    """A rank's whole life: join the group, train, send back the result (rank 0) or the error."""
    os.environ.update(env)
    # The worker coordinates stopping; a terminal's Ctrl-C must not break a rank mid-collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    torch.set_num_threads(threads)
    local_rank = int(env["LOCAL_RANK"])
    cuda = torch.cuda.is_available() and env.get("OPENFT_DIST_BACKEND") == "nccl"
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU everywhere
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    try:
        reporter = _RankReporter(_PipeReporter(conn) if dist.get_rank() == 0 else None)
        result = train(reporter=reporter)
        send_result(conn, result if dist.get_rank() == 0 else None)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the worker
        if isinstance(exc, JobCancelled):  # a cancel, pause or shutdown: state is saved
            log.info("rank %s stopped: %s", env["RANK"], exc)
        else:
            log.exception("rank %s failed", env["RANK"])
        with contextlib.suppress(OSError):  # the worker may be gone too
            conn.send(("error", _picklable(exc)))
        os._exit(1)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _exit_with_parent() -> None:
    """A rank whose worker died (even by SIGKILL) exits too; the job's lease then expires."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# -- in the worker --------------------------------------------------------------------------------


def launch(
    train: Callable[..., T],
    reporter: Reporter,
    *,
    nproc: int,
    threads: int | None = None,
    cuda: bool = False,
    max_restarts: int = MAX_RESTARTS,
) -> T:
    """Run ``train(reporter=...)`` on ``nproc`` ranks (one GPU each when ``cuda``, else gloo on
    CPU with ``threads`` torch threads per rank, default this process's share) and return rank 0's result. Rank 0's reporter
    calls are served here from ``reporter``. A rank's error is re-raised here; ranks that die
    without one are all restarted (the recipe must resume from its saved state), up to
    ``max_restarts`` times."""
    threads = threads or max(1, torch.get_num_threads() // nproc)
    for attempt in range(max_restarts + 1):
        lost = _run_once(train, reporter, nproc=nproc, threads=threads, cuda=cuda)
        if isinstance(lost, _Finished):
            return lost.result  # type: ignore[no-any-return]
        if attempt < max_restarts:
            reporter.on_message(
                f"{lost}; restarting all {nproc} processes from the last saved state "
                f"(restart {attempt + 1} of {max_restarts})",
                level="warn",
            )
    raise RanksLost(f"{lost}; gave up after {max_restarts} restarts")


def send_result(conn: Connection, result: Any) -> None:
    """Send a rank's result by value (plain pickle). The pipe's own pickler would pass tensors as
    shared-memory handles served by this process, which exits before the launcher reads them."""
    conn.send(("result", pickle.dumps(result)))


class _Outcome:
    """What the ranks said: rank 0's result, each rank's error, and which ranks are done talking."""

    def __init__(self) -> None:
        self.result: Any = None
        self.errors: dict[int, BaseException] = {}
        self.finished: set[int] = set()

    def take(self, r: int, conn: Connection, reporter: Reporter | None) -> None:
        """Read one message from rank ``r``: serve a reporter call, or note its end."""
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # that rank is gone; its exit code says how
            self.finished.add(r)
            return
        if msg[0] == "call":
            _, name, args, kwargs = msg
            if reporter is None:
                return  # the job is being torn down; nobody waits for the answer
            try:
                conn.send(("ok", getattr(reporter, name)(*args, **kwargs)))
            except Exception as exc:  # noqa: BLE001 - the rank re-raises it
                conn.send(("raise", _picklable(exc)))
        elif msg[0] == "result":
            self.result = pickle.loads(msg[1]) if r == 0 else self.result  # noqa: S301 - our own rank
            self.finished.add(r)
        else:
            self.errors[r] = msg[1]
            self.finished.add(r)


class _Finished:
    def __init__(self, result: Any) -> None:
        self.result = result


def _run_once(
    train: Callable[..., Any], reporter: Reporter, *, nproc: int, threads: int, cuda: bool
) -> _Finished | str:
    """One launch of all ranks: their result, or why they were lost (a string)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs: list[Any] = []
    conns: list[Connection] = []
    for r in range(nproc):
        mine, theirs = ctx.Pipe()
        env = {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(r),
            "WORLD_SIZE": str(nproc),
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": str(nproc),
            "OPENFT_DIST_BACKEND": "nccl" if cuda else "gloo",
        }
        p = ctx.Process(
            target=_rank_main, args=(env, theirs, train, threads), name=f"openft-rank{r}", daemon=False
        )
        p.start()
        theirs.close()
        procs.append(p)
        conns.append(mine)
    outcome = _Outcome()
    try:
        while True:
            live = [c for r, c in enumerate(conns) if r not in outcome.finished]
            for ready in wait([*live, *(p.sentinel for p in procs)], timeout=1.0):
                if isinstance(ready, Connection):
                    outcome.take(conns.index(ready), ready, reporter)
            if all(p.exitcode is not None for p in procs):
                break
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # one rank failed: the others cannot go on without it
    finally:
        _reap(procs)
        for r, c in enumerate(conns):
            while r not in outcome.finished and c.poll():  # the survivors' last words
                outcome.take(r, c, None)
            c.close()
    errors = outcome.errors
    silent = [r for r, p in enumerate(procs) if p.exitcode != 0 and r not in errors]
    if silent:
        how = ", ".join(f"rank {r} {_exit_words(procs[r].exitcode)}" for r in silent)
        return f"{how} without reporting an error"
    if errors:
        raise next(iter(errors.values()))  # the first to arrive: the others are often its echo
    return _Finished(outcome.result)


def _reap(procs: list[Any]) -> None:
    deadline = time.monotonic() + SURVIVOR_GRACE_SECONDS
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.exitcode is None:
            p.kill()
            p.join()


def _exit_words(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
