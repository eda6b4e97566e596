"""Pieces shared by several resources: the list envelopes and the request base class."""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects/arrays accepted in any request field. Tool schemas and tool-call
arguments need a handful of levels; hundreds overflow Python's recursion in the chat template
and JSON encoders, so such a request is refused up front with a 400."""


def nested_too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> str | None:
    """Path (``.a[0].b``...) to the first point of ``value`` nested deeper than ``limit``
    objects/arrays, or None. Iterative, so it cannot itself overflow the stack."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict):
            children = ((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            children = ((v, f"{path}[{i}]") for i, v in enumerate(item))
        else:
            continue
        if depth == limit:
            return path
        stack.extend((v, depth + 1, p) for v, p in children if isinstance(v, dict | list | tuple))
    return None


def check_depth(value: Any) -> Any:
    """A ``mode="before"`` field validator: refuse a value nested deeper than ``MAX_JSON_DEPTH``."""
    path = nested_too_deep(value)
    if path is not None:
        shown = path if len(path) <= 120 else path[:60] + "..." + path[-40:]
        raise ValueError(
            f"nested more than {MAX_JSON_DEPTH} levels deep (at {shown!r}); flatten the structure "
            f"to at most {MAX_JSON_DEPTH} levels of objects and arrays"
        )
    return value


class Request(BaseModel):
    """Base for request bodies: unknown fields are accepted (newer SDKs send more) but logged."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown(self) -> Request:
        if self.model_extra:
            log.info("%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra))
        return self


class OmitUnset(BaseModel):
    """For spec fields that are optional but not nullable: leave them out instead of sending null."""

    omit_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self.omit_if_none:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ListResponse(BaseModel, Generic[T]):
    """``{"object": "list", "data": [...], "has_more": bool}``: the cursor-paginated envelope."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False


class FirstLastListResponse(ListResponse[T], Generic[T]):
    """List envelope that also names its first and last ids (files, checkpoints)."""

    first_id: str | None = None
    last_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_ends(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("data") and "first_id" not in values:
            data = values["data"]
            first, last = data[0], data[-1]
            values = dict(values)
            values["first_id"] = first["id"] if isinstance(first, dict) else first.id
            values["last_id"] = last["id"] if isinstance(last, dict) else last.id
        return values


class DeletedResponse(BaseModel):
    id: str
    object: str
    deleted: bool = True
