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


def test_moderator_is_chosen_by_setting(tmp_path):
    """OPENFT_MODERATOR swaps the moderator: the no-op one lets a photo of a person through."""
    import base64
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((256, 256)).save(buf, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    line = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "a person"},
        ]
    }
    path = tmp_path / "people.jsonl"
    path.write_text(json.dumps(line) + "\n")

    def codes(moderator: str | None) -> list[str]:
        # In process (no interpreter start-up): the command reads its settings from the environment.
        env = {"OPENFT_HOME": str(tmp_path), "OPENFT_MODERATOR": moderator}
        result = CliRunner().invoke(app(), ["validate", str(path), "--json"], env=env)
        return [i["code"] for i in json.loads(result.stdout)["issues"]]

    assert {"contains_people", "contains_faces"} & set(codes(None))
    assert codes("openft.datasets.moderation:NoopModerator") == ["too_few_examples"]
