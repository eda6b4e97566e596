import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from openft.cli.validate import register

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "datasets"


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)

    @a.callback()
    def main() -> None:  # keep "validate" a subcommand
        pass

    return a


def test_trainable_file_exits_0_with_json() -> None:
    result = CliRunner().invoke(
        app(), ["validate", str(GOLDEN / "clean_dpo.jsonl"), "--method", "dpo", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["method"] == "dpo" and set(report) == {"ok", "method", "summary", "issues"}


def test_untrainable_file_exits_1_with_readable_summary() -> None:
    result = CliRunner().invoke(app(), ["validate", str(GOLDEN / "mixed_dpo.jsonl"), "--method", "dpo"])
    assert result.exit_code == 1
    assert "not trainable" in result.stdout and "invalid_preference_example" in result.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert CliRunner().invoke(app(), ["validate", str(tmp_path / "nope.jsonl")]).exit_code == 2
    f = GOLDEN / "clean_dpo.jsonl"
    assert CliRunner().invoke(app(), ["validate", str(f), "--method", "rl"]).exit_code == 2
