"""Issue 17: jobs on N processes (torch.distributed, gloo on CPU) train like one process and survive
a killed rank. Every rank uses one torch thread (OPENFT_TORCH_THREADS=1; the machine is shared)."""

from __future__ import annotations

import functools
import io
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import model_cache, start_server
from tests.integration.test_job_control import csv_rows, last_step, wait_until
from tests.integration.test_service_e2e import wait_for
from tests.tasks import colour_examples, preference_jsonl, to_jsonl

pytestmark = pytest.mark.slow

ENV = {"OPENFT_TORCH_THREADS": "1", "OPENFT_LEASE_SECONDS": "5"}
N_EXAMPLES, N_EPOCHS, BATCH = 40, 3, 3  # 14 steps an epoch (the last batch has 1 example: one rank idles)
STEPS = 14 * N_EPOCHS
RTOL = 2e-3


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def _ranks(server_pid: int) -> list[int]:
    """The training processes (``spawn`` children) under a server, oldest first."""
    ranks = []
    for pid in _children(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            ranks.append(pid)
    return sorted(ranks)


def _losses(c, job) -> list[float]:
    return [float(r["train_loss"]) for r in csv_rows(c, job)]


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) == STEPS
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert worst < RTOL, (worst, a, b)


def test_two_processes_match_one_and_survive_a_killed_rank(tmp_path: Path) -> None:
    """Through the real worker: the same SFT job on 1 process, then on 2 (gloo) with one rank
    SIGKILLed after the first epoch. The 2-process job restarts both ranks from its saved state,
    finishes with every step's metrics exactly once, and its per-step losses equal the 1-process
    job's within 2e-3 relative."""
    home = tmp_path / "home"
    body = to_jsonl(colour_examples(N_EXAMPLES, seed=3))
    hp = {"n_epochs": N_EPOCHS, "batch_size": BATCH, "learning_rate_multiplier": 2.0}

    one = start_server(home, "--workers", "1", env=ENV)
    try:
        c = one.client("dist")
        f = c.files.create(file=("t.jsonl", io.BytesIO(body)), purpose="fine-tune")
        single = wait_for(
            c,
            c.fine_tuning.jobs.create(
                training_file=f.id, model="openft-tiny-vlm", hyperparameters=hp, seed=5
            ).id,
        )
        assert single.status == "succeeded", single.error
        expected = _losses(c, single)
    finally:
        one.stop()

    two = start_server(home, "--workers", "1", "--nproc", "2", env=ENV, new_session=True)
    try:
        c2 = two.client("dist")
        job = c2.fine_tuning.jobs.create(
            training_file=f.id, model="openft-tiny-vlm", hyperparameters=hp, seed=5
        )
        # Past the first epoch's saved state, so the restart resumes mid-run and re-runs steps
        # whose metrics were already recorded.
        wait_until(lambda: last_step(c2, job.id) >= 16)
        ranks = _ranks(two.proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        done = wait_for(c2, job.id)
        assert done.status == "succeeded", done.error
        events = c2.fine_tuning.jobs.list_events(job.id, limit=1000).data
        messages = [e.message for e in events]
        assert sorted(e.data["step"] for e in events if e.type == "metrics") == list(range(1, STEPS + 1))
        assert [int(r["step"]) for r in csv_rows(c2, done)] == list(range(1, STEPS + 1))
        assert sum("restarting all 2 processes from the last saved state" in m for m in messages) == 1, (
            messages
        )
        assert sum(m.startswith("Job resumed at step") for m in messages) == 1
        assert sum(m.startswith("training on 40 examples") for m in messages) == 1  # rank 0 only
        _close(expected, _losses(c2, done))
        # The model trained on two processes answers chat like any other.
        reply = c2.chat.completions.create(
            model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert reply.choices[0].message.content is not None
        assert not _ranks(two.proc.pid)  # the ranks exited with their job
    finally:
        two.stop()


def test_dpo_on_two_processes_matches_one(tmp_path: Path) -> None:
    """The DPO recipe launched on 2 ranks (the worker's launcher, in-process reporter) reports the
    same per-step losses as on one process."""
    from openft.datasets.validate import validate_file
    from openft.models.loader import load_processor, resolve_base
    from openft.models.validation import model_validation_options
    from openft.training import distributed
    from openft.training.config import TrainConfig
    from openft.training.recipes import dpo
    from openft.training.reporter import ListReporter

    base = resolve_base("openft-tiny-vlm", model_cache())
    options = model_validation_options(load_processor(base))
    examples = validate_file(
        io.BufferedReader(io.BytesIO(preference_jsonl(15, seed=2))), method="dpo", options=options
    ).examples

    def cfg(name: str) -> TrainConfig:
        return TrainConfig(
            base_model=base,
            output_dir=tmp_path / name,
            n_epochs=2,
            batch_size=4,
            learning_rate=1e-3,
            seed=0,
            device="cpu",
        )

    one = ListReporter()
    dpo.run(cfg("one"), examples, one, beta=0.1)
    two = ListReporter()
    distributed.launch(functools.partial(dpo.run, cfg("two"), examples, beta=0.1), two, nproc=2, threads=1)
    a, b = [s["train_loss"] for s in one.steps], [s["train_loss"] for s in two.steps]
    assert len(a) == len(b) == 8
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < RTOL, (a, b)
    assert [s["step"] for s in two.steps] == list(range(1, 9))
    assert two.checkpoints and two.checkpoints[-1]["weights_dir"].exists()


def test_a_pause_stops_every_rank_and_they_resume_where_it_left(tmp_path: Path) -> None:
    """A stop asked of rank 0 (pause, cancel, worker shutdown) stops both ranks at one step
    boundary with the state saved; a second launch resumes there (every rank loads it) and ends
    with the 1-process run's losses."""
    import random

    from openft.errors import JobCancelled
    from openft.models.loader import resolve_base
    from openft.training import distributed
    from openft.training.config import TrainConfig
    from openft.training.recipes import sft
    from openft.training.reporter import ListReporter
    from tests.integration.test_sft_recipe import _example, _prompt

    rng = random.Random(1)
    train = [_example(i + 1, *_prompt(rng)) for i in range(20)]
    base = resolve_base("openft-tiny-vlm", model_cache())

    def cfg(name: str) -> TrainConfig:
        return TrainConfig(
            base_model=base,
            output_dir=tmp_path / name,
            n_epochs=2,
            batch_size=4,
            learning_rate=1e-3,
            seed=0,
            device="cpu",
            micro_batch_size=1,
        )

    one = ListReporter()
    sft.run(cfg("one"), train, one)
    paused = ListReporter(stop_after=3)
    with pytest.raises(JobCancelled, match="stopped at step 3 of 10"):
        distributed.launch(
            functools.partial(sft.run, cfg("two"), train, resume=True), paused, nproc=2, threads=1
        )
    assert [s["step"] for s in paused.steps] == [1, 2, 3]
    resumed = ListReporter()
    distributed.launch(
        functools.partial(sft.run, cfg("two"), train, resume=True), resumed, nproc=2, threads=1
    )
    assert [m for _, m in resumed.messages if m.startswith("Job resumed")] == [
        "Job resumed at step 3 of 10 (epoch 1, batch 4)"
    ]
    steps = paused.steps + resumed.steps
    assert [s["step"] for s in steps] == list(range(1, 11))
    a, b = [s["train_loss"] for s in one.steps], [s["train_loss"] for s in steps]
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True)) < RTOL, (a, b)
    assert [c["step"] for c in resumed.checkpoints] == [5, 10]
