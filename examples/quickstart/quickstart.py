"""openft quick start: upload, fine-tune, follow the training, then ask held-out questions and
print the base model's answers beside the fine-tuned model's.

    export OPENFT_API_KEY=$(.venv/bin/openft keys create --project demo)
    .venv/bin/python examples/quickstart/quickstart.py

Uses only the openai SDK; OPENFT_BASE_URL (default http://127.0.0.1:8000/v1) points it at openft.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).parent
BASE_MODEL = "openft-tiny-vlm"


def follow(client: OpenAI, job_id: str) -> None:
    """Print new events as they arrive until the job ends (events come newest first)."""
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        fresh = [e for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data if e.id not in seen]
        for event in reversed(fresh):
            seen.add(event.id)
            data = event.data or {}
            if event.type == "metrics" and data.get("step") not in (1, data.get("total_steps")):
                if int(data.get("step", 0)) % 40 and "valid_loss" not in data:
                    continue  # every 40th step is enough to watch the loss fall
            print(f"  {event.message}", flush=True)
        if job.status in ("succeeded", "failed", "cancelled"):
            return
        time.sleep(1)


def ask(client: OpenAI, model: str, messages: list[dict]) -> str:
    out = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)
    text = (out.choices[0].message.content or "").strip()
    return "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in text)


def main() -> int:
    client = OpenAI(
        base_url=os.environ.get("OPENFT_BASE_URL", "http://127.0.0.1:8000/v1"),
        api_key=os.environ["OPENFT_API_KEY"],
    )
    with open(HERE / "train.jsonl", "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune")
    with open(HERE / "validation.jsonl", "rb") as f:
        valid = client.files.create(file=f, purpose="fine-tune")
    print(f"uploaded {train.filename} ({train.id}) and {valid.filename} ({valid.id})")

    # Hyperparameters left on "auto": openft picks them from the data and records them on the job.
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=train.id, validation_file=valid.id, suffix="quickstart", seed=42
    )
    print(f"job {job.id} created; following it (also visible on the dashboard at /):")
    follow(client, job.id)
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status != "succeeded":
        print(f"job ended {job.status}: {job.error}", file=sys.stderr)
        return 1
    hp = (
        job.method.supervised.hyperparameters if job.method and job.method.supervised else job.hyperparameters
    )
    print(f"\nfine-tuned model: {job.fine_tuned_model}")
    print(
        f"hyperparameters: n_epochs={hp.n_epochs} batch_size={hp.batch_size} lr_multiplier={hp.learning_rate_multiplier}"
    )

    # Questions whose wording never appears in the training or validation files.
    rows = [json.loads(line)["messages"] for line in (HERE / "heldout.jsonl").read_text().splitlines()]
    width = max(len(m[1]["content"]) for m in rows)
    print(f"\n{'held-out question':<{width}}  {'expected':<8}  {'base':<14}  fine-tuned")
    right = {"base": 0, "tuned": 0}
    for messages in rows:
        question, expected = messages[:-1], messages[-1]["content"]
        base, tuned = ask(client, BASE_MODEL, question), ask(client, job.fine_tuned_model, question)
        right["base"] += base == expected
        right["tuned"] += tuned == expected
        mark = "ok" if tuned == expected else "WRONG"
        print(f"{question[-1]['content']:<{width}}  {expected:<8}  {base[:14]:<14}  {tuned}  {mark}")
    n = len(rows)
    print(f"\nright: base {right['base']}/{n}, fine-tuned {right['tuned']}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
