"""Resumable training state: everything a run needs to continue from the exact next batch.

A state folder holds

- ``trainable.safetensors``: every parameter with ``requires_grad`` (LoRA adapters and
  ``modules_to_save``, or all trained weights for full fine-tuning), by name. Frozen weights are
  not saved: they come back from the base model (and ``init_weights``) as before.
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``. The optimizer's per-parameter state
  is keyed by position (one process, DDP) or by parameter name (FSDP's full state dict);
  :func:`load_state` converts between the two, so a job saved under one parallelism resumes under
  the other (another worker may take it over with another ``--nproc``).
- ``rng.pt``: Python ``random``, torch CPU and (when used) CUDA generator states.
- ``state.json``: position (``step``, ``epoch``, ``batch_in_epoch`` = the next batch to run), the
  names of the saved parameters, and whatever ``extra`` the recipe adds (cumulative tokens,
  last metrics, a fingerprint of the config and data). Written last.

An FSDP-sharded model saves its weights and optimizer state sharded instead, each rank writing
its own slices (``training.sharded_state``: same folder, ``shards/`` in place of the two files).
:func:`load_state` still loads this full format into a sharded model (each rank takes its shards
through ``torch.distributed.checkpoint.state_dict.set_state_dict``), so a job saved by one
process or DDP resumes under FSDP, and a sharded state resumes anywhere.

Writes are atomic: the folder is built as a hidden sibling and renamed into place; the previous
state is renamed aside first and removed after, and :func:`find_state` falls back to it if a
crash lands between the two renames.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
FORMAT_VERSION = 1
HOLD_ENV = "OPENFT_TEST_HOLD_STATE_WRITE"


@dataclass
class TrainState:
    step: int
    """Optimizer steps done."""
    epoch: int
    """1-based epoch of the next batch to run (``n_epochs + 1`` once training is done)."""
    batch_in_epoch: int
    """Index of the next batch in that epoch's batch order."""
    rng_states: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python and torch generator states (CUDA too when ``device`` is a CUDA device)."""
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    if "python" in states:
        random.setstate(_to_tuple(states["python"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(
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
    copied: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write the state atomically to ``directory`` (replacing an older one) and return it.
    ``copied``: trainable weights and optimizer state copied to CPU earlier
    (``async_save.snapshot``), written instead of reading ``model`` and ``optimizer``."""
    directory = Path(directory)
    tmp, _ = _siblings(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if copied is not None:
        weights, optimizer_state = copied
        trainable = {n: weights[n].contiguous() for n in names}
    else:
        params = dict(model.named_parameters())
        trainable = {n: params[n].detach().to("cpu").contiguous() for n in names}
        optimizer_state = optimizer.state_dict()
    save_file(trainable, str(tmp / "trainable.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    commit_state(
        tmp,
        directory,
        scheduler=scheduler,
        rng_states=rng_states,
        meta={
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "trainable": sorted(trainable),
            "extra": extra or {},
        },
    )
    return directory


def commit_state(
    tmp: Path,
    directory: Path,
    *,
    scheduler: Any,
    rng_states: dict[str, Any],
    meta: dict[str, Any],
    also_fsync: tuple[Path, ...] = (),
) -> None:
    """Finish a state written into ``tmp`` (either format): schedule, RNG and ``state.json`` last,
    everything fsynced, then swapped in for ``directory``. The old state is set aside before the
    rename, so a process killed at any line leaves one complete state for :func:`find_state`."""
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_states, tmp / "rng.pt")
    (tmp / STATE_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=1))
    for f in (*also_fsync, *tmp.iterdir()):
        if f.is_file():
            _fsync(f)
    _hold_if_asked(meta["step"])
    _, old = _siblings(directory)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def find_state(directory: Path) -> Path | None:
    """The complete state folder at ``directory`` (or its set-aside predecessor), if any."""
    directory = Path(directory)
    _, old = _siblings(directory)
    for candidate in (directory, old):
        if (candidate / STATE_FILE).exists():
            return candidate
    return None


def read_extra(directory: Path) -> dict[str, Any]:
    """The ``extra`` a state was saved with, without loading anything (to check it first)."""
    return dict(json.loads((Path(directory) / STATE_FILE).read_text()).get("extra", {}))


def load_state(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Load trainable weights, optimizer and scheduler state in place; return position and RNG.

    ``model`` must have the same trainable parameters (same names) as the one that was saved, and
    ``optimizer`` must have been built over them in ``named_parameters()`` order. An FSDP-sharded
    ``model`` takes its shards of the full tensors on every rank (each rank reads the folder).
    """
    directory = Path(directory)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    meta = checked_meta(directory, list(params))
    tensors = load_file(str(directory / "trainable.safetensors"))
    optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        for module in model.modules():  # into the shards, not weights a forward left gathered
            if isinstance(module, FSDPModule):
                module.reshard()

        set_state_dict(
            model,
            optimizer,
            model_state_dict=tensors,
            optim_state_dict=_optimizer_keyed(optimizer_state, list(params), by_name=True),
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
        optimizer.load_state_dict(_optimizer_keyed(optimizer_state, list(params), by_name=False))
    return position(directory, meta, scheduler)


def checked_meta(directory: Path, trainable: list[str]) -> dict[str, Any]:
    """``state.json`` of the state at ``directory``, refused unless its format is this one and it
    was saved for the ``trainable`` parameter names."""
    meta: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported training state format {meta.get('format_version')!r} in {directory}")
    if sorted(trainable) != meta["trainable"]:
        missing = sorted(set(meta["trainable"]) ^ set(trainable))[:5]
        raise ValueError(f"training state in {directory} was saved for other trainable weights: {missing}")
    return meta


def position(directory: Path, meta: dict[str, Any], scheduler: Any) -> TrainState:
    """Load the scheduler's state in place; the position and RNG states ``meta`` and the folder hold."""
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True))
    rng = torch.load(directory / "rng.pt", map_location="cpu", weights_only=True)
    return TrainState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_in_epoch=int(meta["batch_in_epoch"]),
        rng_states=rng,
        extra=dict(meta["extra"]),
    )


def _optimizer_keyed(state: dict[str, Any], names: list[str], *, by_name: bool) -> dict[str, Any]:
    """``state`` (an optimizer ``state_dict``) with its parameters named by position (what
    ``Optimizer.load_state_dict`` wants) or by name (what FSDP's full state dict holds). ``names``:
    the trainable parameters in ``named_parameters()`` order, the optimizer's own order."""
    index = {n: i for i, n in enumerate(names)}

    def key(k: Any) -> Any:
        if by_name:
            return names[k] if isinstance(k, int) else k
        return index[k] if isinstance(k, str) else k

    return {
        "state": {key(k): v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key(k) for k in g["params"]]} for g in state["param_groups"]],
    }


def remove_state(directory: Path) -> None:
    """Delete the state (and any half-written or set-aside copy)."""
    for d in (Path(directory), *_siblings(Path(directory))):
        shutil.rmtree(d, ignore_errors=True)


def _siblings(directory: Path) -> tuple[Path, Path]:
    return directory.with_name(f".{directory.name}.tmp"), directory.with_name(f".{directory.name}.old")


def _hold_if_asked(step: int) -> None:
    """Tests only: with ``OPENFT_TEST_HOLD_STATE_WRITE=<step>:<file>``, the save of that step's
    state creates ``<file>`` and stops here for good, its files written but not renamed into place,
    so a test can kill the process mid-write. Once: a restarted run (``<file>`` exists) goes on."""
    asked = os.environ.get(HOLD_ENV, "")
    if asked.partition(":")[0] == str(step) and not Path(asked.partition(":")[2]).exists():
        Path(asked.partition(":")[2]).touch()
        threading.Event().wait()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_tuple(x: Any) -> Any:
    """``random.setstate`` wants tuples all the way down (a round trip may hand back lists)."""
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x
