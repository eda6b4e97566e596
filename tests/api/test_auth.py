"""Every /v1 route needs a key, and a project sees only its own resources."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from tests.openapi_schema import validate_against
from tests.tasks import tiny_chat_jsonl

GOOD = tiny_chat_jsonl(10)


@pytest.mark.parametrize("path", ["/files", "/fine_tuning/jobs", "/models"])
def test_missing_key_is_401_in_openai_envelope(api_server, path):
    resp = httpx.get(api_server.base_url + path)
    assert resp.status_code == 401
    body = resp.json()
    validate_against("ErrorResponse", body)
    assert "API key" in body["error"]["message"]


def test_unknown_key_raises_authentication_error(api_server):
    c = openai.OpenAI(base_url=api_server.base_url, api_key="sk-openft-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_projects_are_isolated(api_server):
    a, b = api_server.client("iso-a"), api_server.client("iso-b")
    f = a.files.create(file=("t.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        b.files.delete(f.id)
    assert list(b.files.list()) == []
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.checkpoints.list(job.id)
    assert list(b.fine_tuning.jobs.list()) == []
    # b cannot train on a's file either
    with pytest.raises(openai.BadRequestError) as e:
        b.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
    assert e.value.param == "training_file"
    # and a still has everything
    assert a.files.retrieve(f.id).id == f.id
    assert a.fine_tuning.jobs.retrieve(job.id).organization_id != ""
