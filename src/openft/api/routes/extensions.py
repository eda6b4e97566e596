"""openft extensions under /v1, documented in the README's API section; project-scoped like every
/v1 route. ``GET /v1/fine_tuning/jobs/{id}/metrics``: every recorded step, live.
``GET /v1/files/{id}/validation``: the report a job's worker computes before training."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from openft.api.deps import CurrentProject, State
from openft.datasets.moderation import load_moderator
from openft.datasets.thumbnails import thumbnails_for
from openft.datasets.validate import ValidationOptions, validate_file
from openft.errors import InvalidRequest
from openft.protocol.extensions import FileValidation, StepMetrics, StepMetricsList, ValidationIssue
from openft.storage import repo

router = APIRouter(prefix="/v1", tags=["openft extensions"])

# Reports of recently validated (content, method) pairs: a file's bytes never change, so a report
# never goes stale, and the dashboard asks again on every view.
_REPORTS: OrderedDict[tuple[str, str], tuple[bool, dict, list[ValidationIssue]]] = OrderedDict()
_REPORTS_LOCK = threading.Lock()
_REPORTS_KEPT = 16
_MAX_THUMBNAILS = 200


@router.get("/fine_tuning/jobs/{job_id}/metrics", response_model=StepMetricsList)
def list_metrics(
    job_id: str,
    project: CurrentProject,
    state: State,
    after_step: Annotated[int, Query(ge=0)] = 0,
) -> StepMetricsList:
    """Every recorded step after ``after_step``, oldest first: the rows the results CSV will hold,
    available while the job runs (metrics events are thinned past 500 steps)."""
    with state.db.session(readonly=True) as s:
        repo.get_job(s, project_id=project.id, job_id=job_id)
        rows = repo.step_metrics(s, job_id=job_id, after_step=after_step)
    return StepMetricsList(data=[StepMetrics.model_validate(r) for r in rows])


@router.get("/files/{file_id}/validation", response_model=FileValidation)
def file_validation(
    file_id: str,
    project: CurrentProject,
    state: State,
    method: Literal["supervised", "dpo"] = "supervised",
) -> FileValidation:
    """Validate a fine-tune file as the worker will (structure, images, moderation) and return
    every issue, with thumbnails of the inline images it skips."""
    with state.db.session(readonly=True) as s:
        row = repo.get_file(s, project_id=project.id, file_id=file_id)
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"{file_id} has purpose '{row.purpose}'; only 'fine-tune' files have a validation report.",
            param="file_id",
            code="invalid_file_purpose",
        )
    key = (row.sha256, method)
    with _REPORTS_LOCK:
        cached = _REPORTS.get(key)
    if cached is None:
        cached = _validate(state, row.sha256, method)
        with _REPORTS_LOCK:
            _REPORTS[key] = cached
            while len(_REPORTS) > _REPORTS_KEPT:
                _REPORTS.popitem(last=False)
    ok, summary, issues = cached
    return FileValidation(file_id=file_id, method=method, ok=ok, summary=summary, issues=issues)


def _validate(state: State, sha256: str, method: str) -> tuple[bool, dict, list[ValidationIssue]]:
    settings = state.settings
    options = ValidationOptions(
        allow_private_networks=settings.allow_private_networks,
        moderator=load_moderator(settings.moderator) if settings.moderator else None,
    )
    with state.blobs.open(sha256) as fp:
        report = validate_file(io.BufferedReader(fp), method=method, options=options).report  # type: ignore[arg-type]
    images = [(i.line, i.field) for i in report.issues if i.field.endswith("image_url.url")]
    with state.blobs.open(sha256) as fp:
        thumbs = thumbnails_for(io.BufferedReader(fp), images[:_MAX_THUMBNAILS])  # type: ignore[arg-type]
    issues = [
        ValidationIssue(
            line=i.line,
            field=i.field,
            code=i.code,
            severity=i.severity,  # type: ignore[arg-type]
            message=i.message,
            thumbnail=thumbs.get((i.line, i.field)),
        )
        for i in report.issues
    ]
    return report.ok, report.summary.to_dict(), issues
