"""Chat-completions serving throughput under concurrency: ``python bench/serve_throughput.py``.

Starts a real ``openft serve --workers 1`` (own process group, temporary ``OPENFT_HOME``, free
loopback port, key made in-process) and drives ``POST /v1/chat/completions`` with 1, 8, 32 and 64
concurrent clients (asyncio + httpx, raw HTTP, always streamed so time-to-first-token is seen):

- ``model``: text prompts to ``openft-tiny-vlm``;
- ``adapters``: the same prompts spread over N LoRA fine-tunes of that base, trained here through
  the API (``extra_body={"openft": {"training_type": "lora"}}``, a few steps each);
- ``vision``: prompts with one image each, of mixed sizes (64x64 up to 448x448 before resizing).

Concurrency 1 is the one-at-a-time baseline; every other level's throughput is divided by the
baseline measured in the same repetition. Repetitions are interleaved (rep 1 of every case and
level, then rep 2, ...) so slow spells of the shared machine spread over all cases. Each
request uses ``max_tokens`` fixed and ``temperature=0``; request ``i`` of a run uses prompt /
adapter / image ``i % 8``, so the greedy answers at every level can be compared with the
baseline's (``!=seq``). While a level runs, a probe calls ``GET /v1/models`` every 0.25 s.
``--budget-s`` bounds the measuring time: runs that would start past it are skipped and listed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import Server, start_server  # noqa: E402  (a real `openft serve` on a free port)
from tests.tasks import colour_examples, to_jsonl  # noqa: E402

TINY = "openft-tiny-vlm"
ADAPTER_EXAMPLES, ADAPTER_BATCH = 16, 8  # one epoch: 2 optimizer steps per adapter
KEYS = 8  # request i uses prompt/adapter/image i % KEYS, so every level repeats the baseline's requests
PROMPTS = [
    "Colour of the wet small sky one?",
    "Describe a quiet harbour at dawn in a few words.",
    "What comes after Monday, and why?",
    "Colour of the old apple over there?",
    "List three things found in a kitchen.",
    "Colour of the big fresh grass field?",
    "Write one sentence about trains.",
    "Colour of the cold snow on the hill?",
]
IMAGE_SIZES = [(64, 64), (112, 112), (224, 160), (448, 448), (96, 200), (160, 224), (56, 56), (320, 240)]
PROBE_EVERY = 0.25
MAX_DIFFS_SHOWN = 6


# --------------------------------------------------------------------------- requests


@dataclass
class Case:
    name: str
    models: list[str]
    with_images: bool = False

    def body(self, i: int, max_tokens: int, images: list[str]) -> dict[str, Any]:
        k = i % KEYS
        text = PROMPTS[k]
        content: str | list[dict[str, Any]] = text
        if self.with_images:
            content = [
                {"type": "image_url", "image_url": {"url": images[k]}},
                {"type": "text", "text": "What is in this picture? " + text},
            ]
        return {
            "model": self.models[k % len(self.models)],
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


@dataclass
class Result:
    key: int
    outcome: str
    """``"200"``, another status code, ``"stream-error"`` (error event after 200) or an exception name."""
    latency: float
    ttft: float | None = None
    tokens: int = 0
    text: str = ""


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], key: int) -> Result:
    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(key, str(resp.status_code), time.perf_counter() - t0)
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return Result(key, "stream-error", time.perf_counter() - t0)
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        parts.append(piece)
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            if not done:
                return Result(key, "no-[DONE]", time.perf_counter() - t0)
    except httpx.HTTPError as exc:
        return Result(key, type(exc).__name__, time.perf_counter() - t0)
    return Result(key, "200", time.perf_counter() - t0, ttft, tokens, "".join(parts))


@dataclass
class Run:
    case: str
    level: int
    rep: int
    wall: float
    results: list[Result]
    probes: list[float]
    load_before: float
    load_after: float

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.outcome == "200"]

    @property
    def rps(self) -> float:
        return len(self.ok) / self.wall

    @property
    def tps(self) -> float:
        return sum(r.tokens for r in self.ok) / self.wall


async def run_level(
    url: str, key: str, case: Case, level: int, n: int, args: argparse.Namespace, images: list[str]
) -> tuple[float, list[Result], list[float]]:
    """``n`` requests from ``level`` concurrent clients, each taking the next request when its last ends."""
    limits = httpx.Limits(max_connections=level + 1, max_keepalive_connections=level + 1)
    timeout = httpx.Timeout(args.request_timeout, connect=30)
    headers = {"Authorization": f"Bearer {key}"}
    results: list[Result] = []
    probes: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        next_i = iter(range(n))

        async def client_loop() -> None:
            for i in next_i:  # a shared iterator: each index goes to exactly one client
                results.append(await one_request(client, case.body(i, args.max_tokens, images), i % KEYS))

        async def probe(stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as side:
                while not stop.is_set():
                    t = time.perf_counter()
                    try:
                        await side.get("/v1/models")
                        probes.append(time.perf_counter() - t)
                    except httpx.HTTPError:
                        probes.append(math.inf)
                    try:
                        await asyncio.wait_for(stop.wait(), PROBE_EVERY)
                    except TimeoutError:
                        pass

        stop = asyncio.Event()
        prober = asyncio.create_task(probe(stop))
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(level)))
        wall = time.perf_counter() - t0
        stop.set()
        await prober
    return wall, results, probes


async def warm_up(url: str, key: str, case: Case, images: list[str]) -> None:
    """One untimed request per model of the case, so model/adapter loading is not measured."""
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600
    ) as client:
        for j, _model in enumerate(case.models):
            r = await one_request(client, case.body(j, 1, images), j)
            if r.outcome != "200":
                raise SystemExit(f"warm-up of {case.name} ({case.models[j]}) failed: {r.outcome}")


# --------------------------------------------------------------------------- setup


def png_data_url(width: int, height: int, seed: int) -> str:
    from PIL import Image, ImageDraw

    colours = ["red", "blue", "green", "black", "white", "yellow", "purple", "orange"]
    img = Image.new("RGB", (width, height), colours[(seed + 3) % len(colours)])
    d = ImageDraw.Draw(img)
    d.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=colours[seed % len(colours)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def train_adapters(server: Server, base: str, n: int, timeout: float) -> tuple[list[str], str]:
    """``n`` LoRA fine-tunes of ``base`` through the API; returns their ids (empty if any failed)."""
    client = server.client("bench")
    f = client.files.create(
        file=("train.jsonl", io.BytesIO(to_jsonl(colour_examples(ADAPTER_EXAMPLES, seed=7)))),
        purpose="fine-tune",
    )
    t0 = time.perf_counter()
    jobs = [
        client.fine_tuning.jobs.create(
            training_file=f.id,
            model=base,
            suffix=f"adapter{i}",
            seed=i,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": ADAPTER_BATCH}},
            },
            extra_body={"openft": {"training_type": "lora"}},
        )
        for i in range(n)
    ]
    pending = {j.id for j in jobs}
    done: dict[str, Any] = {}
    while pending and time.perf_counter() - t0 < timeout:
        for jid in list(pending):
            job = client.fine_tuning.jobs.retrieve(jid)
            if job.status in ("succeeded", "failed", "cancelled"):
                done[jid] = job
                pending.discard(jid)
        time.sleep(0.5)
    took = time.perf_counter() - t0
    bad = [f"{j.id} {j.status} {j.error}" for j in done.values() if j.status != "succeeded"]
    if pending or bad:
        for jid in pending:
            client.fine_tuning.jobs.cancel(jid)
        return (
            [],
            f"adapters not made in {took:.0f} s ({len(pending)} unfinished; {bad}): adapters case skipped",
        )
    ids = [done[j.id].fine_tuned_model for j in jobs]
    steps = math.ceil(ADAPTER_EXAMPLES / ADAPTER_BATCH)
    return ids, f"{n} LoRA adapters trained through the API in {took:.0f} s ({steps} steps each, one worker)"


def stop_group(server: Server) -> None:
    """SIGTERM the server's process group (API + workers), then SIGKILL whatever is left."""
    try:
        pgid = os.getpgid(server.proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        server.proc.wait(timeout=15)
    except (ProcessLookupError, PermissionError):
        return
    except Exception:  # noqa: BLE001  (a hung API: fall through to SIGKILL)
        pass
    time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def first_traceback(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(text) if line.startswith("Traceback")), None)
    return "\n".join(text[start : start + lines] if start is not None else text[-lines:])


# --------------------------------------------------------------------------- report


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p99 of fewer than 100 values is the maximum)."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)] if s else math.nan


def _ttfts(run: Run) -> list[float]:
    return [x.ttft for x in run.ok if x.ttft is not None]


def _latencies(run: Run) -> list[float]:
    return [x.latency for x in run.ok]


def mmm(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def report(runs: list[Run], cases: list[str], levels: list[int], expected_reps: int) -> None:
    seq_text: dict[tuple[str, int], str] = {}
    for r in runs:
        if r.level == 1:
            for res in r.ok:
                seq_text.setdefault((r.case, res.key), res.text)
    print(
        "\nper case and level, over repetitions: min/median/max for req/s, tok/s and x seq; "
        "medians over repetitions for the percentiles (ms)."
    )
    head = (
        f"{'case':<9}{'conc':>5}{'reps':>5}{'reqs':>5}  {'req/s':<18}{'tok/s':<21}{'x seq':<16}"
        f"{'TTFT p50':>9}{'p99':>7}{'lat p50':>8}{'p99':>7}{'models max':>11}  "
        f"{'!=seq':>6}  {'errors':<14}{'load 1m before->after'}"
    )
    print(head)
    print("-" * len(head))
    shown_diffs: list[tuple[Run, Result, str]] = []
    for name in cases:
        base_rps = {r.rep: r.rps for r in runs if r.case == name and r.level == 1}
        for level in levels:
            rs = [r for r in runs if r.case == name and r.level == level]
            if not rs:
                continue
            ratios = [r.rps / base_rps[r.rep] for r in rs if base_rps.get(r.rep)]
            ttft50, ttft99, lat50, lat99 = (
                statistics.median(pct(vals(r), p) for r in rs) * 1000
                for vals, p in ((_ttfts, 50), (_ttfts, 99), (_latencies, 50), (_latencies, 99))
            )
            probe = max((max(r.probes) for r in rs if r.probes), default=math.nan) * 1000
            errors = Counter(x.outcome for r in rs for x in r.results if x.outcome != "200")
            diffs = [
                (r, x)
                for r in rs
                for x in r.ok
                if (name, x.key) in seq_text and x.text != seq_text[(name, x.key)]
            ]
            differ = len(diffs)
            shown_diffs.extend((r, x, seq_text[(name, x.key)]) for r, x in diffs)
            checked = sum(1 for r in rs for x in r.ok if (name, x.key) in seq_text)
            loads = " ".join(f"{r.load_before:.1f}->{r.load_after:.1f}" for r in rs)
            err = ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"
            print(
                f"{name:<9}{level:>5}{len(rs):>3}/{expected_reps}{len(rs[0].results):>5}  "
                f"{mmm([r.rps for r in rs], '.2f'):<18}{mmm([r.tps for r in rs], '.1f'):<21}"
                f"{mmm(ratios, '.2f'):<16}{ttft50:>9.0f}{ttft99:>7.0f}{lat50:>8.0f}{lat99:>7.0f}"
                f"{probe:>11.0f}  {differ:>2}/{checked:<3}  {err:<14}{loads}"
            )
    for r, x, want in shown_diffs[:MAX_DIFFS_SHOWN]:
        at = next(
            (i for i, (a, b) in enumerate(zip(want, x.text, strict=False)) if a != b),
            min(len(want), len(x.text)),
        )
        print(
            f"!=seq: {r.case} conc {r.level} rep {r.rep} request key {x.key}: differs from char {at}: "
            f"seq {want[at : at + 24]!r} vs {x.text[at : at + 24]!r}"
        )


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--levels", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrent clients (1 = baseline)"
    )
    ap.add_argument(
        "--model",
        default=TINY,
        help=f"base model served: {TINY}, qwen2-vl-2b (a random-weight Qwen2-VL-2B-sized model built "
        "here, for a GPU) or a local model folder",
    )
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every case and level")
    ap.add_argument(
        "--cases", nargs="+", default=["model", "adapters", "vision"], choices=["model", "adapters", "vision"]
    )
    ap.add_argument("--requests", type=int, default=16, help="requests per run (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--adapters", type=int, default=4, help="LoRA adapters to train for the adapters case; 0 skips it"
    )
    ap.add_argument("--train-timeout", type=float, default=240, help="give up on the adapters after this (s)")
    ap.add_argument("--budget-s", type=float, default=300, help="measuring time; later runs are skipped")
    ap.add_argument("--request-timeout", type=float, default=300)
    args = ap.parse_args()
    if 1 not in args.levels:
        ap.error("--levels must include 1: it is the baseline the other levels are divided by")
    args.levels = sorted(set(args.levels))
    if args.adapters == 0 and "adapters" in args.cases:
        args.cases.remove("adapters")

    # A SIGTERM to the bench unwinds through `finally`, so the server group is always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="openft-servebench-") as tmp:
        env = {"OPENFT_MAX_LOADED_MODELS": str(max(4, args.adapters + 1))}
        if args.model == "qwen2-vl-2b":
            from train_throughput import prepare_model  # bench/ is on sys.path when run as a script

            args.model = str(prepare_model("qwen2-vl-2b", Path(tmp)))
        if args.model != TINY:
            if not Path(args.model).is_dir():
                ap.error(f"--model {args.model!r} is neither {TINY}, qwen2-vl-2b nor a model folder")
            env["OPENFT_BASE_MODELS"] = json.dumps([args.model])
        load_start = os.getloadavg()
        t = time.perf_counter()
        server = start_server(Path(tmp) / "home", "--workers", "1", env=env, new_session=True)
        startup = time.perf_counter() - t
        try:
            runs, notes, skipped = measure(server, args)
        finally:
            stop_group(server)
        if any(x.outcome[0] == "5" or x.outcome == "stream-error" for r in runs for x in r.results):
            notes.append(
                "server errors; the first traceback in the server log:\n" + first_traceback(server.log)
            )
    print(f"\nopenft serve throughput, {args.model}, max_tokens={args.max_tokens}, temperature=0, streamed")
    print(
        f"machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average (1/5/15 min) at start "
        f"{'/'.join(f'{x:.1f}' for x in load_start)}, at end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(f"server start (to /healthz 200): {startup:.1f} s")
    for n in notes:
        print(n)
    cases = [c for c in CASES_ORDER if c in {r.case for r in runs}]
    report(runs, cases, args.levels, args.reps)
    if skipped:
        print(f"\nskipped past --budget-s {args.budget_s:.0f}: " + ", ".join(skipped))


CASES_ORDER = ["model", "adapters", "vision"]


def measure(server: Server, args: argparse.Namespace) -> tuple[list[Run], list[str], list[str]]:
    key = server.new_key("bench")
    notes: list[str] = []
    cases: list[Case] = []
    for name in CASES_ORDER:
        if name not in args.cases:
            continue
        if name == "model":
            cases.append(Case("model", [args.model]))
        elif name == "vision":
            cases.append(Case("vision", [args.model], with_images=True))
        else:
            ids, note = train_adapters(server, args.model, args.adapters, args.train_timeout)
            notes.append(note)
            if ids:
                cases.append(Case("adapters", ids))
    images = [png_data_url(w, h, i) for i, (w, h) in enumerate(IMAGE_SIZES)]
    if any(c.with_images for c in cases):
        notes.append("vision images (w x h): " + ", ".join(f"{w}x{h}" for w, h in IMAGE_SIZES))

    runs: list[Run] = []
    skipped: list[str] = []
    t0 = time.perf_counter()
    for rep in range(1, args.reps + 1):
        for case in cases:
            if time.perf_counter() - t0 > args.budget_s:
                skipped.extend(f"{case.name}@{lv} rep {rep}" for lv in args.levels)
                continue
            asyncio.run(warm_up(server.url, key, case, images))
            for level in args.levels:
                if time.perf_counter() - t0 > args.budget_s:
                    skipped.append(f"{case.name}@{level} rep {rep}")
                    continue
                n = max(args.requests, level)
                before = os.getloadavg()[0]
                wall, results, probes = asyncio.run(run_level(server.url, key, case, level, n, args, images))
                run = Run(case.name, level, rep, wall, results, probes, before, os.getloadavg()[0])
                runs.append(run)
                bad = Counter(r.outcome for r in results if r.outcome != "200")
                print(
                    f"rep {rep} {case.name:<8} conc {level:>3}: {n} requests in {wall:6.1f} s, "
                    f"{run.rps:5.2f} req/s, {run.tps:6.1f} tok/s, errors {dict(bad) or 0}, "
                    f"load {before:.1f}->{run.load_after:.1f}",
                    flush=True,
                )
    return runs, notes, skipped


if __name__ == "__main__":
    main()
