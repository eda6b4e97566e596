"""``create_app(settings)``: the FastAPI application (API under /v1, dashboard at /)."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from openft import __version__
from openft.api import errors
from openft.api.deps import AppState
from openft.api.routes import chat, files, fine_tuning, models
from openft.settings import Settings
from openft.storage.blobs import LocalBlobStore
from openft.storage.db import Database
from openft.storage.migrations import migrate
from openft.web.router import router as web_router

log = logging.getLogger("openft.api")


def open_state(settings: Settings) -> AppState:
    """Create the home folder, bring the schema up to date and open the blob store."""
    settings.resolved_home.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    applied = migrate(db.engine)
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return AppState(settings=settings, db=db, blobs=LocalBlobStore(settings.blob_dir))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="openft", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.openft = open_state(settings)
    errors.install(app)
    for module in (files, fine_tuning, models, chat):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    app.include_router(web_router)
    return app
