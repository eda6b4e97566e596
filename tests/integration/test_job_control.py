"""Issue 7 through the SDK: auto hyperparameters, validation metrics, pause/resume, crash recovery."""

from __future__ import annotations

import csv
import io
import os
import signal
import time

import openai
import pytest

from tests.conftest import start_server
from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow


def metric_events(c, job_id, limit=100):
    return [e for e in c.fine_tuning.jobs.list_events(job_id, limit=limit).data if e.type == "metrics"]


def last_step(c, job_id):
    events = metric_events(c, job_id, limit=20)
    return events[0].data["step"] if events else 0


def csv_rows(c, job):
    return list(csv.DictReader(io.StringIO(c.files.content(job.result_files[0]).text)))


def wait_until(predicate, timeout=300):
    """Poll ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout  # a guard against hanging, not a speed assertion
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)
    return value


def finish_after_restart(home, api_key, job_id, env=None, steps=300, check=None):
    """Start a new server on ``home``, wait for the job to succeed; return it and its event messages,
    having checked that its results file has every step exactly once (1..300: 60 examples x 5 epochs)
    and that its events are the job's, not the run's: one metrics event per step, the start-up
    events once, one "Job resumed" line. ``check(client, job, messages)`` runs while it is up."""
    restarted = start_server(home, "--workers", "1", env=env)
    try:
        c2 = openai.OpenAI(base_url=restarted.base_url, api_key=api_key, max_retries=0)
        done = wait_for(c2, job_id)
        assert done.status == "succeeded", done.error
        events = c2.fine_tuning.jobs.list_events(job_id, limit=1000).data
        messages = [e.message for e in events]
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, steps + 1))
        for start in (
            "Validated training_file",
            "Fine-tuning job started",
            "Estimated peak training memory",
            "trainable parameters",
            "training on ",
            "Job resumed at step",
        ):
            assert sum(m.startswith(start) for m in messages) == 1, (start, messages)
        assert [int(r["step"]) for r in csv_rows(c2, done)] == list(range(1, steps + 1))
        if check is not None:
            check(c2, done, messages)
        return c2, done, messages
    finally:
        restarted.stop()


def test_defaults_resolve_and_are_recorded(full_server):
    c = full_server.client("auto-hp")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(20, seed=11)))), purpose="fine-tune"
    )
    job = wait_for(c, c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm").id)
    assert job.status == "succeeded", job.error
    hp = job.hyperparameters
    assert hp.n_epochs == 5  # OpenAI's rule: 100 // 20 examples
    assert isinstance(hp.batch_size, int) and isinstance(hp.learning_rate_multiplier, float)
    assert job.method.supervised.hyperparameters.n_epochs == 5
    started = [
        e
        for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
        if e.message.startswith("Fine-tuning job started")
    ]
    assert "n_epochs=5" in started[0].message and "raise n_epochs by 1-2" in started[0].message


def test_validation_file_gives_valid_metrics_everywhere(full_server):
    c = full_server.client("valid")
    train = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(40, seed=12)))), purpose="fine-tune"
    )
    valid = c.files.create(
        file=("v.jsonl", io.BytesIO(to_jsonl(colour_examples(12, seed=13)))), purpose="fine-tune"
    )
    job = wait_for(
        c,
        c.fine_tuning.jobs.create(
            training_file=train.id,
            validation_file=valid.id,
            model="openft-tiny-vlm",
            hyperparameters={"n_epochs": 2, "batch_size": 4},
        ).id,
    )
    assert job.status == "succeeded", job.error
    with_valid = [e for e in metric_events(c, job.id) if "valid_loss" in e.data]
    assert with_valid and all(e.data["valid_loss"] > 0 for e in with_valid)
    assert any("validation loss=" in e.message for e in with_valid)
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert all(
        k.metrics.full_valid_loss is not None and k.metrics.full_valid_mean_token_accuracy is not None
        for k in ckpts
    )
    rows = csv_rows(c, job)
    assert any(r["valid_loss"] for r in rows) and any(r["valid_mean_token_accuracy"] for r in rows)


def test_pause_holds_still_and_resume_matches_an_uninterrupted_run(full_server):
    c = full_server.client("pause")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(60, seed=14)))), purpose="fine-tune"
    )
    hp = {"n_epochs": 6, "batch_size": 1}
    straight = wait_for(
        c,
        c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", seed=7, hyperparameters=hp).id,
    )
    assert straight.status == "succeeded", straight.error

    job = c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", seed=7, hyperparameters=hp)
    wait_until(lambda: last_step(c, job.id) >= 20)
    running = c.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.estimated_finish >= running.created_at  # kept current
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_until(
        lambda: any(
            "the job is paused" in e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=10)
        )
    )
    held = last_step(c, job.id)
    assert c.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError):  # only paused jobs resume; a paused job is not re-paused
        c.fine_tuning.jobs.pause(job.id)

    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    resumed = wait_for(c, job.id)
    assert resumed.status == "succeeded", resumed.error
    # In order: nothing trained while paused; the resumed run continued at the next step.
    events = c.fine_tuning.jobs.list_events(resumed.id, limit=1000).data[::-1]
    paused_at = next(i for i, e in enumerate(events) if "the job is paused" in e.message)
    after = [e for e in events[paused_at:] if e.type == "metrics" or e.message.startswith("Job resumed")]
    assert after[0].message.startswith(f"Job resumed at step {held} of 360")
    assert after[1].data["step"] == held + 1
    a = [float(r["train_loss"]) for r in csv_rows(c, straight)]
    b = [float(r["train_loss"]) for r in csv_rows(c, resumed)]
    assert len(a) == len(b) == 360
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_sigkill_mid_job_then_restart_finishes_it(tmp_path):
    env = {"OPENFT_LEASE_SECONDS": "3"}
    home = tmp_path / "home"
    server = start_server(home, "--workers", "1", env=env, new_session=True)
    c = server.client("crash")
    pairs = colour_examples(60, seed=15)
    body = to_jsonl([*pairs, pairs[0]])  # line 61 repeats line 1: a warning with no field
    f = c.files.create(file=("t.jsonl", io.BytesIO(body)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 5, "batch_size": 1}
    )
    # Past the first epoch's checkpoint (state saved at step 61) by a few steps, so the restart
    # re-runs steps whose metrics were already recorded.
    wait_until(lambda: last_step(c, job.id) >= 64)
    os.killpg(server.proc.pid, signal.SIGKILL)  # API and workers die together, as in a power loss
    server.proc.wait()
    assert c.fine_tuning.jobs  # the key and everything recorded live on in the home folder

    def check(c2, _job, messages):
        assert c2.files.content(f.id).read() == body

    # finish_after_restart: each step's metrics, the validation report and start-up events once
    _, _, messages = finish_after_restart(home, c.api_key, job.id, env=env, steps=305, check=check)
    assert any("continues it from its last saved state" in m for m in messages)
    assert sum(m.startswith("training on 61 examples") for m in messages) == 1
    duplicate = "Line 61: this example is identical to line 1"  # not "Line 61 (): ..."
    assert sum(m.startswith(duplicate) for m in messages) == 1
    resumed_at = next(int(m.split()[4]) for m in messages if m.startswith("Job resumed at step"))
    assert resumed_at < 64  # steps already announced were re-run, and announced once
