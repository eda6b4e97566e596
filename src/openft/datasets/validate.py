"""Validate a training file: every rule checked, every problem reported together.

``validate_file`` streams the JSONL, checks each line's structure (errors make the file
untrainable), then resolves its images in small chunks on a thread pool — decode the data
URL or fetch the HTTP URL, decode fully, moderate — and leaves out the examples whose
images fail (skips: the job goes on without them). Memory stays flat in the file size
apart from the usable examples it returns; ``iter_validate`` streams those too.

Bad user data never raises: it becomes an ``Issue`` with a line, a field path like
``messages[2].content[0].image_url.url``, a stable code and a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Literal

from openft.datasets.fetch import make_client
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
from openft.datasets.images import ImageInfo, ImageRejected, decode_image, fetch_image_bytes
from openft.datasets.lines import read_jsonl
from openft.datasets.moderation import SKIP_CODE, SKIP_PHRASE, Moderator, default_moderator
from openft.datasets.report import Issue, Report, Severity
from openft.datasets.tokens import TokenStats, estimate_tokens

MAX_IMAGES_PER_EXAMPLE = 10
MAX_IMAGE_EXAMPLES = 50_000
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
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
)
_CHUNK = 32  # lines per image-resolution batch: bounds memory, keeps the pool busy
_FETCH_THREADS = 8  # fetches wait on the network; decoding and OpenCV release the GIL
# When one example has images failing for several reasons, the first of these is reported.
_MODERATION_ORDER = ("children", "faces", "people", "captcha")


@dataclass
class ValidationOptions:
    allow_private_networks: bool = False
    """Allow image URLs on loopback/private/link-local addresses (tests, trusted intranets)."""
    fetch_timeout: float = 10.0
    """Seconds for each image download, redirects included."""
    moderator: Moderator | None = None
    """Image moderation; None means the default offline one (``default_moderator()``)."""
    token_counter: Callable[[Example], int] | None = None
    """The model's own counter (from its processor); None means a rough estimate."""
    max_tokens: int | None = None
    """The model's context length; longer examples get an ``example_too_long`` warning."""
    control_tokens: Sequence[str] | None = None
    """Special tokens text may not contain; None means ``DEFAULT_CONTROL_TOKENS``."""
    image_sink: Callable[[str, bytes], None] | None = None
    """Called once per distinct usable image with (sha256, bytes), e.g. to store the blob."""
    progress: Callable[[int], None] | None = None
    """Called with the number of examples (non-blank lines) done so far."""
    min_examples: int = 10
    """Fewest usable examples a trainable file must have."""


@dataclass
class ValidationResult:
    report: Report
    examples: list[ChatExample | PreferenceExample]  # usable examples only


def validate_file(
    fp: BinaryIO,
    *,
    method: Literal["supervised", "dpo"],
    options: ValidationOptions = ValidationOptions(),  # noqa: B008 - a frozen-by-convention default
) -> ValidationResult:
    """Validate a JSONL training file for ``method``; never raises for bad data."""
    validator = _Validator(method, options)
    examples = list(validator.run(fp))
    return ValidationResult(report=validator.report(), examples=examples)


def iter_validate(
    fp: BinaryIO, *, method: Literal["supervised", "dpo"], options: ValidationOptions
) -> tuple[Iterator[Example], Callable[[], Report]]:
    """Streaming form: (usable examples as they are validated, a function giving the report).

    Call the report function after the iterator is exhausted.
    """
    validator = _Validator(method, options)
    return validator.run(fp), validator.report


# ---------------------------------------------------------------------------- structure


class _Line:
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


def _tools(container: dict, prefix: str, ck: _Line) -> tuple[tuple[dict, ...] | None, bool | None]:
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


def _content(obj: dict, role: str, path: str, ck: _Line) -> tuple[Part, ...] | None:
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


def _image_part(part: dict, role: str, where: str, ck: _Line) -> ImagePart | None:
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


def _tool_calls(obj: dict, path: str, ck: _Line) -> tuple[dict, ...] | None:
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


def _message(obj: Any, path: str, ck: _Line) -> Message | None:
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


def _messages(value: Any, path: str, ck: _Line, code: str) -> list[Message] | None:
    if not isinstance(value, list) or not value:
        ck.error(path, code, f"{path} must be a non-empty list of messages, not {_kind(value)}")
        return None
    messages = [_message(m, f"{path}[{i}]", ck) for i, m in enumerate(value)]
    return None if ck.failed else messages  # type: ignore[return-value]


def _check_chat(record: dict, ck: _Line) -> Callable[[dict], Example] | None:
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
        messages=tuple(_fill(m, images) for m in messages),
        tools=tools,
        parallel_tool_calls=ptc,
    )


def _output(record: dict, key: str, ck: _Line) -> Message | None:
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


def _check_preference(record: dict, ck: _Line) -> Callable[[dict], Example] | None:
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
        prompt=tuple(_fill(m, images) for m in prompt),
        preferred=preferred,
        non_preferred=non_preferred,
        tools=tools,
        parallel_tool_calls=ptc,
    )


def _fill(message: Message, images: dict) -> Message:
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


# ---------------------------------------------------------------------------- images


@dataclass
class _Resolved:
    data: bytes
    info: ImageInfo


@dataclass
class _Draft:
    line: int
    build: Callable[[dict], Example]
    images: list[tuple[str, str]] = field(default_factory=list)


class _Validator:
    def __init__(self, method: str, options: ValidationOptions) -> None:
        if method not in ("supervised", "dpo"):
            raise ValueError(f"unknown method {method!r}; use 'supervised' or 'dpo'")
        self.method = method
        self.options = options
        self.moderator = options.moderator or default_moderator()
        self.control_tokens = tuple(
            DEFAULT_CONTROL_TOKENS if options.control_tokens is None else options.control_tokens
        )
        self.counter = options.token_counter or estimate_tokens
        self.tokens = TokenStats("model" if options.token_counter else "estimate")
        self.issues: list[Issue] = []
        self.examples = 0
        self.usable = 0
        self.skipped = 0
        self.with_images = 0
        self.images = 0
        self.seen: dict[bytes, int] = {}  # example digest -> first line (duplicates)
        self.verdicts: dict[str, ImageInfo | ImageRejected] = {}  # sha256 -> decode+moderation
        self.sunk: set[str] = set()

    # -- the loop

    def run(self, fp: BinaryIO) -> Iterator[Example]:
        pending: list[_Draft] = []
        with ThreadPoolExecutor(_FETCH_THREADS) as pool, make_client(self.options.fetch_timeout) as client:
            self.pool, self.client = pool, client
            for line, record, error in read_jsonl(fp):
                self.examples += 1
                if error is not None:
                    self._add(Issue(line, "", "invalid_json", "error", f"{error}"))
                else:
                    draft = self._check(line, record)
                    if draft is not None:
                        pending.append(draft)
                if self.examples % _CHUNK == 0:
                    yield from self._flush(pending)
                    pending = []
                    self._progress()
            yield from self._flush(pending)
            self._progress()

    def _progress(self) -> None:
        if self.options.progress is not None:
            self.options.progress(self.examples)

    def _add(self, issue: Issue) -> None:
        self.issues.append(issue)

    def _check(self, line: int, record: dict) -> _Draft | None:
        ck = _Line(line, self.control_tokens)
        try:
            build = (_check_chat if self.method == "supervised" else _check_preference)(record, ck)
        except RecursionError:
            ck.error("", "invalid_structure", "the example is nested too deeply; flatten it")
            build = None
        if build is not None and len(ck.images) > MAX_IMAGES_PER_EXAMPLE:
            ck.error(
                "messages" if self.method == "supervised" else "input.messages",
                "too_many_images",
                f"the example has {len(ck.images)} images; the limit is {MAX_IMAGES_PER_EXAMPLE}, "
                "so split it into several examples",
            )
        self.issues.extend(ck.issues)
        if build is None or ck.failed:
            return None
        if ck.images:
            self.with_images += 1
            self.images += len(ck.images)
            if self.with_images == MAX_IMAGE_EXAMPLES + 1:
                self._add(
                    Issue(
                        line,
                        "",
                        "too_many_image_examples",
                        "error",
                        f"the file has more than {MAX_IMAGE_EXAMPLES:,} examples with images (the limit); "
                        "split it into several files or jobs",
                    )
                )
            if self.with_images > MAX_IMAGE_EXAMPLES:
                return None
        self._check_duplicate(line, record)
        return _Draft(line, build, ck.images)

    def _check_duplicate(self, line: int, record: dict) -> None:
        try:
            canonical = json.dumps(record, sort_keys=True, ensure_ascii=False).encode()
        except (RecursionError, ValueError):
            return
        digest = hashlib.blake2b(canonical, digest_size=16).digest()
        first = self.seen.setdefault(digest, line)
        if first != line:
            self._add(
                Issue(
                    line,
                    "",
                    "duplicate_example",
                    "warning",
                    f"this example is identical to line {first}; remove one unless the repetition is intended",
                )
            )

    def _flush(self, pending: list[_Draft]) -> Iterator[Example]:
        urls = list(dict.fromkeys(url for d in pending for _, url in d.images))
        resolved = dict(zip(urls, self.pool.map(self._resolve, urls), strict=True))
        for draft in pending:
            failures = [
                (path, resolved[url])
                for path, url in draft.images
                if isinstance(resolved[url], ImageRejected)
            ]
            if failures:
                self.skipped += 1
                for path, rejected in failures:
                    self._add(Issue(draft.line, path, rejected.code, "skip", _skip_message(rejected)))
                continue
            example = draft.build(resolved)
            self._sink(example)
            self._count_tokens(draft.line, example)
            self.usable += 1
            yield example

    def _resolve(self, url: str) -> _Resolved | ImageRejected:
        """Bytes, decode and moderation of one image; runs on the pool, never raises ImageRejected."""
        try:
            data = fetch_image_bytes(
                url,
                allow_private_networks=self.options.allow_private_networks,
                timeout=self.options.fetch_timeout,
                client=self.client,
            )
            digest = hashlib.sha256(data).hexdigest()
            verdict = self.verdicts.get(digest)
            if verdict is None:
                verdict = self._judge(data)
                self.verdicts[digest] = verdict
            if isinstance(verdict, ImageRejected):
                return verdict
            return _Resolved(data, verdict)
        except ImageRejected as rejected:
            return rejected

    def _judge(self, data: bytes) -> ImageInfo | ImageRejected:
        try:
            info, image = decode_image(data)
        except ImageRejected as rejected:
            return rejected
        with image:
            result = self.moderator.moderate(image)
        for category in _MODERATION_ORDER:
            if category in result.flagged:
                score = result.scores.get(category, 1.0)
                return ImageRejected(
                    SKIP_CODE[category],
                    f"the image appears to contain {SKIP_PHRASE[category]} (score {score:.2f}); images with "
                    "people, faces, children or CAPTCHAs cannot be trained on, so remove it",
                )
        return info

    def _sink(self, example: Example) -> None:
        if self.options.image_sink is None:
            return
        for image in example.images:
            if image.sha256 not in self.sunk and image.data is not None:
                self.sunk.add(image.sha256)
                self.options.image_sink(image.sha256, image.data)

    def _count_tokens(self, line: int, example: Example) -> None:
        n = int(self.counter(example))
        self.tokens.add(n)
        limit = self.options.max_tokens
        if limit and n > limit:
            self._add(
                Issue(
                    line,
                    "",
                    "example_too_long",
                    "warning",
                    f"the example has {n:,} tokens, more than the model's {limit:,}; it will be truncated "
                    "from the end, so shorten it or split it",
                )
            )

    # -- the report

    def report(self) -> Report:
        minimum = self.options.min_examples
        file_level: list[Issue] = []
        if self.usable < minimum:
            file_level.append(
                Issue(
                    0,
                    "",
                    "too_few_examples",
                    "error",
                    f"the file has {self.usable} usable example(s) ({self.examples} in all, {self.skipped} "
                    f"skipped); at least {minimum} are needed, so add more examples",
                )
            )
        issues = sorted(self.issues + file_level, key=lambda i: (i.line <= 0, i.line))
        errors = sum(1 for i in issues if i.severity == "error")
        summary = {
            "examples": self.examples,
            "usable_examples": self.usable,
            "examples_with_images": self.with_images,
            "images": self.images,
            "skipped_examples": self.skipped,
            "errors": errors,
            "tokens": self.tokens.summary(self.options.max_tokens),
        }
        return Report(ok=errors == 0, method=self.method, summary=summary, issues=issues)


def _skip_message(rejected: ImageRejected) -> str:
    return f"{rejected.message}. The example is left out of training."


__all__ = [
    "DEFAULT_CONTROL_TOKENS",
    "Severity",
    "ValidationOptions",
    "ValidationResult",
    "iter_validate",
    "validate_file",
]
