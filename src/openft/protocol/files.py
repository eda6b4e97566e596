"""Files API: ``OpenAIFile`` and its list/delete envelopes."""

from __future__ import annotations

from typing import Literal

from openft.protocol.common import DeletedResponse, FirstLastListResponse, OmitUnset

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


class FileObject(OmitUnset):
    omit_if_none = ("expires_at", "status_details")

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


class FileList(FirstLastListResponse[FileObject]):
    pass


class FileDeleted(DeletedResponse):
    object: Literal["file"] = "file"
