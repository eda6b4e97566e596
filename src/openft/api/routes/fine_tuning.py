"""Fine-tuning jobs: create (inserts a row; a worker trains), list, retrieve, cancel/pause/resume,
events, checkpoints."""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from openft.api.deps import CurrentProject, State
from openft.errors import InvalidRequest
from openft.protocol.checkpoints import CheckpointList
from openft.protocol.events import EventList
from openft.protocol.fine_tuning import CreateFineTuningJobRequest, FineTuningJob, JobList
from openft.storage import repo
from openft.storage.tables import Project

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")


def _check_file(s: Session, *, project_id: str, file_id: str, param: str) -> None:
    try:
        row = repo.get_file(s, project_id=project_id, file_id=file_id)
    except Exception:
        raise InvalidRequest(
            f"invalid {param}: {file_id} (no such file in this project)", param=param, code="invalid_file"
        ) from None
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"invalid {param}: {file_id} has purpose '{row.purpose}'; upload it with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )


def _job(row, project: Project) -> FineTuningJob:  # type: ignore[no-untyped-def]
    return repo.job_to_protocol(row, organization_id=project.id)


@router.post("", response_model=FineTuningJob)
def create_job(
    body: CreateFineTuningJobRequest, project: CurrentProject, state: State
) -> FineTuningJob:
    body.refuse_unsupported()
    method = body.resolved_method()
    with state.db.session() as s:
        init_model: str | None = None
        if body.model in state.settings.base_model_ids:
            base_model = body.model
        else:
            parent = repo.get_model(s, project_id=project.id, model_id=body.model)
            if parent is None:
                raise InvalidRequest(
                    f"Model '{body.model}' is not available for fine-tuning. Use one of "
                    f"{', '.join(state.settings.base_model_ids)} or one of your own ft: models.",
                    param="model",
                    code="model_not_available",
                )
            base_model, init_model = parent.base_model, parent.id
        _check_file(s, project_id=project.id, file_id=body.training_file, param="training_file")
        if body.validation_file:
            _check_file(s, project_id=project.id, file_id=body.validation_file, param="validation_file")
        row = repo.create_job(
            s,
            project_id=project.id,
            model=body.model,
            base_model=base_model,
            init_model=init_model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
            job_metadata=body.metadata,
            integrations=[i.model_dump() for i in body.integrations] if body.integrations else None,
            method_type=method.type,
            hyperparameters=method.hyperparameters.model_dump(),
            options=body.openft.model_dump(),
        )
        return _job(row, project)


@router.get("", response_model=JobList)
def list_jobs(
    request: Request,
    project: CurrentProject,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: str | None = None,
) -> JobList:
    metadata: dict[str, str] | None = None
    for key, value in request.query_params.multi_items():
        if key == "metadata" and value == "null":
            metadata = {}  # jobs without metadata
        elif m := _METADATA_KEY.match(key):
            metadata = (metadata or {}) | {m.group(1): value}
    with state.db.session(readonly=True) as s:
        rows, has_more = repo.list_jobs(s, project_id=project.id, limit=limit, after=after, metadata=metadata)
        return JobList(data=[_job(r, project) for r in rows], has_more=has_more)


@router.get("/{job_id}", response_model=FineTuningJob)
def retrieve_job(job_id: str, project: CurrentProject, state: State) -> FineTuningJob:
    with state.db.session(readonly=True) as s:
        return _job(repo.get_job(s, project_id=project.id, job_id=job_id), project)


@router.post("/{job_id}/cancel", response_model=FineTuningJob)
def cancel_job(job_id: str, project: CurrentProject, state: State) -> FineTuningJob:
    with state.db.session() as s:
        return _job(repo.cancel_job(s, project_id=project.id, job_id=job_id), project)


@router.post("/{job_id}/pause", response_model=FineTuningJob)
def pause_job(job_id: str, project: CurrentProject, state: State) -> FineTuningJob:
    with state.db.session() as s:
        return _job(repo.pause_job(s, project_id=project.id, job_id=job_id), project)


@router.post("/{job_id}/resume", response_model=FineTuningJob)
def resume_job(job_id: str, project: CurrentProject, state: State) -> FineTuningJob:
    with state.db.session() as s:
        return _job(repo.resume_job(s, project_id=project.id, job_id=job_id), project)


@router.get("/{job_id}/events", response_model=EventList)
def list_events(
    job_id: str,
    project: CurrentProject,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: str | None = None,
) -> EventList:
    with state.db.session(readonly=True) as s:
        repo.get_job(s, project_id=project.id, job_id=job_id)
        rows, has_more = repo.list_events(s, job_id=job_id, limit=limit, after=after)
        return EventList(data=[repo.event_to_protocol(r) for r in rows], has_more=has_more)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job_id: str,
    project: CurrentProject,
    state: State,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    after: str | None = None,
) -> CheckpointList:
    with state.db.session(readonly=True) as s:
        repo.get_job(s, project_id=project.id, job_id=job_id)
        rows, has_more = repo.list_checkpoints(s, job_id=job_id, limit=limit, after=after)
        return CheckpointList(data=[repo.checkpoint_to_protocol(r) for r in rows], has_more=has_more)
