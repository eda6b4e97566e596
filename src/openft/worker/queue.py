"""Claiming jobs and holding them: leases renewed by a heartbeat thread.

A job belongs to the worker that claimed it until its lease runs out. The heartbeat renews
the lease every second and reads the job's status, so a cancel made through the API is seen
(or a pause)
within about a second, and a worker that dies (SIGKILL, power loss) leaves a lease that simply
expires: another worker then claims the job again. Nothing stays ``running`` for ever.
"""

from __future__ import annotations

import logging
import threading

from openft.storage import repo
from openft.storage.db import Database
from openft.storage.tables import Job

log = logging.getLogger("openft.worker")


def claim(db: Database, *, worker_id: str, lease_seconds: float) -> Job | None:
    with db.session() as s:
        return repo.claim_next_job(s, worker_id=worker_id, lease_seconds=lease_seconds)


class JobLease:
    """Keeps a claimed job's lease alive in the background and notices cancellation."""

    def __init__(
        self,
        db: Database,
        *,
        job_id: str,
        worker_id: str,
        lease_seconds: float,
        shutdown: threading.Event | None = None,
        every: float = 1.0,
    ) -> None:
        self._db, self.job_id, self.worker_id = db, job_id, worker_id
        self.shutdown = shutdown or threading.Event()
        """Set when the worker process is asked to stop: save state, requeue the job."""
        self._lease, self._every = lease_seconds, every
        self._stop = threading.Event()
        self.cancelled = threading.Event()
        self.paused = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> JobLease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.paused.is_set() or self.lost.is_set() or self.shutdown.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with self._db.session() as s:
                    status = repo.heartbeat(
                        s, job_id=self.job_id, worker_id=self.worker_id, lease_seconds=self._lease
                    )
            except Exception:  # a busy database must not kill training; the lease has slack
                log.warning("heartbeat for %s failed; will retry", self.job_id, exc_info=True)
                continue
            if status is None:
                log.warning("lost the lease on %s; stopping", self.job_id)
                self.lost.set()
            elif status == "cancelled":
                self.cancelled.set()
            elif status == "paused":
                self.paused.set()
