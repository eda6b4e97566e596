"""OpenAI's legacy function-calling format, converted to tools / tool_calls / tool messages.

Older fine-tuning datasets (and the OpenAI cookbook's function-calling example) use ``functions``
at the top level, an assistant ``function_call: {name, arguments}`` and ``role: "function"``
messages with a ``name``. OpenAI's fine-tuning accepted them; openft converts each such line to
the current format before validation, and the validator warns once per file.
"""

from __future__ import annotations

from typing import Any

LEGACY_CODE = "legacy_function_calling"
LEGACY_MESSAGE = (
    "the file uses the legacy function-calling format (functions, function_call, role 'function'); "
    "it was converted to tools, tool_calls and tool messages"
)


def _call_id(n: int) -> str:
    # Nine characters: the length Mistral's template requires of tool-call ids.
    return f"call{n:05d}"


def upgrade_functions(record: Any) -> tuple[Any, bool]:
    """``(record in the current format, whether anything was converted)``; a record without legacy
    fields comes back unchanged (the same object). Only shapes that are clearly legacy are touched;
    anything malformed is left for the validator to report."""
    if not isinstance(record, dict):
        return record, False
    messages = record.get("messages")
    legacy_messages = isinstance(messages, list) and any(
        isinstance(m, dict) and ("function_call" in m or m.get("role") == "function") for m in messages
    )
    if "functions" not in record and not legacy_messages:
        return record, False
    out = dict(record)
    functions = out.pop("functions", None)
    if isinstance(functions, list) and "tools" not in out:
        out["tools"] = [{"type": "function", "function": f} for f in functions]
    elif functions is not None:
        out["functions"] = functions  # malformed or both given: let validation speak
    if legacy_messages:
        converted: list[Any] = []
        open_calls: dict[str, list[str]] = {}  # function name -> call ids not yet answered
        n = 0
        for m in messages:
            if not isinstance(m, dict):
                converted.append(m)
                continue
            m = dict(m)
            call = m.pop("function_call", None)
            if isinstance(call, dict) and "tool_calls" not in m:
                n += 1
                cid = _call_id(n)
                m["tool_calls"] = [{"id": cid, "type": "function", "function": call}]
                open_calls.setdefault(str(call.get("name")), []).append(cid)
            elif call is not None:
                m["function_call"] = call
            if m.get("role") == "function":
                name = str(m.get("name"))
                pending = open_calls.get(name) or []
                m["role"] = "tool"
                m["tool_call_id"] = pending.pop(0) if pending else _call_id(0)
                m.pop("name", None)
            converted.append(m)
        out["messages"] = converted
    return out, True
