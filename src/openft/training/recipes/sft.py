"""Supervised fine-tuning: one readable loop, full weights or LoRA.

``run(cfg, examples, reporter)`` loads the model, decides what trains (see ``training.trainable``),
renders every example once (images decoded once, not per epoch), then runs
``ceil(n / batch_size) * n_epochs`` AdamW steps over length-grouped, right-padded batches, each
optionally split into micro-batches whose gradients accumulate. The loss is the mean cross-entropy
over the batch's assistant tokens only.

Along the way:

- with ``valid_examples``, ``valid_loss`` / ``valid_mean_token_accuracy`` on a fixed sample every
  ``valid_every`` steps, and ``full_valid_*`` over all of them at each epoch end;
- every epoch ends with a servable checkpoint in ``output_dir/step-<N>/`` (the last one is the
  final model);
- resumable state goes to ``output_dir/state`` at epoch ends, every few steps, and right before
  stopping for a cancel or pause (``recipes.progress``). ``resume=True`` continues from it at the
  exact next batch: each epoch's batch order is a pure function of ``(seed, epoch)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch

from openft.adapters import apply_lora, merge
from openft.datasets.formats import ChatExample
from openft.errors import InvalidRequest
from openft.models.loader import load_model, resolve_device, weights_kind
from openft.models.render import Rendered, render_chat
from openft.training.collate import collate_sft, epoch_batches, micro_batches, target_tokens
from openft.training.config import TrainConfig
from openft.training.loss import sft_loss
from openft.training.recipes.progress import Progress, TrainResult, optimizer_and_schedule, resumable_state
from openft.training.reporter import Reporter
from openft.training.trainable import describe_trainable, lora_plan, set_full_trainable

MAX_GRAD_NORM = 1.0
VALID_SAMPLE_EXAMPLES = 32
"""Size of the fixed validation sample behind ``valid_loss`` (the same examples every time)."""
VALID_EVALS_PER_RUN = 10

T = TypeVar("T")


def run(
    cfg: TrainConfig,
    examples: Sequence[ChatExample],
    reporter: Reporter,
    *,
    valid_examples: Sequence[ChatExample] | None = None,
    resume: bool = False,
) -> TrainResult:
    if not examples:
        raise InvalidRequest("the training file has no examples", param="training_file")
    model, processor, device, pad_id, bf16, checkpointing, autocast = setup(cfg, reporter)

    # Render once: tokenization and image decoding are the slow part on CPU, and they never change.
    rendered = [_render(processor, ex, cfg.max_length) for ex in examples]
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
    valid = [_render(processor, ex, cfg.max_length, what="validation file ") for ex in valid_examples or ()]
    valid_sample = _fixed_sample(valid, VALID_SAMPLE_EXAMPLES, cfg.seed)
    lengths = [len(r.input_ids) for r in rendered]

    steps_per_epoch = math.ceil(len(rendered) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs
    valid_every = cfg.valid_every or max(
        1, min(steps_per_epoch, math.ceil(total_steps / VALID_EVALS_PER_RUN))
    )
    params, optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps)
    eval_batch = cfg.micro_batch_size or cfg.batch_size
    reporter.on_message(
        f"training on {len(rendered)} examples ({sum(lengths):,} tokens) for {cfg.n_epochs} epochs, "
        f"{total_steps} steps on {device.type} ({'bf16' if bf16 else 'fp32'}"
        f"{', gradient checkpointing' if checkpointing else ''}"
        f"{f', micro-batches of {cfg.micro_batch_size}' if cfg.micro_batch_size else ''})"
        + (f"; {len(valid)} validation examples, evaluated every {valid_every} steps" if valid else ""),
        once="training-plan",
    )

    fingerprint = _fingerprint(cfg, lengths)
    progress = Progress(cfg, reporter, model, optimizer, scheduler, device, fingerprint, total_steps)
    progress.resume(resumable_state(cfg, reporter, fingerprint, resume=resume))
    model.train()
    for epoch in range(progress.start_epoch, cfg.n_epochs + 1):
        batches = epoch_batches(lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        for b in progress.batches(epoch, len(batches)):
            progress.stop_if_asked(epoch, b)
            batch_ids = batches[b]

            # Gradient accumulation: each micro-batch's mean loss is weighted by its share of the
            # batch's target tokens, so the summed gradient equals the full batch's.
            n_targets = max(1, sum(target_tokens(rendered[i]) for i in batch_ids))
            loss_sum = correct = 0.0
            for chunk in micro_batches(batch_ids, cfg.micro_batch_size):
                batch = _to_device(collate_sft([rendered[i] for i in chunk], pad_id), device)
                labels = batch.pop("labels")
                share = sum(target_tokens(rendered[i]) for i in chunk) / n_targets
                with autocast():
                    logits = model(**batch, use_cache=False).logits
                loss, accuracy = sft_loss(logits, labels)
                (loss * share).backward()
                loss_sum += loss.item() * share
                correct += accuracy.item() * share
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            progress.step += 1
            progress.trained_tokens += sum(lengths[i] for i in batch_ids)  # OpenAI bills every epoch
            epoch_done = b == len(batches) - 1
            metrics: dict[str, float | int] = {
                "step": progress.step,
                "total_steps": total_steps,
                "epoch": epoch,
                "train_loss": loss_sum,
                "train_mean_token_accuracy": correct,
                "trained_tokens": progress.trained_tokens,
            }
            if valid and (progress.step % valid_every == 0 or epoch_done):
                v_loss, v_acc = _evaluate(model, valid_sample, pad_id, device, eval_batch, autocast)
                metrics |= {"valid_loss": v_loss, "valid_mean_token_accuracy": v_acc}
            if valid and epoch_done:
                v_loss, v_acc = _evaluate(model, valid, pad_id, device, eval_batch, autocast)
                metrics |= {"full_valid_loss": v_loss, "full_valid_mean_token_accuracy": v_acc}
            progress.metrics = metrics
            reporter.on_step(metrics)
            if not epoch_done:
                progress.save_if_due(epoch, b + 1)
        progress.end_epoch(epoch, processor)
    return progress.finish()


class Setup(NamedTuple):
    model: Any
    processor: Any
    device: torch.device
    pad_id: int
    bf16: bool
    checkpointing: bool
    autocast: Callable[[], Any]
    """bf16 autocast on devices that have it, else a no-op."""


def setup(cfg: TrainConfig, reporter: Reporter) -> Setup:
    """Seeded, on its device, with what trains decided and announced: where every recipe starts."""
    seed_everything(cfg.seed)
    device = torch.device(resolve_device(cfg.device))
    bf16, checkpointing = _precision(cfg, device)
    model, processor = _build_model(cfg, bf16=bf16, gradient_checkpointing=checkpointing)
    reporter.on_message(describe_trainable(model, lora=cfg.lora is not None), once="trainable")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    autocast = functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    return Setup(model, processor, device, pad_id, bf16, checkpointing, autocast)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the loop itself
        pass


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """``(bf16, gradient_checkpointing)``: ``None`` means on for CUDA (bf16 only where the GPU
    supports it). CPU always trains in fp32: its bf16 autocast is slow and only loses precision."""
    cuda = device.type == "cuda"
    bf16 = cuda and (cfg.bf16 if cfg.bf16 is not None else torch.cuda.is_bf16_supported())
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else cuda
    return bf16, checkpointing


def _build_model(cfg: TrainConfig, *, bf16: bool, gradient_checkpointing: bool) -> tuple[Any, Any]:
    """Base (or ``init_weights``) model made trainable: fresh LoRA, a continued adapter, or full weights.

    LoRA under bf16 loads the frozen base in bf16 (half the memory) and keeps every trainable
    weight in fp32; full fine-tuning keeps fp32 master weights and relies on autocast.
    """
    dtype = torch.bfloat16 if bf16 and cfg.lora is not None else None
    model, processor = load_model(
        cfg.base_model, cfg.init_weights, device=cfg.device, dtype=dtype, trainable=True
    )
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it works with frozen embeddings.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    continuing_adapter = cfg.init_weights is not None and weights_kind(cfg.init_weights) == "adapter"
    if cfg.lora is not None and not continuing_adapter:
        plan = lora_plan(
            model, cfg.lora, train_vision_tower=cfg.train_vision_tower, train_projector=cfg.train_projector
        )
        model = apply_lora(model, plan)
    elif cfg.lora is None and continuing_adapter:
        model = merge(model)  # full fine-tuning continues from base + adapter folded together
    if cfg.lora is None:
        set_full_trainable(model, train_vision_tower=cfg.train_vision_tower)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # AdamW on bf16 weights loses small updates
    model.train()
    return model, processor


def _render(processor: Any, ex: ChatExample, max_length: int, *, what: str = "") -> Rendered:
    try:
        return render_chat(processor, ex.messages, tools=ex.tools, max_length=max_length)
    except InvalidRequest as e:
        raise InvalidRequest(f"{what}line {ex.line}: {e.message}", param=e.param, code=e.code) from e


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _fixed_sample(items: list[T], n: int, seed: int) -> list[T]:
    """The same ``n`` items every call (seeded), in their original order."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(random.Random(f"openft-valid:{seed}").sample(range(len(items)), n))]


def _evaluate(
    model: Any,
    items: list[Rendered],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    autocast: Callable[[], torch.autocast],
) -> tuple[float, float]:
    """Token-weighted loss and accuracy over ``items`` (no dropout, no gradients)."""
    model.eval()
    loss_sum = correct = 0.0
    n_total = 0
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                chunk = items[i : i + batch_size]
                n = sum(target_tokens(r) for r in chunk)
                if n == 0:
                    continue
                batch = _to_device(collate_sft(chunk, pad_id), device)
                labels = batch.pop("labels")
                with autocast():
                    logits = model(**batch, use_cache=False).logits
                loss, accuracy = sft_loss(logits, labels)
                loss_sum += loss.item() * n
                correct += accuracy.item() * n
                n_total += n
    finally:
        model.train()
    return loss_sum / max(1, n_total), correct / max(1, n_total)


def _fingerprint(cfg: TrainConfig, lengths: list[int]) -> str:
    """What must not change between a run and its resumption: data, batch order and schedule."""
    what = {
        "lengths": lengths,
        "batch_size": cfg.batch_size,
        "n_epochs": cfg.n_epochs,
        "seed": cfg.seed,
        "learning_rate": cfg.learning_rate,
        "lora": cfg.lora is not None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
