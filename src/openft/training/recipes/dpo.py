"""Preference fine-tuning (sigmoid DPO): one readable loop, full weights or LoRA.

``run(cfg, examples, reporter, beta=...)`` renders every pair once as two conversations, prompt +
preferred and prompt + non-preferred (only the reply and its end-of-turn token are labelled; images
may sit in the prompt), and stacks both sides of a batch into one right-padded batch so a single
forward pass scores them. The loss is ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``
on summed reply log-probs (see ``training.loss.dpo_loss``). Every epoch ends with a servable
checkpoint in ``output_dir/step-<N>/``, exactly like SFT; the last one is the final model.

The reference model, without a second copy of the weights
-----------------------------------------------------------
DPO measures how far the policy moved from a frozen reference. A second model would double the
memory, so the reference is always the policy's own starting point, obtained one of two ways:

- **Adapter disabled** (LoRA from the bare base, or LoRA on top of an ``ft:`` model's *full*
  weights): the base weights never train, so ``model.disable_adapter()`` under ``no_grad`` *is* the
  starting model, computed on the fly each step (one extra forward pass, no backward).
- **Precomputed** (full fine-tuning, from the base or from any ``ft:`` model; LoRA *continuing* an
  ``ft:`` model's adapter): the weights that define the reference move, so before the first step
  the starting model scores every training and validation pair once and the log-probs are kept as
  an ``(n_pairs, 2)`` tensor. Costs one forward pass over the data, and the reference can never
  drift.

Resuming works exactly as in SFT (``resume=True``; state in ``output_dir/state`` at epoch ends,
every few steps and right before a cancel or pause; the exact next batch). A precomputed reference
is also written once, before the first step, to ``output_dir/state-reference.safetensors``: a
resumed run reuses the *starting* model's log-probs instead of rescoring with trained weights (if
that file is missing, it rescores the freshly loaded starting model before loading the state).

Why LoRA continuing an adapter is precomputed, not "merge, then a fresh LoRA": OpenAI's flow is
SFT first, then DPO from that ``ft:`` model, so the reference must be the SFT model. With its
adapter still attached, ``disable_adapter()`` would give the *base*, the wrong reference. Merging
the SFT adapter and stacking a fresh LoRA would fix the reference, but the new adapter would then
be relative to the merged weights: the checkpoint folder (an adapter whose ``openft.json`` names
the base model) would serve as base + DPO delta, silently dropping the SFT delta. Continuing the
SFT adapter itself, as SFT does, keeps every checkpoint a small adapter over the base that serves
correctly, and the precomputed reference is exactly the SFT model.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openft.datasets.formats import PreferenceExample
from openft.errors import InvalidRequest
from openft.models.loader import weights_kind
from openft.models.render import Rendered, render_chat
from openft.training import distributed
from openft.training.async_save import StateWriter
from openft.training.collate import collate_preference, epoch_batches
from openft.training.config import TrainConfig
from openft.training.loss import Scores, dpo_loss, dpo_metrics, labelled_logprobs
from openft.training.prerender import render_all, render_workers
from openft.training.progress import Progress, TrainResult, optimizer_and_schedule, resumable_state
from openft.training.reporter import Reporter
from openft.training.setup import (
    MAX_GRAD_NORM,
    Feeder,
    fixed_sample,
    run_fingerprint,
    setup,
    valid_every,
)

Pair = tuple[Rendered, Rendered]
"""(prompt + preferred, prompt + non-preferred), rendered."""

VALID_SAMPLE_PAIRS = 16
"""Pairs in the fixed validation sample behind the periodic ``valid_*`` metrics."""
REFERENCE_FILE = "state-reference.safetensors"
"""Next to ``STATE_DIR`` in ``output_dir``: the precomputed reference log-probs of the *starting*
model, written once before the first step so a resumed run never rescores with trained weights."""


@dataclass(frozen=True)
class Scorer:
    """What scoring a chunk of pairs needs besides the pairs: the model and how to run it."""

    model: Any
    pad_id: int
    device: torch.device
    beta: float
    feeder: Feeder
    """Runs a batch (bf16 autocast or not, labelled-only logits or not); the reference is scored
    exactly like the policy."""


def run(
    cfg: TrainConfig,
    examples: Sequence[PreferenceExample],
    reporter: Reporter,
    *,
    beta: float,
    valid_examples: Sequence[PreferenceExample] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train with DPO; ``resume=True`` continues from ``output_dir/state`` exactly like ``sft.run``."""
    with StateWriter() as writer:  # as in ``sft.run``: the last background state write finishes first
        return _train(
            cfg, examples, reporter, writer, beta=beta, valid_examples=valid_examples, resume=resume
        )


def _train(
    cfg: TrainConfig,
    examples: Sequence[PreferenceExample],
    reporter: Reporter,
    writer: StateWriter,
    *,
    beta: float,
    valid_examples: Sequence[PreferenceExample] | None,
    resume: bool,
) -> TrainResult:
    if not examples:
        raise InvalidRequest("the training file has no examples", param="training_file")
    if not beta > 0:
        raise InvalidRequest(f"beta must be > 0, got {beta}", param="hyperparameters.beta")
    model, processor, device, pad_id, bf16, checkpointing, _, feeder = setup(cfg, reporter)
    scorer = Scorer(model=model, pad_id=pad_id, device=device, beta=beta, feeder=feeder)

    # Render once: tokenization and image decoding are the slow part on CPU, and they never change.
    # On several processes; pixels kept in the dtype the model will see (bf16 under bf16 autocast).
    workers = render_workers(cfg.render_workers, len(examples) + len(valid_examples or ()))
    pixel_dtype = torch.bfloat16 if bf16 else None
    pairs = render_all(
        functools.partial(_render_pair, processor, max_length=cfg.max_length, where="line"),
        examples,
        workers=workers,
        pixel_dtype=pixel_dtype,
    )
    valid = render_all(
        functools.partial(_render_pair, processor, max_length=cfg.max_length, where="validation_file line"),
        valid_examples or (),
        workers=workers,
        pixel_dtype=pixel_dtype,
    )
    if feeder.vision is not None:  # size the frozen-feature cache (both sides share their images)
        feeder.vision.admit([r for p in (*pairs, *valid) for r in p], reporter)
    if cfg.parallelism == "fsdp":  # before scoring the reference and building the optimizer
        distributed.shard(model, device, vision_blocks=all(c.vision for c, _ in pairs), bf16=bf16)
    lockstep = distributed.sharded(model)  # every forward/backward is a collective: ranks keep pace
    # Both sides share one padded batch, so the longer side sets a pair's cost.
    widths = [max(len(c.input_ids), len(r.input_ids)) for c, r in pairs]
    tokens = [len(c.input_ids) + len(r.input_ids) for c, r in pairs]  # what count_tokens bills
    chunk = cfg.micro_batch_size or cfg.batch_size  # pairs per forward pass (2x rows)

    output_dir = Path(cfg.output_dir)
    fingerprint = _dpo_fingerprint(cfg, pairs, valid, beta)
    found = resumable_state(cfg, reporter, fingerprint, resume=resume)

    # The reference comes before any saved state is loaded: the model is still the starting model.
    ref_table = valid_ref = None
    disabled_adapter = reference_is_disabled_adapter(cfg)
    if not disabled_adapter:
        saved_ref = _read_reference(output_dir / REFERENCE_FILE, fingerprint) if found else None
        if saved_ref is not None:
            ref_table, valid_ref = saved_ref
        else:
            reporter.on_message(
                f"scoring {len(pairs) + len(valid)} pairs with the starting model: the DPO reference, "
                "computed once because the weights that define it are about to train",
                once="dpo-reference",
            )
            ref_table = reference_logps(scorer, pairs, chunk)
            valid_ref = reference_logps(scorer, valid, chunk)
            if distributed.is_main():  # every rank scored the same pairs; rank 0 writes the file
                _write_reference(output_dir / REFERENCE_FILE, ref_table, valid_ref, fingerprint)

    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.n_epochs
    eval_every = valid_every(cfg, steps_per_epoch, total_steps)
    valid_sample = fixed_sample(list(range(len(valid))), max(VALID_SAMPLE_PAIRS, chunk), cfg.seed)
    params, optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps)
    reporter.on_message(
        f"DPO with beta={beta} (reference: {'adapter disabled' if disabled_adapter else 'precomputed'}) "
        f"on {sum(p.numel() for p in params):,} parameters: {len(pairs)} pairs ({sum(tokens):,} tokens), "
        f"{cfg.n_epochs} epochs, {total_steps} steps on {device.type} ({'bf16' if bf16 else 'fp32'}"
        f"{', gradient checkpointing' if checkpointing else ''})"
        + (f"; {len(valid)} validation pairs, evaluated every {eval_every} steps" if valid else ""),
        once="training-plan",
    )

    progress = Progress(
        cfg, reporter, model, optimizer, scheduler, device, fingerprint, total_steps, writer=writer
    )
    progress.resume(found)
    model.train()
    ddp = distributed.wrap(model, device)  # the model itself on one process
    train_scorer = replace(scorer, model=ddp)
    for epoch in range(progress.start_epoch, cfg.n_epochs + 1):
        batches = epoch_batches(widths, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        for b in progress.batches(epoch, len(batches)):
            progress.stop_if_asked(epoch, b)
            batch_ids = batches[b]
            # Gradient accumulation: the loss is a mean over pairs, so each micro-batch's mean is
            # weighted by its share of the batch's pairs and the summed gradient is the batch's. On
            # N processes each rank takes its part (as in ``sft``: an idle rank joins at weight 0).
            # Sums stay on the device; the metrics below read them back in two host syncs per step.
            chunks = distributed.rank_micro_batches(batch_ids, cfg.micro_batch_size, lockstep=lockstep)
            sums, rewards_c, rewards_r = torch.zeros(3, device=device), [], []
            for k, (ids, counts) in enumerate(chunks):
                weight = len(ids) / len(batch_ids) if counts else 0.0
                with distributed.accumulating(ddp, last=k == len(chunks) - 1):
                    out = score(train_scorer, [pairs[i] for i in ids], ref_table, ids)
                    (out.loss * weight * distributed.world_size()).backward()
                if counts:
                    sums += torch.stack([out.loss.detach() * len(ids), out.correct, out.labelled])
                    rewards_c.append(out.rewards_chosen)
                    rewards_r.append(out.rewards_rejected)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step = progress.take_step(sum(tokens[i] for i in batch_ids))  # both replies, every epoch
            loss_sum, correct, labelled = distributed.all_sum(*sums.tolist())
            metrics: dict[str, float | int] = {
                "train_loss": loss_sum / len(batch_ids),
                "train_mean_token_accuracy": correct / max(1, labelled),  # chosen replies only
                **dpo_metrics(distributed.gather(rewards_c), distributed.gather(rewards_r)),
            }
            epoch_done = b == len(batches) - 1
            evaluating = valid and (distributed.is_main() or lockstep)  # only rank 0 reports
            if evaluating and (step % eval_every == 0 or epoch_done):
                metrics |= _prefixed("valid_", evaluate(scorer, valid, valid_sample, valid_ref, chunk))
            if evaluating and epoch_done:
                every = range(len(valid))
                metrics |= _prefixed("full_valid_", evaluate(scorer, valid, every, valid_ref, chunk))
            progress.record_step(metrics, epoch=epoch, next_batch=b + 1, epoch_done=epoch_done)
        progress.end_epoch(epoch, processor)

    if distributed.is_main():
        (output_dir / REFERENCE_FILE).unlink(missing_ok=True)  # the reference is no longer needed either
    return progress.finish()


def _dpo_fingerprint(cfg: TrainConfig, pairs: Sequence[Pair], valid: Sequence[Pair], beta: float) -> str:
    """``sft``'s fingerprint over both sides' lengths, plus what only DPO depends on."""
    lengths = [n for c, r in pairs for n in (len(c.input_ids), len(r.input_ids))]
    what = f"{run_fingerprint(cfg, lengths)}:dpo:{beta!r}:{len(valid)}:{cfg.init_weights}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def _write_reference(path: Path, train: torch.Tensor, valid: torch.Tensor, fingerprint: str) -> None:
    """Atomically write the starting model's reference log-probs (tagged with the run's fingerprint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {"train": train.contiguous(), "valid": valid.contiguous()}
    save_file(tensors, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def _read_reference(path: Path, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The saved reference log-probs, or None when missing, unreadable or from another run."""
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None
            return f.get_tensor("train"), f.get_tensor("valid")
    except Exception:  # missing or half-written: rescoring the starting model is always correct
        return None


def reference_is_disabled_adapter(cfg: TrainConfig) -> bool:
    """True when the trainable part is a *fresh* LoRA, so the model with its adapter disabled is
    exactly the starting model; otherwise the reference is precomputed (see the module docstring)."""
    if cfg.lora is None:
        return False
    return cfg.init_weights is None or weights_kind(cfg.init_weights) != "adapter"


def _collate(scorer: Scorer, pairs: Sequence[Pair]) -> dict[str, torch.Tensor]:
    """One stacked batch of ``pairs`` (chosen rows, then rejected), tagged for the vision cache."""
    chosen, rejected = zip(*pairs, strict=True)
    return scorer.feeder.tag_vision(collate_preference(chosen, rejected, scorer.pad_id), [*chosen, *rejected])


def reference_logps(scorer: Scorer, pairs: Sequence[Pair], chunk: int) -> torch.Tensor:
    """Score every pair with the model as it is now: ``(len(pairs), 2)`` summed reply log-probs on
    the CPU, column 0 the preferred reply, column 1 the non-preferred one. Eval mode, no gradients."""
    model = scorer.model
    was_training = model.training
    model.eval()
    out = [torch.zeros((0, 2))]
    try:
        with torch.no_grad():
            for m in range(0, len(pairs), chunk):
                part = pairs[m : m + chunk]
                logps = _forward(scorer, _collate(scorer, part))[0]
                out.append(torch.stack([logps[: len(part)], logps[len(part) :]], dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class Scored:
    loss: torch.Tensor
    """Mean DPO loss over the chunk's pairs (with a graph unless scored under ``no_grad``)."""
    rewards_chosen: torch.Tensor
    rewards_rejected: torch.Tensor
    correct: torch.Tensor
    """Chosen-reply label tokens predicted exactly (argmax), a float count on the device ..."""
    labelled: torch.Tensor
    """... out of this many."""


def score(
    scorer: Scorer, chunk: Sequence[Pair], ref_table: torch.Tensor | None, ids: Sequence[int]
) -> Scored:
    """DPO loss and rewards for ``chunk`` (pairs ``ids``): both replies in one stacked forward pass;
    the reference from ``ref_table`` rows ``ids``, or the same model with its adapter disabled."""
    n = len(chunk)
    batch = _collate(scorer, chunk)
    if ref_table is not None:
        ref = ref_table[list(ids)].to(scorer.device)
        ref_c, ref_r = ref[:, 0], ref[:, 1]
    else:
        with torch.no_grad(), distributed.unwrap(scorer.model).disable_adapter():
            ref_logps = _forward(scorer, batch)[0]
        ref_c, ref_r = ref_logps[:n], ref_logps[n:]
    logps, scores, hits = _forward(scorer, batch)
    loss, rewards_c, rewards_r = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, scorer.beta)
    correct, labelled = _token_hits(scores, hits, n)
    return Scored(loss, rewards_c, rewards_r, correct, labelled)


def evaluate(
    scorer: Scorer,
    pairs: Sequence[Pair],
    indices: Sequence[int],
    ref_table: torch.Tensor | None,
    chunk: int,
) -> dict[str, float]:
    """``loss``, ``mean_token_accuracy`` (chosen replies), ``reward_accuracy`` and ``reward_margin``
    over ``pairs[indices]``: no dropout, no gradients."""
    model = scorer.model
    indices = list(indices)
    sums, rewards_c, rewards_r = torch.zeros(3, device=scorer.device), [], []
    model.eval()
    try:
        with torch.no_grad():
            for m in range(0, len(indices), chunk):
                ids = indices[m : m + chunk]
                out = score(scorer, [pairs[i] for i in ids], ref_table, ids)
                sums += torch.stack([out.loss * len(ids), out.correct, out.labelled])
                rewards_c.append(out.rewards_chosen)
                rewards_r.append(out.rewards_rejected)
    finally:
        model.train()
    loss_sum, correct, labelled = sums.tolist()
    rewards = dpo_metrics(torch.cat(rewards_c), torch.cat(rewards_r))
    return {
        "loss": loss_sum / len(indices),
        "mean_token_accuracy": correct / max(1, labelled),
        "reward_accuracy": rewards["reward_accuracy"],
        "reward_margin": rewards["reward_margin"],
    }


def _forward(scorer: Scorer, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Scores, torch.Tensor]:
    """(summed reply log-probs per row, the labelled positions' scores, their argmax hits) for a
    collated batch."""
    scores = scorer.feeder.forward(scorer.model, batch)
    logps, hits = labelled_logprobs(scores)
    return logps, scores, hits


@torch.no_grad()
def _token_hits(scores: Scores, hits: torch.Tensor, n_chosen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax hits, label tokens) of the first ``n_chosen`` rows, as float counts on the device
    so micro-batches add up exactly without a host sync."""
    chosen = scores.rows < n_chosen
    return (hits & chosen).sum().float(), chosen.sum().float()


def _render_pair(processor: Any, ex: PreferenceExample, max_length: int, where: str) -> Pair:
    # Only the reply is trained: assistant turns inside the prompt are context (weight 0).
    prompt = tuple(replace(m, weight=0) if m.role == "assistant" else m for m in ex.prompt)
    out = []
    for reply in (ex.preferred, ex.non_preferred):
        conversation = (*prompt, replace(reply, weight=1))
        try:
            out.append(render_chat(processor, conversation, tools=ex.tools, max_length=max_length))
        except InvalidRequest as e:
            raise InvalidRequest(f"{where} {ex.line}: {e.message}", param=e.param, code=e.code) from e
    return out[0], out[1]


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {prefix + k: v for k, v in values.items()}
