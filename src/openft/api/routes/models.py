"""Models API: the base models this server offers plus the project's fine-tuned and checkpoint models."""

from __future__ import annotations

from fastapi import APIRouter

from openft.api.deps import CurrentProject, State
from openft.errors import InvalidRequest, NotFound
from openft.protocol.models import Model, ModelDeleted, ModelList
from openft.storage import repo

router = APIRouter(prefix="/v1/models", tags=["models"])

OWNER_BASE = "openft"


def _base_models(state: State) -> list[Model]:
    created = (
        int(state.settings.resolved_home.stat().st_ctime) if state.settings.resolved_home.exists() else 0
    )
    return [Model(id=m, created=created, owned_by=OWNER_BASE) for m in state.settings.base_model_ids]


@router.get("", response_model=ModelList)
def list_models(project: CurrentProject, state: State) -> ModelList:
    with state.db.session(readonly=True) as s:
        tuned = [
            Model(id=r.id, created=r.created_at, owned_by=project.id)
            for r in repo.list_models(s, project_id=project.id)
        ]
    return ModelList(data=_base_models(state) + tuned)


@router.get("/{model_id:path}", response_model=Model)
def retrieve_model(model_id: str, project: CurrentProject, state: State) -> Model:
    for base in _base_models(state):
        if base.id == model_id:
            return base
    with state.db.session(readonly=True) as s:
        row = repo.get_model(s, project_id=project.id, model_id=model_id)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return Model(id=row.id, created=row.created_at, owned_by=project.id)


@router.delete("/{model_id:path}", response_model=ModelDeleted)
def delete_model(model_id: str, project: CurrentProject, state: State) -> ModelDeleted:
    if model_id in state.settings.base_model_ids:
        raise InvalidRequest(
            f"'{model_id}' is a base model; only fine-tuned models can be deleted.", param="model"
        )
    with state.db.session() as s:
        row = repo.get_model(s, project_id=project.id, model_id=model_id)
        if row is None:
            raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        row.deleted = True
        repo.delete_unreferenced(s, state.blobs, weights=[row.weights])
    if state._registry is not None:
        state.registry.evict(model_id)
    return ModelDeleted(id=model_id)
