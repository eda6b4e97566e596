"""`openft files|jobs|chat` against a real `openft serve`, asserting only on what the CLI prints."""

from __future__ import annotations

import io
import json

import pytest
import typer
from typer.testing import CliRunner

from openft.cli import chat, files, jobs
from tests.conftest import free_port
from tests.tasks import colour_examples, tiny_chat_jsonl, to_jsonl

GOOD = tiny_chat_jsonl(10)


def remote_app() -> typer.Typer:
    """The three remote command groups, mounted as main.py mounts them."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.add_typer(files.app, name="files")
    app.add_typer(jobs.app, name="jobs")
    app.command("chat")(chat.chat)
    return app


class Cli:
    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url
        self.key = key
        self.app = remote_app()
        # No key or URL from the developer's environment leaks into the commands.
        self.env = {"OPENFT_API_KEY": None, "OPENAI_API_KEY": None, "OPENFT_BASE_URL": None}

    def __call__(self, *args: str, input: str | bytes | None = None, auth: bool = True):  # noqa: A002
        conn = ["--base-url", self.base_url] + (["--api-key", self.key] if auth else [])
        return CliRunner().invoke(self.app, [*args, *conn], input=input, env=self.env)


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def failed(result, code: int = 1) -> str:
    """The command refused cleanly: its exit code, one ``error:`` line on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cli(api_server):
    return Cli(api_server.base_url, api_server.new_key("cli-remote"))


@pytest.fixture(scope="module")
def train_file(cli, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli") / "train.jsonl"
    path.write_bytes(GOOD)
    return ok(cli("files", "upload", str(path))).strip()


# ---------------------------------------------------------------- files


def test_files_upload_list_content_round_trip(cli, tmp_path):
    data = GOOD + b"\n" + json.dumps({"note": "é ünïcode"}, ensure_ascii=False).encode() + b"\r\n"
    path = tmp_path / "round trip.jsonl"
    path.write_bytes(data)
    upload = json.loads(ok(cli("files", "upload", str(path), "--purpose", "user_data", "--json")))
    file_id = upload["id"]
    assert file_id.startswith("file-") and upload["bytes"] == len(data) and upload["filename"] == path.name

    listing = ok(cli("files", "list", "--purpose", "user_data"))
    assert file_id in listing and path.name in listing
    listed = json.loads(ok(cli("files", "list", "--json")))
    assert file_id in [f["id"] for f in listed]
    assert all(
        f["purpose"] == "user_data"
        for f in json.loads(ok(cli("files", "list", "--purpose", "user_data", "--json")))
    )

    assert cli("files", "content", file_id).stdout_bytes == data
    out = tmp_path / "copy.jsonl"
    ok(cli("files", "content", file_id, "-o", str(out)))
    assert out.read_bytes() == data
    assert f"filename: {path.name}" in " ".join(ok(cli("files", "get", file_id)).split())


def test_files_delete_then_get_is_a_clean_404(cli, tmp_path):
    path = tmp_path / "gone.jsonl"
    path.write_bytes(GOOD)
    file_id = ok(cli("files", "upload", str(path))).strip()
    assert ok(cli("files", "delete", file_id)).strip() == f"deleted {file_id}"
    line = failed(cli("files", "get", file_id))
    assert file_id in line
    assert file_id not in ok(cli("files", "list"))


def test_upload_limit_refusal_names_the_param(cli, tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_bytes(GOOD * (3 * 1024 * 1024 // len(GOOD) + 1))  # over api_server's 2 MiB limit
    line = failed(cli("files", "upload", str(path)))
    assert line.endswith("(param: file)")


# ---------------------------------------------------------------- jobs


def test_jobs_create_sends_parallelism(cli, train_file):
    """``--parallelism`` reaches the server, which refuses fsdp with LoRA and says what to use."""
    line = failed(
        cli(
            "jobs", "create", "--training-file", train_file, "--model", "openft-tiny-vlm",
            "--training-type", "lora", "--parallelism", "fsdp",
        )  # fmt: skip
    )
    assert "full fine-tuning only" in line and line.endswith("(param: openft.parallelism)")


def test_jobs_create_sends_loss_kernel(cli, train_file):
    """``--loss-kernel`` reaches the server, which refuses the chunked loss under FSDP."""
    line = failed(
        cli(
            "jobs", "create", "--training-file", train_file, "--model", "openft-tiny-vlm",
            "--parallelism", "fsdp", "--loss-kernel", "chunked",
        )  # fmt: skip
    )
    assert "parallelism 'fsdp'" in line and line.endswith("(param: openft.loss_kernel)")


def test_jobs_create_list_get_pause_cancel(cli, train_file):
    job_id = ok(
        cli(
            "jobs",
            "create",
            "--training-file",
            train_file,
            "--model",
            "openft-tiny-vlm",
            "--suffix",
            "cli",
            "--seed",
            "7",
            "--n-epochs",
            "2",
            "--learning-rate-multiplier",
            "0.5",
            "--training-type",
            "lora",
            "--train-projector",
        )  # fmt: skip
    ).strip()
    assert job_id.startswith("ftjob-")

    job = json.loads(ok(cli("jobs", "get", job_id, "--json")))
    assert job["status"] == "validating_files" and job["seed"] == 7 and job["user_provided_suffix"] == "cli"
    hp = job["method"]["supervised"]["hyperparameters"]
    assert hp["n_epochs"] == 2 and hp["learning_rate_multiplier"] == 0.5 and hp["batch_size"] == "auto"
    text = ok(cli("jobs", "get", job_id))
    assert "validating_files" in text and "n_epochs=2" in text and train_file in text

    assert job_id in ok(cli("jobs", "list"))
    assert job_id in [j["id"] for j in json.loads(ok(cli("jobs", "list", "--json")))]

    line = failed(cli("jobs", "pause", job_id))  # only queued or running jobs pause
    assert "validating_files" in line and line.endswith("(param: fine_tuning_job_id)")
    assert ok(cli("jobs", "cancel", job_id)).strip() == f"{job_id} cancelled"
    assert "already been cancelled" in failed(cli("jobs", "cancel", job_id))
    assert "only paused jobs" in failed(cli("jobs", "resume", job_id))

    events = ok(cli("jobs", "events", job_id)).splitlines()
    assert "Created fine-tuning job" in events[0] and "cancelled" in events[-1]
    # --follow ends by itself once the job has finished, printing the same events
    assert ok(cli("jobs", "events", job_id, "--follow", "--interval", "0.1")).splitlines() == events
    assert [json.loads(x)["message"] for x in ok(cli("jobs", "events", job_id, "--json")).splitlines()][
        0
    ] == (f"Created fine-tuning job: {job_id}")
    assert "no checkpoints" in cli("jobs", "checkpoints", job_id).stderr
    result = cli("jobs", "wait", job_id, "--interval", "0.1")
    assert result.exit_code == 1 and "status: cancelled" in result.stdout


def test_dpo_method_and_bad_request_param(cli, train_file):
    job = json.loads(
        ok(
            cli(
                "jobs",
                "create",
                "--training-file",
                train_file,
                "--model",
                "openft-tiny-vlm",
                "--method",
                "dpo",
                "--beta",
                "0.2",
                "--json",
            )  # fmt: skip
        )
    )
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    ok(cli("jobs", "cancel", job["id"]))
    line = failed(cli("jobs", "create", "--training-file", train_file, "--model", "gpt-4o-mini"))
    assert "not available for fine-tuning" in line and line.endswith("(param: model)")
    # --beta without --method dpo is a usage error caught before any request
    assert (
        cli("jobs", "create", "--training-file", train_file, "--model", "m", "--beta", "0.1").exit_code == 2
    )


def test_unknown_job_is_a_clean_404(cli):
    for command in (["get"], ["cancel"], ["events"], ["checkpoints"], ["wait"]):
        line = failed(cli("jobs", *command, "ftjob-doesnotexist"))
        assert "ftjob-doesnotexist" in line, line


def test_missing_key_and_unreachable_server(cli):
    line = failed(cli("files", "list", auth=False), code=2)
    assert "--api-key" in line and "OPENFT_API_KEY" in line
    line = failed(Cli(f"http://127.0.0.1:{free_port()}/v1", cli.key)("jobs", "list"))
    assert "cannot reach" in line


# ---------------------------------------------------------------- against a training server


@pytest.fixture(scope="module")
def full_cli(full_server):
    return Cli(full_server.base_url, full_server.new_key("cli-remote-full"))


@pytest.mark.slow
def test_chat_streams_and_matches_no_stream(full_cli, tmp_path):
    args = ["chat", "openft-tiny-vlm", "Colour of the sky?", "--max-tokens", "8", "--temperature", "0"]
    streamed = ok(full_cli(*args))
    assert streamed.strip()
    assert ok(full_cli(*args, "--no-stream")) == streamed
    # the prompt can come on stdin, and a local image file is sent as a data URL
    assert (
        ok(full_cli(*args[:2], "--max-tokens", "8", "--temperature", "0", input="Colour of the sky?"))
        == streamed
    )
    from PIL import Image

    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (220, 30, 30)).save(picture)
    assert ok(full_cli(*args, "--image", str(picture), "--system", "Answer briefly.")).strip()
    line = failed(full_cli("chat", "ft:openft-tiny-vlm:nobody:x:y", "hi"))
    assert line.endswith("(param: model)")


@pytest.mark.slow
def test_jobs_wait_for_a_tiny_job(full_cli, tmp_path):
    path = tmp_path / "colours.jsonl"
    path.write_bytes(to_jsonl(colour_examples(10, seed=1)))
    file_id = ok(full_cli("files", "upload", str(path))).strip()
    job_id = ok(
        full_cli(
            "jobs", "create", "--training-file", file_id, "--model", "openft-tiny-vlm", "--n-epochs", "1"
        )
    ).strip()
    result = full_cli("jobs", "wait", job_id, "--interval", "0.5")
    assert result.exit_code == 0, (result.output, ok(full_cli("jobs", "events", job_id)))
    assert "status: succeeded" in " ".join(result.stdout.split())
    model = json.loads(ok(full_cli("jobs", "get", job_id, "--json")))["fine_tuned_model"]
    assert model.startswith("ft:") and model in result.stdout
    events = ok(full_cli("jobs", "events", job_id)).splitlines()
    assert "Created fine-tuning job" in events[0] and len(events) > 2
    assert "ckpt-step-" in ok(full_cli("jobs", "checkpoints", job_id))
    # the new model is servable through the CLI (a 1-epoch model may well answer with nothing)
    ok(full_cli("chat", model, "Colour of the sky?", "--max-tokens", "4", "--temperature", "0"))


def test_uploading_through_the_sdk_shows_in_the_cli(api_server, cli):
    """The CLI and the SDK see the same project through the same key."""
    import openai

    sdk = openai.OpenAI(base_url=cli.base_url, api_key=cli.key, max_retries=0)
    f = sdk.files.create(file=("sdk.jsonl", io.BytesIO(GOOD)), purpose="fine-tune")
    assert f.id in ok(cli("files", "list"))
