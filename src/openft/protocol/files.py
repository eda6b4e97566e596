"""Files API: ``OpenAIFile`` and its list/delete envelopes."""

from __future__ import annotations

from typing import Literal

from typing import Any

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from openft.protocol.common import DeletedResponse, FirstLastListResponse

# Purposes a client may upload with (spec CreateFileRequest.purpose).
UploadPurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
# Purposes a file may have (adds the server-made ones, e.g. training result CSVs).
FilePurpose = Literal[
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "fine-tune",
    "fine-tune-results",
    "vision",
    "user_data",
    "evals",
]
UPLOAD_PURPOSES: tuple[str, ...] = UploadPurpose.__args__  # type: ignore[attr-defined]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    """Size of the file in bytes."""
    created_at: int
    """Unix seconds."""
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    status: Literal["uploaded", "processed", "error"] = "processed"
    """Deprecated by OpenAI but still required; uploads are checked synchronously, so always processed."""
    status_details: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_optionals(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The spec types these as integer / string (optional, not nullable): omit rather than null.
        data = handler(self)
        for key in ("expires_at", "status_details"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class FileList(FirstLastListResponse[FileObject]):
    pass


class FileDeleted(DeletedResponse):
    object: Literal["file"] = "file"
