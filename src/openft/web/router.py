"""Serves the dashboard page and its static assets."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).parent
router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(HERE / "templates" / "index.html", media_type="text/html")


def install(app: FastAPI) -> None:
    """The page, and ``/static/*`` served by Starlette (path checks, media types, caching headers)."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
