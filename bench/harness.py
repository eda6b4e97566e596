"""What the side-by-side training benches share: measuring one variant in its own process, and
timing optimizer steps the same way for openft (its ``Reporter``) and for TRL (a callback)."""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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
    """One variant (``args.child`` is ``impl:mode``) on ``data``, measured by :func:`measure`."""
    impl, mode = args.child.split(":")
    import_both_stacks(recipe)
    import torch

    torch.manual_seed(args.seed)
    run = run_openft if impl == "openft" else run_trl
    res = measure(lambda: run(args, mode, data), cuda=args.device.startswith("cuda"))
    res["variant"] = f"{impl} {mode}"
    return res


class StepClock:
    """Seconds between consecutive optimizer-step ends; ``restart`` leaves a pause (a checkpoint
    save) out of the next step's time."""

    def __init__(self) -> None:
        self._t: float | None = None
        self.step_s: list[float] = []

    def start(self) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def restart(self) -> None:
        self._t = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.step_s.append(now - (self._t if self._t is not None else now))
        self._t = now


class TimingReporter(StepClock):
    """openft's ``Reporter`` protocol, timing steps. ``should_stop`` is polled at the start of every
    step, so its first call starts the clock (after model load, rendering and any precompute);
    checkpoint saving is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.cum_tokens: list[int] = []
        self.last: dict[str, Any] = {}

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
    """A ``TrainerCallback`` with a :class:`StepClock` started at ``on_train_begin``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback, StepClock):
        def __init__(self) -> None:
            StepClock.__init__(self)

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            self.restart()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.tick()

    return Timer()
