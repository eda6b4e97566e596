"""``openft.loss_kernel`` on a real worker: a kernel this worker cannot run fails the job before
anything trains, with the reason and the setting as the user wrote it; one it can run trains."""

from __future__ import annotations

import io

import pytest

from tests.conftest import start_server
from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow

DATA = to_jsonl(colour_examples(12, seed=5))


def test_liger_on_a_cpu_worker_fails_the_job_saying_why_and_plain_trains(tmp_path):
    server = start_server(tmp_path / "home", "--workers", "1", env={"OPENFT_DEVICE": "cpu"})
    try:
        c = server.client("loss-kernel")
        f = c.files.create(file=("t.jsonl", io.BytesIO(DATA)), purpose="fine-tune")
        base = dict(training_file=f.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 1})
        # Accepted on create: the API server cannot know which worker (GPU or not) takes the job.
        liger = wait_for(
            c, c.fine_tuning.jobs.create(**base, extra_body={"openft": {"loss_kernel": "liger"}}).id
        )
        assert liger.status == "failed", liger
        assert liger.error.code == "unsupported_parameter" and liger.error.param == "openft.loss_kernel"
        assert "openft.loss_kernel 'liger' cannot be used: Liger kernels need CUDA (device is cpu)" in (
            liger.error.message
        )
        assert not any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(liger.id, limit=100))
        plain = wait_for(
            c, c.fine_tuning.jobs.create(**base, extra_body={"openft": {"loss_kernel": "plain"}}).id
        )
        assert plain.status == "succeeded", plain.error
        said = [e.message for e in c.fine_tuning.jobs.list_events(plain.id, limit=100)]
        assert any(
            "full-vocabulary logits at the labelled positions (loss_kernel 'plain' asked for)" in m
            for m in said
        ), said
    finally:
        server.stop()
