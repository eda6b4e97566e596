"""Files API through the real openai SDK against a real server."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

from tests.openapi_schema import validate_against

GOOD = b"".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    ).encode()
    + b"\n"
    for i in range(12)
)


def test_upload_retrieve_content_list_delete(api_server):
    c = api_server.client("files-a")
    f = c.files.create(file=("train.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    assert (
        f.id.startswith("file-")
        and f.bytes == len(GOOD)
        and f.purpose == "fine-tune"
        and f.filename == "train.jsonl"
    )
    raw = httpx.get(
        f"{api_server.base_url}/files/{f.id}", headers={"Authorization": f"Bearer {c.api_key}"}
    ).json()
    validate_against("OpenAIFile", raw)

    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).read() == GOOD  # exact bytes back

    listed = httpx.get(
        f"{api_server.base_url}/files", headers={"Authorization": f"Bearer {c.api_key}"}
    ).json()
    validate_against("ListFilesResponse", listed)
    assert [x["id"] for x in listed["data"]] == [f.id]

    deleted = c.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_list_pagination_order_and_purpose(api_server):
    c = api_server.client("files-page")
    ids = [c.files.create(file=(f"t{i}.jsonl", io.BytesIO(GOOD)), purpose="fine-tune").id for i in range(5)]
    other = c.files.create(file=("notes.txt", io.BytesIO(b"free text")), purpose="user_data")
    # The SDK follows `after` cursors by itself; newest first by default.
    seen = [f.id for f in c.files.list(purpose="fine-tune", limit=2)]
    assert seen == list(reversed(ids))
    asc = [f.id for f in c.files.list(purpose="fine-tune", limit=2, order="asc")]
    assert asc == ids
    assert other.id in [f.id for f in c.files.list()]
    first_page = c.files.list(purpose="fine-tune", limit=2)
    assert first_page.has_more is True and len(first_page.data) == 2


def test_bad_jsonl_is_refused_with_its_line_number(api_server):
    c = api_server.client("files-bad")
    bad = GOOD + b'{"messages": [}\n'
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("train.jsonl", io.BytesIO(bad)), purpose="fine-tune")
    assert "line 13" in e.value.message and e.value.param == "file"
    assert e.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("train.jsonl", io.BytesIO(b"\xff\xfe not utf8\n")), purpose="fine-tune")
    assert "line 1" in e.value.message and "UTF-8" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("train.csv", io.BytesIO(GOOD)), purpose="fine-tune")
    assert ".jsonl" in e.value.message
    # nothing was stored by the refused uploads
    assert [f for f in c.files.list()] == []


def test_bad_purpose(api_server):
    c = api_server.client("files-purpose")
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("train.jsonl", io.BytesIO(GOOD)), purpose="training")  # type: ignore[arg-type]
    assert e.value.param == "purpose"


def test_upload_over_the_limit_is_413(api_server):
    # api_server runs with OPENFT_MAX_UPLOAD_BYTES=2 MiB
    c = api_server.client("files-big")
    big = b'{"messages": []}\n' * (3 * 1024 * 1024 // 17)
    with pytest.raises(openai.APIStatusError) as e:
        c.files.create(file=("big.jsonl", io.BytesIO(big)), purpose="fine-tune")
    assert e.value.status_code == 413
    assert "limit" in e.value.message


def test_expires_after(api_server):
    c = api_server.client("files-exp")
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(GOOD)),
        purpose="fine-tune",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert f.expires_at == f.created_at + 3600
