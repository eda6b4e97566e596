"""Issue 12, items 6, 11 and 12: stopping ``openft serve`` while a job trains.

SIGTERM: the server says at once which job's state is being saved, the worker saves it at a step
boundary, the process exits, and after a restart the job continues from that step (no step
lost or repeated). A second Ctrl-C says what it loses and stops at once. Each process runs
torch with its share of the cores.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sqlite3

import pytest

from openft.threads import available_cores, threads_per_process
from tests.conftest import Server, start_server
from tests.integration.test_job_control import finish_after_restart, wait_until
from tests.tasks import colour_examples, to_jsonl

pytestmark = pytest.mark.slow


def start_training(server: Server, project: str, seed: int):  # type: ignore[no-untyped-def]
    c = server.client(project)
    f = c.files.create(
        file=("t.jsonl", io.BytesIO(to_jsonl(colour_examples(60, seed=seed)))), purpose="fine-tune"
    )
    job = c.fine_tuning.jobs.create(
        training_file=f.id, model="openft-tiny-vlm", hyperparameters={"n_epochs": 5, "batch_size": 1}
    )
    # Training for real: some steps are recorded.
    wait_until(lambda: any(e.type == "metrics" for e in c.fine_tuning.jobs.list_events(job.id, limit=5).data))
    return c, job


def test_sigterm_saves_the_running_job_and_it_resumes_after_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    server = start_server(home, "--workers", "1")
    c, job = start_training(server, "sigterm-job", seed=21)
    server.proc.send_signal(signal.SIGTERM)
    said = wait_until(lambda: re.search(r"openft: SIGTERM: stopping: (.*)", server.log.read_text()))
    assert f"saving the state of job {job.id}" in said[1] and "may take up to 60 s" in said[1]
    assert server.proc.wait(timeout=300) == 0  # it exits by itself once the state is saved
    log = server.log.read_text()
    assert f"job {job.id} continues from its saved state on the next start" in log
    threads = threads_per_process(available_cores(), 2)  # one worker + the API
    assert f"torch uses {threads} thread(s) for training" in log

    _, _, messages = finish_after_restart(home, c.api_key, job.id)
    assert any("The worker stopped; the job is back in the queue" in m for m in messages)
    resumed = [int(m.split()[4]) for m in messages if m.startswith("Job resumed at step")]
    assert resumed[0] > 0  # continued from the step it saved at, not from the start


def worker_pids(server: Server) -> list[int]:
    children = f"/proc/{server.proc.pid}/task/{server.proc.pid}/children"
    with open(children) as f:
        return [int(pid) for pid in f.read().split()]


def test_second_ctrl_c_says_what_is_lost_and_stops_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(tmp_path / "home", "--workers", "1", new_session=True)
    try:
        _, job = start_training(server, "ctrl-c", seed=22)
        (worker,) = worker_pids(server)
        # A worker stopped in the middle of a write holds SQLite's write lock; the server must still
        # name its job at once (a writer session there waited 30 s and named none). The test takes
        # the lock itself first (waiting for the worker's write in progress to end), so the case is
        # certain rather than a matter of where the SIGSTOP lands.
        lock = sqlite3.connect(tmp_path / "home" / "openft.db", timeout=60)
        lock.execute("BEGIN IMMEDIATE")
        os.kill(worker, signal.SIGSTOP)  # a worker slow to save its state (a big model would be)
        os.killpg(server.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole group
        first = wait_until(lambda: re.search(r"openft: SIGINT: stopping: .*", server.log.read_text()))
        lock.rollback()
        lock.close()
        assert f"saving the state of job {job.id}" in first[0] and "Press Ctrl-C again" in first[0]
        os.killpg(server.proc.pid, signal.SIGINT)
        server.proc.wait(timeout=300)  # at once: the stopped worker is killed, not waited for
        second = re.search(r"openft: SIGINT again: stopping at once: (.*)", server.log.read_text())
        assert second, server.log.read_text()[-2000:]
        assert f"job {job.id} loses its training since" in second[1]
        assert "redoes it on the next start" in second[1]
        with pytest.raises(ProcessLookupError):  # the worker did not outlive the server
            wait_until(lambda: os.kill(worker, 0) or False, timeout=60)
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
