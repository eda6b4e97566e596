"""Files API: upload (streamed to the blob store), list, retrieve, content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from openft.api.deps import DB, CurrentProject, State
from openft.datasets.lines import scan_jsonl
from openft.errors import InvalidRequest, PayloadTooLarge
from openft.protocol.files import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject
from openft.storage import repo

router = APIRouter(prefix="/v1/files", tags=["files"])

# Multipart framing around the file part: a request may exceed the file limit by this much.
_ENVELOPE_SLACK = 64 * 1024


def _expires_at(form_anchor: str | None, form_seconds: str | None, created: int) -> int | None:
    if form_anchor is None and form_seconds is None:
        return None
    if form_anchor != "created_at":
        raise InvalidRequest("expires_after[anchor] must be 'created_at'.", param="expires_after.anchor")
    try:
        seconds = int(form_seconds or "")
    except ValueError:
        raise InvalidRequest(
            "expires_after[seconds] must be an integer.", param="expires_after.seconds"
        ) from None
    if not 3600 <= seconds <= 2592000:
        raise InvalidRequest(
            "expires_after[seconds] must be between 3600 (1 hour) and 2592000 (30 days).",
            param="expires_after.seconds",
        )
    return created + seconds


@router.post("", response_model=FileObject)
async def create_file(request: Request, state: State, project: CurrentProject, s: DB) -> FileObject:
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _ENVELOPE_SLACK:
        raise PayloadTooLarge(
            f"Request of {declared} bytes exceeds the {limit}-byte upload limit.", param="file"
        )
    # Starlette spools the file part to disk past 1 MB, so a large upload never sits in memory.
    form = await request.form(max_files=1, max_fields=16)
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing the 'file' part of the multipart upload.", param="file")
        if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(
                f"Invalid purpose {purpose!r}; expected one of: {', '.join(UPLOAD_PURPOSES)}.",
                param="purpose",
            )
        filename = upload.filename or "upload"
        if purpose == "fine-tune":
            if not filename.lower().endswith(".jsonl"):
                raise InvalidRequest(
                    f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {filename!r}).",
                    param="file",
                )
            scan = scan_jsonl(upload.file)
            if scan.first_error is not None:
                line, what = scan.first_error
                raise InvalidRequest(
                    f"Invalid file format for Fine-Tuning API: line {line}: {what}",
                    param="file",
                    code="invalid_file_format",
                )
            upload.file.seek(0)
        key, size = state.blobs.put_stream(upload.file, max_bytes=limit)
        created = repo.now()
        expires = _expires_at(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"), created)  # type: ignore[arg-type]
        row = repo.create_file(
            s,
            project_id=project.id,
            filename=filename,
            purpose=purpose,
            size=size,
            sha256=key,
            expires_at=expires,
        )
        return repo.file_to_protocol(row)
    finally:
        await form.close()


@router.get("", response_model=FileList)
def list_files(
    project: CurrentProject,
    s: DB,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    rows, has_more = repo.list_files(
        s, project_id=project.id, purpose=purpose, limit=limit, after=after, order=order
    )
    return FileList(data=[repo.file_to_protocol(r) for r in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, project: CurrentProject, s: DB) -> FileObject:
    return repo.file_to_protocol(repo.get_file(s, project_id=project.id, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, project: CurrentProject, s: DB, state: State) -> StreamingResponse:
    row = repo.get_file(s, project_id=project.id, file_id=file_id)

    def chunks() -> Iterator[bytes]:
        with state.blobs.open(row.sha256) as f:
            while chunk := f.read(1024 * 1024):
                yield chunk

    media = "text/csv" if row.purpose == "fine-tune-results" else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media, headers={"content-length": str(row.bytes)})


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, project: CurrentProject, s: DB) -> FileDeleted:
    repo.delete_file(s, project_id=project.id, file_id=file_id)
    return FileDeleted(id=file_id)
