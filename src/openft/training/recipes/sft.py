"""Supervised fine-tuning: one readable loop, full weights or LoRA.

``run(cfg, examples, reporter)`` loads the model, renders every example once (images decoded
once, not per epoch), then runs ``ceil(n / batch_size) * n_epochs`` AdamW steps over
length-grouped, right-padded batches. The loss is the mean cross-entropy over assistant tokens
only. Every epoch ends with a servable checkpoint in ``output_dir/step-<N>/``; the last one is the
final model.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openft.adapters import apply_lora, merge, save_adapter
from openft.datasets.formats import ChatExample
from openft.errors import InvalidRequest, JobCancelled
from openft.models.loader import load_model, weights_kind, write_marker
from openft.models.render import Rendered, render_chat
from openft.training.collate import collate_sft, length_grouped_batches
from openft.training.config import TrainConfig
from openft.training.loss import sft_loss
from openft.training.reporter import Reporter

MAX_GRAD_NORM = 1.0
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


def run(cfg: TrainConfig, examples: Sequence[ChatExample], reporter: Reporter) -> TrainResult:
    if not examples:
        raise InvalidRequest("the training file has no examples", param="training_file")
    seed_everything(cfg.seed)
    model, processor = _build_model(cfg)
    device = next(model.parameters()).device
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # Render once: tokenization and image decoding are the slow part on CPU, and they never change.
    rendered = [_render(processor, ex, cfg.max_length) for ex in examples]
    empty = sum(1 for r in rendered if r.n_label_tokens == 0)
    if empty == len(rendered):
        raise InvalidRequest(
            "no example has an assistant message with weight 1 to train on", param="training_file"
        )
    if empty:
        reporter.on_message(
            f"{empty} examples have no trained tokens (weight 0 or truncated); they add context only"
        )
    lengths = [len(r.input_ids) for r in rendered]

    steps_per_epoch = math.ceil(len(rendered) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_then_linear(total_steps))
    reporter.on_message(
        f"training {sum(p.numel() for p in params):,} parameters on {len(rendered)} examples "
        f"({sum(lengths):,} tokens) for {cfg.n_epochs} epochs, {total_steps} steps"
    )

    rng = random.Random(cfg.seed)
    step = trained_tokens = 0
    metrics: dict[str, float | int] = {}
    checkpoints: list[Path] = []
    model.train()
    for epoch in range(1, cfg.n_epochs + 1):
        for batch_ids in length_grouped_batches(lengths, cfg.batch_size, rng):
            if reporter.should_stop():
                raise JobCancelled(f"stopped at step {step} of {total_steps}")
            batch = {
                k: v.to(device) for k, v in collate_sft([rendered[i] for i in batch_ids], pad_id).items()
            }
            labels = batch.pop("labels")
            logits = model(**batch).logits
            loss, accuracy = sft_loss(logits, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            trained_tokens += sum(lengths[i] for i in batch_ids)  # OpenAI bills every token, every epoch
            metrics = {
                "step": step,
                "total_steps": total_steps,
                "epoch": epoch,
                "train_loss": loss.item(),
                "train_mean_token_accuracy": accuracy.item(),
                "trained_tokens": trained_tokens,
            }
            reporter.on_step(metrics)

        weights_dir = _save_checkpoint(model, processor, cfg, step)
        checkpoints.append(weights_dir)
        reporter.on_checkpoint(weights_dir, step=step, epoch=epoch, metrics=metrics)
        for old in checkpoints[: -max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        checkpoints = checkpoints[-max(1, cfg.keep_checkpoints) :]

    return TrainResult(
        weights_dir=checkpoints[-1], steps=step, trained_tokens=trained_tokens, final_metrics=metrics
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional for the loop itself
        pass


def _build_model(cfg: TrainConfig) -> tuple[Any, Any]:
    """Base (or ``init_weights``) model made trainable: fresh LoRA, a continued adapter, or all weights."""
    model, processor = load_model(cfg.base_model, cfg.init_weights, device=cfg.device, trainable=True)
    continuing_adapter = cfg.init_weights is not None and weights_kind(cfg.init_weights) == "adapter"
    if cfg.lora is not None and not continuing_adapter:
        model = apply_lora(model, cfg.lora)
    elif cfg.lora is None and continuing_adapter:
        model = merge(model)  # full fine-tuning continues from base + adapter folded together
    if cfg.lora is None:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, processor


def _render(processor: Any, ex: ChatExample, max_length: int) -> Rendered:
    try:
        return render_chat(processor, ex.messages, tools=ex.tools, max_length=max_length)
    except InvalidRequest as e:
        raise InvalidRequest(f"line {ex.line}: {e.message}", param=e.param, code=e.code) from e


def _warmup_then_linear(total_steps: int):
    """Linear warm-up over the first 3% of steps, then linear decay to 10% of the peak rate."""
    warmup = max(1, round(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 1.0 - (1.0 - FINAL_LR_FRACTION) * min(1.0, progress)

    return factor


def _save_checkpoint(model: Any, processor: Any, cfg: TrainConfig, step: int) -> Path:
    """Write a servable folder (weights + processor + openft.json) atomically as ``step-<N>``."""
    target = Path(cfg.output_dir) / f"step-{step}"
    tmp = Path(cfg.output_dir) / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cfg.lora is not None:
        save_adapter(model, tmp)
        kind = "adapter"
    else:
        model.save_pretrained(tmp)
        kind = "full"
    processor.save_pretrained(tmp)
    write_marker(tmp, kind=kind, base_model=cfg.base_model)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
