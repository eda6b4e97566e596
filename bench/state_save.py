"""The training thread's stall per resumable state save: synchronous vs background writes.

    python bench/state_save.py [--layers 12] [--hidden 768] [--vocab 8192] [--repeats 3] [--dir DIR]

Builds ``fsdp_memory.py``'s random-init Qwen2 (98M parameters at the defaults) for full
fine-tuning with openft's AdamW and schedule (``progress.optimizer_and_schedule``), takes one step
so the AdamW moments exist, then saves its state through the recipes' own ``Progress`` exactly as a
periodic save does: ``--repeats`` times round-robin, synchronously (``cfg.async_state_save=False``:
the step waits for the write and fsync) and in the background (the step waits only for the copy to
CPU). Per mode it prints, min/median/max: the stall (what the training thread waits), the time
from the save's start until the state is on disk (background: until the writer is done or the step
below ends, whichever is later), the bytes written, and a training step (batch 1 x 64 tokens) run right after the save returns, which in the background
mode overlaps the write (on a machine with few cores the two compete). Load average before/after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the state is written (default: a temporary folder)")
    args = ap.parse_args()

    import torch
    from fsdp_memory import build_model

    from openft.training.config import TrainConfig
    from openft.training.progress import STATE_DIR, Progress, optimizer_and_schedule
    from openft.training.reporter import ListReporter

    torch.set_num_threads(1)
    model = build_model(layers=args.layers, hidden=args.hidden, vocab=args.vocab, device=torch.device("cpu"))
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (1, 64), generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory(dir=args.dir) as out:
        progress = {}
        for mode in ("sync", "async"):
            cfg = TrainConfig(
                base_model="bench",
                output_dir=Path(out) / mode,
                n_epochs=1,
                batch_size=1,
                learning_rate=1e-4,
                seed=0,
                device="cpu",
                async_state_save=mode == "async",
            )
            _, optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps=100)
            progress[mode] = Progress(
                cfg, ListReporter(), model, optimizer, scheduler, torch.device("cpu"), "x", 100
            )

        def step(optimizer, scheduler) -> float:
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for p in progress.values():
            step(p.optimizer, p.scheduler)  # AdamW moments exist, as in a real save
        figures: dict[str, dict[str, list[float]]] = {
            m: {"stall": [], "write": [], "step": []} for m in progress
        }
        loads = []
        size = 0
        for i in range(args.repeats):
            for mode, p in progress.items():
                loads.append(os.getloadavg()[0])
                t0 = time.perf_counter()
                p._save(1, i, background=p.cfg.async_state_save)  # what save_if_due calls
                stall = time.perf_counter() - t0
                step_s = step(p.optimizer, p.scheduler)
                p.writer.wait()
                figures[mode]["stall"].append(stall)
                figures[mode]["write"].append(time.perf_counter() - t0 - (step_s if mode == "sync" else 0.0))
                figures[mode]["step"].append(step_s)
                loads.append(os.getloadavg()[0])
                size = sum(f.stat().st_size for f in (p.output_dir / STATE_DIR).iterdir())
                print(
                    f"run {i + 1}/{args.repeats} {mode}: stall {stall:.2f} s, step after {step_s:.2f} s",
                    flush=True,
                )

    print(f"\n{n_params / 1e6:.0f}M parameters, full fine-tuning; {size / 2**20:,.0f} MiB written per save")
    print("| save | stall per save, s | until written, s | step right after, s |\n|---|---|---|---|")
    for mode, f in figures.items():
        print(f"| {mode} | {_spread(f['stall'])} | {_spread(f['write'])} | {_spread(f['step'])} |")
    print(
        f"min/median/max of {args.repeats}; load average (1 min) {min(loads):.1f}-{max(loads):.1f}, cores {os.cpu_count()}"
    )


if __name__ == "__main__":
    main()
