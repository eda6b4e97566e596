"""Peak memory and time of the SFT loss + backward at the labelled positions: ``plain`` (the
``(n, V)`` logits the model's lm_head returns, then ``token_loss``) vs ``chunked``
(``loss.chunked_logprobs``: one ``(rows, V)`` fp32 block at a time, forward and backward).

    OMP_NUM_THREADS=1 .venv/bin/python bench/loss_kernel.py            # V=151,936, H=1,536, n=4,096

Each run is its own process (``--child``), so its peak RSS is its own: the figure is the growth of
peak RSS over the RSS once the inputs exist (hidden states, a trainable lm_head weight, targets),
i.e. what the loss and its backward add, the weight's gradient included. Variants run
``--runs`` times interleaved; min / median / max and the load average before and after are printed.
Full fine-tuning (the weight trains) unless ``--frozen``. CPU and fp32 here (the recipes train in
fp32 on CPU); ``--device cuda`` measures ``max_memory_allocated`` growth instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> dict[str, float]:
    import torch

    from openft.training.loss import LogitHead, Scores, chunk_rows, labelled_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).requires_grad_(not args.frozen)
    hidden = torch.randn(args.n, args.hidden, device=device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.n,), device=device)
    rows = torch.zeros(args.n, dtype=torch.long, device=device)
    head = LogitHead(weight)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss()
    start = time.perf_counter()
    if args.variant == "plain":
        # What the plain path does: the model's lm_head at the labelled positions, then the loss.
        scores = Scores(head.logits(hidden), targets, rows, 1)
    else:
        scores = Scores(None, targets, rows, 1, hidden, head, "chunked")
    loss, accuracy = labelled_loss(scores)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "loss": loss.item(),
        "accuracy": accuracy.item(),
        "rows": chunk_rows(args.vocab),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=1_536)
    ap.add_argument("--n", type=int, default=4_096, help="labelled tokens")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["plain", "chunked"], choices=("plain", "chunked"))
    ap.add_argument("--frozen", action="store_true", help="lm_head frozen (LoRA): no weight gradient")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return

    passthrough = ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--n", str(args.n)]
    passthrough += ["--device", args.device] + (["--frozen"] if args.frozen else [])
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for run in range(args.runs):
        for variant in args.variants:  # interleaved: a load spike hits both
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, *passthrough],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(res)
            print(
                f"run {run + 1} {variant:<8} {res['seconds']:7.2f} s  {res['peak_bytes'] / 2**30:6.2f} GiB",
                flush=True,
            )
    load_after = os.getloadavg()

    print(
        f"\nSFT loss + backward at the labelled positions: V={args.vocab:,}, H={args.hidden:,}, n={args.n:,}, "
        f"{'frozen' if args.frozen else 'trainable'} lm_head, {args.device}, fp32, "
        f"{os.environ.get('OMP_NUM_THREADS', 'all')} thread(s); chunk rows {results[args.variants[-1]][0]['rows']}; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    print(
        f"{'variant':<8} {'seconds min/median/max':>26} {'peak growth GiB min/median/max':>32} {'loss':>10}"
    )
    for variant, runs in results.items():
        s = sorted(r["seconds"] for r in runs)
        m = sorted(r["peak_bytes"] / 2**30 for r in runs)
        print(
            f"{variant:<8} {s[0]:8.2f} {statistics.median(s):8.2f} {s[-1]:8.2f} "
            f"{m[0]:10.2f} {statistics.median(m):10.2f} {m[-1]:10.2f} {runs[0]['loss']:10.5f}"
        )


if __name__ == "__main__":
    main()
