"""The per-line rules of a training file: pure functions from one parsed JSON line to either an
example builder or the issues found, each with a field path, a stable code and what to do.

No I/O here: images are only collected as ``(field path, url)`` for the pipeline in
``datasets.validate`` to fetch, decode and moderate; the builder a rule returns then takes the
resolved images and puts their bytes into the example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from openft.datasets.formats import (
    DETAILS,
    ROLES,
    ChatExample,
    Example,
    ImagePart,
    Message,
    Part,
    PreferenceExample,
    TextPart,
)
from openft.datasets.report import Issue

# Special tokens of common open-model chat templates. Text containing one would be read by
# the tokenizer as structure (a fake turn boundary, a fake image slot), not as text.
DEFAULT_CONTROL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<image>",
    "<start_of_image>",  # Gemma 3
    "<image_soft_token>",
    "<end_of_image>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    # Idefics3 / SmolVLM: turn end and the image expansion's markers (tiles up to 6x6).
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# ---------------------------------------------------------------------------- structure


class LineCheck:
    """Issues of one line, in the order found."""

    def __init__(self, line: int, control_tokens: Sequence[str]) -> None:
        self.line = line
        self.control_tokens = control_tokens
        self.issues: list[Issue] = []
        self.images: list[tuple[str, str]] = []  # (field path, url)

    @property
    def failed(self) -> bool:
        return any(i.severity == "error" for i in self.issues)

    def error(self, field_path: str, code: str, message: str) -> None:
        self.issues.append(Issue(self.line, field_path, code, "error", message))

    def text(self, value: str, field_path: str) -> None:
        for token in self.control_tokens:
            if token in value:
                self.error(
                    field_path,
                    "control_token_in_content",
                    f"the text contains the special token {token!r}, which the model reads as "
                    "structure, not text; remove it or write it differently",
                )
                return


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _tools(container: dict, prefix: str, ck: LineCheck) -> tuple[tuple[dict, ...] | None, bool | None]:
    tools = container.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        ck.error(f"{prefix}tools", "invalid_structure", "tools must be a list of function definitions")
        tools = None
    ptc = container.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        ck.error(
            f"{prefix}parallel_tool_calls", "invalid_structure", "parallel_tool_calls must be true or false"
        )
        ptc = None
    return (tuple(tools) if tools else None), ptc


def _content(obj: dict, role: str, path: str, ck: LineCheck) -> tuple[Part, ...] | None:
    content = obj.get("content")
    if isinstance(content, str):
        ck.text(content, f"{path}.content")
        return (TextPart(content),)
    if content is None:
        if role == "assistant" and obj.get("tool_calls"):
            return ()
        ck.error(
            f"{path}.content", "invalid_structure", "content is missing; give a string or a list of parts"
        )
        return None
    if not isinstance(content, list):
        ck.error(
            f"{path}.content",
            "invalid_structure",
            f"content must be a string or a list of parts, not {_kind(content)}",
        )
        return None
    parts: list[Part] = []
    for j, part in enumerate(content):
        where = f"{path}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                ck.error(f"{where}.text", "invalid_structure", "a text part needs a string 'text'")
                continue
            ck.text(text, f"{where}.text")
            parts.append(TextPart(text))
        elif kind == "image_url":
            image = _image_part(part, role, where, ck)
            if image is not None:
                parts.append(image)
        else:
            ck.error(
                f"{where}.type" if isinstance(part, dict) else where,
                "invalid_structure",
                f"unsupported content part {kind!r}; use {{'type': 'text', ...}} or {{'type': 'image_url', ...}}",
            )
    return tuple(parts)


def _image_part(part: dict, role: str, where: str, ck: LineCheck) -> ImagePart | None:
    if role == "assistant":
        ck.error(
            where,
            "image_in_assistant_message",
            "assistant messages cannot contain images; move the image to a user message",
        )
        return None
    if role == "tool":
        ck.error(where, "invalid_structure", "tool messages cannot contain images; use a user message")
        return None
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str) or not url:
        ck.error(
            f"{where}.image_url.url",
            "invalid_structure",
            "an image_url part needs {'image_url': {'url': 'https://... or data:image/...;base64,...'}}",
        )
        return None
    detail = spec.get("detail", "auto")
    if detail not in DETAILS:
        ck.error(
            f"{where}.image_url.detail",
            "invalid_detail",
            f"detail {detail!r} is not allowed; use 'low', 'high' or 'auto'",
        )
        return None
    ck.images.append((f"{where}.image_url.url", url))
    return ImagePart(url=url, detail=detail)


def _tool_calls(obj: dict, path: str, ck: LineCheck) -> tuple[dict, ...] | None:
    calls = obj.get("tool_calls")
    if calls is None:
        return None
    if not isinstance(calls, list):
        ck.error(f"{path}.tool_calls", "invalid_structure", "tool_calls must be a list")
        return None
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not (
            isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str)
        ):
            ck.error(
                f"{path}.tool_calls[{k}]",
                "invalid_structure",
                "a tool call needs {'id', 'type': 'function', 'function': {'name', 'arguments' (a JSON string)}}",
            )
            return None
    return tuple(calls)


def _message(obj: Any, path: str, ck: LineCheck) -> Message | None:
    if not isinstance(obj, dict):
        ck.error(
            path, "invalid_structure", f"a message must be an object with role and content, not {_kind(obj)}"
        )
        return None
    role = obj.get("role")
    if role not in ROLES:
        what = "the message has no role" if role is None else f"unknown role {role!r}"
        ck.error(f"{path}.role", "invalid_role", f"{what}; use one of {', '.join(ROLES)}")
        return None
    content = _content(obj, role, path, ck)
    weight = obj.get("weight")
    if "weight" in obj:
        if role != "assistant":
            ck.error(f"{path}.weight", "invalid_structure", "weight is only allowed on assistant messages")
        elif type(weight) is not int or weight not in (0, 1):
            ck.error(f"{path}.weight", "invalid_structure", f"weight must be 0 or 1, not {weight!r}")
    elif role == "assistant":
        weight = 1
    name = obj.get("name")
    if name is not None and not isinstance(name, str):
        ck.error(f"{path}.name", "invalid_structure", "name must be a string")
    tool_calls = None
    if "tool_calls" in obj:
        if role != "assistant":
            ck.error(f"{path}.tool_calls", "invalid_structure", "only assistant messages can have tool_calls")
        else:
            tool_calls = _tool_calls(obj, path, ck)
    tool_call_id = obj.get("tool_call_id")
    if role == "tool" and not isinstance(tool_call_id, str):
        ck.error(
            f"{path}.tool_call_id",
            "invalid_structure",
            "a tool message needs the tool_call_id of the assistant tool call it answers",
        )
    if content is None or ck.failed:
        return None
    return Message(
        role=role,
        content=content,
        weight=weight if role == "assistant" else None,
        name=name,
        tool_calls=tool_calls,
        tool_call_id=tool_call_id if role == "tool" else None,
    )


def _messages(value: Any, path: str, ck: LineCheck, code: str) -> list[Message] | None:
    if not isinstance(value, list) or not value:
        ck.error(path, code, f"{path} must be a non-empty list of messages, not {_kind(value)}")
        return None
    messages = [_message(m, f"{path}[{i}]", ck) for i, m in enumerate(value)]
    return None if ck.failed else messages  # type: ignore[return-value]


def check_chat(record: dict, ck: LineCheck) -> Callable[[dict], Example] | None:
    if "messages" not in record:
        if "input" in record or "preferred_output" in record:
            ck.error(
                "",
                "invalid_structure",
                "this is a preference (DPO) example, but the job's method is supervised; "
                "use method 'dpo' or write {\"messages\": [...]}",
            )
        else:
            ck.error(
                "messages", "invalid_structure", 'missing "messages"; write {"messages": [...]} on each line'
            )
        return None
    tools, ptc = _tools(record, "", ck)
    messages = _messages(record["messages"], "messages", ck, "invalid_structure")
    if messages is None or ck.failed:
        return None
    if not any(m.role == "assistant" and m.weight == 1 for m in messages):
        ck.error(
            "messages",
            "missing_assistant_message",
            "no assistant message to train on; add one (with weight 1 or no weight)",
        )
        return None
    return lambda images: ChatExample(
        line=ck.line,
        messages=tuple(_fill_images(m, images) for m in messages),
        tools=tools,
        parallel_tool_calls=ptc,
    )


def _output(record: dict, key: str, ck: LineCheck) -> Message | None:
    value = record.get(key)
    if not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict):
        n = f"{len(value)} items" if isinstance(value, list) else _kind(value)
        ck.error(
            key,
            "invalid_preference_example",
            f"{key} must be a list with exactly one assistant message, not {n}",
        )
        return None
    if value[0].get("role") != "assistant":
        ck.error(
            f"{key}[0].role",
            "invalid_preference_example",
            f"{key} must hold an assistant message, not role {value[0].get('role')!r}",
        )
        return None
    return _message(value[0], f"{key}[0]", ck)


def check_preference(record: dict, ck: LineCheck) -> Callable[[dict], Example] | None:
    if "input" not in record and "messages" in record:
        ck.error(
            "",
            "invalid_preference_example",
            "this is a supervised chat example, but the job's method is dpo; write "
            '{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}',
        )
        return None
    prompt_obj = record.get("input")
    if not isinstance(prompt_obj, dict):
        ck.error(
            "input",
            "invalid_preference_example",
            f'input must be an object {{"messages": [...]}}, not {_kind(prompt_obj)}',
        )
        return None
    tools, ptc = _tools(prompt_obj, "input.", ck)
    prompt = _messages(prompt_obj.get("messages"), "input.messages", ck, "invalid_preference_example")
    preferred = _output(record, "preferred_output", ck)
    non_preferred = _output(record, "non_preferred_output", ck)
    if prompt is None or preferred is None or non_preferred is None or ck.failed:
        return None
    return lambda images: PreferenceExample(
        line=ck.line,
        prompt=tuple(_fill_images(m, images) for m in prompt),
        preferred=preferred,
        non_preferred=non_preferred,
        tools=tools,
        parallel_tool_calls=ptc,
    )


def _fill_images(message: Message, images: dict) -> Message:
    """The message with each image's bytes and digest filled in."""
    if not message.images:
        return message
    parts = tuple(
        replace(p, data=images[p.url].data, sha256=images[p.url].info.sha256)
        if isinstance(p, ImagePart)
        else p
        for p in message.content
    )
    return replace(message, content=parts)
