"""Models API: base models and the project's fine-tuned / checkpoint models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from openft.protocol.common import DeletedResponse


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ModelDeleted(DeletedResponse):
    object: Literal["model"] = "model"
