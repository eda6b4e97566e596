"""Files API: upload (streamed to the blob store), list, retrieve, content, delete."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Literal

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from openft.api.deps import CurrentProject, State
from openft.api.upload import receive_upload
from openft.errors import InvalidRequest
from openft.protocol.files import UPLOAD_PURPOSES, FileDeleted, FileList, FileObject
from openft.storage import repo

router = APIRouter(prefix="/v1/files", tags=["files"])


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
async def create_file(request: Request, state: State, project: CurrentProject) -> FileObject:
    """Stream the file into the blob store (limit enforced on the bytes received, JSONL lines
    checked as they arrive), then record it in a short transaction committed before we answer."""
    settings = state.settings
    upload = await receive_upload(
        request.stream(),
        request.headers.get("content-type", ""),
        blobs=state.blobs,
        max_bytes=settings.max_upload_bytes,
        max_line_bytes=settings.max_line_bytes,
    )
    purpose = upload.fields.get("purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(
            f"Invalid purpose {purpose!r}; expected one of: {', '.join(UPLOAD_PURPOSES)}.",
            param="purpose",
        )
    filename = upload.filename or "upload"
    if purpose == "fine-tune":
        if upload.scan is None:
            raise InvalidRequest(
                f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {filename!r}).",
                param="file",
            )
        if upload.scan.first_error is not None:
            line, what = upload.scan.first_error
            raise InvalidRequest(
                f"Invalid file format for Fine-Tuning API: line {line}: {what}",
                param="file",
                code="invalid_file_format",
            )
    created = repo.now()
    expires = _expires_at(
        upload.fields.get("expires_after[anchor]"), upload.fields.get("expires_after[seconds]"), created
    )

    def record() -> FileObject:
        assert upload.key is not None
        with state.db.session() as s:
            row = repo.create_file(
                s,
                project_id=project.id,
                filename=filename,
                purpose=purpose,
                size=upload.size,
                sha256=upload.key,
                expires_at=expires,
            )
            return repo.file_to_protocol(row)

    return await anyio.to_thread.run_sync(record)


@router.get("", response_model=FileList)
def list_files(
    project: CurrentProject,
    state: State,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    with state.db.session(readonly=True) as s:
        rows, has_more = repo.list_files(
            s, project_id=project.id, purpose=purpose, limit=limit, after=after, order=order
        )
        return FileList(data=[repo.file_to_protocol(r) for r in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, project: CurrentProject, state: State) -> FileObject:
    with state.db.session(readonly=True) as s:
        return repo.file_to_protocol(repo.get_file(s, project_id=project.id, file_id=file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, project: CurrentProject, state: State) -> StreamingResponse:
    with state.db.session(readonly=True) as s:
        row = repo.get_file(s, project_id=project.id, file_id=file_id)

    def chunks() -> Iterator[bytes]:
        with state.blobs.open(row.sha256) as f:
            while chunk := f.read(1024 * 1024):
                yield chunk

    media = "text/csv" if row.purpose == "fine-tune-results" else "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media, headers={"content-length": str(row.bytes)})


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, project: CurrentProject, state: State) -> FileDeleted:
    with state.db.session() as s:
        repo.delete_file(s, project_id=project.id, file_id=file_id)
    return FileDeleted(id=file_id)
