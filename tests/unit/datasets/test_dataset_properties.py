"""Property tests: whatever the bytes, the validator returns a Report and never raises."""

import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openft.datasets.lines import scan_jsonl
from openft.datasets.moderation import NoopModerator
from openft.datasets.report import ERROR_CODES, SKIP_CODES, WARNING_CODES, Report
from openft.datasets.validate import ValidationOptions, validate_file

OPTIONS = ValidationOptions(moderator=NoopModerator())
CODES = set(ERROR_CODES) | set(SKIP_CODES) | set(WARNING_CODES)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot", None])
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "x"])},
    optional={
        "text": st.text(max_size=20) | json_values,
        "image_url": st.fixed_dictionaries(
            {
                "url": st.sampled_from(["data:image/png;base64,AAAA", "data:,x", "ftp://a/b", "x"])
                | json_values
            },
            optional={"detail": st.sampled_from(["low", "high", "auto", "max"]) | json_values},
        ),
    },
)
messages = st.fixed_dictionaries(
    {"role": roles},
    optional={
        "content": st.text(max_size=30) | st.lists(parts, max_size=3) | json_values,
        "weight": st.sampled_from([0, 1, 2, True, None, "1"]),
        "tool_calls": json_values,
        "tool_call_id": json_values,
        "name": json_values,
    },
)
records = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.lists(messages, max_size=5) | json_values}, optional={"tools": json_values}
    ),
    st.fixed_dictionaries(
        {
            "input": st.fixed_dictionaries({"messages": st.lists(messages, max_size=3)}) | json_values,
            "preferred_output": st.lists(messages, max_size=2) | json_values,
            "non_preferred_output": st.lists(messages, max_size=2) | json_values,
        }
    ),
    json_values,
)


def check(report: Report) -> None:
    assert isinstance(report, Report)
    json.dumps(report.to_dict())
    assert {i.code for i in report.issues} <= CODES
    assert report.ok == (report.summary.errors == 0)


@FAST
@given(st.binary(max_size=2000), st.sampled_from(["supervised", "dpo"]))
def test_random_bytes_never_crash(data: bytes, method: str) -> None:
    check(validate_file(io.BytesIO(data), method=method, options=OPTIONS).report)
    scan_jsonl(io.BytesIO(data))


@FAST
@given(st.lists(records, max_size=12), st.sampled_from(["supervised", "dpo"]))
def test_random_json_never_crashes(lines: list, method: str) -> None:
    data = "\n".join(json.dumps(r) for r in lines).encode()
    result = validate_file(io.BytesIO(data), method=method, options=OPTIONS)
    check(result.report)
    assert len(result.examples) == result.report.summary.usable_examples
