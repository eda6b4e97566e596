"""`openft migrate` between two real `openft serve` instances, populated and checked through the SDK."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from openft.cli.main import app
from openft.cli.migration import MIGRATED_FROM, SOURCE_METRICS, SOURCE_RESULTS
from tests.conftest import Server, start_server
from tests.tasks import colour_examples, preference_jsonl, to_jsonl

pytestmark = pytest.mark.slow  # one tiny job trains on the source, for its results CSV

SOURCE_ONLY = "vendor-model-without-twin"
ALIAS = "gpt-4o-mini-2024-07-18"
NO_ENV = {
    "OPENFT_API_KEY": None,
    "OPENAI_API_KEY": None,
    "OPENFT_BASE_URL": None,
    "OPENFT_FROM_API_KEY": None,
}


@pytest.fixture(scope="module")
def source_server(tmp_path_factory):
    # No embedded worker: jobs stay where the API put them (a worker runs once, below, for one job).
    server = start_server(
        tmp_path_factory.mktemp("migrate-source") / "home",
        "--no-worker",
        env={"OPENFT_BASE_MODELS": json.dumps([ALIAS, SOURCE_ONLY])},
    )
    yield server
    server.stop()


def _train_one(server: Server, client, file_id: str) -> str:
    """A tiny job trained to completion by a standalone worker, stopped before anything else is queued."""
    job = client.fine_tuning.jobs.create(
        model="openft-tiny-vlm",
        training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 5}}},
        seed=7,
    )
    worker = subprocess.Popen([sys.executable, "-m", "openft.cli.main", "worker"], env=server.env)
    try:
        while (status := client.fine_tuning.jobs.retrieve(job.id).status) not in ("succeeded", "failed"):
            assert worker.poll() is None, "the worker died"
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert status == "succeeded", list(client.fine_tuning.jobs.list_events(job.id))
    return job.id


@pytest.fixture(scope="module")
def source(source_server, tmp_path_factory):
    """Files and jobs of every kind the migration must handle, made through the SDK."""
    c = source_server.client("team")
    data = {
        "train.jsonl": to_jsonl(colour_examples(10, seed=1)),
        "valid.jsonl": to_jsonl(colour_examples(4, seed=2)),
        "prefs.jsonl": preference_jsonl(6, seed=3),
    }
    files = {name: c.files.create(file=(name, body), purpose="fine-tune") for name, body in data.items()}
    c.files.create(file=("notes.txt", b"not for fine-tuning"), purpose="user_data")
    train, valid, prefs = (files[n].id for n in data)
    trained = _train_one(source_server, c, train)
    supervised = c.fine_tuning.jobs.create(
        model=ALIAS,
        training_file=train,
        validation_file=valid,
        suffix="colours",
        seed=1234,
        metadata={"team": "vision", "ticket": "T-17"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 0.5}
            },
        },
    )
    dpo = c.fine_tuning.jobs.create(
        model="openft-tiny-vlm",
        training_file=prefs,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}},
    )
    cancelled = c.fine_tuning.jobs.create(model="openft-tiny-vlm", training_file=train, suffix="gone")
    c.fine_tuning.jobs.cancel(cancelled.id)
    unmapped = c.fine_tuning.jobs.create(model=SOURCE_ONLY, training_file=train)
    return {
        "client": c,
        "url": source_server.base_url,
        "data": data,
        "files": {n: f.id for n, f in files.items()},
        "jobs": {
            "trained": trained,
            "supervised": supervised.id,
            "dpo": dpo.id,
            "cancelled": cancelled.id,
            "unmapped": unmapped.id,
        },
    }


@pytest.fixture(scope="module")
def dest(api_server):
    key = api_server.new_key("migrated-team")
    return {"url": api_server.base_url, "key": key, "client": api_server.client("migrated-team")}


def run(source, dest, *extra: str):
    args = ["migrate", "--from-base-url", source["url"], "--from-api-key", source["client"].api_key]
    args += ["--model-map", f"{ALIAS}=openft-tiny-vlm", "--base-url", dest["url"], "--api-key", dest["key"]]
    return CliRunner().invoke(app, [*args, *extra], env=NO_ENV)


def state(client) -> tuple[list, list]:
    return list(client.files.list()), list(client.fine_tuning.jobs.list())


def test_migrate_dry_run_then_copy_then_nothing_new(source, dest):
    d = dest["client"]
    before = state(d)
    assert before == ([], [])

    # --dry-run: the whole plan, nothing changed
    dry = run(source, dest, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] is True and "result" not in plan
    assert sorted(f["filename"] for f in plan["files"]) == ["prefs.jsonl", "train.jsonl", "valid.jsonl"]
    assert {f["action"] for f in plan["files"]} == {"copy"}
    assert {f["bytes"] for f in plan["files"]} == {len(b) for b in source["data"].values()}
    by_source = {j["source_id"]: j for j in plan["jobs"]}
    jobs = source["jobs"]
    assert set(by_source) == set(jobs.values())
    assert by_source[jobs["supervised"]]["model"] == "openft-tiny-vlm"
    assert by_source[jobs["unmapped"]]["action"] == "skip"
    assert SOURCE_ONLY in by_source[jobs["unmapped"]]["reason"]
    assert state(d) == before

    # the real run
    real = run(source, dest)
    assert real.exit_code == 0, real.output
    assert f"skipped {jobs['unmapped']}" in real.stderr and "--model-map" in real.stderr
    assert "copied 3 file(s), created 4 job(s), skipped 1 job(s)" in real.stdout

    # files: same names, identical bytes
    copied = {f.filename: f for f in d.files.list(purpose="fine-tune")}
    assert set(copied) == set(source["data"])
    for name, body in source["data"].items():
        assert d.files.content(copied[name].id).read() == body
    id_map = {source["files"][n]: copied[n].id for n in copied}

    s = source["client"]
    made = {(j.metadata or {}).get(MIGRATED_FROM): j for j in d.fine_tuning.jobs.list()}
    assert set(made) == {jobs[k] for k in ("trained", "supervised", "dpo", "cancelled")}
    for src_id, new in made.items():
        old = s.fine_tuning.jobs.retrieve(src_id)
        assert new.method.type == old.method.type
        kind = old.method.type
        assert getattr(new.method, kind).hyperparameters == getattr(old.method, kind).hyperparameters
        assert new.training_file == id_map[old.training_file]
        assert new.validation_file == (id_map[old.validation_file] if old.validation_file else None)
        assert (new.seed, new.user_provided_suffix) == (old.seed, old.user_provided_suffix)
        assert {k: v for k, v in new.metadata.items() if not k.startswith("openft_")} == (old.metadata or {})
    sup = made[jobs["supervised"]]
    assert sup.model == "openft-tiny-vlm" and sup.seed == 1234 and sup.user_provided_suffix == "colours"
    assert sup.method.supervised.hyperparameters.n_epochs == 3
    assert sup.method.supervised.hyperparameters.learning_rate_multiplier == 0.5
    assert sup.metadata["team"] == "vision" and sup.validation_file == id_map[source["files"]["valid.jsonl"]]
    assert made[jobs["dpo"]].method.dpo.hyperparameters.beta == 0.2
    assert made[jobs["dpo"]].method.dpo.hyperparameters.n_epochs == "auto"  # auto stays auto

    # the trained job's results CSV and final metrics came along
    trained_old = s.fine_tuning.jobs.retrieve(jobs["trained"])
    trained_new = made[jobs["trained"]]
    csv_copy = trained_new.metadata[SOURCE_RESULTS]
    assert d.files.content(csv_copy).read() == s.files.content(trained_old.result_files[0]).read()
    final = json.loads(trained_new.metadata[SOURCE_METRICS])
    assert final["step"] == 2 and final["train_loss"] > 0  # 10 examples, batch 5, 1 epoch
    assert SOURCE_RESULTS not in made[jobs["supervised"]].metadata  # it never trained

    # a second run creates nothing and recognises everything
    after = state(d)
    again = run(source, dest, "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["result"] == {"files_copied": 0, "jobs_created": 0, "failures": []}
    assert {f["action"] for f in second["files"]} == {"present"}
    assert {j["source_id"]: j["dest_id"] for j in second["jobs"] if j["action"] == "present"} == {
        k: v.id for k, v in made.items()
    }
    assert [f.id for f in state(d)[0]] == [f.id for f in after[0]]
    assert [j.id for j in state(d)[1]] == [j.id for j in after[1]]

    # compare: the old curve (from the copied CSV; the source job id is unknown here) next to the new
    compared = CliRunner().invoke(
        app,
        [
            "jobs",
            "compare",
            jobs["trained"],
            trained_new.id,
            "--base-url",
            dest["url"],
            "--api-key",
            dest["key"],
        ],
        env=NO_ENV,
    )
    assert compared.exit_code == 0, compared.output
    lines = compared.stdout.splitlines()
    assert "train_loss A" in lines[0] and "train_loss B" in lines[0]
    step_two = next(line.split() for line in lines if line.split()[:1] == ["2"])
    assert float(step_two[1]) == pytest.approx(final["train_loss"], abs=1e-4)
    assert f"migrated as {trained_new.id}" in compared.stderr


def test_migrate_after_an_interruption_adopts_the_orphan_copy(source, dest, api_server):
    """A file uploaded before a run died (no job points at it) is recognised by name, size and sha256."""
    key = api_server.new_key("half-migrated")
    d = api_server.client("half-migrated")
    body = source["data"]["train.jsonl"]
    orphan = d.files.create(file=("train.jsonl", body), purpose="fine-tune")
    # same name and size, different bytes: not a copy
    twin = source["data"]["valid.jsonl"].replace(b"Colour", b"COLOUR", 1)
    d.files.create(file=("valid.jsonl", twin), purpose="fine-tune")
    result = run(source, {"url": dest["url"], "key": key}, "--status", "cancelled", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    files = {f["filename"]: f for f in out["files"]}
    assert files["train.jsonl"]["action"] == "present" and files["train.jsonl"]["dest_id"] == orphan.id
    assert files["valid.jsonl"]["action"] == "copy"
    assert [j["source_id"] for j in out["jobs"]] == [source["jobs"]["cancelled"]]
    job = d.fine_tuning.jobs.retrieve(out["jobs"][0]["dest_id"])
    assert job.training_file == orphan.id and job.user_provided_suffix == "gone"


def test_migrate_refuses_a_source_key_without_access(source, dest):
    result = CliRunner().invoke(
        app,
        [
            "migrate",
            "--from-base-url",
            source["url"],
            "--from-api-key",
            "sk-wrong",
            "--base-url",
            dest["url"],
            "--api-key",
            dest["key"],
        ],
        env=NO_ENV,
    )
    assert result.exit_code == 1
    assert "source refused the key (401)" in result.stderr and "--from-api-key" in result.stderr
    assert "Traceback" not in result.output
