"""Memory is predicted, not discovered: the worker splits a batch that would not fit into
micro-batches (same effective batch), and refuses, with advice, a job that cannot fit at all."""

from __future__ import annotations

import io
import json

import pytest

from tests.conftest import start_server
from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow

DATA = to_jsonl(colour_examples(16, seed=31))


def estimates(tmp_path, server) -> tuple[int, int]:
    """The estimator's own numbers for micro-batches of 1 and 8 on this file's longest example."""
    from openft.models.loader import load_empty_model, resolve_base
    from openft.training.memory import plan_for_model

    path = tmp_path / "train.jsonl"
    path.write_bytes(DATA)
    out = server.cli("validate", str(path), "--model", "openft-tiny-vlm", "--json")
    seq_len = json.loads(out.stdout)["summary"]["tokens"]["max"]
    model = load_empty_model(resolve_base("openft-tiny-vlm", server.env["OPENFT_MODEL_CACHE"]))
    kw = dict(
        seq_len=seq_len,
        image_tokens=0,
        lora_rank=None,
        dpo=False,
        gradient_checkpointing=False,
        available=10**12,
    )
    return (
        plan_for_model(model, batch_size=1, **kw)[2].total,
        plan_for_model(model, batch_size=8, **kw)[2].total,
    )


def test_a_batch_that_does_not_fit_is_split_into_micro_batches(tmp_path, api_server):
    one, eight = estimates(tmp_path, api_server)
    assert one < eight
    server = start_server(
        tmp_path / "home", "--workers", "1", env={"OPENFT_MEMORY_LIMIT_BYTES": str((one + eight) // 2)}
    )
    try:
        c = server.client("mem")
        f = c.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
        job = wait_for(
            c,
            c.fine_tuning.jobs.create(
                training_file=f.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 1, "batch_size": 8}
            ).id,
        )
        assert job.status == "succeeded", job.error
        plan = next(
            e
            for e in c.fine_tuning.jobs.list_events(job.id, limit=100)
            if e.message.startswith("Estimated peak")
        )
        assert (
            plan.data["micro_batch_size"] < 8
            and plan.data["micro_batch_size"] * plan.data["grad_accum_steps"] == 8
        )
        assert "effective batch_size stays 8" in plan.message
        assert job.hyperparameters.batch_size == 8
        assert len(c.fine_tuning.jobs.checkpoints.list(job.id).data) == 1
    finally:
        server.stop()


def test_a_job_that_cannot_fit_fails_early_with_advice(tmp_path):
    server = start_server(
        tmp_path / "home", "--workers", "1", env={"OPENFT_MEMORY_LIMIT_BYTES": str(1024 * 1024)}
    )
    try:
        c = server.client("mem-fail")
        f = c.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
        job = wait_for(c, c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm").id)
        assert job.status == "failed"
        assert job.error.code == "insufficient_memory" and job.error.param == "training_file"
        assert 'detail: "low"' in job.error.message and "needs about" in job.error.message
        assert not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=100))
    finally:
        server.stop()
