"""``create_app(settings)``: the FastAPI application (API under /v1, dashboard at /)."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from openft import __version__
from openft.api import errors
from openft.api.deps import AppState
from openft.api.limits import MULTIPART_SLACK, Admission, BodyLimit
from openft.api.routes import chat, extensions, files, fine_tuning, models
from openft.settings import Settings
from openft.storage.home import open_home
from openft.web.router import install as install_dashboard

log = logging.getLogger("openft.api")


def open_state(settings: Settings) -> AppState:
    """Create the home folder, bring the schema up to date and open the blob store."""
    # One connection per request thread (plus a few for the event loop's own work), so a
    # request never waits on the pool: the pool is never the bottleneck, threads are.
    home = open_home(settings, pool_size=settings.api_threads + 4)
    return AppState(settings=settings, db=home.db, blobs=home.blobs)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Blocking request work (sync routes, uploads, sessions) runs on these threads; the
        # database pool above has one connection per thread.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield

    app = FastAPI(title="openft", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.openft = open_state(settings)
    errors.install(app)
    app.add_middleware(BodyLimit, limit_for=functools.partial(_body_limit, settings))
    app.add_middleware(Admission, max_inflight=settings.max_inflight_requests)
    for module in (files, fine_tuning, models, chat, extensions):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:  # async: answers even when every request thread is busy
        return {"status": "ok", "version": __version__}

    install_dashboard(app)
    return app


def _body_limit(settings: Settings, path: str) -> tuple[int, str, str | None]:
    if path.rstrip("/") == "/v1/files":
        return settings.max_upload_bytes + MULTIPART_SLACK, "OPENFT_MAX_UPLOAD_BYTES", "file"
    return settings.max_request_bytes, "OPENFT_MAX_REQUEST_BYTES", None
