"""``openft serve`` (API + embedded workers) and ``openft worker`` (a standalone worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

from openft.cli.common import HomeOption, settings_for, setup_logging


def serve(
    home: HomeOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Embedded worker processes.")] = 1,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only; run 'openft worker' elsewhere.")
    ] = False,
) -> None:
    """Start the API (and dashboard) with N embedded workers on the same home."""
    import uvicorn

    from openft.api.app import create_app

    setup_logging()
    settings = settings_for(home, host=host, port=port)
    app = create_app(settings)  # migrates the database before any worker starts
    children: list[subprocess.Popen[bytes]] = []
    if not no_worker:
        env = dict(os.environ, OPENFT_HOME=str(settings.resolved_home))
        for _ in range(workers):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "openft.cli.main", "worker"], env=env, preexec_fn=_die_with_parent
                )
            )
    typer.echo(
        f"openft API on http://{settings.host}:{settings.port}/v1  (home {settings.resolved_home})", err=True
    )
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `serve` dies (even by SIGKILL): it saves state and requeues."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: workers outlive the API and keep training, which is also safe
        pass


def worker(home: HomeOption = None) -> None:
    """Run one worker process that trains queued jobs from the same home or database."""
    from openft.worker.main import run_forever

    setup_logging()
    run_forever(settings_for(home))
