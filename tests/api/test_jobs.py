"""Jobs API (no worker running): creation checks, listing, cancel, events, checkpoints."""

from __future__ import annotations

import io

import httpx
import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from tests.openapi_schema import validate_against
from tests.tasks import tiny_chat_jsonl

GOOD = tiny_chat_jsonl(10)


@pytest.fixture
def client(api_server):
    return api_server.client("jobs")


@pytest.fixture
def train_file(client):
    return client.files.create(file=("t.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")


def _raw(api_server, client, path):
    return httpx.get(api_server.base_url + path, headers={"Authorization": f"Bearer {client.api_key}"}).json()


def test_create_returns_a_complete_job(api_server, client, train_file):
    job = client.fine_tuning.jobs.create(
        training_file=train_file.id,
        model="openft-tiny-vlm",
        suffix="demo",
        seed=42,
        metadata={"team": "vision"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
    )
    raw = _raw(api_server, client, f"/fine_tuning/jobs/{job.id}")
    validate_against("FineTuningJob", raw)
    FineTuningJob.model_validate(raw)
    assert job.id.startswith("ftjob-") and job.status == "validating_files"
    assert job.seed == 42 and job.metadata == {"team": "vision"}
    assert job.hyperparameters.n_epochs == 3 and job.hyperparameters.batch_size == "auto"
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 3
    assert job.fine_tuned_model is None and job.finished_at is None and job.trained_tokens is None
    assert job.result_files == [] and job.error is None and job.training_file == train_file.id


def test_seed_is_generated_when_absent(client, train_file):
    job = client.fine_tuning.jobs.create(training_file=train_file.id, model="openft-tiny-vlm")
    assert isinstance(job.seed, int) and 0 <= job.seed < 2**31
    # deprecated top-level hyperparameters still work and mean "supervised"
    job2 = client.fine_tuning.jobs.create(
        training_file=train_file.id, model="openft-tiny-vlm", hyperparameters={"batch_size": 4}
    )
    assert job2.method.type == "supervised" and job2.hyperparameters.batch_size == 4


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 51}}}},
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 257}}}},
            "method.supervised.hyperparameters.batch_size",
        ),
        (
            {
                "method": {
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": 0}},
                }
            },
            "method.supervised.hyperparameters.learning_rate_multiplier",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}},
            "method.dpo.hyperparameters.beta",
        ),
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": "bad suffix!"}, "suffix"),
        ({"seed": -1}, "seed"),
        ({"model": "gpt-4o-mini"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"validation_file": "file-doesnotexist"}, "validation_file"),
    ],
)
def test_bad_requests_name_the_param(client, train_file, kwargs, param):
    args = {"training_file": train_file.id, "model": "openft-tiny-vlm"} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**args)
    assert e.value.param == param, e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"


def test_training_file_must_have_purpose_fine_tune(client):
    f = client.files.create(file=("t.jsonl", io.BytesIO(GOOD)), purpose="user_data")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
    assert e.value.param == "training_file" and "fine-tune" in e.value.message


def test_list_paginates_and_filters_by_metadata(api_server, train_file):
    c = api_server.client("jobs-list")
    f = c.files.create(file=("t.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    made = [
        c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", metadata={"n": str(i)}).id
        for i in range(4)
    ]
    plain = c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm").id
    all_ids = [j.id for j in c.fine_tuning.jobs.list(limit=2)]  # SDK walks the `after` cursor
    assert all_ids == [plain, *reversed(made)]
    page = c.fine_tuning.jobs.list(limit=2)
    assert page.has_more and len(page.data) == 2
    validate_against("ListPaginatedFineTuningJobsResponse", _raw(api_server, c, "/fine_tuning/jobs?limit=2"))
    assert [j.id for j in c.fine_tuning.jobs.list(metadata={"n": "2"})] == [made[2]]


def test_cancel_then_cancel_again(api_server, client, train_file):
    job = client.fine_tuning.jobs.create(training_file=train_file.id, model="openft-tiny-vlm")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.cancel(job.id)
    assert e.value.code == "invalid_job_state"
    assert e.value.response.headers["x-should-retry"] == "false"
    events = client.fine_tuning.jobs.list_events(job.id)
    assert events.data[0].message == "Fine-tuning job cancelled"  # newest first
    validate_against(
        "ListFineTuningJobEventsResponse", _raw(api_server, client, f"/fine_tuning/jobs/{job.id}/events")
    )


def test_events_paginate_newest_first(client, train_file):
    job = client.fine_tuning.jobs.create(training_file=train_file.id, model="openft-tiny-vlm")
    client.fine_tuning.jobs.cancel(job.id)
    first = client.fine_tuning.jobs.list_events(job.id, limit=1)
    assert first.has_more and len(first.data) == 1
    every = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1)]
    assert every[0] == "Fine-tuning job cancelled" and every[-1].startswith("Created fine-tuning job")


def test_checkpoints_of_a_new_job_are_empty(api_server, client, train_file):
    job = client.fine_tuning.jobs.create(training_file=train_file.id, model="openft-tiny-vlm")
    raw = _raw(api_server, client, f"/fine_tuning/jobs/{job.id}/checkpoints")
    validate_against("ListFineTuningJobCheckpointsResponse", raw)
    assert raw["data"] == [] and raw["has_more"] is False


def test_unknown_job_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_the_api_works_on_postgresql(postgres_url, tmp_path, monkeypatch):
    """OPENFT_DATABASE_URL switches metadata to PostgreSQL; the wire behaviour is the same. The
    server runs in this process (real uvicorn on loopback): the settings come from the environment
    as ``openft serve`` reads them."""
    from sqlalchemy import create_engine
    from sqlalchemy import text as sql

    from openft.settings import Settings
    from tests.inprocess import inprocess_server

    with create_engine(postgres_url).begin() as conn:
        conn.execute(sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    monkeypatch.setenv("OPENFT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENFT_DATABASE_URL", postgres_url)
    with inprocess_server(Settings()) as server:
        c = server.client("pg")
        f = c.files.create(file=("t.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
        assert c.files.content(f.id).read() == GOOD
        job = c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm", metadata={"db": "pg"})
        assert [j.id for j in c.fine_tuning.jobs.list(metadata={"db": "pg"})] == [job.id]
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert not (tmp_path / "home" / "openft.db").exists()  # nothing went to SQLite


@pytest.mark.parametrize(
    "hp, message",
    [
        ({"n_epochs": 1000}, 'n_epochs must be 1–50 or "auto", got 1000'),
        ({"n_epochs": "many"}, 'n_epochs must be 1–50 or "auto", got "many"'),
        ({"batch_size": 0}, 'batch_size must be 1–256 or "auto", got 0'),
        ({"learning_rate_multiplier": -1}, 'learning_rate_multiplier must be a number > 0 or "auto", got -1'),
    ],
)
def test_out_of_range_hyperparameters_say_the_range(client, train_file, hp, message):
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            training_file=train_file.id,
            model="openft-tiny-vlm",
            method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        )
    assert e.value.body["message"] == message
    assert e.value.code == "invalid_hyperparameter"
    assert e.value.param == f"method.supervised.hyperparameters.{next(iter(hp))}"


def test_conflicting_hyperparameters_are_refused(client, train_file):
    base = {"training_file": train_file.id, "model": "openft-tiny-vlm"}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            **base,
            hyperparameters={"n_epochs": 2},
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5}}},
        )
    assert e.value.param == "hyperparameters" and e.value.code == "conflicting_hyperparameters"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, hyperparameters={"n_epochs": 2}, method={"type": "dpo"})
    assert e.value.param == "hyperparameters" and "method.dpo.hyperparameters" in e.value.message
    # The same values in both places, or top-level ones with an empty method section, are fine.
    same = client.fine_tuning.jobs.create(
        **base,
        hyperparameters={"n_epochs": 2},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    folded = client.fine_tuning.jobs.create(
        **base, hyperparameters={"n_epochs": 3}, method={"type": "supervised"}
    )
    assert same.hyperparameters.n_epochs == 2 and folded.hyperparameters.n_epochs == 3


def test_reinforcement_and_integrations_are_refused_clearly(client, train_file):
    base = {"training_file": train_file.id, "model": "openft-tiny-vlm"}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            **base, method={"type": "reinforcement", "reinforcement": {"grader": {"type": "string_check"}}}
        )
    assert e.value.code == "unsupported_method" and e.value.param == "method"
    assert "'reinforcement'" in e.value.message and "not supported by openft" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert e.value.param == "integrations" and e.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, extra_body={"n_epochs": 3})
    assert e.value.param == "n_epochs" and "Unrecognized request argument" in e.value.message


def test_parallelism_is_validated_on_create(client, train_file):
    """``openft.parallelism`` takes auto, ddp or fsdp; fsdp with LoRA is refused with what to do."""
    base = {"training_file": train_file.id, "model": "openft-tiny-vlm"}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, extra_body={"openft": {"parallelism": "zero3"}})
    assert e.value.status_code == 400 and e.value.param == "openft.parallelism"
    assert "'auto', 'ddp' or 'fsdp'" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(
            **base, extra_body={"openft": {"parallelism": "fsdp", "training_type": "lora"}}
        )
    assert e.value.param == "openft.parallelism" and e.value.code == "unsupported_parameter"
    assert "full fine-tuning only" in e.value.message and "'ddp'" in e.value.message
    job = client.fine_tuning.jobs.create(**base, extra_body={"openft": {"parallelism": "fsdp"}})
    assert job.status in ("validating_files", "queued")


def test_cache_vision_features_is_validated_on_create(client, train_file):
    """``openft.cache_vision_features`` takes auto, on or off; 'on' with a trained vision tower is
    refused with what to do; 'on' with a trained projector (train_projector, full fine-tuning) is
    accepted: the frozen tower's outputs are cached."""
    base = {"training_file": train_file.id, "model": "openft-tiny-vlm"}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, extra_body={"openft": {"cache_vision_features": "yes"}})
    assert e.value.status_code == 400 and e.value.param == "openft.cache_vision_features"
    for kind in ("full", "lora"):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(
                **base,
                extra_body={
                    "openft": {"cache_vision_features": "on", "training_type": kind, "train_vision_tower": True}
                },
            )
        assert e.value.param == "openft.cache_vision_features" and e.value.code == "unsupported_parameter"
        assert "needs a frozen vision tower" in e.value.message and "train_vision_tower" in e.value.message
    for accepted in (
        {"training_type": "lora"},
        {"training_type": "lora", "train_projector": True},
        {"training_type": "full"},
    ):
        job = client.fine_tuning.jobs.create(
            **base, extra_body={"openft": {"cache_vision_features": "on", **accepted}}
        )
        assert job.status in ("validating_files", "queued")


def test_loss_kernel_is_validated_on_create(client, train_file):
    """``openft.loss_kernel`` takes auto, chunked, plain or liger; chunked or liger with FSDP (which
    shards the lm_head) is refused with what to do; a valid choice is stored on the job."""
    base = {"training_file": train_file.id, "model": "openft-tiny-vlm"}
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**base, extra_body={"openft": {"loss_kernel": "fused"}})
    assert e.value.status_code == 400 and e.value.param == "openft.loss_kernel"
    assert e.value.type == "invalid_request_error" and "'chunked'" in e.value.message
    for kernel in ("chunked", "liger"):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(
                **base, extra_body={"openft": {"loss_kernel": kernel, "parallelism": "fsdp"}}
            )
        assert e.value.param == "openft.loss_kernel" and e.value.code == "unsupported_parameter"
        assert "parallelism 'fsdp'" in e.value.message and "'plain'" in e.value.message
    job = client.fine_tuning.jobs.create(
        **base, extra_body={"openft": {"loss_kernel": "plain", "parallelism": "fsdp"}}
    )
    assert job.status in ("validating_files", "queued")
