"""The legacy function-calling format is converted, not rejected; token estimates count tools."""

from __future__ import annotations

import io
import json

from openft.datasets.formats import ChatExample, Message, TextPart
from openft.datasets.legacy import upgrade_functions
from openft.datasets.moderation import NoopModerator
from openft.datasets.tokens import estimate_tokens
from openft.datasets.validate import ValidationOptions, validate_file
from tests.tasks import DRONE_FUNCTIONS, function_calling_records, records_jsonl


def run(records: list[dict]):
    return validate_file(
        io.BytesIO(records_jsonl(records)),
        method="supervised",
        options=ValidationOptions(moderator=NoopModerator()),
    )


def test_cookbook_style_file_validates_with_one_warning() -> None:
    records = function_calling_records(12, seed=0)
    result = run(records)
    assert result.report.ok, result.report.error_message()
    legacy = [i for i in result.report.issues if i.code == "legacy_function_calling"]
    assert len(legacy) == 1 and legacy[0].severity == "warning" and legacy[0].line == 1
    assert result.report.summary.usable_examples == 12
    ex = result.examples[0]
    assert ex.tools is not None and [t["function"]["name"] for t in ex.tools] == [
        f["name"] for f in DRONE_FUNCTIONS
    ]
    call = ex.messages[2].tool_calls[0]
    assert call["type"] == "function" and call["function"] == records[0]["messages"][2]["function_call"]
    tool = ex.messages[3]
    assert tool.role == "tool" and tool.tool_call_id == call["id"] and len(call["id"]) == 9


def test_function_results_answer_their_own_call() -> None:
    record = {
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "function_call": {"name": "a", "arguments": "{}"}},
            {"role": "function", "name": "a", "content": "1"},
            {"role": "assistant", "function_call": {"name": "b", "arguments": "{}"}},
            {"role": "function", "name": "b", "content": "2"},
            {"role": "assistant", "content": "done"},
        ]
    }
    out, converted = upgrade_functions(record)
    assert converted and "functions" not in out
    ids = [m["tool_calls"][0]["id"] for m in out["messages"] if "tool_calls" in m]
    assert [m["tool_call_id"] for m in out["messages"] if m["role"] == "tool"] == ids and len(set(ids)) == 2
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert upgrade_functions(plain) == (plain, False)


def test_current_format_files_get_no_legacy_warning() -> None:
    records = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(10)
    ]
    assert not [i for i in run(records).report.issues if i.code == "legacy_function_calling"]


def test_estimate_counts_tools() -> None:
    msgs = (Message("user", (TextPart("Take off"),)), Message("assistant", (TextPart("ok"),), weight=1))
    tools = tuple({"type": "function", "function": f} for f in DRONE_FUNCTIONS)
    bare = estimate_tokens(ChatExample(line=1, messages=msgs))
    with_tools = estimate_tokens(ChatExample(line=1, messages=msgs, tools=tools))
    assert with_tools - bare >= len(json.dumps(tools)) // 4 > 500
