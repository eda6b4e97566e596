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

from openft.errors import InvalidRequest

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_JSON_DEPTH = 64
"""Deepest nesting of objects/arrays accepted in a request field or a training record. Real
messages and tool JSON schemas stay far below it; hundreds of levels overflow Python's recursion
in chat templates and JSON encoders, so they are refused up front (400 / a rejected line)."""


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` and ``{}`` are 1), iteratively."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        depth = max(depth, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return depth


def check_depth(value: Any) -> Any:
    """A ``mode="before"`` field validator: refuse a value nested deeper than ``MAX_JSON_DEPTH``."""
    if (depth := json_depth(value)) > MAX_JSON_DEPTH:
        raise ValueError(
            f"nested {depth} levels deep, more than the limit of {MAX_JSON_DEPTH}; flatten it to at most "
            f"{MAX_JSON_DEPTH} levels of objects and arrays"
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

    def refuse_extra(self, where: str = "", hint: str = "") -> None:
        """Raise ``InvalidRequest`` naming the first field the spec does not define (endpoints
        that must never ignore a parameter call this; the model itself stays lenient)."""
        for key in sorted(self.model_extra or {}):
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {where}{key}{hint}",
                param=f"{where}{key}",
                code="unsupported_parameter",
            )


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
