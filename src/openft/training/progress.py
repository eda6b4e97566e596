"""What the SFT and DPO loops share around their steps, so both pause, crash and resume alike.

:class:`Progress` knows where a run stands (step, next epoch and batch, tokens, last metrics), and
owns its resumable state in ``output_dir/state`` (``training.state``) and its checkpoint folders
``output_dir/step-<N>/``:

- state is saved every few steps (about 5% of the run, at most every 30 s), right before a cancel
  or pause, and at each epoch end *before* that epoch's checkpoint is announced, so a crash at any
  moment resumes at the exact next batch and never retrains an epoch or loses its checkpoint;
- the periodic saves are written in the background (``cfg.async_state_save``, see
  ``training.async_save``; under FSDP every rank's shards, ``training.sharded_state``) while
  training goes on; every other save, and the end of the run, first waits for that write, so at
  most one is in flight and a failed one fails the job;
- under FSDP the epoch's servable checkpoint is gathered and written a file at a time
  (``training.fsdp_io.save_servable``): rank 0 never holds the whole model;
- the optimizer, warm-up and decay schedule are built here too, in ``named_parameters()`` order,
  which is the order a saved optimizer state refers to.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openft.adapters import save_adapter
from openft.errors import JobCancelled
from openft.models.loader import write_marker
from openft.training import distributed, fsdp_io
from openft.training.async_save import StateWriter, snapshot
from openft.training.config import TrainConfig
from openft.training.reporter import Reporter
from openft.training.sharded_state import is_sharded, load_sharded_state, save_sharded_state
from openft.training.state import (
    capture_rng,
    find_state,
    load_state,
    read_extra,
    remove_state,
    restore_rng,
    save_state,
)

STATE_DIR = "state"
STATE_FRACTION = 0.05
"""Periodic state saves about every this fraction of the run's steps..."""
STATE_MIN_SECONDS = 30.0
"""...but not more often than this: a save writes every trained weight and the optimizer."""
WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.1


@dataclass
class TrainResult:
    weights_dir: Path
    """The last epoch's checkpoint folder: the fine-tuned model."""
    steps: int
    trained_tokens: int
    """All tokens (prompt + reply + image tokens) of every example, summed over epochs."""
    final_metrics: dict[str, float | int] = field(default_factory=dict)


def resumable_state(cfg: TrainConfig, reporter: Reporter, fingerprint: str, *, resume: bool) -> Path | None:
    """The saved state to continue from: none unless ``resume``, and none (with a warning) when it
    was saved under other data or settings (``fingerprint``: what must not change between runs)."""
    found = find_state(Path(cfg.output_dir) / STATE_DIR) if resume else None
    if found is not None and read_extra(found).get("fingerprint") != fingerprint:
        reporter.on_message(
            "the saved training state belongs to other data or settings; starting from the beginning",
            level="warn",
        )
        return None
    return found


def optimizer_and_schedule(
    model: torch.nn.Module, cfg: TrainConfig, total_steps: int
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters, and linear warm-up then decay (``warmup_then_linear``).
    On CUDA the fused kernel (``cfg.fused_optimizer``; same update, one launch for all tensors)."""
    if distributed.sharded(model):
        distributed.reshard(model)  # the shards, not weights a forward left gathered
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    on_cuda = bool(params) and params[0].is_cuda
    fused = (cfg.fused_optimizer if cfg.fused_optimizer is not None else on_cuda) or None
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear(total_steps))
    return params, optimizer, scheduler


def warmup_then_linear(total_steps: int):  # type: ignore[no-untyped-def]
    """Linear warm-up over the first 3% of steps, then linear decay to 10% of the peak rate."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 1.0 - (1.0 - FINAL_LR_FRACTION) * min(1.0, progress)

    return factor


@dataclass
class Progress:
    cfg: TrainConfig
    reporter: Reporter
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    fingerprint: str
    total_steps: int
    step: int = 0
    """Optimizer steps done."""
    start_epoch: int = 1
    start_batch: int = 0
    """Where this run starts: the next batch after a saved state, else the very first."""
    trained_tokens: int = 0
    metrics: dict[str, float | int] = field(default_factory=dict)
    """The last step's metrics (an epoch end's become its checkpoint's)."""
    checkpoints: list[Path] = field(default_factory=list)
    writer: StateWriter = field(default_factory=StateWriter)
    """Where periodic saves are written in the background; the recipe closes it however it ends."""
    _saved_step: int = 0
    _saved_at: float = 0.0

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    def resume(self, found: Path | None) -> None:
        """Continue from ``found`` (see :func:`resumable_state`), or start afresh when it is None."""
        if found is not None:
            load = load_sharded_state if is_sharded(found) else load_state  # either, under any parallelism
            saved = load(found, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
            restore_rng(saved.rng_states)
            self.step, self.start_epoch, self.start_batch = saved.step, saved.epoch, saved.batch_in_epoch
            self.trained_tokens, self.metrics = saved.extra["trained_tokens"], saved.extra["metrics"]
            self.reporter.on_message(
                f"Job resumed at step {self.step} of {self.total_steps} "
                f"(epoch {self.start_epoch}, batch {self.start_batch + 1})"
            )
        self.checkpoints = _existing_checkpoints(self.output_dir, up_to=self.step)
        if found is not None and self.start_batch == 0 and self._newest_checkpoint_step() == self.step:
            # Stopped right after an epoch end: record its checkpoint (again; recording is idempotent).
            self._announce_checkpoint(self.start_epoch - 1)
        self._saved_step, self._saved_at = self.step, time.monotonic()

    def take_step(self, tokens: int) -> int:
        """An optimizer step over ``tokens`` tokens (prompt, reply and image tokens: OpenAI bills
        every epoch) was taken; returns its number, counting from 1."""
        self.step += 1
        self.trained_tokens += tokens
        return self.step

    def record_step(
        self, metrics: dict[str, float | int], *, epoch: int, next_batch: int, epoch_done: bool
    ) -> None:
        """Report the step just taken: ``metrics`` plus ``step``, ``total_steps``, ``epoch`` and the
        cumulative ``trained_tokens``, kept as the last metrics (an epoch end's become its
        checkpoint's); then save state when due (an epoch end saves in :meth:`end_epoch`)."""
        self.metrics = {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": epoch,
            **metrics,
            "trained_tokens": self.trained_tokens,
        }
        self.reporter.on_step(self.metrics)
        if not epoch_done:
            self.save_if_due(epoch, next_batch)

    def batches(self, epoch: int, n_batches: int) -> range:
        """Indices of the batches of ``epoch`` still to run."""
        return range(self.start_batch if epoch == self.start_epoch else 0, n_batches)

    def stop_if_asked(self, epoch: int, batch: int) -> None:
        """At a step boundary: a cancel or pause saves the state (a pause keeps its progress) and stops."""
        if self.reporter.should_stop():
            self._save(epoch, batch)
            raise JobCancelled(f"stopped at step {self.step} of {self.total_steps}")

    def save_if_due(self, epoch: int, next_batch: int) -> None:
        self.writer.check()
        every = (
            self.cfg.state_every_steps
            if self.cfg.state_every_steps is not None
            else max(1, math.ceil(STATE_FRACTION * self.total_steps))
        )
        min_seconds = STATE_MIN_SECONDS if self.cfg.state_every_steps is None else 0.0
        due = self.step - self._saved_step >= every and time.monotonic() - self._saved_at >= min_seconds
        if distributed.sharded(self.model):  # every rank writes: rank 0's clock decides for all
            due = distributed.agree(due)
        if due:
            self._save(epoch, next_batch, background=self.cfg.async_state_save)

    def end_epoch(self, epoch: int, processor: Any) -> None:
        """Write the epoch's servable checkpoint, save the state after it, then announce it."""
        self.writer.wait()  # a failed background save fails the job before a checkpoint is written
        if distributed.sharded(self.model):  # every rank gathers, rank 0 writes a file at a time
            self.checkpoints.append(_save_sharded_checkpoint(self.model, processor, self.cfg, self.step))
        elif distributed.is_main():
            self.checkpoints.append(_save_checkpoint(self.model, processor, self.cfg, self.step))
        else:  # other ranks only keep track of it (rank 0 writes every file)
            self.checkpoints.append(_checkpoint_dir(self.cfg, self.step))
        self._save(epoch + 1, 0)
        self._announce_checkpoint(epoch)

    def finish(self) -> TrainResult:
        """Done: the last checkpoint is the result; the optimizer state is no longer needed."""
        self.writer.wait()
        if distributed.is_main():
            remove_state(self.output_dir / STATE_DIR)
        return TrainResult(
            weights_dir=self.checkpoints[-1],
            steps=self.step,
            trained_tokens=self.trained_tokens,
            final_metrics=self.metrics,
        )

    def _save(self, epoch: int, batch_in_epoch: int, *, background: bool = False) -> None:
        """Rank 0 saves (one process, DDP); under FSDP every rank writes its shards
        (``training.sharded_state``). Every rank loads the state on resume.
        ``background``: copy the state to CPU and write it on ``writer``'s thread; a synchronous
        save first waits for a background one (never two on one folder)."""
        sharded = distributed.sharded(self.model)
        if not sharded and not distributed.is_main():
            return
        position = {
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "rng_states": capture_rng(self.device),
            "extra": {
                "fingerprint": self.fingerprint,
                "trained_tokens": self.trained_tokens,
                "metrics": dict(self.metrics),
            },
        }
        directory = self.output_dir / STATE_DIR
        if background and sharded:
            self.writer.wait()
            save_sharded_state(
                directory,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                writer=self.writer,
                **position,
            )
        elif background:
            copied, scheduler = snapshot(self.model, self.optimizer, self.scheduler)
            write = functools.partial(
                save_state,
                directory,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=scheduler,
                copied=copied,
                **position,
            )
            self.writer.submit(write, f"step {self.step}")
        else:
            self.writer.wait()
            (save_sharded_state if sharded else save_state)(
                directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, **position
            )
        self._saved_step, self._saved_at = self.step, time.monotonic()

    def _announce_checkpoint(self, epoch: int) -> None:
        """Record the newest checkpoint, then drop local folders beyond those kept."""
        self.reporter.on_checkpoint(self.checkpoints[-1], step=self.step, epoch=epoch, metrics=self.metrics)
        keep = max(1, self.cfg.keep_checkpoints)
        for old in self.checkpoints[:-keep]:
            if distributed.is_main():
                shutil.rmtree(old, ignore_errors=True)
        self.checkpoints = self.checkpoints[-keep:]

    def _newest_checkpoint_step(self) -> int | None:
        return int(self.checkpoints[-1].name.removeprefix("step-")) if self.checkpoints else None


def _existing_checkpoints(output_dir: Path, *, up_to: int) -> list[Path]:
    """Checkpoint folders a previous (interrupted) run already wrote, oldest first."""
    found = []
    for p in output_dir.glob("step-*") if output_dir.exists() else ():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir() and int(m.group(1)) <= up_to:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _checkpoint_dir(cfg: TrainConfig, step: int) -> Path:
    return Path(cfg.output_dir) / f"step-{step}"


def _save_checkpoint(model: Any, processor: Any, cfg: TrainConfig, step: int) -> Path:
    """Write a servable folder (weights + processor + openft.json) atomically as ``step-<N>``."""
    tmp = _checkpoint_tmp(cfg, step)
    if cfg.lora is not None:
        save_adapter(model, tmp)
    else:
        model.save_pretrained(tmp)
    return _finish_checkpoint(tmp, processor, cfg, step)


def _save_sharded_checkpoint(model: Any, processor: Any, cfg: TrainConfig, step: int) -> Path:
    """:func:`_save_checkpoint` for an FSDP-sharded model (full fine-tuning), a collective: every
    rank gathers one tensor at a time and rank 0 writes them a file at a time
    (``fsdp_io.save_servable``), into the same ordinary Hugging Face folder a single process
    writes (split into several files when the weights exceed one). Configuration files come from
    ``save_pretrained`` itself, given no weights."""
    main = distributed.is_main()
    tmp = _checkpoint_tmp(cfg, step) if main else _checkpoint_dir(cfg, step)  # only rank 0 writes
    if main:
        model.save_pretrained(tmp, state_dict={})  # config.json, generation_config.json
        for written in tmp.glob("model*.safetensors*"):
            written.unlink()  # its empty weights file
    if not fsdp_io.save_servable(model, tmp):  # names that need more than renaming: gather whole
        weights = distributed.full_state(model)
        if main:
            model.save_pretrained(tmp, state_dict=weights)
        del weights
    return _finish_checkpoint(tmp, processor, cfg, step) if main else tmp


def _checkpoint_tmp(cfg: TrainConfig, step: int) -> Path:
    tmp = Path(cfg.output_dir) / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish_checkpoint(tmp: Path, processor: Any, cfg: TrainConfig, step: int) -> Path:
    """Processor files and the ``openft.json`` marker into ``tmp``, then renamed into place."""
    target = _checkpoint_dir(cfg, step)
    processor.save_pretrained(tmp)
    write_marker(tmp, kind="adapter" if cfg.lora is not None else "full", base_model=cfg.base_model)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
