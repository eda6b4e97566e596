"""The API under load, abuse and faults (issue 12): every answer is a stored fact or a clear
refusal, never a 500, and nothing past a limit is buffered or written.

Each test talks real HTTP to a real uvicorn server; the in-process one lets a test reach into
the server's database engine (slow commits, failing commits) while the client is the openai SDK.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import OperationalError

from openft.settings import Settings
from tests.inprocess import InProcessServer, inprocess_server

LINE = json.dumps(
    {"messages": [{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "blue"}]}
).encode()


def jsonl(n_bytes: int) -> bytes:
    return (LINE + b"\n") * (n_bytes // (len(LINE) + 1) + 1)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path) -> Iterator[InProcessServer]:
    url = None
    if request.param == "postgresql":
        from sqlalchemy import create_engine

        url = request.getfixturevalue("postgres_url")
        with create_engine(url).begin() as conn:  # one cluster per session: start empty
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    settings = Settings(
        home=tmp_path / "home",
        database_url=url,
        max_upload_bytes=4 * 1024 * 1024,
        max_line_bytes=256 * 1024,
        max_request_bytes=1024 * 1024,
    )
    with inprocess_server(settings) as srv:
        yield srv


def blob_files(srv: InProcessServer) -> list[Path]:
    root = srv.state.blobs.root
    return [p for p in root.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- 1. durable before the response


def test_read_your_writes_with_a_slow_commit(server):
    """A 200 means committed: with every commit delayed, create-then-retrieve/list still sees it."""
    c = server.client("ryw")

    @event.listens_for(server.state.db.engine, "commit")
    def slow_commit(_conn) -> None:  # type: ignore[no-untyped-def]
        time.sleep(0.3)

    try:
        f = c.files.create(file=("t.jsonl", io.BytesIO(jsonl(2000))), purpose="fine-tune")
        assert c.files.retrieve(f.id).id == f.id
        job = c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
        assert c.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
        assert [j.id for j in c.fine_tuning.jobs.list()] == [job.id]
        assert c.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert c.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    finally:
        event.remove(server.state.db.engine, "commit", slow_commit)


def test_a_failed_commit_is_an_error_not_a_lost_row(server):
    c = server.client("fail")
    f = c.files.create(file=("t.jsonl", io.BytesIO(jsonl(2000))), purpose="fine-tune")

    @event.listens_for(server.state.db.engine, "commit")
    def failing_commit(_conn) -> None:  # type: ignore[no-untyped-def]
        raise OperationalError("COMMIT", {}, Exception("database is locked"))

    try:
        with pytest.raises(openai.APIStatusError) as e:
            c.fine_tuning.jobs.create(training_file=f.id, model="openft-tiny-vlm")
    finally:
        event.remove(server.state.db.engine, "commit", failing_commit)
    assert e.value.status_code == 503  # busy, retryable: the SDK retries after Retry-After
    assert e.value.response.headers["retry-after"] == "1"
    assert list(c.fine_tuning.jobs.list()) == []  # no job the client was not told about


# ---------------------------------------------------------------- 2 + 3. concurrency without 5xx


def test_concurrent_uploads_all_stored_with_their_bytes(server):
    c = server.client("uploads")
    bodies = [jsonl(1024 * 1024) + f'{{"n": {i}}}\n'.encode() for i in range(12)]

    def upload(body: bytes) -> str:
        return c.files.create(file=("t.jsonl", io.BytesIO(body)), purpose="fine-tune").id

    with ThreadPoolExecutor(12) as pool:
        ids = list(pool.map(upload, bodies))
    assert len(set(ids)) == 12
    for file_id, body in zip(ids, bodies, strict=True):
        assert c.files.content(file_id).read() == body


def test_an_upload_in_progress_does_not_hold_up_other_requests(server):
    """While a slow client is half-way through an upload, other requests are answered."""
    key = server.new_key("slow")
    half_sent, probe_done = threading.Event(), threading.Event()
    body = jsonl(512 * 1024)

    def slow_body() -> Iterator[bytes]:
        yield b"--B\r\n" + b'Content-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        yield body[: len(body) // 2]
        half_sent.set()
        assert probe_done.wait(60)
        yield body[len(body) // 2 :] + b"\r\n--B--\r\n"

    result: dict[str, httpx.Response] = {}

    def send() -> None:
        result["upload"] = httpx.post(
            server.url + "/v1/files",
            content=slow_body(),
            headers={"authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=B"},
            timeout=120,
        )

    t = threading.Thread(target=send)
    t.start()
    assert half_sent.wait(60)
    listed = httpx.get(server.url + "/v1/files", headers={"authorization": f"Bearer {key}"}, timeout=60)
    probe_done.set()
    t.join(120)
    assert listed.status_code == 200 and listed.json()["data"] == []  # answered mid-upload
    assert result["upload"].status_code == 200, result["upload"].text
    assert result["upload"].json()["bytes"] == len(body)


def test_200_concurrent_job_lists_get_no_5xx(server):
    key = server.new_key("lists")
    with httpx.Client(limits=httpx.Limits(max_connections=200), timeout=300) as http:

        def one(_: int) -> int:
            r = http.get(server.url + "/v1/fine_tuning/jobs", headers={"authorization": f"Bearer {key}"})
            return r.status_code

        with ThreadPoolExecutor(200) as pool:
            codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200


def test_beyond_the_admission_limit_the_answer_is_503_with_retry_after(tmp_path):
    settings = Settings(home=tmp_path / "home", max_inflight_requests=2)
    with inprocess_server(settings) as srv:
        key = srv.new_key("busy")
        release = threading.Event()
        started = threading.Barrier(3)

        def held_body() -> Iterator[bytes]:
            started.wait(30)
            assert release.wait(60)
            yield b"{}"

        def hold() -> int:
            return httpx.post(
                srv.url + "/v1/fine_tuning/jobs",
                content=held_body(),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                timeout=120,
            ).status_code

        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(hold) for _ in range(2)]
            started.wait(30)
            for _ in range(100):  # both held requests admitted (their bodies are still open)
                over = httpx.get(srv.url + "/v1/files", headers={"authorization": f"Bearer {key}"})
                if over.status_code == 503:
                    break
                time.sleep(0.05)
            release.set()
            assert [h.result() for h in held] == [400, 400]  # the held ones still get their answer
        assert over.status_code == 503 and over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "overloaded"
        assert httpx.get(srv.url + "/v1/files", headers={"authorization": f"Bearer {key}"}).status_code == 200


# ---------------------------------------------------------------- 4 + 5. limits on bytes received


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_chunked_upload_over_the_limit_is_413_and_leaves_no_file(server):
    key = server.new_key("chunked")
    sent = 0

    def endless() -> Iterator[bytes]:  # no Content-Length: the limit must count what arrives
        nonlocal sent
        yield b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
        chunk = jsonl(256 * 1024)
        while sent < 64 * 1024 * 1024:  # 16x the limit, then give up
            sent += len(chunk)
            yield chunk

    before = blob_files(server)
    rss_before = _rss_kb()
    try:
        r = httpx.post(
            server.url + "/v1/files",
            content=endless(),
            headers={"authorization": f"Bearer {key}", "content-type": "multipart/form-data; boundary=B"},
            timeout=120,
        )
        status, body = r.status_code, r.json()
    except httpx.HTTPError:  # the server may close while we are still sending: then ask again
        status, body = 413, None
    assert status == 413
    if body is not None:
        assert body["error"]["param"] == "file" and "OPENFT_MAX_UPLOAD_BYTES" in body["error"]["message"]
    assert blob_files(server) == before  # no blob, no temp file left
    # The server (this process) did not buffer what it refused; generous bound for the 64 MB sent.
    assert _rss_kb() - rss_before < 48 * 1024


def test_a_fine_tune_line_over_the_limit_is_refused_naming_line_and_limit(server):
    c = server.client("longline")
    data = jsonl(4000) + b'{"messages": "' + b"x" * (3 * 1024 * 1024) + b'"}\n'
    before = blob_files(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    line = data.count(b"\n")
    assert f"line {line}:" in e.value.message and "262144-byte limit" in e.value.message
    assert e.value.param == "file"
    assert blob_files(server) == before


def test_json_body_over_the_limit_is_413_declared_or_chunked(server):
    key = server.new_key("json")
    big = json.dumps({"model": "openft-tiny-vlm", "messages": [{"role": "user", "content": "x" * 2_000_000}]})
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    declared = httpx.post(server.url + "/v1/chat/completions", content=big, headers=headers, timeout=60)
    chunked = httpx.post(
        server.url + "/v1/chat/completions",
        content=(big[i : i + 65536].encode() for i in range(0, len(big), 65536)),
        headers=headers,
        timeout=60,
    )
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert "OPENFT_MAX_REQUEST_BYTES" in r.json()["error"]["message"]
        assert r.headers["x-should-retry"] == "false"


# ---------------------------------------------------------------- 8. nesting in a training file


def test_deeply_nested_training_line_is_refused_naming_the_line(server):
    c = server.client("nest")
    # 600 levels of {"properties": {"x": ...}} in a tool's parameters, written as text (json.dumps
    # itself would recurse too deep).
    params = '{"type": "object", "properties": {"x": ' * 300 + "{}" + "}}" * 300
    tool_line = (
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], '
        '"tools": [{"type": "function", "function": {"name": "f", "parameters": ' + params + "}}]}"
    ).encode()
    data = (LINE + b"\n") * 2 + tool_line + b"\n"
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("t.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert "line 3:" in e.value.message and "nested" in e.value.message
    assert e.value.code == "invalid_file_format"


# ---------------------------------------------------------------- helpers sanity


def test_the_pool_fits_the_request_threads(tmp_path):
    settings = Settings(home=tmp_path / "home", api_threads=7)
    with inprocess_server(settings) as srv:
        assert srv.state.db.engine.pool.size() >= 7
