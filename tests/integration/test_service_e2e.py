"""The whole path a user walks, through the unmodified openai SDK against a real `openft serve`:
upload -> fine-tune (real CPU training of openft-tiny-vlm) -> events/checkpoints -> chat."""

from __future__ import annotations

import csv
import io
import json
import shutil
import stat
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.openapi_schema import validate_against
from tests.tasks import COLOURS, colour_examples, to_jsonl

pytestmark = pytest.mark.slow
TINY = "openft-tiny-vlm"


def wait_for(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=600):
    deadline = time.monotonic() + timeout  # a guard against hanging, not a speed assertion
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status}")


def accuracy(client, model, pairs):
    right = 0
    for prompt, answer in pairs:
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=4
        )
        right += out.choices[0].message.content.strip() == answer
    return right / len(pairs)


@pytest.fixture(scope="module")
def trained(full_server):
    c = full_server.client("demo")
    train = colour_examples(120, seed=1)
    f = c.files.create(file=("train.jsonl", io.BytesIO(to_jsonl(train))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model="openft-tiny-vlm",
        suffix="demo",
        seed=3,  # reproducible; over seeds 1-7 held-out accuracy was 1.00
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 5, "batch_size": 8, "learning_rate_multiplier": 1.0}
            },
        },
    )
    return c, wait_for(c, job.id), train


def test_job_succeeds_with_every_field_filled(full_server, trained):
    c, job, _ = trained
    assert job.status == "succeeded", job.error
    raw = httpx.get(
        f"{full_server.base_url}/fine_tuning/jobs/{job.id}", headers={"Authorization": f"Bearer {c.api_key}"}
    ).json()
    validate_against("FineTuningJob", raw)
    assert job.fine_tuned_model.startswith("ft:openft-tiny-vlm:demo:demo:")
    assert job.fine_tuned_model.endswith(job.id[-8:])
    assert job.finished_at >= job.created_at and job.trained_tokens > 0
    assert job.hyperparameters.n_epochs == 5 and job.hyperparameters.batch_size == 8
    assert job.estimated_finish is None and job.error is None
    # validation counted tokens with the same rendering training uses: every epoch bills them all
    summary = next(
        e for e in c.fine_tuning.jobs.list_events(job.id, limit=200) if e.message.startswith("Validated")
    )
    assert job.trained_tokens == 5 * summary.data["summary"]["tokens"]["total"]


def test_events_tell_the_story(full_server, trained):
    c, job, _ = trained
    events = list(c.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed"  # newest first
    assert any(m.startswith("New fine-tuned model created: ft:") for m in messages)
    assert any(m.startswith("Validated training_file: 120 examples") for m in messages)
    assert messages[-1].startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics"]
    total = 5 * 15
    assert (
        len(metrics) == total and metrics[0].data["step"] == total and metrics[0].data["total_steps"] == total
    )
    first_loss, last_loss = metrics[-1].data["train_loss"], metrics[0].data["train_loss"]
    assert last_loss < first_loss / 4, (first_loss, last_loss)
    assert 0.0 <= metrics[0].data["train_mean_token_accuracy"] <= 1.0
    raw = httpx.get(
        f"{full_server.base_url}/fine_tuning/jobs/{job.id}/events?limit=5",
        headers={"Authorization": f"Bearer {c.api_key}"},
    ).json()
    validate_against("ListFineTuningJobEventsResponse", raw)


def test_checkpoints_last_three_epochs_and_servable(full_server, trained):
    c, job, _ = trained
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [k.step_number for k in ckpts] == [75, 60, 45]  # an epoch is 15 steps; the last 3 kept
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-75"
    assert all(k.id.startswith("ftckpt_") and k.metrics.train_loss is not None for k in ckpts)
    raw = httpx.get(
        f"{full_server.base_url}/fine_tuning/jobs/{job.id}/checkpoints",
        headers={"Authorization": f"Bearer {c.api_key}"},
    ).json()
    validate_against("ListFineTuningJobCheckpointsResponse", raw)
    out = c.chat.completions.create(
        model=ckpts[-1].fine_tuned_model_checkpoint,
        messages=[{"role": "user", "content": "Colour of the big sky one?"}],
        max_tokens=3,
    )
    assert out.model == ckpts[-1].fine_tuned_model_checkpoint
    model_ids = [m.id for m in c.models.list()]
    assert job.fine_tuned_model in model_ids and ckpts[0].fine_tuned_model_checkpoint in model_ids


def test_result_csv(trained):
    c, job, _ = trained
    (result_id,) = job.result_files
    meta = c.files.retrieve(result_id)
    assert meta.purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(c.files.content(result_id).text)))
    assert list(rows[0]) == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    assert [int(r["step"]) for r in rows] == list(range(1, 76))
    assert rows[0]["valid_loss"] == ""


def test_fine_tuned_model_learned_the_rule(full_server, trained):
    c, job, train = trained
    seen = {p for p, _ in train}
    held_out = [(p, a) for p, a in colour_examples(60, seed=999) if p not in seen]
    assert len(held_out) >= 40
    base = accuracy(c, "openft-tiny-vlm", held_out)
    tuned = accuracy(c, job.fine_tuned_model, held_out)
    assert base <= 1 / len(COLOURS)
    assert tuned >= 0.9, f"fine-tuned accuracy {tuned:.2f}"


def test_chat_response_shape_and_streaming_equals_non_streaming(full_server, trained):
    c, job, _ = trained
    msgs = [{"role": "user", "content": "Colour of my wet snow one?"}]
    r = httpx.post(
        f"{full_server.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {c.api_key}"},
        json={"model": job.fine_tuned_model, "messages": msgs, "temperature": 0, "max_tokens": 8},
    ).json()
    validate_against("CreateChatCompletionResponse", r)
    ChatCompletion.model_validate(r)
    full = c.chat.completions.create(model=job.fine_tuned_model, messages=msgs, temperature=0, max_tokens=8)
    assert (
        full.usage.prompt_tokens > 0
        and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    )
    chunks = list(
        c.chat.completions.create(
            model=job.fine_tuned_model,
            messages=msgs,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    for ch in chunks:
        validate_against("CreateChatCompletionStreamResponse", ch.model_dump(exclude_unset=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]


def test_delete_model_then_it_is_gone(full_server, trained):
    c, job, _ = trained
    ckpt = c.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    other = full_server.client("someone-else")
    with pytest.raises(openai.NotFoundError):  # other projects can neither serve nor delete it
        other.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        other.models.delete(ckpt)
    assert c.models.delete(ckpt).deleted
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model=ckpt, messages=[{"role": "user", "content": "hi"}])


def test_bad_data_fails_the_job_naming_the_line_and_the_worker_survives(full_server):
    c = full_server.client("bad-data")
    lines = to_jsonl(colour_examples(12, seed=3)).decode().splitlines()
    record = json.loads(lines[4])
    record["messages"][0]["role"] = "robot"
    lines[4] = json.dumps(record)
    f = c.files.create(
        file=("bad.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
    )
    job = wait_for(c, c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm").id)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "Line 5" in job.error.message and "robot" in job.error.message
    assert job.fine_tuned_model is None and job.trained_tokens is None
    # the same worker goes on to train the next job
    good = c.files.create(
        file=("ok.jsonl", io.BytesIO(to_jsonl(colour_examples(12, seed=4)))), purpose="fine-tune"
    )
    ok = wait_for(
        c,
        c.fine_tuning.jobs.create(
            training_file=good.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 1}
        ).id,
    )
    assert ok.status == "succeeded", ok.error


def test_cancel_stops_a_running_job(full_server):
    c = full_server.client("cancel")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(200, seed=5)))), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    wait_for(c, job.id, statuses=("running",))
    while not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data):
        time.sleep(0.2)
    assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"

    # Within a few seconds training stops: the worker says so once its loop has returned, so
    # nothing is recorded after that line (no step ran past the cancel's step boundary).
    deadline = time.monotonic() + 60
    while not any("stopped" in e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data):
        assert time.monotonic() < deadline, "worker did not stop"
        time.sleep(0.2)
    events = c.fine_tuning.jobs.list_events(job.id, limit=20).data
    assert events[0].message.startswith("Training stopped at a step boundary"), events[0].message
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps and steps[0] < 50 * 200
    final = c.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None


def assert_portable(folder: Path, listing: dict, *, local: list) -> None:
    """An export folder moves to another machine: plain files (0644, folders 0755), no links, no
    path of this machine inside, and the --json listing names every file."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert listing["path"] == str(folder) and listing["files"] == files and files
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in folder.rglob("*"):
        assert not path.is_symlink(), path
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
        if path.suffix in (".json", ".jinja", ".txt"):
            text = path.read_text()
            assert not [str(p) for p in local if str(p) in text], (path, text[:300])


def test_lora_job_exports_portable_merged_weights_that_answer_like_openft(full_server, tmp_path):
    """The openft extension field picks LoRA; `openft export` writes portable folders, and the
    merged one, moved elsewhere, loads with plain transformers and gives the same greedy answer
    as openft's own serving."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    c = full_server.client("export")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(24, seed=8)))), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(
        training_file=f.id,
        model="openft-tiny-vlm",
        hyperparameters={"n_epochs": 1},
        extra_body={"openft": {"training_type": "lora"}},
    )
    job = wait_for(c, job.id)
    assert job.status == "succeeded", job.error
    started = [
        e
        for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.message.startswith("Fine-tuning job started")
    ]
    assert "(lora)" in started[0].message

    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    for target, extra in ((adapter_dir, []), (merged_dir, ["--merged"])):
        out = full_server.cli("export", job.fine_tuned_model, "--to", str(target), "--json", *extra)
        assert out.returncode == 0, out.stderr
        assert_portable(
            target, json.loads(out.stdout), local=[full_server.home, full_server.env["OPENFT_MODEL_CACHE"]]
        )
    assert (adapter_dir / "adapter_config.json").exists()
    assert (merged_dir / "config.json").exists() and not (merged_dir / "adapter_config.json").exists()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY
    assert json.loads((adapter_dir / "openft.json").read_text()) == {"kind": "adapter", "base_model": TINY}
    merged_dir = shutil.move(merged_dir, tmp_path / "moved")  # portable: loads from anywhere

    messages = [{"role": "user", "content": "Colour of the old grass far?"}]
    served = c.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, temperature=0, max_tokens=8
    )
    tok = AutoTokenizer.from_pretrained(merged_dir)
    model = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    plain = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert plain == served.choices[0].message.content
