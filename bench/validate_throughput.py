"""Validation throughput and memory at real image sizes: ``python bench/validate_throughput.py``.

Part 1, images with moderation on (the default offline moderator): files whose every example
carries one distinct 448-1,024 px image (sides drawn at random), of one kind per file:

- ``synthetic``: generated people-free pictures (coloured shapes, blurred colour blobs,
  gradients, smooth noise, bar charts, text), PNG;
- ``photos``: random crops of scikit-image's people-free photos, resized, JPEG (quality 90);
- ``mixed``: the two in turn (half each).

Each file is validated ``--repeats`` times per moderator in a fresh subprocess (so peak RSS and the
verdict cache are its own) with the streaming API (``iter_validate``), the runs of all files and
moderators interleaved. ``--moderator`` takes several: ``default`` (what ``default_moderator()``
picks: ``PedestrianSSDModerator``, MTCNN faces + the first head of an SSDLite pedestrian detector
at 160 px, when its weights are installed), ``mtcnn-hog`` (``MTCNNModerator``: MTCNN faces + HOG
whole bodies, the fallback without those weights and the default before), ``faces-only``
(``FacesOnlyModerator``: no whole-body search, an opt-in), ``ssd-208`` / ``ssd-256`` (the default
with its body detector at 208 / 256 px, not offered: more recall for more CPU), ``hog-320`` (HOG on a smaller
copy and pyramid, not offered), ``haar`` (``OpenCVModerator``, the Haar fallback), ``noop`` (no
moderation: decode and the rest only).
Printed per file and moderator: images/s (min/median/max), CPU ms per image (process time, all
threads, median run), cores used (CPU time / wall time, median run), the idle 2-core estimate
(2 cores / CPU time per image: what carries over from a shared machine), images flagged, peak
RSS, and the 1-minute load average before/after.

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

    if kind == "mixed":  # generated PNGs and photo JPEGs in turn
        pairs = zip(people_free(n // 2, seed=seed), photo_variants(n // 2, seed=seed), strict=True)
        pictures = [(im, fmt) for pair in pairs for im, fmt in zip(pair, ("PNG", "JPEG"), strict=True)]
    elif kind == "synthetic":
        pictures = [(im, "PNG") for im in people_free(n, seed=seed)]
    else:
        pictures = [(im, "JPEG") for im in photo_variants(n, seed=seed)]
    with open(path, "w") as f:
        for i, (im, fmt) in enumerate(pictures):
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
    from openft.datasets.moderation import (
        FacesOnlyModerator,
        MTCNNModerator,
        NoopModerator,
        OpenCVModerator,
        PedestrianSSDModerator,
        default_moderator,
    )
    from openft.datasets.validate import ValidationOptions, iter_validate, validate_file

    class Hog320Moderator(MTCNNModerator):
        """Not offered: HOG on a 320-px copy with a 1.25 pyramid step (people >= 40% of the longer
        side), to show what a cheaper HOG search would cost; it lost the few whole-body people
        HOG 400 / 1.15 finds (bench/README.md)."""

        hog_max_side, hog_scale_step = 320, 1.25

    class SSD208Moderator(PedestrianSSDModerator):
        """Not offered: the body detector at 208 px (threshold at ~2x the best people-free score)."""

        body_side, body_threshold = 208, 0.2

    class SSD256Moderator(PedestrianSSDModerator):
        """Not offered: the body detector at 256 px."""

        body_side, body_threshold = 256, 0.2

    mod = {
        "noop": NoopModerator,
        "haar": OpenCVModerator,
        "default": default_moderator,
        "mtcnn-hog": MTCNNModerator,
        "faces-only": FacesOnlyModerator,
        "hog-320": Hog320Moderator,
        "ssd-208": SSD208Moderator,
        "ssd-256": SSD256Moderator,
    }[moderator]()
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
                "moderator": type(mod).__name__,
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
    ap.add_argument(
        "--kinds",
        nargs="+",
        default=["mixed", "synthetic", "photos"],
        choices=["mixed", "synthetic", "photos"],
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs per file, interleaved")
    ap.add_argument("--text-sizes", type=int, nargs="*", default=[], help="e.g. 10000 50000 (part 2)")
    ap.add_argument(
        "--image-share", type=float, default=0.2, help="part 2: share of examples with a 32-px PNG"
    )
    ap.add_argument(
        "--moderator",
        nargs="+",
        choices=["default", "mtcnn-hog", "faces-only", "ssd-208", "ssd-256", "hog-320", "haar", "noop"],
        default=["default"],
    )
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.moderator[0])
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        if args.kinds and args.images:
            files = {}
            for kind in args.kinds:
                files[kind] = os.path.join(tmp, f"{kind}.jsonl")
                write_image_file(files[kind], kind, args.images, seed=7)
            runs: dict[tuple[str, str], list[dict]] = {(k, m): [] for k in files for m in args.moderator}
            for _ in range(args.repeats):
                for kind, mod in runs:
                    runs[kind, mod].append(run_child(files[kind], "stream", mod))
            print(
                f"images 448-1,024 px, streaming, {cores} cores, {args.repeats} interleaved runs per file "
                "and moderator"
            )
            print(f"{'kind':<10} {'moderator':<20} {'images':>6} {'MB':>6} {'images/s min/med/max':>22} "
                  f"{'CPU ms/img':>10} {'cores':>5} {'idle 2-core img/s':>17} {'flagged':>7} {'peak RSS MB':>11} "
                  f"{'load':>10}")  # fmt: skip
            for (kind, _), rs in runs.items():
                rates = sorted(r["images"] / r["seconds"] for r in rs)
                mid = sorted(rs, key=lambda r: r["images"] / r["seconds"])[(len(rs) - 1) // 2]
                loads = [r[k] for r in rs for k in ("load_before", "load_after")]
                cpu_ms = 1000 * mid["cpu_seconds"] / mid["images"]
                print(
                    f"{kind:<10} {mid['moderator']:<20} {mid['images']:>6} "
                    f"{os.path.getsize(files[kind]) / 2**20:>6.1f} "
                    f"{'/'.join(f'{x:.1f}' for x in (rates[0], statistics.median(rates), rates[-1])):>22} "
                    f"{cpu_ms:>10.1f} {mid['cpu_seconds'] / mid['seconds']:>5.2f} {2000 / cpu_ms:>17.0f} "
                    f"{mid['skipped']:>7} {max(r['peak_rss_mb'] for r in rs):>11.0f} "
                    f"{min(loads):>4.1f}-{max(loads):<5.1f}"
                )
        if args.text_sizes:
            print(
                f"\n{'examples':>9} {'MB':>6} {'mode':>7} {'ex/s':>8} {'img/s':>7} {'peak RSS MB':>11} {'load':>10}"
            )
            for n in args.text_sizes:
                path = os.path.join(tmp, f"text_{n}.jsonl")
                write_text_file(path, n, args.image_share)
                for mode in ("stream", "keep"):
                    r = run_child(path, mode, args.moderator[0])
                    print(
                        f"{r['examples']:>9} {os.path.getsize(path) / 2**20:>6.1f} {mode:>7} "
                        f"{r['examples'] / r['seconds']:>8.0f} {r['images'] / r['seconds']:>7.0f} "
                        f"{r['peak_rss_mb']:>11.0f} {r['load_before']:>4.1f}-{r['load_after']:<5.1f}"
                    )


if __name__ == "__main__":
    main()
