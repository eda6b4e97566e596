"""Typed dependencies: the app's state and the caller's project.

There is deliberately no per-request session dependency: a route opens its own short
transaction (``with state.db.session() as s``) inside the function, so the transaction commits
before the response is built, and a connection is held only while one thread uses it (a
``yield`` dependency's exit would wait for a free thread while holding its connection, and
under load those waits exhaust the pool)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from openft.errors import Unauthorized
from openft.settings import Settings
from openft.storage import repo
from openft.storage.blobs import BlobStore
from openft.storage.db import Database
from openft.storage.tables import Project

if TYPE_CHECKING:
    from openft.inference.registry import Registry


@dataclass
class AppState:
    settings: Settings
    db: Database
    blobs: BlobStore
    _registry: Registry | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the server shuts down: chats still generating are cancelled."""
    _generations: set[threading.Event] = field(default_factory=set)

    def track_generation(self, cancel: threading.Event) -> None:
        """Register a running chat's cancel flag (``untrack_generation`` when it ends)."""
        with self._lock:
            self._generations.add(cancel)
            if self.stopping.is_set():
                cancel.set()

    def untrack_generation(self, cancel: threading.Event) -> None:
        with self._lock:
            self._generations.discard(cancel)

    def stop_generations(self) -> None:
        """Shutting down: cancel every chat still generating (each stops at its next token)."""
        with self._lock:
            self.stopping.set()
            for cancel in self._generations:
                cancel.set()

    @property
    def registry(self) -> Registry:
        # Imported and built on the first chat request: the API starts without torch.
        with self._lock:
            if self._registry is None:
                from openft.inference.registry import Registry

                self._registry = Registry(
                    device=self.settings.device,
                    max_loaded=self.settings.max_loaded_models,
                    adapter_cache_bytes=self.settings.adapter_cache_bytes,
                    max_batch_rows=self.settings.max_batch_rows,
                    max_waiting_rows=self.settings.max_waiting_rows,
                    threads=self.settings.torch_threads,
                )
            return self._registry


def get_state(request: Request) -> AppState:
    return request.app.state.openft


def get_project(request: Request, state: Annotated[AppState, Depends(get_state)]) -> Project:
    """The caller's project, looked up in a short session of its own: routes that hold no
    session of their own (chat, while it generates) then hold no database connection."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "You didn't provide an API key. Send 'Authorization: Bearer <key>'; create one with "
            "'openft keys create --project NAME'.",
            code="missing_api_key",
        )
    with state.db.session(readonly=True) as s:
        project = repo.project_for_key(s, key=key.strip())
    if project is None:
        raise Unauthorized(f"Incorrect API key provided: {key[:10]}****.", code="invalid_api_key")
    return project


State = Annotated[AppState, Depends(get_state)]
CurrentProject = Annotated[Project, Depends(get_project)]
