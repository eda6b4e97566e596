"""openft's /v1 extensions the dashboard uses: a job's per-step metrics and a file's validation
report (with thumbnails of skipped images). Both are project-scoped and refuse bad input."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from tests.tasks import person_photo, picture_examples, picture_message, tiny_chat_jsonl


def _get(api_server, key, path, **params):
    return httpx.get(api_server.base_url + path, params=params, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def client(api_server):
    return api_server.client("extensions")


def _record_steps(api_server, job_id, n):
    from openft.settings import Settings
    from openft.storage import repo
    from openft.storage.db import Database

    db = Database(Settings(home=api_server.home).resolved_database_url)
    try:
        with db.session() as s:
            for step in range(1, n + 1):
                data = {"total_steps": n, "train_loss": 3.0 / step, "train_mean_token_accuracy": step / n}
                if step % 5 == 0:
                    data["valid_loss"] = 3.5 / step
                repo.record_step(s, job_id=job_id, step=step, data=data)
    finally:
        db.dispose()


def test_metrics_are_every_step_in_order_after_a_cursor_and_only_for_the_owner(api_server, client):
    f = client.files.create(file=("t.jsonl", io.BytesIO(tiny_chat_jsonl(10))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
    assert _get(api_server, client.api_key, f"/fine_tuning/jobs/{job.id}/metrics").json()["data"] == []
    _record_steps(api_server, job.id, 700)  # more than the 500 metrics events a job keeps

    body = _get(api_server, client.api_key, f"/fine_tuning/jobs/{job.id}/metrics").json()
    assert [m["step"] for m in body["data"]] == list(range(1, 701))
    assert body["data"][9] == {
        "step": 10,
        "total_steps": 700,
        "train_loss": pytest.approx(0.3),
        "train_mean_token_accuracy": pytest.approx(10 / 700),
        "valid_loss": pytest.approx(0.35),
        "valid_mean_token_accuracy": None,
    }
    tail = _get(api_server, client.api_key, f"/fine_tuning/jobs/{job.id}/metrics", after_step=698).json()
    assert [m["step"] for m in tail["data"]] == [699, 700]

    bad = _get(api_server, client.api_key, f"/fine_tuning/jobs/{job.id}/metrics", after_step=-1)
    assert bad.status_code == 400 and bad.json()["error"]["param"]
    other = api_server.client("someone-else")
    missing = _get(api_server, other.api_key, f"/fine_tuning/jobs/{job.id}/metrics")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    assert _get(api_server, "sk-wrong", f"/fine_tuning/jobs/{job.id}/metrics").status_code == 401


def test_validation_report_lists_issues_with_a_thumbnail_of_the_skipped_image(api_server, client):
    lines = [
        json.dumps({"messages": [picture_message(png), {"role": "assistant", "content": colour}]})
        for png, colour in picture_examples(10, seed=3)
    ]
    lines.insert(
        1, json.dumps({"messages": [picture_message(person_photo()), {"role": "assistant", "content": "x"}]})
    )
    lines.append(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}))
    f = client.files.create(
        file=("p.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="fine-tune"
    )

    resp = _get(api_server, client.api_key, f"/files/{f.id}/validation")
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert report["object"] == "file.validation" and report["method"] == "supervised"
    assert report["ok"] is False  # line 12 has an unknown role
    assert report["summary"]["examples"] == 12 and report["summary"]["skipped_examples"] == 1
    by_line = {i["line"]: i for i in report["issues"]}
    skip = by_line[2]
    assert skip["code"] in ("contains_people", "contains_faces") and skip["severity"] == "skip"
    assert skip["field"] == "messages[0].content[1].image_url.url"
    head, _, payload = skip["thumbnail"].partition(",")
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(payload))) as thumb:
        assert max(thumb.size) <= 96 and thumb.size[0] > 40  # the 256x256 photo, shrunk
    error = by_line[12]
    assert error["severity"] == "error" and error["field"].startswith("messages[0].role")
    assert error["thumbnail"] is None


def test_validation_report_refuses_bad_requests(api_server, client):
    results = client.files.create(file=("r.jsonl", io.BytesIO(tiny_chat_jsonl(10))), purpose="batch")
    wrong_purpose = _get(api_server, client.api_key, f"/files/{results.id}/validation")
    assert wrong_purpose.status_code == 400
    assert wrong_purpose.json()["error"]["code"] == "invalid_file_purpose"
    f = client.files.create(file=("t.jsonl", io.BytesIO(tiny_chat_jsonl(10))), purpose="fine-tune")
    bad_method = _get(api_server, client.api_key, f"/files/{f.id}/validation", method="rlhf")
    assert bad_method.status_code == 400 and bad_method.json()["error"]["param"]
    as_dpo = _get(api_server, client.api_key, f"/files/{f.id}/validation", method="dpo").json()
    assert as_dpo["ok"] is False and as_dpo["method"] == "dpo"  # chat lines are not preference pairs
    other = api_server.client("not-the-owner")
    assert _get(api_server, other.api_key, f"/files/{f.id}/validation").status_code == 404
