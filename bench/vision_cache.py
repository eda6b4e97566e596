"""Frozen vision features cached vs. recomputed: seconds per epoch, ``python bench/vision_cache.py``.

Two cases (``--cases``): ``frozen``, the same LoRA run with tower and projector frozen (the default
plan: the projected features are cached), and ``projector``, LoRA with ``train_projector`` (the
frozen tower's outputs are cached and the projector trains on them). Each case runs with
``cache_vision_features="on"`` and ``"off"``, every variant ``--repeats`` times interleaved in fresh
processes with ``--threads`` torch threads. Model: ``openft-tiny-vlm`` with its processor's pixel
budget raised to ``--image-size``² (448² by default: 1,024 patches, 256 image tokens per image;
the shipped tiny processor would shrink such an image to 64 tokens). Data: synthetic shape
pictures of ``--image-size`` px, one per example. Reported per variant as min/median/max over the
runs: the up-front render (``prep s``), the first epoch's seconds and the mean of the later
epochs' (the first epoch fills the cache; the later ones reuse it), the final train loss (equal
between ``on`` and ``off`` of a case), and the 1-minute load average before/after the runs; then per
case the later epochs' median time with the cache over the median without.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from harness import REPO, TimingReporter, load_range, openft_config, run_interleaved, spread
from train_throughput import make_data


def prepare_model(root: Path, image_size: int) -> Path:
    sys.path.insert(0, str(REPO / "src"))
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from openft.models.tiny import ensure_tiny_vlm

    tiny = ensure_tiny_vlm(root)
    out = root / f"tiny-{image_size}px"
    processor = AutoProcessor.from_pretrained(tiny)
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": image_size * image_size}
    processor.save_pretrained(out)
    AutoModelForImageTextToText.from_pretrained(tiny).save_pretrained(out)
    return out


def run_child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    import openft.training.recipes.sft as sft
    from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart

    torch.set_num_threads(args.threads)
    data = make_data(args.examples, args.image_size, args.seed)
    examples = [
        ChatExample(
            line=i + 1,
            messages=(
                Message("user", (ImagePart(url="data:", data=png), TextPart(prompt))),
                Message("assistant", (TextPart(answer),), weight=1),
            ),
        )
        for i, (png, prompt, answer) in enumerate(data)
    ]
    with tempfile.TemporaryDirectory() as out:
        case, cache = args.child.split(":")
        cfg = openft_config(
            out,
            args,
            "lora",
            n_epochs=args.epochs,
            cache_vision_features=cache,
            train_projector=case == "projector",
        )
        rep = TimingReporter()
        rep.watch_model()
        sft.run(cfg, examples, rep)
    per_epoch = math.ceil(args.examples / args.batch_size)
    epochs = [sum(rep.step_s[e * per_epoch : (e + 1) * per_epoch]) for e in range(args.epochs)]
    return {"prep_s": rep.prep_s, "epoch_s": epochs, "last_loss": rep.losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="frozen,projector", help="comma-separated: frozen, projector")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.json_out).write_text(json.dumps(run_child(args)))
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        args.model_dir = prepare_model(tmp / "models", args.image_size)

        def command(variant: str, json_out: Path) -> list[str]:
            passed = [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k not in ("child", "json_out")
            ]
            return [sys.executable, __file__, *passed, f"--child={variant}", f"--json-out={json_out}"]

        cases = args.cases.split(",")
        variants = [f"{case}:{cache}" for case in cases for cache in ("on", "off")]
        runs, errors = run_interleaved(variants, command, args.repeats, tmp)
    print(
        f"\nopenft-tiny-vlm LoRA, {args.examples} examples of {args.image_size} px, batch {args.batch_size}, "
        f"{args.epochs} epochs, {args.threads} thread(s), {args.repeats} runs interleaved (min/median/max)"
    )
    print("| case | cache | prep s | epoch 1 s | later epochs s (mean) | final loss | load |")
    print("|---|---|---|---|---|---|---|")
    later: dict[str, list[float]] = {}
    for variant, results in runs.items():
        case, cache = variant.split(":")
        if not results:
            print(f"| {case} | {cache} | failed: {errors.get(variant)} |")
            continue
        later[variant] = [sum(r["epoch_s"][1:]) / (len(r["epoch_s"]) - 1) for r in results]
        print(
            f"| {case} | {cache} | {spread([r['prep_s'] for r in results])} "
            f"| {spread([r['epoch_s'][0] for r in results], '{:.2f}')} | {spread(later[variant], '{:.2f}')} "
            f"| {spread([r['last_loss'] for r in results], '{:.4f}')} | {load_range(results)} |"
        )
    for case in cases:
        on, off = later.get(f"{case}:on"), later.get(f"{case}:off")
        if on and off:
            ratio = statistics.median(on) / statistics.median(off)
            print(f"{case}: later epochs with the cache take {ratio:.2f}x the time without (medians)")


if __name__ == "__main__":
    main()
