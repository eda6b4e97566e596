"""Supervised fine-tuning: one readable loop, full weights or LoRA.

``run(cfg, examples, reporter)`` loads the model, decides what trains (see ``training.trainable``),
renders every example once (images decoded once, not per epoch), then runs
``ceil(n / batch_size) * n_epochs`` AdamW steps over length-grouped batches, each optionally split
into micro-batches whose gradients accumulate. The loss is the mean cross-entropy over the batch's
assistant tokens only.

How a step runs (``TrainConfig``'s speed switches, each giving the same losses up to float error):
text micro-batches can be packed into one padding-free row (``cfg.packing``, by default with
flash-attention only; image batches are padded), the ``lm_head`` runs only where a labelled token is predicted (``cfg.labelled_logits``),
the loss never holds full-vocabulary logits (``cfg.loss_kernel``: chunked, or Liger's fused kernel on CUDA),
the next micro-batches are collated on a background thread and copied from pinned memory
(``cfg.prefetch``), and the loss and accuracy sums stay on the device until the step's metrics.

Along the way:

- with ``valid_examples``, ``valid_loss`` / ``valid_mean_token_accuracy`` on a fixed sample every
  ``valid_every`` steps, and ``full_valid_*`` over all of them at each epoch end;
- every epoch ends with a servable checkpoint in ``output_dir/step-<N>/`` (the last one is the
  final model);
- resumable state goes to ``output_dir/state`` at epoch ends, every few steps, and right before
  stopping for a cancel or pause (``training.progress``). ``resume=True`` continues from it at the
  exact next batch: each epoch's batch order is a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from openft.datasets.formats import ChatExample
from openft.errors import InvalidRequest
from openft.models.render import Rendered, render_chat
from openft.training import distributed
from openft.training.async_save import StateWriter
from openft.training.collate import epoch_batches, prefetched, target_tokens
from openft.training.config import TrainConfig
from openft.training.loss import labelled_loss
from openft.training.prerender import render_all, render_workers
from openft.training.progress import Progress, TrainResult, optimizer_and_schedule, resumable_state
from openft.training.reporter import Reporter
from openft.training.setup import MAX_GRAD_NORM, Feeder, fixed_sample, run_fingerprint, setup, valid_every

VALID_SAMPLE_EXAMPLES = 32
"""Size of the fixed validation sample behind ``valid_loss`` (the same examples every time)."""
PREFETCH_MICRO_BATCHES = 2
"""Micro-batches collated ahead on the prefetch thread (``cfg.prefetch``)."""


def run(
    cfg: TrainConfig,
    examples: Sequence[ChatExample],
    reporter: Reporter,
    *,
    valid_examples: Sequence[ChatExample] | None = None,
    resume: bool = False,
) -> TrainResult:
    # However the run ends (done, stopped, crashed), a background state write finishes first: it is
    # what a restart resumes from, and its failure must fail the job.
    with StateWriter() as writer:
        return _train(cfg, examples, reporter, writer, valid_examples=valid_examples, resume=resume)


def _train(
    cfg: TrainConfig,
    examples: Sequence[ChatExample],
    reporter: Reporter,
    writer: StateWriter,
    *,
    valid_examples: Sequence[ChatExample] | None,
    resume: bool,
) -> TrainResult:
    if not examples:
        raise InvalidRequest("the training file has no examples", param="training_file")
    model, processor, device, _, bf16, checkpointing, _, feeder = setup(cfg, reporter)

    # Render once: tokenization and image decoding are the slow part on CPU, and they never change.
    # On several processes; pixels kept in the dtype the model will see (bf16 under bf16 autocast).
    workers = render_workers(cfg.render_workers, len(examples) + len(valid_examples or ()))
    pixel_dtype = torch.bfloat16 if bf16 else None
    rendered = render_all(
        functools.partial(_render, processor, max_length=cfg.max_length),
        examples,
        workers=workers,
        pixel_dtype=pixel_dtype,
    )
    empty = sum(1 for r in rendered if r.n_label_tokens == 0)
    if empty == len(rendered):
        raise InvalidRequest(
            "no example has an assistant message with weight 1 to train on", param="training_file"
        )
    if empty:
        reporter.on_message(
            f"{empty} examples have no trained tokens (weight 0 or truncated); they add context only",
            once="untrained-examples",
        )
    valid = render_all(
        functools.partial(_render, processor, max_length=cfg.max_length, what="validation file "),
        valid_examples or (),
        workers=workers,
        pixel_dtype=pixel_dtype,
    )
    valid_sample = fixed_sample(valid, VALID_SAMPLE_EXAMPLES, cfg.seed)
    if feeder.vision is not None:  # size the frozen-feature cache for every image the run will see
        feeder.vision.admit([*rendered, *valid], reporter)
    lengths = [len(r.input_ids) for r in rendered]
    if cfg.parallelism == "fsdp":  # before the optimizer, which must see the shards
        distributed.shard(model, device, vision_blocks=all(r.vision for r in rendered), bf16=bf16)
    lockstep = distributed.sharded(model)  # every forward/backward is a collective: ranks keep pace

    steps_per_epoch = math.ceil(len(rendered) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs
    eval_every = valid_every(cfg, steps_per_epoch, total_steps)
    params, optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps)
    eval_batch = cfg.micro_batch_size or cfg.batch_size
    reporter.on_message(
        f"training on {len(rendered)} examples ({sum(lengths):,} tokens) for {cfg.n_epochs} epochs, "
        f"{total_steps} steps on {device.type} ({'bf16' if bf16 else 'fp32'}"
        f"{', gradient checkpointing' if checkpointing else ''}"
        f"{f', micro-batches of {cfg.micro_batch_size}' if cfg.micro_batch_size else ''}"
        f"{', packed' if feeder.packing else ''}, {feeder.loss_kernel} loss)"
        + (f"; {len(valid)} validation examples, evaluated every {eval_every} steps" if valid else ""),
        once="training-plan",
    )

    fingerprint = run_fingerprint(cfg, lengths)
    progress = Progress(
        cfg, reporter, model, optimizer, scheduler, device, fingerprint, total_steps, writer=writer
    )
    progress.resume(resumable_state(cfg, reporter, fingerprint, resume=resume))
    model.train()
    ddp = distributed.wrap(model, device)  # the model itself on one process
    ahead = PREFETCH_MICRO_BATCHES if cfg.prefetch else 0
    for epoch in range(progress.start_epoch, cfg.n_epochs + 1):
        batches = epoch_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        todo = progress.batches(epoch, len(batches))
        # This rank's part of each batch, in micro-batches (weight-0 stand-ins where it has none).
        mine = {
            b: distributed.rank_micro_batches(batches[b], cfg.micro_batch_size, lockstep=lockstep)
            for b in todo
        }
        chunks = [c for b in todo for c, _ in mine[b]]
        feed = prefetched(lambda c: feeder.collate([rendered[i] for i in c]), chunks, ahead=ahead)
        with contextlib.closing(feed):
            for b in todo:
                progress.stop_if_asked(epoch, b)
                batch_ids = batches[b]

                # Gradient accumulation: each micro-batch's mean loss is weighted by its share of the
                # batch's target tokens, so the summed gradient equals the full batch's. On N
                # processes each rank takes its part of the batch (an idle rank runs one example at
                # weight 0 to join the reduction) and scales by N, since DDP and FSDP average what
                # the shares already sum. Sums stay on the device: one host sync per step, for the metrics.
                n_targets = max(1, sum(target_tokens(rendered[i]) for i in batch_ids))
                sums = torch.zeros(2, device=device)
                for k, (chunk, counts) in enumerate(mine[b]):
                    share = sum(target_tokens(rendered[i]) for i in chunk) / n_targets if counts else 0.0
                    with distributed.accumulating(ddp, last=k == len(mine[b]) - 1):
                        loss, accuracy = labelled_loss(feeder.forward(ddp, next(feed)))
                        (loss * share * distributed.world_size()).backward()
                    sums += torch.stack([loss.detach(), accuracy]) * share
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step = progress.take_step(sum(lengths[i] for i in batch_ids))
                epoch_done = b == len(batches) - 1
                loss_sum, correct = distributed.all_sum(*sums.tolist())
                metrics: dict[str, float | int] = {
                    "train_loss": loss_sum,
                    "train_mean_token_accuracy": correct,
                }
                evaluating = valid and (distributed.is_main() or lockstep)  # only rank 0 reports
                if evaluating and (step % eval_every == 0 or epoch_done):
                    v_loss, v_acc = _evaluate(model, valid_sample, feeder, eval_batch)
                    metrics |= {"valid_loss": v_loss, "valid_mean_token_accuracy": v_acc}
                if evaluating and epoch_done:
                    v_loss, v_acc = _evaluate(model, valid, feeder, eval_batch)
                    metrics |= {"full_valid_loss": v_loss, "full_valid_mean_token_accuracy": v_acc}
                progress.record_step(metrics, epoch=epoch, next_batch=b + 1, epoch_done=epoch_done)
        progress.end_epoch(epoch, processor)
    return progress.finish()


def _render(processor: Any, ex: ChatExample, max_length: int, *, what: str = "") -> Rendered:
    try:
        return render_chat(processor, ex.messages, tools=ex.tools, max_length=max_length)
    except InvalidRequest as e:
        raise InvalidRequest(f"{what}line {ex.line}: {e.message}", param=e.param, code=e.code) from e


def _evaluate(model: Any, items: list[Rendered], feeder: Feeder, batch_size: int) -> tuple[float, float]:
    """Token-weighted loss and accuracy over ``items`` (no dropout, no gradients, one host sync)."""
    model.eval()
    sums = torch.zeros(2, device=feeder.device)
    n_total = 0
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                n = sum(target_tokens(r) for r in chunk)
                if n == 0:
                    continue
                loss, accuracy = labelled_loss(feeder.forward(model, feeder.collate(chunk)))
                sums += torch.stack([loss, accuracy]) * n
                n_total += n
    finally:
        model.train()
    loss_sum, correct = sums.tolist()
    return loss_sum / max(1, n_total), correct / max(1, n_total)
