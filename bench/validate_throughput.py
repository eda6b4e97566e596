"""Validation throughput and memory: ``python bench/validate_throughput.py [--sizes 10000 50000]``.

Generates files of text examples plus a share (default 20%) with a small, distinct inline
PNG each, validates each file in a fresh subprocess with the streaming API
(``iter_validate``: examples consumed, not kept) and with ``validate_file`` (examples
kept), and prints examples/s, images/s and peak RSS. Flat peak memory across file sizes
in the streaming mode shows validation itself streams.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

from PIL import Image


def make_file(path: str, n: int, image_share: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            question = f"Question {i}: " + " ".join(
                rng.choice(["red", "green", "blue", "big", "small"]) for _ in range(20)
            )
            content: object = question
            if rng.random() < image_share:
                im = Image.new("RGB", (32, 32), (rng.randrange(256), rng.randrange(256), i % 256))
                im.putpixel((i % 32, (i // 32) % 32), (i % 251, 0, 0))  # distinct bytes per image
                buf = io.BytesIO()
                im.save(buf, "PNG")
                url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
                content = [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": url}},
                ]
            rec = {
                "messages": [
                    {"role": "user", "content": content},
                    {"role": "assistant", "content": f"Answer {i}."},
                ]
            }
            f.write(json.dumps(rec) + "\n")


def child(path: str, mode: str, moderator: str) -> None:
    from openft.datasets.moderation import NoopModerator, default_moderator
    from openft.datasets.validate import ValidationOptions, iter_validate, validate_file

    mod = NoopModerator() if moderator == "noop" else default_moderator()
    options = ValidationOptions(moderator=mod)
    start = time.perf_counter()
    with open(path, "rb") as fp:
        if mode == "stream":
            examples, report_fn = iter_validate(fp, method="supervised", options=options)
            for _ in examples:
                pass
            report = report_fn()
        else:
            report = validate_file(fp, method="supervised", options=options).report
    elapsed = time.perf_counter() - start
    s = report.summary
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "examples": s.examples,
                "images": s.images,
                "seconds": elapsed,
                "peak_rss_mb": peak_mb,
                "ok": report.ok,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--image-share", type=float, default=0.2)
    ap.add_argument("--moderator", choices=["default", "noop"], default="default")
    ap.add_argument("--child", nargs=2, metavar=("PATH", "MODE"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.moderator)
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'examples':>9} {'MB':>6} {'mode':>7} {'ex/s':>8} {'img/s':>7} {'peak RSS MB':>11}")
        for n in args.sizes:
            path = os.path.join(tmp, f"bench_{n}.jsonl")
            make_file(path, n, args.image_share)
            size_mb = os.path.getsize(path) / 2**20
            for mode in ("stream", "keep"):
                out = subprocess.run(
                    [sys.executable, __file__, "--moderator", args.moderator, "--child", path, mode],
                    check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
                r = json.loads(out.strip().splitlines()[-1])
                print(
                    f"{r['examples']:>9} {size_mb:>6.1f} {mode:>7} {r['examples'] / r['seconds']:>8.0f} "
                    f"{r['images'] / r['seconds']:>7.0f} {r['peak_rss_mb']:>11.0f}"
                )


if __name__ == "__main__":
    main()
