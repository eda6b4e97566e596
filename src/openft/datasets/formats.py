"""Internal, validated training examples: what validation produces and training consumes.

These are not wire types. They are the normalized form of one JSONL line after every rule
has been checked: ``content`` is always a list of parts, images carry their decoded bytes
(so training never re-downloads), and each example remembers its 1-based line number so
later stages can still point the user at the right line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]
Detail = Literal["low", "high", "auto"]
Method = Literal["supervised", "dpo"]

ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
DETAILS: tuple[str, ...] = ("low", "high", "auto")


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class ImagePart:
    """An image in a user (or system) message.

    ``data`` holds the image file's bytes (JPEG/PNG/WEBP) once validation has decoded the
    data URL or fetched the HTTP URL; ``sha256`` is their digest (the blob key).
    """

    url: str
    detail: Detail = "auto"
    data: bytes | None = field(default=None, repr=False)
    sha256: str | None = None
    type: Literal["image"] = "image"


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: Role
    content: tuple[Part, ...]
    # 1 = train on this assistant message, 0 = context only. Non-assistant messages: None.
    weight: int | None = None
    name: str | None = None
    tool_calls: tuple[dict[str, Any], ...] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(p for p in self.content if isinstance(p, ImagePart))


@dataclass(frozen=True)
class ChatExample:
    """One supervised example: a conversation whose weighted assistant turns are trained on."""

    line: int
    messages: tuple[Message, ...]
    tools: tuple[dict[str, Any], ...] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(img for m in self.messages for img in m.images)


@dataclass(frozen=True)
class PreferenceExample:
    """One DPO pair: a prompt conversation and a preferred / non-preferred assistant reply."""

    line: int
    prompt: tuple[Message, ...]
    preferred: Message
    non_preferred: Message
    tools: tuple[dict[str, Any], ...] | None = None
    parallel_tool_calls: bool | None = None

    @property
    def images(self) -> tuple[ImagePart, ...]:
        return tuple(img for m in self.prompt for img in m.images)


Example = ChatExample | PreferenceExample
