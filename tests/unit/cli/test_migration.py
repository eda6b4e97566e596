"""`openft migrate`'s planner and copier fed OpenAI's own responses (shapes from its OpenAPI document).

The source is OpenAI as recorded: ``file-…``/``ftjob-…`` ids, cursor pages with ``has_more``,
jobs without ``method`` (older ones) or with ``hyperparameters: null`` (newer ones), a
base64-encoded results file, a 429 in the middle of a listing, a 401 for a bad key. The
destination is a small in-memory stand-in that records what it was asked to create. Both are
reached through the real openai SDK over an injected mock transport.
"""

from __future__ import annotations

import base64
import copy
import json
from email.parser import BytesParser
from email.policy import default as email_policy
from typing import Any

import openai
import pytest

from openft.cli import migration, results_csv, transfer

try:  # the SDK's own HTTP library (openai 3.x ships httpx2; earlier versions use httpx)
    import httpx2 as sdk_http
except ImportError:  # pragma: no cover
    import httpx as sdk_http  # type: ignore[no-redef]

TRAIN = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
PREFS = (
    b'{"input": {"messages": [{"role": "user", "content": "hi"}]}, '
    b'"preferred_output": [{"role": "assistant", "content": "Hello!"}], '
    b'"non_preferred_output": [{"role": "assistant", "content": "hi"}]}\n'
)
RESULTS_CSV = (
    b"step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n1,1.5,0.4,,\n2,1.2,0.5,1.3,0.45\n"
)
RESULTS_B64 = base64.b64encode(RESULTS_CSV)  # OpenAI serves result files base64-encoded

# GET /v1/files, the spec's example split over two pages (the pdf is not for fine-tuning).
FILES_PAGE_1 = {
    "object": "list",
    "data": [
        {
            "id": "file-abc123",
            "object": "file",
            "bytes": 175,
            "created_at": 1613677385,
            "expires_at": 1677614202,
            "filename": "salesOverview.pdf",
            "purpose": "assistants",
        },
        {
            "id": "file-abc456",
            "object": "file",
            "bytes": len(TRAIN),
            "created_at": 1613779121,
            "expires_at": 1677614202,
            "filename": "puppy.jsonl",
            "purpose": "fine-tune",
        },
    ],
    "first_id": "file-abc123",
    "last_id": "file-abc456",
    "has_more": True,
}
FILES_PAGE_2 = {
    "object": "list",
    "data": [
        {
            "id": "file-abc789",
            "object": "file",
            "bytes": len(PREFS),
            "created_at": 1613779200,
            "filename": "prefs.jsonl",
            "purpose": "fine-tune",
        }
    ],
    "first_id": "file-abc789",
    "last_id": "file-abc789",
    "has_more": False,
}
RESULT_FILE = {
    "id": "file-res1",
    "object": "file",
    "bytes": len(RESULTS_B64),
    "created_at": 1692661190,
    "filename": "step_metrics.csv",
    "purpose": "fine-tune-results",
}
# The spec's FineTuningJob example (a succeeded supervised job with metadata).
JOB_SUCCEEDED = {
    "object": "fine_tuning.job",
    "id": "ftjob-abc123",
    "model": "davinci-002",
    "created_at": 1692661014,
    "finished_at": 1692661190,
    "fine_tuned_model": "ft:davinci-002:my-org:custom_suffix:7q8mpxmy",
    "organization_id": "org-123",
    "result_files": ["file-res1"],
    "status": "succeeded",
    "validation_file": None,
    "training_file": "file-abc456",
    "hyperparameters": {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 1.0},
    "trained_tokens": 5768,
    "integrations": [],
    "seed": 0,
    "estimated_finish": 0,
    "method": {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 1.0}},
    },
    "metadata": {"key": "value"},
}
# The spec's DPO create response: hyperparameters only under method, top level null.
JOB_DPO = {
    "object": "fine_tuning.job",
    "id": "ftjob-abc",
    "model": "gpt-4o-mini",
    "created_at": 1746130590,
    "fine_tuned_model": None,
    "organization_id": "org-abc",
    "result_files": [],
    "status": "queued",
    "validation_file": "file-abc456",
    "training_file": "file-abc789",
    "method": {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {
                "beta": 0.1,
                "batch_size": "auto",
                "learning_rate_multiplier": "auto",
                "n_epochs": "auto",
            }
        },
    },
    "metadata": None,
    "error": {"code": None, "message": None, "param": None},
    "finished_at": None,
    "hyperparameters": None,
    "seed": 1036326793,
    "estimated_finish": None,
    "integrations": [],
    "user_provided_suffix": "prefs",
    "usage_metrics": None,
    "shared_with_openai": False,
}
# An older job, from before ``method`` existed: supervised by definition.
JOB_LEGACY = {
    "object": "fine_tuning.job",
    "id": "ftjob-old1",
    "model": "gpt-3.5-turbo-0125",
    "created_at": 1700000000,
    "fine_tuned_model": None,
    "organization_id": "org-123",
    "result_files": [],
    "status": "cancelled",
    "validation_file": None,
    "training_file": "file-abc456",
    "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": 2},
    "seed": 42,
}
JOB_REINFORCEMENT = {
    **{k: v for k, v in JOB_DPO.items() if k != "method"},
    "id": "ftjob-rft1",
    "model": "o4-mini",
    "created_at": 1746130600,
    "method": {"type": "reinforcement", "reinforcement": {"hyperparameters": {"n_epochs": "auto"}}},
}
JOBS_PAGE_1 = {"object": "list", "data": [JOB_REINFORCEMENT, JOB_DPO], "has_more": True}
JOBS_PAGE_2 = {"object": "list", "data": [JOB_SUCCEEDED, JOB_LEGACY], "has_more": False}
MODEL_MAP = {"davinci-002": "openft-tiny-vlm", "gpt-4o-mini": "openft-tiny-vlm", "o4-mini": "openft-tiny-vlm"}


def openai_source(
    *, fail_once: set[str] | None = None, unauthorized: bool = False, jobs: list[dict] | None = None
):
    """A transport answering like api.openai.com; records the paths it was asked for."""
    calls: list[str] = []
    fail_once = set(fail_once or ())

    def handler(request: Any):
        key = request.url.path + (
            "?after=" + request.url.params["after"] if "after" in request.url.params else ""
        )
        calls.append(key)
        if unauthorized:
            return sdk_http.Response(
                401,
                json={
                    "error": {
                        "message": "Incorrect API key provided: sk-wrong.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        if key in fail_once:
            fail_once.discard(key)
            return sdk_http.Response(
                429, json={"error": {"message": "Rate limit reached", "type": "requests", "param": None}}
            )
        routes = {
            "/v1/files": FILES_PAGE_1,
            "/v1/files?after=file-abc456": FILES_PAGE_2,
            "/v1/files/file-res1": RESULT_FILE,
            "/v1/fine_tuning/jobs": JOBS_PAGE_1,
            "/v1/fine_tuning/jobs?after=ftjob-abc": JOBS_PAGE_2,
        }
        if jobs is not None:
            routes["/v1/fine_tuning/jobs"] = {"object": "list", "data": jobs, "has_more": False}
        contents = {"file-abc456": TRAIN, "file-abc789": PREFS, "file-res1": RESULTS_B64}
        if key in routes:
            return sdk_http.Response(200, json=routes[key])
        parts = request.url.path.split("/")
        if parts[-1] == "content" and parts[-2] in contents:
            return sdk_http.Response(200, content=contents[parts[-2]])
        return sdk_http.Response(
            404, json={"error": {"message": f"no {key}", "type": "invalid_request_error"}}
        )

    return handler, calls


class Destination:
    """Just enough of an openft server: files, jobs and models, kept in memory."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, Any]] = {}
        self.content: dict[str, bytes] = {}
        self.jobs: list[dict[str, Any]] = []
        self.job_requests: list[dict[str, Any]] = []

    def __call__(self, request: Any):
        path, method = request.url.path, request.method
        if path == "/v1/models":
            names = ["openft-tiny-vlm", *(j["fine_tuned_model"] for j in self.jobs if j["fine_tuned_model"])]
            models = [{"id": n, "object": "model", "created": 0, "owned_by": "openft"} for n in names]
            return sdk_http.Response(200, json={"object": "list", "data": models})
        if path == "/v1/files" and method == "POST":
            form = self._form(request)
            file_id = f"file-dst{len(self.files)}"
            name, body = form["file"]
            self.files[file_id] = {
                "id": file_id,
                "object": "file",
                "bytes": len(body),
                "created_at": 1,
                "filename": name,
                "purpose": form["purpose"][1].decode(),
                "status": "processed",
            }
            self.content[file_id] = body
            return sdk_http.Response(200, json=self.files[file_id])
        if path == "/v1/files":
            purpose = request.url.params.get("purpose")
            data = [f for f in self.files.values() if purpose in (None, f["purpose"])]
            return sdk_http.Response(200, json={"object": "list", "data": data[::-1], "has_more": False})
        if path.startswith("/v1/files/") and path.endswith("/content"):
            return sdk_http.Response(200, content=self.content[path.split("/")[3]])
        if path == "/v1/fine_tuning/jobs" and method == "POST":
            body = json.loads(request.content)
            self.job_requests.append(body)
            kind = body["method"]["type"]
            job = {
                **copy.deepcopy(JOB_DPO),
                "id": f"ftjob-dst{len(self.jobs)}",
                "model": body["model"],
                "training_file": body["training_file"],
                "validation_file": body.get("validation_file"),
                "method": body["method"]
                | {kind: {"hyperparameters": body["method"][kind]["hyperparameters"]}},
                "metadata": body.get("metadata"),
                "seed": body.get("seed", 0),
                "user_provided_suffix": body.get("suffix"),
            }
            self.jobs.append(job)
            return sdk_http.Response(200, json=job)
        if path == "/v1/fine_tuning/jobs":
            return sdk_http.Response(200, json={"object": "list", "data": self.jobs[::-1], "has_more": False})
        return sdk_http.Response(
            404, json={"error": {"message": f"no {path}", "type": "invalid_request_error"}}
        )

    @staticmethod
    def _form(request: Any) -> dict[str, tuple[str | None, bytes]]:
        header = b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n"
        message = BytesParser(policy=email_policy).parsebytes(header + request.read())
        return {
            part.get_param("name", header="content-disposition"): (
                part.get_filename(),
                part.get_payload(decode=True),
            )
            for part in message.iter_parts()
        }


def client(handler: Any, base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base_url,
        api_key="sk-test",
        max_retries=0,  # the SDK's own retries off: the migration's listing retries are under test
        http_client=openai.DefaultHttpxClient(transport=sdk_http.MockTransport(handler)),
    )


def no_sleep(_: float) -> None:
    pass


def test_openai_responses_are_planned_copied_and_recognised_the_second_time():
    handler, calls = openai_source(fail_once={"/v1/fine_tuning/jobs?after=ftjob-abc"})
    src = client(handler, "https://api.openai.com/v1")
    dest = Destination()
    dst = client(dest, "http://127.0.0.1:9/v1")

    plan = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    # both pages of files, the non-fine-tune one left out; both pages of jobs despite the 429
    assert [f.source["id"] for f in plan.files] == ["file-abc456", "file-abc789"]
    assert calls.count("/v1/fine_tuning/jobs?after=ftjob-abc") == 2
    steps = {j.source_id: j for j in plan.jobs}
    assert [j.source_id for j in plan.jobs] == ["ftjob-abc123", "ftjob-old1", "ftjob-abc", "ftjob-rft1"]
    assert steps["ftjob-rft1"].action == "skip" and "not supported yet" in steps["ftjob-rft1"].reason
    legacy = steps["ftjob-old1"]
    assert legacy.action == "skip" and "--model-map gpt-3.5-turbo-0125=" in legacy.reason
    assert legacy.method == "supervised" and legacy.hyperparameters["learning_rate_multiplier"] == 2

    result = migration.execute(src, dst, plan)
    assert result.failures == [] and (result.files_copied, result.jobs_created) == (2, 2)
    copies = {f["filename"]: f for f in dest.files.values()}
    assert dest.content[copies["puppy.jsonl"]["id"]] == TRAIN
    assert dest.content[copies["prefs.jsonl"]["id"]] == PREFS
    assert {copies[n]["purpose"] for n in ("puppy.jsonl", "prefs.jsonl")} == {"fine-tune"}
    # the results file travels byte for byte (still base64, as OpenAI served it) as user data
    results = copies["ftjob-abc123_results.csv"]
    assert dest.content[results["id"]] == RESULTS_B64 and results["purpose"] == "user_data"

    sup, dpo = dest.job_requests
    assert "hyperparameters" not in sup and "hyperparameters" not in dpo  # only under method
    assert sup["model"] == "openft-tiny-vlm" and sup["training_file"] == copies["puppy.jsonl"]["id"]
    assert sup["method"] == {
        "type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 1, "learning_rate_multiplier": 1.0}},
    }
    assert sup["seed"] == 0 and "suffix" not in sup and "validation_file" not in sup
    assert sup["metadata"]["key"] == "value"
    assert sup["metadata"][migration.MIGRATED_FROM] == "ftjob-abc123"
    assert sup["metadata"][migration.SOURCE_RESULTS] == results["id"]
    final = json.loads(sup["metadata"][migration.SOURCE_METRICS])
    assert final == {
        "step": 2,
        "train_loss": 1.2,
        "train_accuracy": 0.5,
        "valid_loss": 1.3,
        "valid_mean_token_accuracy": 0.45,
        "trained_tokens": 5768,
    }
    assert dpo["method"]["dpo"]["hyperparameters"] == JOB_DPO["method"]["dpo"]["hyperparameters"]
    assert dpo["training_file"] == copies["prefs.jsonl"]["id"]
    assert dpo["validation_file"] == copies["puppy.jsonl"]["id"]
    assert (dpo["seed"], dpo["suffix"]) == (1036326793, "prefs")
    assert dpo["metadata"] == {migration.MIGRATED_FROM: "ftjob-abc"}

    # a second run: everything recognised, nothing sent
    again = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    assert {(f.action, f.how) for f in again.files} == {("present", "linked")}
    assert {j.source_id: j.action for j in again.jobs} == {
        "ftjob-old1": "skip",
        "ftjob-abc123": "present",
        "ftjob-abc": "present",
        "ftjob-rft1": "skip",
    }
    assert migration.execute(src, dst, again).to_json() == {
        "files_copied": 0,
        "jobs_created": 0,
        "failures": [],
    }
    assert len(dest.files) == 3 and len(dest.jobs) == 2


def test_a_copy_without_its_job_is_found_by_content():
    """An interrupted run: the file was uploaded, the job never made. No second upload."""
    handler, _ = openai_source()
    src, dest = client(handler, "https://api.openai.com/v1"), Destination()
    dst = client(dest, "http://127.0.0.1:9/v1")
    dst.files.create(file=("puppy.jsonl", TRAIN), purpose="fine-tune")
    dst.files.create(
        file=("prefs.jsonl", PREFS.replace(b"Hello", b"HELLO")), purpose="fine-tune"
    )  # same size
    plan = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    assert [(f.source["filename"], f.action, f.how) for f in plan.files] == [
        ("puppy.jsonl", "present", "sha256"),
        ("prefs.jsonl", "copy", ""),
    ]


def test_source_key_without_access_is_one_clear_error():
    handler, calls = openai_source(unauthorized=True)
    dst = client(Destination(), "http://127.0.0.1:9/v1")
    with pytest.raises(migration.SourceAccessError, match=r"refused the key \(401\).*--from-api-key"):
        migration.plan(client(handler, "https://api.openai.com/v1"), dst, model_map={}, sleep=no_sleep)
    assert calls == ["/v1/files"]  # no retries on a refusal


def test_listing_backs_off_then_gives_up_on_a_server_that_stays_down():
    calls: list[str] = []

    def down(request: Any):
        calls.append(request.url.path)
        return sdk_http.Response(503, json={"error": {"message": "overloaded", "type": "server_error"}})

    src = client(down, "https://api.openai.com/v1")
    slept: list[float] = []
    with pytest.raises(openai.InternalServerError):
        list(transfer.paginate(lambda: src.files.list(), sleep=slept.append))
    assert len(calls) == 5 and len(slept) == 4
    assert slept[3] > slept[0]  # exponential: 0.5 s, then 4 s, each with jitter of +-50 %


def test_results_csv_is_read_plain_or_base64():
    rows = results_csv.read_results_csv(RESULTS_CSV)
    assert rows == results_csv.read_results_csv(RESULTS_B64)
    assert rows[0] == {"step": 1.0, "train_loss": 1.5, "train_accuracy": 0.4}
    assert len(json.loads(results_csv.final_metrics(rows * 200, {}))) == 5


def test_command_line_refusals_name_the_option():
    from typer.testing import CliRunner

    from openft.cli.main import app

    env = {"OPENFT_API_KEY": None, "OPENFT_FROM_API_KEY": None, "OPENFT_BASE_URL": None}

    def run(*args: str, **extra_env: str):
        return CliRunner().invoke(app, ["migrate", *args], env={**env, **extra_env})

    # the destination key never falls back to OPENAI_API_KEY (that is the source's key here)
    result = run("--from-api-key", "sk-src", OPENAI_API_KEY="sk-openai")
    assert result.exit_code == 2 and "no API key" in result.stderr
    result = run("--api-key", "k", OPENAI_API_KEY="")
    assert result.exit_code == 2 and "--from-api-key" in result.stderr
    result = run("--from-api-key", "s", "--api-key", "k", "--model-map", "gpt-4o-mini")
    assert result.exit_code == 2 and "SOURCE_MODEL=DESTINATION_MODEL" in result.output
    result = run(
        "--from-api-key",
        "k",
        "--api-key",
        "k",
        "--from-base-url",
        "http://h/v1",
        "--base-url",
        "http://h/v1/",
    )
    assert result.exit_code == 2 and "same project" in result.stderr
    result = run("--from-api-key", "s", "--api-key", "k", "--status", "done")
    assert result.exit_code == 2 and "'done' is not one of" in result.output


def test_a_lost_results_file_does_not_stop_its_job():
    lost = {**JOB_SUCCEEDED, "result_files": ["file-gone"]}
    handler, _ = openai_source(jobs=[lost])
    src, dest = client(handler, "https://api.openai.com/v1"), Destination()
    dst = client(dest, "http://127.0.0.1:9/v1")
    plan = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    result = migration.execute(src, dst, plan)
    assert result.jobs_created == 1 and result.failures == []
    assert dest.job_requests[0]["metadata"] == {"key": "value", migration.MIGRATED_FROM: "ftjob-abc123"}
    assert plan.jobs[0].notes == ["results CSV not copied: no /v1/files/file-gone/content"]


def test_a_download_cut_off_half_way_starts_over():
    handler, _ = openai_source()
    broken = {"left": 1}

    class Breaks(sdk_http.SyncByteStream):
        def __iter__(self):
            yield TRAIN[:10]
            raise sdk_http.ReadError("connection reset")

    def flaky(request: Any):
        if request.url.path.endswith("file-abc456/content") and broken["left"]:
            broken["left"] -= 1
            return sdk_http.Response(200, stream=Breaks())
        return handler(request)

    src, dest = client(flaky, "https://api.openai.com/v1"), Destination()
    dst = client(dest, "http://127.0.0.1:9/v1")
    copied = transfer.copy_file(
        src, dst, FILES_PAGE_1["data"][1], purpose="fine-tune", progress=transfer.Progress()
    )
    assert dest.content[copied] == TRAIN and broken["left"] == 0


def test_a_large_file_is_copied_without_holding_it_in_memory():
    """64 MB through download, temp file and multipart upload with a small, bounded peak."""
    import hashlib
    import tracemalloc

    size, block = 64 * 1024 * 1024, bytes(range(256)) * 4096  # 1 MiB
    source_file = {**FILES_PAGE_2["data"][0], "id": "file-big", "bytes": size, "filename": "big.jsonl"}

    class Blocks(sdk_http.SyncByteStream):
        def __iter__(self):
            for _ in range(size // len(block)):
                yield block

    class Sink(sdk_http.BaseTransport):
        """Reads the upload as it streams in (MockTransport would buffer the whole request)."""

        sha = hashlib.sha256()
        received = 0

        def handle_request(self, request: Any) -> Any:
            for chunk in request.stream:
                Sink.sha.update(chunk)
                Sink.received += len(chunk)
            uploaded = {**source_file, "id": "file-dst-big", "purpose": "fine-tune", "status": "processed"}
            return sdk_http.Response(200, json=uploaded)

    src = client(lambda request: sdk_http.Response(200, stream=Blocks()), "https://api.openai.com/v1")
    dst = openai.OpenAI(
        base_url="http://127.0.0.1:9/v1",
        api_key="k",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=Sink()),
    )
    tracemalloc.start()
    try:
        copied = transfer.copy_file(src, dst, source_file, purpose="fine-tune", progress=transfer.Progress())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert copied == "file-dst-big" and size < Sink.received < size + 4096  # the file plus multipart framing
    assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB for a 64 MiB file"


def test_a_job_continuing_a_fine_tuned_model_follows_its_parents_copy():
    child = {
        **JOB_LEGACY,
        "id": "ftjob-child",
        "created_at": 1692662000,
        "model": JOB_SUCCEEDED["fine_tuned_model"],
        "status": "queued",
    }
    handler, _ = openai_source(jobs=[child, JOB_SUCCEEDED])
    src, dest = client(handler, "https://api.openai.com/v1"), Destination()
    dst = client(dest, "http://127.0.0.1:9/v1")
    first = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    skipped = first.jobs[1]
    assert (
        skipped.action == "skip" and "run again once" in skipped.reason and "ftjob-abc123" in skipped.reason
    )
    migration.execute(src, dst, first)
    dest.jobs[0]["fine_tuned_model"] = "ft:openft-tiny-vlm:team:custom_suffix:dst0"  # the copy trained
    second = migration.plan(src, dst, model_map=MODEL_MAP, sleep=no_sleep)
    assert [(j.source_id, j.action) for j in second.jobs] == [
        ("ftjob-abc123", "present"),
        ("ftjob-child", "create"),
    ]
    migration.execute(src, dst, second)
    assert dest.job_requests[-1]["model"] == "ft:openft-tiny-vlm:team:custom_suffix:dst0"
