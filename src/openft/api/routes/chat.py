"""Chat completions for base, fine-tuned and checkpoint models (JSON or server-sent events)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from openft.api.deps import CurrentProject, State
from openft.datasets.images import load_image_url
from openft.errors import NotFound
from openft.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from openft.storage import repo

if TYPE_CHECKING:
    from openft.inference.registry import ModelRef

router = APIRouter(prefix="/v1/chat", tags=["chat"])


def _model_ref(model: str, *, project_id: str, state: State) -> ModelRef:
    from openft.inference.registry import ModelRef
    from openft.models.loader import resolve_base

    cache = state.settings.resolved_model_cache
    if model in state.settings.base_model_ids:
        return ModelRef(id=model, base=resolve_base(model, cache), weights_dir=None)
    with state.db.session(readonly=True) as s:  # short: no connection held while generating
        row = repo.get_model(s, project_id=project_id, model_id=model)
    if row is None:
        raise NotFound(
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    weights = state.blobs.materialize_dir(row.weights)
    return ModelRef(id=model, base=resolve_base(row.base_model, cache), weights_dir=weights)


@router.post("/completions", response_model=None)
def create_chat_completion(
    body: ChatCompletionRequest, project: CurrentProject, state: State
) -> ChatCompletionResponse | StreamingResponse:
    from openft.inference.chat import create_completion, stream_completion
    from openft.inference.stream import sse_lines

    ref = _model_ref(body.model, project_id=project.id, state=state)
    loaded = state.registry.get(ref)
    image_loader = functools.partial(
        load_image_url, allow_private_networks=state.settings.allow_private_networks
    )
    if body.stream:
        # Build the first chunk eagerly so request errors (bad image, too long) answer as
        # a normal 400 before any bytes of the event stream are sent.
        chunks = stream_completion(loaded, body, image_loader=image_loader)
        first = next(chunks)

        def events():  # type: ignore[no-untyped-def]
            yield from sse_lines(_prepend(first, chunks))

        return StreamingResponse(events(), media_type="text/event-stream")
    return create_completion(loaded, body, image_loader=image_loader)


def _prepend(first, rest):  # type: ignore[no-untyped-def]
    yield first
    yield from rest
