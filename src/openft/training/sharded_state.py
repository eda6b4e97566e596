"""Resumable training state of an FSDP-sharded model, written by every rank (torch.distributed.checkpoint).

The folder is the one :mod:`openft.training.state` describes (``state.json`` written last,
``scheduler.pt``, ``rng.pt``: rank 0's), except that the trainable weights and AdamW state live in
``shards/``, a ``torch.distributed.checkpoint`` (DCP) checkpoint: each rank writes the slices it
holds (``__<rank>_0.distcp``) and rank 0 the ``.metadata`` that says which global slice each holds.
No rank ever gathers the full weights or optimizer state to save them, so the memory a save needs is
what the rank already holds, and the N ranks write in parallel.

Loading reshards: ``dcp.load`` reads, for every tensor a rank asks for, just the slices it overlaps,
whatever the number of ranks that wrote them. So a state saved by 2 ranks resumes on 1 process
(plain tensors: the whole of each), on DDP ranks or on 3 FSDP ranks; and the full format that one
process and DDP write still loads under FSDP (``state.load_state``). Parameters and optimizer state
are keyed by parameter name (``get_state_dict``), so the optimizer's own order does not matter.

Atomic like the full format: every rank writes into the hidden sibling ``.state.tmp``, and after
all have written (DCP's own final collective) rank 0 adds the small files, ``state.json`` last,
and renames the folder into place; a kill at any moment leaves the previous state.

In the background (``writer``: the periodic saves): ``dcp.async_save`` copies each rank's shards
to CPU before it returns (training may then update the originals) and writes them on a thread,
its collectives on a process group of their own (:func:`_save_group`) so they never interleave
with the training's. Each rank's :class:`~openft.training.async_save.StateWriter` waits for that
write; rank 0's then commits (DCP's coordinator finishes only after every rank's files are
written). The next save on each rank first waits for its writer, so at most one is in flight, and
a failed write fails the job like a failed full-format one.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from openft.training import distributed
from openft.training.async_save import SavedScheduler, StateWriter
from openft.training.state import (
    TrainState,
    _siblings,
    checked_meta,
    commit_state,
    position,
)

SHARDS_DIR = "shards"


def is_sharded(directory: Path) -> bool:
    """The state at ``directory`` was written by :func:`save_sharded_state`."""
    return (Path(directory) / SHARDS_DIR).is_dir()


def save_sharded_state(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    epoch: int,
    batch_in_epoch: int,
    rng_states: dict[str, Any],
    extra: dict[str, Any] | None = None,
    writer: StateWriter | None = None,
) -> Path:
    """Write the state of a sharded ``model`` atomically to ``directory`` (replacing an older one).
    A collective: every rank calls it, each writing its own shards. ``writer``: return once the
    shards are copied and write them on its thread (the caller waits for ``writer`` before the
    next save, on every rank)."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    tmp, _ = _siblings(directory)
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()  # the empty folder exists before any rank writes into it
    names = _trainable(model)
    meta = {
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "trainable": names,
        "sharded_by": distributed.world_size(),
        "extra": extra or {},
    }

    def commit(scheduler: Any) -> None:  # every rank's shards and the metadata are written
        if distributed.is_main():
            commit_state(
                tmp,
                directory,
                scheduler=scheduler,
                rng_states=rng_states,
                meta=meta,
                also_fsync=(tmp / SHARDS_DIR / ".metadata",),
            )

    state = _state_dicts(model, optimizer, names)
    if writer is None:
        dcp.save(state, checkpoint_id=tmp / SHARDS_DIR)
        commit(scheduler)
        dist.barrier()  # the new state is in place (and tmp free) before any rank goes on
        return directory
    written = dcp.async_save(state, checkpoint_id=tmp / SHARDS_DIR, process_group=_save_group())
    saved_scheduler = SavedScheduler(copy.deepcopy(scheduler.state_dict()))

    def finish() -> None:
        written.result()
        commit(saved_scheduler)

    writer.submit(finish, f"step {step}")
    return directory


_SAVE_GROUP: list[Any] = []


def _save_group() -> Any:
    """A gloo process group for background saves only (created once, by every rank together at
    its first background save): their collectives run on the writer thread while training's run
    on the default group, and two threads must never share one group's sequence of collectives."""
    if not _SAVE_GROUP or _SAVE_GROUP[0][0] is not dist.group.WORLD:
        _SAVE_GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]
    return _SAVE_GROUP[0][1]


def load_sharded_state(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Load a state written by :func:`save_sharded_state` into ``model`` (sharded or not, on any
    number of ranks: a collective when there are several), ``optimizer`` and ``scheduler``; return
    position and RNG. Same contract as ``state.load_state``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    directory = Path(directory)
    names = _trainable(model)
    meta = checked_meta(directory, names)
    state = _state_dicts(model, optimizer, names)
    # Each rank reads the slices it holds; one process (no group) reads everything, as it means to.
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=directory / SHARDS_DIR, no_dist=single)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # frozen weights are not in the state
    )
    return position(directory, meta, scheduler)


def _trainable(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]
) -> dict[str, Any]:
    """This rank's view of the trainable weights and the optimizer state, keyed by parameter name:
    DTensor shards under FSDP (which DCP saves and loads slice by slice), whole tensors otherwise.
    A fresh optimizer's state is initialised first (zeros), so a load has tensors to fill."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if distributed.sharded(model):
        distributed.reshard(model)  # the shards, not weights a forward left gathered
    weights, optim = get_state_dict(model, optimizer)
    return {"model": {n: weights[n] for n in names}, "optimizer": optim}
