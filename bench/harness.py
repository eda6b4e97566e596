"""What the side-by-side training benches share: each variant in its own process, run several
times interleaved; the same clock for openft (its ``Reporter``) and TRL (a callback); the same
trained tokens on both sides.

What is timed, on both sides: everything after the model is loaded until the last optimizer step
ends, except checkpoint saves. That is data preparation (openft's up-front render and, for DPO,
its reference precompute; TRL's dataset building, tokenization and reference precompute), then
every step (TRL's per-batch collation runs inside its steps). ``prep_s`` is the part before the
first step, ``step_s`` the time between consecutive optimizer-step ends.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
END_OF_TURN = "<|im_end|>"


def import_both_stacks(recipe: str) -> None:
    """Import TRL's and openft's stacks in every child, so the RSS baseline is the same for either."""
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    sys.path.insert(0, str(REPO / "src"))
    __import__(f"openft.training.recipes.{recipe}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(run: Callable[[], dict[str, Any]], *, cuda: bool) -> dict[str, Any]:
    """``run()``'s figures plus ``wall_s``, ``peak_rss_bytes`` (peak RSS minus the RSS before the
    run) and, on CUDA, ``cuda_peak_bytes`` (``torch.cuda.max_memory_allocated``)."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    res = run()
    res["wall_s"] = time.perf_counter() - t0
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    if cuda:
        res["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return res


def run_child(
    args: Any, recipe: str, data: Any, run_openft: Callable[..., dict], run_trl: Callable[..., dict]
) -> dict[str, Any]:
    """One variant (``args.child`` is ``impl:mode``) on ``data``, measured by :func:`measure`, with
    ``args.threads`` torch threads."""
    impl, mode = args.child.split(":")
    import_both_stacks(recipe)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run = run_openft if impl == "openft" else run_trl
    res = measure(lambda: run(args, mode, data), cuda=args.device.startswith("cuda"))
    res["variant"] = f"{impl} {mode}"
    return res


def run_interleaved(
    variants: Sequence[str], command: Callable[[str, Path], list[str]], repeats: int, tmp: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Run every variant ``repeats`` times, round-robin (so a burst of load elsewhere on the
    machine hits them all alike), each in a fresh process given by ``command(variant, json_out)``.
    Each result gets ``load_before``/``load_after`` (1-minute load average). Returns the results
    per variant and the last error line of the variants that failed."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    for i in range(repeats):
        for variant in variants:
            if variant in errors:
                continue
            out = tmp / f"{variant.replace(':', '-')}-{i}.json"
            print(f"run {i + 1}/{repeats}: {variant} ...", flush=True)
            before = os.getloadavg()[0]
            proc = subprocess.run(command(variant, out), capture_output=True, text=True, check=False)
            after = os.getloadavg()[0]
            if proc.returncode != 0:
                lines = (proc.stdout + proc.stderr).strip().splitlines()
                errors[variant] = lines[-1] if lines else "?"
                print("\n".join(lines[-25:]), file=sys.stderr)
                continue
            res = json.loads(out.read_text())
            res |= {"load_before": before, "load_after": after}
            runs[variant].append(res)
    return runs, errors


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """``min/median/max``."""
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def load_range(results: Sequence[dict[str, Any]]) -> str:
    loads = [r[k] for r in results for k in ("load_before", "load_after")]
    return f"{min(loads):.1f}-{max(loads):.1f}"


class StepClock:
    """Seconds between consecutive optimizer-step ends (``step_s``) and, before the first step,
    ``prep_s``: from :meth:`begin` (the model is loaded) to :meth:`start` (the first step begins).
    ``restart`` leaves a pause (a checkpoint save) out of the next step's time."""

    def __init__(self) -> None:
        self._t: float | None = None
        self._begun: float | None = None
        self.prep_s = 0.0
        self.step_s: list[float] = []

    def begin(self) -> None:
        self._begun = time.perf_counter()

    def start(self) -> None:
        if self._t is None:
            self._t = time.perf_counter()
            if self._begun is not None:
                self.prep_s = self._t - self._begun

    def restart(self) -> None:
        self._t = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.step_s.append(now - (self._t if self._t is not None else now))
        self._t = now


class TimingReporter(StepClock):
    """openft's ``Reporter`` protocol, timing steps. ``watch_model`` makes the recipe's model
    builder call :meth:`begin` (and count parameters); ``should_stop`` is polled at the start of
    every step, so its first call ends ``prep_s`` (render, reference precompute); checkpoint
    saving is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.cum_tokens: list[int] = []
        self.last: dict[str, Any] = {}
        self.params: int | None = None
        self.trainable: int | None = None

    def watch_model(self) -> None:
        """Wrap ``openft.training.setup._build_model`` (every recipe's ``setup`` calls it)."""
        import openft.training.setup as setup_module

        build = setup_module._build_model

        def wrapped(*a: Any, **k: Any) -> Any:
            model, processor = build(*a, **k)
            self.params = sum(p.numel() for p in model.parameters())
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.begin()
            return model, processor

        setup_module._build_model = wrapped

    def on_message(self, message: str, level: str = "info", *, once: str | None = None) -> None:
        pass

    def should_stop(self) -> bool:
        self.start()
        return False

    def on_step(self, metrics: dict[str, Any]) -> None:
        self.tick()
        self.losses.append(float(metrics["train_loss"]))
        self.cum_tokens.append(int(metrics["trained_tokens"]))
        self.last = dict(metrics)

    def on_checkpoint(self, weights_dir: Path, **kw: Any) -> None:
        self.restart()


def trl_step_timer() -> Any:
    """A ``TrainerCallback`` :class:`StepClock`: call ``begin()`` once TRL's model is loaded, before
    its dataset is built; ``on_train_begin`` ends ``prep_s``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback, StepClock):
        def __init__(self) -> None:
            StepClock.__init__(self)

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.start()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.tick()

    return Timer()


def trl_trainable(model: Any, mode: str, *, train_vision_tower: bool = False) -> Any:
    """Make the TRL side's model trainable the way openft's ``training.setup`` does, before the
    clock starts, and return what TRL needs for it.

    ``lora``: a peft ``LoraConfig`` (r=16, alpha=32, no dropout, openft's default target names)
    whose targets are the full module paths openft's ``lora_plan`` picks (language model only, so a
    vision encoder's same-named layers stay frozen); pass it as ``peft_config=`` or to
    ``get_peft_model``. Anything else is full fine-tuning: every parameter trains but the vision
    tower's (unless ``train_vision_tower``; the projector always does); returns None.
    """
    from peft import LoraConfig as PeftLoraConfig

    from openft.training.config import LoraConfig
    from openft.training.trainable import lora_plan, set_full_trainable

    if mode != "lora":
        set_full_trainable(model, train_vision_tower=train_vision_tower)
        return None
    plan = lora_plan(model, LoraConfig(r=16, alpha=32), train_vision_tower=False, train_projector=False)
    return PeftLoraConfig(
        r=plan.r,
        lora_alpha=plan.alpha,
        lora_dropout=plan.dropout,
        task_type="CAUSAL_LM",
        target_modules=list(plan.target_modules),
    )


def openft_config(out: str, args: Any, mode: str, **specific: Any) -> Any:
    """openft's ``TrainConfig`` for a bench run: the bench's model, batch size, learning rate,
    seed and device; LoRA r=16/alpha=32 on openft's default targets when ``mode`` is ``lora``;
    nothing but the final weights saved. ``specific`` adds to or overrides them; a knob an older
    ``TrainConfig`` lacks is dropped, so a bench runs on either."""
    import dataclasses

    from openft.training.config import LoraConfig, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {
        "base_model": str(args.model_dir),
        "output_dir": Path(out),
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "lora": LoraConfig(r=16, alpha=32) if mode == "lora" else None,
        "device": args.device,
        "keep_checkpoints": 1,
        "state_every_steps": 0,
        **specific,
    }
    return TrainConfig(**{k: v for k, v in kwargs.items() if k in fields})


def trl_args(out: str, args: Any, **specific: Any) -> dict[str, Any]:
    """Keyword arguments for TRL's ``SFTConfig`` / ``DPOConfig`` that every baseline shares: the
    bench's batch size, learning rate and seed; AdamW without weight decay and clipping at 1.0 like
    openft's loop (the schedule is openft's, :func:`openft_schedule_for`); no length cut (never
    inside image tokens); nothing saved, logged or shown. ``specific`` adds to or overrides them."""
    return {
        "output_dir": out,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": None,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 10**9,
        "disable_tqdm": True,
        "seed": args.seed,
        **specific,
    }


def openft_schedule_for(trainer_cls: type) -> type:
    """``trainer_cls`` with openft's learning-rate schedule (warm-up over 3% of the steps from
    1/warm-up of the peak, then linear decay to 10% of it) instead of transformers' linear one
    (which warms up from 0 and decays to 0)."""
    import torch

    from openft.training.progress import warmup_then_linear

    class Aligned(trainer_cls):  # type: ignore[misc, valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if self.lr_scheduler is None:
                optimizer = optimizer if optimizer is not None else self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, warmup_then_linear(num_training_steps)
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return Aligned


def counting_trainer(trainer_cls: type) -> type:
    """``trainer_cls`` with openft's schedule (:func:`openft_schedule_for`) that records each step's
    real tokens (``step_tokens``), labelled tokens (``labelled``) and loss (``losses``)."""

    class Counting(openft_schedule_for(trainer_cls)):  # type: ignore[misc]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.step_tokens: list[int] = []
            self.labelled: list[int] = []
            self.losses: list[float] = []

        def training_step(self, model: Any, inputs: dict, *a: Any, **k: Any) -> Any:
            mask = inputs.get("attention_mask")  # a padding-free batch has none: every token is real
            self.step_tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            self.labelled.append(int((inputs["labels"] != -100).sum()))
            loss = super().training_step(model, inputs, *a, **k)
            self.losses.append(float(loss))
            return loss

    return Counting


def untrain_after_end_of_turn(
    collator: Callable[[list], dict], end_id: int, key: str
) -> Callable[[list], dict]:
    """``collator`` whose batches no longer train the token right after an end-of-turn token.

    openft trains an assistant reply up to and including ``<|im_end|>``; the template's ``\\n``
    after it is context only. TRL trains the whole rendered completion, ``\\n`` included. With
    this both train the same tokens. ``key`` is ``labels`` (set to -100) or ``completion_mask``
    (set to 0); the token stays in the input either way, as in openft."""

    def collate(examples: list) -> dict:
        batch = collator(examples)
        ids = batch["input_ids"]
        after = ids.new_zeros(ids.shape, dtype=bool)
        after[:, 1:] = ids[:, :-1] == end_id
        batch[key] = batch[key].masked_fill(after, -100 if key == "labels" else 0)
        return batch

    return collate
