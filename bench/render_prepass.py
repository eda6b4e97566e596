"""The recipes' up-front render of every example, serial vs several processes, at 448 px.

    python bench/render_prepass.py [--examples 200] [--size 448] [--workers 1 2] [--repeats 3]

Renders ``--examples`` single-image SFT examples (a ``--size``-px PNG with a few random shapes,
plus a question and an answer) with ``training.prerender.render_all``, as ``sft.run`` does, once
per process count (``--workers``: 1 = serial; N = this process and N-1 forked ones) and round-robin
``--repeats`` times (so load elsewhere on the machine hits every
setting alike). The processor is the built-in tiny model's tokenizer and template with Qwen2-VL's
published image-processor limits (``min_pixels`` 56², ``max_pixels`` 28² x 1280, patch 14, merge
2), so a 448-px image is what a real Qwen2-VL run keeps: 32 x 32 patches, 256 image tokens. It
prints the wall time per setting (min/median/max), this process's CPU time per example (all its
threads; the workers' not included), the 1-minute load average before and after, and
the host bytes of one image's ``pixel_values`` as training keeps them: fp32 (CPU runs) and bf16
(runs under bf16 autocast).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _picture(rng: random.Random, size: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        r = rng.randrange(size // 16, size // 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
    from openft.models.loader import resolve_base
    from openft.training.prerender import render_all
    from openft.training.recipes.sft import _render

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache:
        processor = AutoProcessor.from_pretrained(resolve_base("openft-tiny-vlm", Path(cache)))
    processor.image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    rng = random.Random(0)
    examples = [
        ChatExample(
            line=i + 1,
            messages=(
                Message(
                    "user",
                    (
                        ImagePart(url="data:", data=_picture(rng, args.size)),
                        TextPart("What is in the picture?"),
                    ),
                ),
                Message("assistant", (TextPart(f"Six round shapes, number {i}."),), weight=1),
            ),
        )
        for i in range(args.examples)
    ]
    fn = functools.partial(_render, processor, max_length=4096)

    times: dict[int, list[float]] = {w: [] for w in args.workers}
    main_cpu: dict[int, list[float]] = {w: [] for w in args.workers}  # this process, all threads
    loads = []
    reference = None
    for i in range(args.repeats):
        for w in args.workers:
            loads.append(os.getloadavg()[0])
            t0, c0 = time.perf_counter(), time.process_time()
            rendered = render_all(fn, examples, workers=w)
            times[w].append(time.perf_counter() - t0)
            main_cpu[w].append(time.process_time() - c0)
            loads.append(os.getloadavg()[0])
            print(
                f"run {i + 1}/{args.repeats}: {w} process(es) {times[w][-1]:.2f} s, "
                f"main process CPU {main_cpu[w][-1] / args.examples * 1e3:.1f} ms/example",
                flush=True,
            )
            reference = reference or rendered
            assert all(
                torch.equal(a.vision["pixel_values"], b.vision["pixel_values"]) and a.input_ids == b.input_ids
                for a, b in zip(reference, rendered, strict=True)
            ), "a worker count rendered something else"

    assert reference is not None
    pixels = reference[0].vision["pixel_values"]
    grid = reference[0].vision["image_grid_thw"].tolist()
    print(
        f"\n{args.examples} examples, one {args.size}-px image each (grid {grid}, {pixels.shape[0]} patches)"
    )
    print(
        "| processes | wall s (min/median/max) | examples/s (median) | main process CPU ms/example (median) |"
        "\n|---|---|---|---|"
    )
    for w in args.workers:
        med = statistics.median(times[w])
        spread = "/".join(f"{v:.2f}" for v in (min(times[w]), med, max(times[w])))
        cpu = statistics.median(main_cpu[w]) / args.examples * 1e3
        print(f"| {w} | {spread} | {args.examples / med:.0f} | {cpu:.1f} |")
    print(f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f}; cores: {os.cpu_count()}")
    fp32 = pixels.nbytes
    bf16 = pixels.to(torch.bfloat16).nbytes
    print(
        f"pixel_values per image in host RAM: {fp32:,} bytes fp32 ({fp32 / 2**20:.2f} MiB), "
        f"{bf16:,} bytes bf16 ({bf16 / 2**20:.2f} MiB)"
    )


if __name__ == "__main__":
    main()
