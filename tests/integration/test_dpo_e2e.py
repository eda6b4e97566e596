"""Preference fine-tuning through the SDK: SFT first, then DPO from that ft: model (OpenAI's
recommended flow); the preferred style wins on held-out prompts."""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

from tests.integration.test_service_e2e import wait_for
from tests.tasks import both_styles_jsonl, preference_jsonl, style_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_then_dpo(full_server):
    c = full_server.client("dpo")
    sft_file = c.files.create(
        file=("sft.jsonl", io.BytesIO(both_styles_jsonl(160, seed=51))), purpose="fine-tune"
    )
    sft = wait_for(
        c,
        c.fine_tuning.jobs.create(
            training_file=sft_file.id,
            model="openft-tiny-vlm",
            suffix="sft",
            seed=1,  # fixed so the run is reproducible; over seeds 1-23 the style test scored 37-40 of 40
            hyperparameters={"n_epochs": 4, "batch_size": 8},
        ).id,
    )
    assert sft.status == "succeeded", sft.error
    pref = c.files.create(file=("pref.jsonl", io.BytesIO(preference_jsonl(64, seed=52))), purpose="fine-tune")
    dpo = c.fine_tuning.jobs.create(
        training_file=pref.id,
        model=sft.fine_tuned_model,
        suffix="dpo",
        seed=1,
        method={
            "type": "dpo",
            "dpo": {
                "hyperparameters": {
                    "beta": 0.1,
                    "n_epochs": 2,
                    "batch_size": 8,
                    "learning_rate_multiplier": 0.3,
                }
            },
        },
    )
    return c, sft, wait_for(c, dpo.id)


def styles(c, model, prompts):
    upper = lower = 0
    for prompt, want in prompts:
        out = (
            c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=4
            )
            .choices[0]
            .message.content.strip()
        )
        upper += out == want.upper()
        lower += out == want
    return upper, lower


def test_dpo_job_records_method_lineage_and_metrics(sft_then_dpo):
    c, sft, dpo = sft_then_dpo
    assert dpo.status == "succeeded", dpo.error
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.1
    assert dpo.model == sft.fine_tuned_model  # lineage: trained from the SFT model
    assert dpo.fine_tuned_model.startswith("ft:openft-tiny-vlm:dpo:dpo:")
    events = list(c.fine_tuning.jobs.list_events(dpo.id, limit=200))
    assert any(sft.fine_tuned_model in e.message and e.message.startswith("Starting from") for e in events)
    metrics = [e.data for e in events if e.type == "metrics"][::-1]  # oldest first
    for key in ("train_loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"):
        assert key in metrics[-1], key
    first = sum(m["reward_accuracy"] for m in metrics[:2]) / 2
    last = sum(m["reward_accuracy"] for m in metrics[-2:]) / 2
    assert last > first and last >= 0.9
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"]
    rows = list(csv.DictReader(io.StringIO(c.files.content(dpo.result_files[0]).text)))
    assert list(rows[0])[:5] == [
        "step",
        "train_loss",
        "train_accuracy",
        "valid_loss",
        "valid_mean_token_accuracy",
    ]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(rows[0])
    assert len(rows) == metrics[-1]["total_steps"] and float(rows[-1]["reward_accuracy"]) >= 0.9


def test_the_preferred_style_wins_on_held_out_prompts(sft_then_dpo):
    c, sft, dpo = sft_then_dpo
    rng = random.Random(999)
    held_out = [style_prompt(rng) for _ in range(40)]
    upper, lower = styles(c, dpo.fine_tuned_model, held_out)
    assert upper / len(held_out) >= 0.8, (upper, lower)


def test_malformed_preference_file_fails_naming_the_line(full_server):
    c = full_server.client("dpo-bad")
    lines = preference_jsonl(12, seed=53).decode().splitlines()
    bad = json.loads(lines[3])
    bad["preferred_output"].append({"role": "assistant", "content": "two answers"})  # must be exactly one
    lines[3] = json.dumps(bad)
    f = c.files.create(file=("p.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune")
    job = wait_for(
        c, c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", method={"type": "dpo"}).id
    )
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "Line 4" in job.error.message and job.error.param == "training_file"
    # a chat-format file sent to a DPO job is refused too, with a message that says why
    chat = c.files.create(file=("c.jsonl", io.BytesIO(both_styles_jsonl(12, seed=54))), purpose="fine-tune")
    job = wait_for(
        c,
        c.fine_tuning.jobs.create(training_file=chat.id, model="openft-tiny-vlm", method={"type": "dpo"}).id,
    )
    assert job.status == "failed" and job.error.code == "invalid_training_file"


def test_a_paused_dpo_job_resumes_from_its_saved_state(full_server):
    from tests.integration.test_job_control import last_step, wait_until

    c = full_server.client("dpo-pause")
    pref = c.files.create(file=("p.jsonl", io.BytesIO(preference_jsonl(40, seed=55))), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        training_file=pref.id,
        model="openft-tiny-vlm",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4, "batch_size": 1}}},
    )
    wait_until(lambda: last_step(c, job.id) >= 10)
    assert c.fine_tuning.jobs.pause(job.id).status == "paused"
    wait_until(
        lambda: any(
            "the job is paused" in e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=10)
        )
    )
    assert c.fine_tuning.jobs.resume(job.id).status == "queued"
    done = wait_for(c, job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in c.fine_tuning.jobs.list_events(job.id, limit=300)]
    assert any(m.startswith("Job resumed at step") for m in messages)
    rows = list(csv.DictReader(io.StringIO(c.files.content(done.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 161))
