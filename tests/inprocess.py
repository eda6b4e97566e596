"""A real uvicorn server running ``create_app`` in this process, on a loopback port.

For tests that must reach inside the server (hook the database engine, count threads) while
still talking real HTTP through the openai SDK.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI
from openai import OpenAI

from openft.api.app import create_app
from openft.settings import Settings
from openft.storage import repo
from tests.conftest import free_port


@dataclass
class InProcessServer:
    app: FastAPI
    url: str

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.app.state.openft

    def new_key(self, project: str) -> str:
        with self.state.db.session() as s:
            return repo.create_api_key(s, project_name=project)

    def client(self, project: str = "test", **kw: object) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key=self.new_key(project), max_retries=0, **kw)  # type: ignore[arg-type]


@contextmanager
def inprocess_server(settings: Settings) -> Iterator[InProcessServer]:
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # readiness by polling, not a fixed sleep
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield InProcessServer(app=app, url=url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.openft.db.dispose()
