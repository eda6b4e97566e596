"""End-to-end timings of the README demo: ``python bench/e2e_tiny.py [--examples 300 --epochs 3]``.

Starts a real ``openft serve --workers 1`` (subprocess, temporary home, free loopback port),
creates a key with ``openft keys create`` and walks the README demo through the unmodified
openai SDK, timing each phase:

- upload: ``files.create`` of N colour-task examples (``tests/tasks.py``);
- validation: job creation -> first time the job is seen ``queued`` (or later);
- training per epoch: between "Checkpoint created" events, both from the events' ``created_at``
  (whole seconds) and from this script's own polling clock (0.2 s resolution);
- total job time: creation -> ``succeeded``;
- chat: time to first token (streaming) and completion tokens / request time (non-streaming,
  ``max_tokens=64``, ``temperature=0``), cold (first request loads the model) and warm (median).

The fine-tuned tiny model learns to answer one word and stop, so its tokens/s mostly measures
request overhead; the random-init base model rarely stops early and shows decode speed.
Uses the shared generated model cache (``.openft/test-models``), so model generation is not timed.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import start_server  # noqa: E402  (a real `openft serve` on a free port)
from tests.tasks import colour_examples, to_jsonl  # noqa: E402

POLL = 0.2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chat-reps", type=int, default=5, help="warm repetitions per chat measurement")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="openft-bench-") as tmp:
        t = time.perf_counter()
        server = start_server(Path(tmp) / "home", "--workers", "1")
        startup = time.perf_counter() - t
        try:
            rows, notes = run(server, args)
        finally:
            server.stop()
    print(
        f"\nopenft e2e, openft-tiny-vlm, {args.examples} examples x {args.epochs} epochs, batch {args.batch_size}"
    )
    print(f"machine: {os.cpu_count()} cores, load average at the end {os.getloadavg()[0]:.1f} (1 min)")
    print(f"{'phase':<50}{'poll clock (s)':>16}{'event clock (s)':>17}")
    print("-" * 83)
    print(f"{'server start (to /healthz 200)':<50}{startup:>16.2f}{'':>17}")
    for name, mine, theirs in rows:
        a = f"{mine:.3f}" if isinstance(mine, float) else (mine or "")
        b = f"{theirs:.0f}" if isinstance(theirs, (int, float)) else (theirs or "")
        print(f"{name:<50}{a:>16}{b:>17}")
    for n in notes:
        print(n)


def run(server, args):
    client = server.client("bench")
    data = to_jsonl(colour_examples(args.examples, seed=1))
    rows: list[tuple[str, object, object]] = []

    t = time.perf_counter()
    f = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    rows.append(
        (f"upload ({len(data) / 1024:.0f} KiB, {args.examples} examples)", time.perf_counter() - t, None)
    )

    t0 = time.perf_counter()
    job = client.fine_tuning.jobs.create(
        training_file=f.id,
        model="openft-tiny-vlm",
        suffix="bench",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": args.epochs, "batch_size": args.batch_size}},
        },
    )
    create_s = time.perf_counter() - t0
    status_seen: dict[str, float] = {job.status: 0.0}
    event_seen: dict[str, tuple[float, object]] = {}  # id -> (our clock, event)
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        now = time.perf_counter() - t0
        status_seen.setdefault(job.status, now)
        for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data:
            event_seen.setdefault(e.id, (now, e))
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(POLL)
    for e in client.fine_tuning.jobs.list_events(job.id, limit=100):  # anything the last poll missed
        event_seen.setdefault(e.id, (time.perf_counter() - t0, e))
    if job.status != "succeeded":
        raise SystemExit(f"job {job.status}: {job.error}")

    events = sorted(event_seen.values(), key=lambda p: (p[1].created_at, p[0]))

    def first(prefix: str):
        return next(((mine, e) for mine, e in events if e.message.startswith(prefix)), (None, None))

    validated_mine = min(v for k, v in status_seen.items() if k != "validating_files")
    _, created_ev = first("Created fine-tuning job")
    _, queued_ev = first("Files validated")
    started_mine, started_ev = first("Fine-tuning job started")
    rows.append(("job create call", create_s, None))
    rows.append(
        (
            "validation (create -> queued)",
            validated_mine,
            queued_ev.created_at - created_ev.created_at if queued_ev and created_ev else None,
        )
    )
    running_mine = status_seen.get("running", validated_mine)
    rows.append(("queued -> running", running_mine - validated_mine, None))
    ckpts = [(mine, e) for mine, e in events if e.message.startswith("Checkpoint created")]
    prev_mine, prev_ev = running_mine, started_ev
    for i, (mine, e) in enumerate(ckpts, 1):
        label = f"epoch {i} (to its checkpoint event)" if i > 1 else "epoch 1 (+ model load, render)"
        rows.append((label, mine - prev_mine, e.created_at - prev_ev.created_at if prev_ev else None))
        prev_mine, prev_ev = mine, e
    done_mine = status_seen["succeeded"]
    rows.append(("last checkpoint -> succeeded", done_mine - prev_mine, None))
    rows.append(("total job (create -> succeeded)", done_mine, job.finished_at - job.created_at))
    metrics = [e for _, e in events if e.type == "metrics"]
    last = max(metrics, key=lambda e: e.data["step"]) if metrics else None

    notes = [
        f"\njob {job.id}: {last.data['step'] if last else '?'} steps, trained_tokens={job.trained_tokens}, "
        f"final train_loss={last.data['train_loss']:.4f}"
        if last
        else "",
        "poll clock: this script's perf_counter when it first saw the status/event (polling every "
        f"{POLL}s, so +-{POLL}s); event clock: difference of created_at (whole seconds).",
    ]

    prompt = [{"role": "user", "content": "Colour of the wet small sky one?"}]
    for model in (job.fine_tuned_model, "openft-tiny-vlm"):
        short = "fine-tuned" if model.startswith("ft:") else "base (random init)"
        ttfts = [ttft(client, model, prompt) for _ in range(args.chat_reps + 1)]
        rows.append((f"chat TTFT, {short}, cold", ttfts[0][0], None))
        rows.append((f"chat TTFT, {short}, warm median", statistics.median(x[0] for x in ttfts[1:]), None))
        gens = [generate(client, model, prompt) for _ in range(args.chat_reps)]
        secs = statistics.median(g[0] for g in gens)
        toks = statistics.median(g[1] for g in gens)
        rows.append((f"chat, {short}: s/request (non-stream)", secs, None))
        rows.append((f"chat, {short}: completion tok/s", toks / secs, f"{toks:.0f} tok"))
        notes.append(f"{short} answer: {gens[0][2][:60]!r}")
    return rows, notes


def ttft(client, model, messages) -> tuple[float, str]:
    t = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=64, stream=True
    )
    first = None
    text = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t
            text.append(chunk.choices[0].delta.content)
    return (first if first is not None else time.perf_counter() - t), "".join(text)


def generate(client, model, messages) -> tuple[float, int, str]:
    t = time.perf_counter()
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=64)
    return time.perf_counter() - t, out.usage.completion_tokens, out.choices[0].message.content


if __name__ == "__main__":
    main()
