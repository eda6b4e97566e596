import io
import json

import pytest

from openft.datasets.formats import ChatExample, ImagePart, PreferenceExample, TextPart
from openft.datasets.moderation import NoopModerator
from openft.datasets.report import Issue, Report
from openft.datasets.validate import ValidationOptions, validate_file

from .conftest import data_url, png_bytes

NOOP = NoopModerator()


def jsonl(records) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(r) + "\n" for r in records).encode())


def chat(q="Hi", a="Hello", *parts) -> dict:
    content = [{"type": "text", "text": q}, *parts] if parts else q
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": a}]}


def image(url: str, detail: str | None = None) -> dict:
    spec = {"url": url, **({"detail": detail} if detail else {})}
    return {"type": "image_url", "image_url": spec}


def run(records, method="supervised", **opts):
    return validate_file(jsonl(records), method=method, options=ValidationOptions(moderator=NOOP, **opts))


def test_normalised_examples_carry_image_bytes_and_weights() -> None:
    png = png_bytes()
    sunk = {}
    records = [chat(f"q{i}", f"a{i}", image(data_url(png), "low")) for i in range(10)]
    records[0]["messages"].insert(1, {"role": "assistant", "content": "ctx", "weight": 0})
    records[0]["messages"].insert(2, {"role": "user", "content": "more"})
    result = run(records, image_sink=lambda sha, data: sunk.__setitem__(sha, data))
    assert result.report.ok, result.report.to_dict()
    first = result.examples[0]
    assert isinstance(first, ChatExample) and first.line == 1
    assert [m.weight for m in first.messages] == [None, 0, None, 1]
    [img] = first.images
    assert isinstance(img, ImagePart) and img.data == png and img.detail == "low"
    assert first.messages[0].content[0] == TextPart("q0")
    assert list(sunk.values()) == [png] and img.sha256 in sunk  # stored once per digest


def test_dpo_examples() -> None:
    rec = {
        "input": {"messages": [{"role": "user", "content": "Hi"}], "tools": [], "parallel_tool_calls": True},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    result = run([rec] * 10, method="dpo")
    assert result.report.ok
    ex = result.examples[0]
    assert (
        isinstance(ex, PreferenceExample) and ex.preferred.text == "Hello!" and ex.parallel_tool_calls is True
    )
    assert [i.code for i in result.report.issues] == ["duplicate_example"] * 9


def test_skipped_examples_are_left_out_but_the_file_stays_trainable() -> None:
    records = [chat(f"q{i}") for i in range(10)]
    records.append(chat("bad", "x", image("data:image/png;base64,AAAA")))
    result = run(records)
    assert result.report.ok and len(result.examples) == 10
    assert result.report.summary.skipped_examples == 1
    [issue] = result.report.issues
    assert (issue.line, issue.field, issue.code, issue.severity) == (
        11,
        "messages[0].content[1].image_url.url",
        "invalid_image_format",
        "skip",
    )


def test_summary_shape_and_tokens() -> None:
    result = run(
        [chat(f"q{i}", "a" * (4 * i)) for i in range(10)],
        token_counter=lambda ex: 100 + ex.line,
        max_tokens=105,
    )
    d = result.report.to_dict()
    assert set(d) == {"ok", "method", "summary", "issues"}
    assert set(d["summary"]) == {
        "examples", "usable_examples", "examples_with_images", "images", "skipped_examples", "errors", "tokens",
    }  # fmt: skip
    t = d["summary"]["tokens"]
    assert (t["min"], t["max"], t["p50"], t["total"], t["source"]) == (101, 110, 105, 1055, "model")
    assert t["trained_tokens_per_epoch"] == 101 + 102 + 103 + 104 + 105 * 6
    assert [i["code"] for i in d["issues"]] == ["example_too_long"] * 5


def test_summary_keeps_the_most_trained_tokens_a_model_counter_reports() -> None:
    """A model's counter also says how many tokens each example trains; the summary keeps the
    most (the memory planner's logits rows). The estimate does not know it: None."""
    from openft.datasets.tokens import TokenCount

    examples = [chat(f"q{i}", "a" * (4 * i)) for i in range(10)]
    counted = run(examples, token_counter=lambda ex: TokenCount(100 + ex.line, 3 * ex.line))
    tokens = counted.report.to_dict()["summary"]["tokens"]
    assert (tokens["max"], tokens["trained_max"]) == (110, 30)
    assert run(examples).report.to_dict()["summary"]["tokens"]["trained_max"] is None


def test_custom_control_tokens_and_error_message() -> None:
    result = run([chat("say <bos> now")] + [chat(f"q{i}") for i in range(10)], control_tokens=["<bos>"])
    report = result.report
    assert not report.ok
    msg = report.error_message()
    assert msg.startswith("Line 1, messages[0].content:") and "<bos>" in msg
    assert run([chat("say <|im_start|>")] * 10, control_tokens=[]).report.ok is True


def test_error_message_for_file_level_errors() -> None:
    report = run([chat()])
    assert report.report.error_message().startswith("Training file: the file has 1 usable example")
    assert Report(ok=True, method="x", summary={}, issues=[]).error_message()
    issue = Issue(3, "messages[1].role", "invalid_role", "error", "unknown role 'bot'; use one of ...")
    assert Report(False, "supervised", {}, [issue]).error_message().startswith("Line 3, messages[1].role: ")


@pytest.mark.parametrize(
    "message, code",
    [
        ({"role": "tool", "content": "x"}, "invalid_structure"),  # no tool_call_id
        ({"role": "user", "content": "x", "weight": 1}, "invalid_structure"),
        ({"role": "assistant", "content": "x", "weight": True}, "invalid_structure"),
        ({"role": "assistant", "content": "x", "weight": 2}, "invalid_structure"),
        ({"role": "assistant", "content": None}, "invalid_structure"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, "invalid_structure"),
        ({"content": "x"}, "invalid_role"),
        ({"role": "user", "content": [{"type": "audio"}]}, "invalid_structure"),
        ({"role": "user", "content": [image("data:,", "ultra")]}, "invalid_detail"),
        ({"role": "tool", "tool_call_id": "c", "content": [image("data:,")]}, "invalid_structure"),
    ],
)
def test_message_rules(message: dict, code: str) -> None:
    rec = {"messages": [{"role": "user", "content": "q"}, message, {"role": "assistant", "content": "a"}]}
    issues = run([rec]).report.issues
    assert issues[0].code == code and issues[0].line == 1 and issues[0].field.startswith("messages[1]")


def test_too_many_image_examples(monkeypatch) -> None:
    import openft.datasets.validate as v

    monkeypatch.setattr(v, "MAX_IMAGE_EXAMPLES", 2)
    url = data_url(png_bytes())
    records = [chat(f"q{i}", "a", image(url)) for i in range(4)] + [chat(f"t{i}") for i in range(10)]
    report = run(records).report
    [issue] = [i for i in report.issues if i.code == "too_many_image_examples"]
    assert issue.line == 3 and not report.ok


def test_progress_is_reported() -> None:
    seen: list[int] = []
    run([chat(f"q{i}") for i in range(70)], progress=seen.append)
    assert seen[-1] == 70 and seen == sorted(seen)


def test_http_images_in_a_file(image_server: str) -> None:
    records = [chat(f"q{i}", "a", image(f"{image_server}/good.png")) for i in range(10)]
    records.append(chat("m", "a", image(f"{image_server}/missing.png")))
    ok = run(records, allow_private_networks=True).report
    assert ok.ok and [i.code for i in ok.issues] == ["inaccessible_url"]
    refused = run(records).report
    assert not refused.ok and refused.summary.skipped_examples == 11
    assert all("loopback" in i.message for i in refused.issues if i.code == "inaccessible_url")


def test_unknown_method_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        validate_file(io.BytesIO(b""), method="rl")  # type: ignore[arg-type]
