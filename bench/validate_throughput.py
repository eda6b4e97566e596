"""Validation throughput and memory at real image sizes: ``python bench/validate_throughput.py``.

Part 1, images with moderation on (the default offline moderator): files whose every example
carries one distinct 448-1,024 px image (sides drawn at random), of one kind per file:

- ``synthetic``: generated people-free pictures (coloured shapes, blurred colour blobs,
  gradients, smooth noise, bar charts, text), PNG;
- ``photos``: random crops of scikit-image's people-free photos, resized, JPEG (quality 90).

Each file is validated ``--repeats`` times in a fresh subprocess (so peak RSS and the verdict cache
are its own) with the streaming API (``iter_validate``). Printed per file: images/s
(min/median/max), CPU seconds per image (process time, all threads, median run), peak RSS, and the
1-minute load average before/after. ``--moderator noop`` shows the cost without moderation.

Part 2 (``--text-sizes``): large text files with a share of small inline PNGs, streaming vs. kept
examples: flat peak memory across file sizes in the streaming mode shows validation streams.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.pictures: the same pictures the moderation tests use


def write_image_file(path: str, kind: str, n: int, seed: int) -> None:
    from tests.pictures import chat_line, encoded, people_free, photo_variants

    pictures = people_free(n, seed=seed) if kind == "synthetic" else photo_variants(n, seed=seed)
    fmt = "PNG" if kind == "synthetic" else "JPEG"
    with open(path, "w") as f:
        for i, im in enumerate(pictures):
            f.write(
                chat_line(f"What is in picture {i}?", f"Picture {i}.", encoded(im, fmt), fmt.lower()) + "\n"
            )


def write_text_file(path: str, n: int, image_share: float, seed: int = 0) -> None:
    from tests.pictures import chat_line

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            question = f"Question {i}: " + " ".join(
                rng.choice(["red", "green", "blue", "big", "small"]) for _ in range(20)
            )
            png = None
            if rng.random() < image_share:
                im = Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), i % 256))
                im.putpixel((i % 32, (i // 32) % 32), (i % 251, 0, 0))  # distinct bytes per image
                buf = io.BytesIO()
                im.save(buf, "PNG")
                png = buf.getvalue()
            f.write(chat_line(question, f"Answer {i}.", png) + "\n")


def child(path: str, mode: str, moderator: str) -> None:
    from openft.datasets.moderation import NoopModerator, default_moderator
    from openft.datasets.validate import ValidationOptions, iter_validate, validate_file

    mod = NoopModerator() if moderator == "noop" else default_moderator()
    options = ValidationOptions(moderator=mod)
    start, cpu = time.perf_counter(), time.process_time()
    with open(path, "rb") as fp:
        if mode == "stream":
            examples, report_fn = iter_validate(fp, method="supervised", options=options)
            for _ in examples:
                pass
            report = report_fn()
        else:
            report = validate_file(fp, method="supervised", options=options).report
    s = report.summary
    print(
        json.dumps(
            {
                "examples": s.examples,
                "images": s.images,
                "skipped": s.skipped_examples,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": time.process_time() - cpu,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_child(path: str, mode: str, moderator: str) -> dict:
    before = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, __file__, "--moderator", moderator, "--child", path, mode],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    r = json.loads(out.strip().splitlines()[-1])
    return r | {"load_before": before, "load_after": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="images per kind (448-1,024 px each)")
    ap.add_argument("--kinds", nargs="+", default=["synthetic", "photos"], choices=["synthetic", "photos"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per file, interleaved")
    ap.add_argument("--text-sizes", type=int, nargs="*", default=[], help="e.g. 10000 50000 (part 2)")
    ap.add_argument(
        "--image-share", type=float, default=0.2, help="part 2: share of examples with a 32-px PNG"
    )
    ap.add_argument("--moderator", choices=["default", "noop"], default="default")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.moderator)
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        if args.kinds and args.images:
            files = {}
            for kind in args.kinds:
                files[kind] = os.path.join(tmp, f"{kind}.jsonl")
                write_image_file(files[kind], kind, args.images, seed=7)
            runs: dict[str, list[dict]] = {k: [] for k in files}
            for _ in range(args.repeats):
                for kind, path in files.items():
                    runs[kind].append(run_child(path, "stream", args.moderator))
            print(
                f"images 448-1,024 px, moderator {args.moderator}, streaming, {cores} cores, "
                f"{args.repeats} interleaved runs per file"
            )
            print(f"{'kind':<10} {'images':>6} {'MB':>6} {'images/s min/med/max':>22} {'CPU ms/img':>10} "
                  f"{'skipped':>7} {'peak RSS MB':>11} {'load':>10}")  # fmt: skip
            for kind, rs in runs.items():
                rates = sorted(r["images"] / r["seconds"] for r in rs)
                mid = sorted(rs, key=lambda r: r["images"] / r["seconds"])[(len(rs) - 1) // 2]
                loads = [r[k] for r in rs for k in ("load_before", "load_after")]
                print(
                    f"{kind:<10} {mid['images']:>6} {os.path.getsize(files[kind]) / 2**20:>6.1f} "
                    f"{'/'.join(f'{x:.1f}' for x in (rates[0], statistics.median(rates), rates[-1])):>22} "
                    f"{1000 * mid['cpu_seconds'] / mid['images']:>10.1f} {mid['skipped']:>7} "
                    f"{max(r['peak_rss_mb'] for r in rs):>11.0f} {min(loads):>4.1f}-{max(loads):<5.1f}"
                )
        if args.text_sizes:
            print(
                f"\n{'examples':>9} {'MB':>6} {'mode':>7} {'ex/s':>8} {'img/s':>7} {'peak RSS MB':>11} {'load':>10}"
            )
            for n in args.text_sizes:
                path = os.path.join(tmp, f"text_{n}.jsonl")
                write_text_file(path, n, args.image_share)
                for mode in ("stream", "keep"):
                    r = run_child(path, mode, args.moderator)
                    print(
                        f"{r['examples']:>9} {os.path.getsize(path) / 2**20:>6.1f} {mode:>7} "
                        f"{r['examples'] / r['seconds']:>8.0f} {r['images'] / r['seconds']:>7.0f} "
                        f"{r['peak_rss_mb']:>11.0f} {r['load_before']:>4.1f}-{r['load_after']:<5.1f}"
                    )


if __name__ == "__main__":
    main()
