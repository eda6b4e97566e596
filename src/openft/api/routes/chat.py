"""Chat completions for base, fine-tuned and checkpoint models (JSON or server-sent events).

The route is ``async`` so that it can watch the connection: generation runs on a worker thread
(never on the event loop) while the loop waits for ``http.disconnect``; when the client goes
away, the engine's cancel flag stops generation at the next token and frees the model for the
next request. No database session is held while generating: the model id is resolved in a
short session of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from openft.api.deps import AppState, CurrentProject, State
from openft.datasets.images import load_image_url
from openft.errors import NotFound, Unavailable
from openft.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from openft.storage import repo

if TYPE_CHECKING:
    from openft.inference.registry import ModelRef

log = logging.getLogger("openft.api")
router = APIRouter(prefix="/v1/chat", tags=["chat"])
T = TypeVar("T")

_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


def _chat_slots(size: int) -> anyio.CapacityLimiter:
    """Threads chat requests may occupy at once (preparing, waiting for their batch's tokens).
    Their own limiter, so waiting chats never take the threads of the shared pool that the
    synchronous routes (files, jobs, models) need; sized to keep every batch slot fed twice over."""
    # One limiter per event loop (tests run several apps, each TestClient on its own loop).
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = anyio.CapacityLimiter(size)
    return _slots[loop]


def _model_ref(model: str, *, project_id: str, state: AppState) -> ModelRef:
    """Resolve ``model`` in a short session of its own (closed before any generation)."""
    from openft.inference.registry import ModelRef
    from openft.models.loader import resolve_base

    cache = state.settings.resolved_model_cache
    if model in state.settings.base_model_ids:
        return ModelRef(id=model, base=resolve_base(state.settings.source_of(model), cache), weights_dir=None)
    with state.db.session(readonly=True) as s:
        row = repo.get_model(s, project_id=project_id, model_id=model)
        if row is None:
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        weights_blob, base_model = row.weights, row.base_model
    weights = state.blobs.materialize_dir(weights_blob)
    return ModelRef(
        id=model, base=resolve_base(state.settings.source_of(base_model), cache), weights_dir=weights
    )


@router.post("/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, project: CurrentProject, state: State
) -> ChatCompletionResponse | Response:
    from openft.inference.chat import check_request_size, create_completion, stream_completion
    from openft.inference.engine import GenerationCancelled

    body.refuse_unsupported()  # before loading a model: a refused parameter costs nothing
    if body.user or body.safety_identifier or body.metadata:
        log.info(
            "chat completion for %s: user=%s safety_identifier=%s metadata=%s",
            body.model,
            body.user,
            body.safety_identifier,
            body.metadata,
        )
    settings = state.settings
    slots = 2 * settings.max_batch_rows
    cancel = threading.Event()
    image_loader = functools.partial(load_image_url, allow_private_networks=settings.allow_private_networks)

    def prepare():  # type: ignore[no-untyped-def]
        ref = _model_ref(body.model, project_id=project.id, state=state)
        loaded = state.registry.get(ref)
        check_request_size(
            loaded, body, max_completion_tokens_per_request=settings.max_completion_tokens_per_request
        )
        return loaded

    state.track_generation(cancel)
    watcher = asyncio.ensure_future(_watch_disconnect(request, cancel))
    streaming = False
    try:
        loaded = await _in_thread(prepare, cancel, slots)
        if not body.stream:
            return await _in_thread(
                lambda: create_completion(loaded, body, image_loader=image_loader, cancel=cancel),
                cancel,
                slots,
            )
        # Build the first chunk before answering, so request errors (bad image, too long) are a
        # normal 400 rather than an error event inside a 200 stream.
        chunks = await _in_thread(
            lambda: stream_completion(loaded, body, image_loader=image_loader, cancel=cancel), cancel, slots
        )
        first = await _in_thread(lambda: next(chunks, None), cancel, slots)
        streaming = True
        return StreamingResponse(
            _sse(state, first, chunks, cancel, watcher, slots), media_type="text/event-stream"
        )
    except GenerationCancelled:
        if state.stopping.is_set():
            raise Unavailable("The server is shutting down; retry in a moment.") from None
        return Response(status_code=499)  # nobody reads it: the connection is gone
    finally:
        if not streaming:  # the stream's own `finally` does this once it ends
            _finish(state, cancel, watcher)


def _finish(state: AppState, cancel: threading.Event, watcher: asyncio.Future[None]) -> None:
    watcher.cancel()
    cancel.set()  # generation, if still running, stops at its next token
    state.untrack_generation(cancel)


async def _sse(
    state: AppState,
    first: ChatCompletionChunk | None,
    chunks: Iterator[ChatCompletionChunk],
    cancel: threading.Event,
    watcher: asyncio.Future[None],
    slots: int,
) -> AsyncIterator[bytes]:
    """Encode the chunks as SSE, reading each on a thread. Ends, and stops generation, when the
    chunks run out, the client disconnects or the server shuts down (then an error event says so)."""
    from openft.inference.stream import DONE, error_event, sse_lines

    lines = sse_lines(_prepend(first, chunks))
    last = b""
    try:
        while (line := await _in_thread(lambda: next(lines, None), cancel, slots)) is not None:
            yield line
            last = line
        if state.stopping.is_set() and last != DONE:
            yield error_event("The server is shutting down; retry in a moment.", "server_error", None, None)
    finally:
        _finish(state, cancel, watcher)
        # No thread is inside `lines` now (`_in_thread` waits for its thread even when cancelled);
        # closing it runs the generators' cleanup. Cheap: generation is already stopped.
        with contextlib.suppress(ValueError):  # unless a second cancel left the thread running
            lines.close()


async def _in_thread(fn: Callable[[], T], cancel: threading.Event, slots: int) -> T:
    """Run ``fn`` on a thread. If this task is cancelled meanwhile (the server is shutting down
    and its grace period ran out), set ``cancel`` at once so generation stops at its next token,
    wait for the thread to return, then let the cancellation through."""
    call = asyncio.ensure_future(anyio.to_thread.run_sync(fn, limiter=_chat_slots(slots)))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await asyncio.shield(call)
        raise


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects (the body is already read, so the next ASGI
    message can only be ``http.disconnect``)."""
    while not cancel.is_set():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            if not cancel.is_set():
                log.info("chat client disconnected; cancelling its generation")
            cancel.set()
            return


def _prepend(
    first: ChatCompletionChunk | None, rest: Iterator[ChatCompletionChunk]
) -> Iterator[ChatCompletionChunk]:
    if first is not None:
        yield first
    yield from rest
