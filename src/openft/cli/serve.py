"""``openft serve`` (API + embedded workers) and ``openft worker`` (a standalone worker).

Stopping: the first Ctrl-C (or SIGTERM) says at once what happens next (workers save the state
of the jobs they run at the next step boundary, chats in flight get a few seconds) and stops
gracefully; a second one says what is lost and stops at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from openft.cli.common import HomeOption, settings_for, setup_logging

if TYPE_CHECKING:
    from openft.settings import Settings

API_GRACE_SECONDS = 5
"""Requests in flight get this long after a stop signal; then chats still generating are
cancelled (503 / an error event; generation stops at the next token), so the server ends within
seconds even with an ``n=128`` request running."""
NprocOption = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        min=1,
        help="Processes per training job (torch.distributed, data parallel): one per GPU, "
        "gloo on CPU. Default $OPENFT_NPROC or 1.",
    ),
]
WORKER_STOP_SECONDS = 60
"""How long a worker may take to finish its step and save the job's state before it is killed."""


def serve(
    home: HomeOption = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Embedded worker processes.")] = 1,
    no_worker: Annotated[
        bool, typer.Option("--no-worker", help="API only; run 'openft worker' elsewhere.")
    ] = False,
    nproc: NprocOption = None,
) -> None:
    """Start the API (and dashboard) with N embedded workers on the same home."""
    import uvicorn

    from openft.api.app import create_app
    from openft.threads import available_cores, threads_per_process

    setup_logging()
    settings = settings_for(home, host=host, port=port, nproc=_check_nproc(nproc))
    n_workers = 0 if no_worker else workers
    cores = available_cores()
    threads = settings.torch_threads or threads_per_process(cores, n_workers + 1)
    settings = settings.model_copy(update={"torch_threads": threads})
    app = create_app(settings)  # migrates the database before any worker starts
    children: list[subprocess.Popen[bytes]] = []
    env = dict(
        os.environ,
        OPENFT_HOME=str(settings.resolved_home),
        OPENFT_TORCH_THREADS=str(threads),
        OPENFT_NPROC=str(settings.nproc),
    )
    for _ in range(n_workers):
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "openft.cli.main", "worker"], env=env, preexec_fn=_die_with_parent
            )
        )
    typer.echo(
        f"openft API on http://{settings.host}:{settings.port}/v1  (home {settings.resolved_home}; "
        f"{n_workers} worker(s), {threads} torch thread(s) per process on {cores} core(s))",
        err=True,
    )
    stopper = _Stopper(settings, children, on_stop=app.state.openft.stop_generations)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # A backstop only: chats are cancelled after API_GRACE_SECONDS and end by themselves.
        timeout_graceful_shutdown=API_GRACE_SECONDS + 10,
    )
    stopper.server = server = _server(config)
    # Ours for the whole stop, workers' state saving included, so a second Ctrl-C is answered too.
    previous = {sig: signal.signal(sig, stopper) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        stopper.stop_workers()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopper.signals:
        # Everything is saved and the workers are gone. Interpreter teardown with torch loaded
        # (thread pools, idle request threads that wait out their idle timeout) took ~10 s on a
        # busy machine; a stop signal asked us to end, so end now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0 if stopper.signals == 1 else 128 + stopper.last_signal)


def _server(config: Any) -> Any:
    """uvicorn's server, leaving signals to ``serve``: uvicorn's own handling would stay silent,
    then re-raise the signal after its shutdown and kill this process before its workers saved."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


class _Stopper:
    """Signal handler: the first signal stops gracefully, the second at once; both say so."""

    def __init__(
        self, settings: Settings, children: list[subprocess.Popen[bytes]], *, on_stop: Callable[[], None]
    ) -> None:
        self.settings, self.children, self.on_stop = settings, children, on_stop
        self.server: Any = None  # the uvicorn server, set once made
        self.signals = 0
        self.last_signal = 0
        self.jobs: dict[int, list[str]] = {}
        """Worker pid -> the jobs it was running when the first signal came."""

    def __call__(self, sig: int, _frame: Any) -> None:
        self.signals += 1
        self.last_signal = sig
        name = signal.Signals(sig).name
        if self.signals == 1:
            self.jobs = self._running_jobs()
            held = [job for jobs in self.jobs.values() for job in jobs]
            for child in self.children:  # Ctrl-C reached them already; SIGTERM from elsewhere did not
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            self.server.should_exit = True
            timer = threading.Timer(API_GRACE_SECONDS, self.on_stop)
            timer.daemon = True
            timer.start()
            if held:
                what = (
                    f"saving the state of job {', '.join(held)} at its next step boundary; "
                    f"this may take up to {WORKER_STOP_SECONDS} s"
                )
            else:
                what = "no job is training"
            _say(
                f"openft: {name}: stopping: {what}; requests in flight get {API_GRACE_SECONDS} s. "
                "Press Ctrl-C again to stop at once."
            )
            return
        # Only workers still saving lose anything; one that finished has its state on disk.
        busy = [job for c in self.children if c.poll() is None for job in self.jobs.get(c.pid, [])]
        lost = (
            "; ".join(self._loss(job) for job in busy) or "every worker has saved its state, nothing is lost"
        )
        _say(f"openft: {name} again: stopping at once: {lost}.")
        for child in self.children:
            if child.poll() is None:
                child.kill()
        self.on_stop()
        self.server.force_exit = True
        self.server.should_exit = True

    def stop_workers(self) -> None:
        """Ask every worker to stop (if no signal did), then wait for them to save state."""
        for child in self.children:
            if child.poll() is None and self.signals == 0:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_SECONDS
        for child in self.children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"openft: worker {child.pid} did not stop within {WORKER_STOP_SECONDS} s; killing it")
                child.kill()
                child.wait()
        held = [job for jobs in self.jobs.values() for job in jobs]
        if held and self.signals == 1:
            _say(f"openft: stopped; job {', '.join(held)} continues from its saved state on the next start.")

    def _running_jobs(self) -> dict[int, list[str]]:
        from openft.storage import repo
        from openft.storage.db import Database

        alive = [c.pid for c in self.children if c.poll() is None]
        if not alive:
            return {}
        db = Database(self.settings.resolved_database_url)
        try:
            # Read-only: a worker stopped mid-write (SIGSTOP, a debugger, a slow disk) holds
            # SQLite's write lock, and a writer session here would wait it out and report nothing.
            with db.session(readonly=True) as s:
                host = socket.gethostname()
                return {pid: repo.jobs_held_by(s, worker_prefixes=[f"{host}:{pid}:"]) for pid in alive}
        except Exception:  # the message is a courtesy: never let it block stopping
            return {}
        finally:
            db.dispose()

    def _loss(self, job_id: str) -> str:
        step = _saved_step(self.settings.work_dir / job_id)
        since = f"since its last saved state at step {step}" if step is not None else "since it started"
        return f"job {job_id} loses its training {since} and redoes it on the next start"


def _saved_step(job_dir: Path) -> int | None:
    """Step of the newest training state the worker saved for a job (``state*/state.json``)."""
    steps = []
    for meta in job_dir.glob("state*/state.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            steps.append(int(json.loads(meta.read_text())["step"]))
    return max(steps, default=None)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `serve` dies (even by SIGKILL): it saves state and requeues."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: workers outlive the API and keep training, which is also safe
        pass


def worker(home: HomeOption = None, nproc: NprocOption = None) -> None:
    """Run one worker process that trains queued jobs from the same home or database."""
    from openft.models.loader import set_torch_threads
    from openft.threads import available_cores, threads_per_process
    from openft.worker.main import run_forever

    setup_logging()
    settings = settings_for(home, nproc=_check_nproc(nproc))
    set_torch_threads(settings.torch_threads or threads_per_process(available_cores(), 1), purpose="training")
    run_forever(settings)


def _check_nproc(nproc: int | None) -> int | None:
    """``--nproc`` must fit the machine: on a GPU box, one process per GPU."""
    if nproc is None or nproc == 1:
        return nproc
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise typer.BadParameter(
            f"{nproc} processes but {torch.cuda.device_count()} GPU(s): use --nproc {torch.cuda.device_count()} "
            "or fewer (one process per GPU)",
            param_hint="--nproc",
        )
    return nproc
