"""Several machines, one service: a worker with its own home trains a job that an API server
with another home serves, sharing only PostgreSQL and an S3-compatible store."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import model_cache, start_server
from tests.integration.test_service_e2e import wait_for
from tests.s3 import make_bucket
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow


def test_a_job_trained_on_one_machine_is_served_by_another(postgres_url, s3_env, tmp_path):
    with create_engine(postgres_url).begin() as conn:  # one cluster per session: start empty
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(s3_env, bucket)
    shared = {"OPENFT_DATABASE_URL": postgres_url, "OPENFT_BLOB_URL": f"s3://{bucket}/openft", **s3_env}
    api = start_server(tmp_path / "api-home", "--no-worker", env=shared)
    worker_home = tmp_path / "worker-home"
    worker_home.mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-m", "openft.cli.main", "worker"],
        env=dict(os.environ, OPENFT_HOME=str(worker_home), OPENFT_MODEL_CACHE=str(model_cache()), **shared),
        stdout=open(tmp_path / "worker.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        c = api.client("two-machines")
        data = to_jsonl(colour_examples(48, seed=1))
        f = c.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            training_file=f.id,
            model="openft-tiny-vlm",
            seed=1,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}},
            },
        )
        done = wait_for(c, job.id)
        assert done.status == "succeeded", (tmp_path / "worker.log").read_text()[-3000:]
        # Nothing went through a local blob folder on either machine: the bytes live in S3.
        assert not (tmp_path / "api-home" / "blobs").exists() and not (worker_home / "blobs").exists()
        assert c.files.content(f.id).read() == data
        out = c.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "colour?"}], max_tokens=3
        )
        assert out.choices[0].finish_reason in ("stop", "length")
        # The API fetched the weights it did not train into its own cache.
        assert any((tmp_path / "api-home" / "cache" / "weights").iterdir())
        [result_file] = done.result_files
        assert c.files.content(result_file).read().startswith(b"step,")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        api.stop()
