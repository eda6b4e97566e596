"""Shared fixtures: a real ``openft serve`` subprocess on a free loopback port, and SDK clients."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "openft.cli.main", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )

    def new_key(self, project: str) -> str:
        """A key made in-process on the server's database (the CLI path has its own test)."""
        from openft.settings import Settings
        from openft.storage import repo
        from openft.storage.db import Database

        settings = Settings(home=self.home, database_url=self.env.get("OPENFT_DATABASE_URL"))
        db = Database(settings.resolved_database_url)
        try:
            with db.session() as s:
                return repo.create_api_key(s, project_name=project)
        finally:
            db.dispose()

    def client(self, project: str = "test", **kw: object) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=self.new_key(project), max_retries=0, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(
    home: Path, *extra: str, env: dict[str, str] | None = None, new_session: bool = False
) -> Server:
    """`openft serve` on a free port; ``new_session`` puts it (and its workers) in its own process group."""
    port = free_port()
    full_env = dict(os.environ, OPENFT_HOME=str(home), OPENFT_MODEL_CACHE=str(model_cache()), **(env or {}))
    log = home.parent / f"server-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "openft.cli.main", "serve", "--port", str(port), *extra],
        env=full_env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # wait for readiness by polling, not by a fixed sleep
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return Server(url=url, home=home, proc=proc, env=full_env, log=log)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


@contextmanager
def catalog_server(
    tmp_path_factory: pytest.TempPathFactory,
    models: Mapping[str, Path],
    *,
    learning_rate: float = 2e-3,
    options: Mapping[str, dict[str, object]] | None = None,
) -> Iterator[Server]:
    """``openft serve`` with one worker whose catalog (``OPENFT_BASE_MODELS``) names ``models``
    (name -> model folder), each with ``options[name]`` added. Random-init bases learn only in
    full fine-tuning at a random-init rate: the catalog says so for each."""
    catalog = {
        name: {"source": str(folder), "training_type": "full", "learning_rate": learning_rate}
        | dict((options or {}).get(name, {}))
        for name, folder in models.items()
    }
    server = start_server(
        tmp_path_factory.mktemp("catalog") / "home",
        "--workers",
        "1",
        env={"OPENFT_BASE_MODELS": json.dumps(catalog)},
    )
    try:
        yield server
    finally:
        server.stop()


def model_cache() -> Path:
    """One generated openft-tiny-vlm shared by every test process (it is deterministic)."""
    path = Path(os.environ.get("OPENFT_TEST_MODEL_CACHE", REPO / ".openft" / "test-models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL cluster; one per test session."""
    from tests.postgres import pg_bin, postgres_cluster

    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    with postgres_cluster(free_port()) as url:
        yield url


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """AWS_* variables pointing at a throwaway S3-compatible server (moto); one per test session."""
    from tests.s3 import s3_server

    with s3_server(free_port()) as env:
        yield env


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API only (no worker): jobs stay where the API put them."""
    server = start_server(
        tmp_path_factory.mktemp("api") / "home",
        "--no-worker",
        env={"OPENFT_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024)},
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def full_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """API plus one embedded worker: jobs really train."""
    server = start_server(tmp_path_factory.mktemp("full") / "home", "--workers", "1")
    yield server
    server.stop()
