"""The worker process loop: claim a job, run it, repeat; stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from openft.settings import Settings
from openft.storage.home import open_home
from openft.worker.queue import claim
from openft.worker.runner import WorkerContext, run_job

log = logging.getLogger("openft.worker")


def make_context(settings: Settings) -> WorkerContext:
    home = open_home(settings)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    return WorkerContext(settings=settings, db=home.db, blobs=home.blobs, worker_id=worker_id)


def run_forever(settings: Settings, *, stop: threading.Event | None = None, once: bool = False) -> None:
    ctx = make_context(settings)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    log.info("worker %s polling %s", ctx.worker_id, settings.resolved_database_url)
    while not stop.is_set():
        job = claim(ctx.db, worker_id=ctx.worker_id, lease_seconds=settings.lease_seconds)
        if job is None:
            if once:
                return
            stop.wait(settings.worker_poll_seconds)
            continue
        log.info("worker %s took job %s", ctx.worker_id, job.id)
        try:
            run_job(ctx, job, shutdown=stop)
        except Exception:  # run_job records job failures itself; this is the last line of defence
            log.exception("worker error around job %s; the lease will expire and the job be retried", job.id)
        if once:
            return
