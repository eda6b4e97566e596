"""Background state saves in the SFT loop: a kill mid-write resumes from the previous state to the
losses of an uninterrupted run, and a failed write fails the run before its checkpoint."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from openft.training.async_save import StateSaveError
from openft.training.recipes import sft
from openft.training.reporter import ListReporter
from openft.training.state import HOLD_ENV, find_state, read_extra
from tests.integration.test_sft_recipe import _assert_close_weights, _cfg, _example, _prompt

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"n_epochs": 2, "batch_size": 2, "state_every_steps": 2}  # 6 steps an epoch


def _train() -> list:
    rng = random.Random(11)
    return [_example(i + 1, *_prompt(rng)) for i in range(12)]


CHILD = """
import functools, json, sys
from pathlib import Path
from openft.training import distributed
from openft.training.recipes import sft
from openft.training.reporter import ListReporter
from tests.integration.test_async_state import SETTINGS, _train
from tests.integration.test_sft_recipe import _cfg

class Logged(ListReporter):
    def on_step(self, metrics):
        super().on_step(metrics)
        with open(sys.argv[3], "a") as f:
            f.write(json.dumps(metrics) + "\\n")

if sys.argv[4:] == ["fsdp"]:  # 2 ranks, given up on when one dies (no restarts)
    cfg = _cfg(sys.argv[1], Path(sys.argv[2]), parallelism="fsdp", **SETTINGS)
    run = functools.partial(sft.run, cfg, _train(), resume=True)
    distributed.launch(run, Logged(), nproc=2, threads=1, max_restarts=0)
else:
    sft.run(_cfg(sys.argv[1], Path(sys.argv[2]), **SETTINGS), _train(), Logged())
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    from openft.models.loader import resolve_base

    return resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("cache"))


def _steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _wait(predicate, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600  # a guard against hanging, not a speed assertion
    while not predicate():
        assert proc.poll() is None, f"the training process exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _assert_resumed_like(whole, want, *, killed: list[dict], again, got, out: Path) -> None:  # type: ignore[no-untyped-def]
    """The killed run's steps 1-6 and the resumed run's 3-12 have the uninterrupted run's losses,
    the final weights match, and the finished run removed its state."""
    assert [s["step"] for s in again.steps] == list(range(3, 13))
    for x, y in zip(whole.steps[2:], again.steps, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5, (x, y)
    for x, y in zip(whole.steps[:6], killed, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5, (x, y)
    assert got.steps == want.steps == 12
    _assert_close_weights(want.weights_dir, got.weights_dir, atol=1e-5)
    assert not (out / "state").exists() and not (out / ".state.tmp").exists()  # done: state removed


def test_a_kill_mid_background_write_resumes_from_the_previous_state(base: str, tmp_path: Path) -> None:
    whole = ListReporter()
    want = sft.run(_cfg(base, tmp_path / "whole", async_state_save=False, **SETTINGS), _train(), whole)

    out, log, held = tmp_path / "killed", tmp_path / "steps.jsonl", tmp_path / "held"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        HOLD_ENV: f"4:{held}",  # step 4's background write stops with its files written, not renamed
    }
    proc = subprocess.Popen([sys.executable, "-c", CHILD, base, str(out), str(log)], cwd=ROOT, env=env)
    try:
        _wait(held.exists, "step 4's state write started", proc)
        # Training goes on while the write is held: steps 5 and 6 run, and the epoch end then waits
        # for the write before it writes its checkpoint.
        _wait(lambda: len(_steps(log)) >= 6, "steps 5 and 6 ran during the write", proc)
        time.sleep(1.0)  # time enough to go wrong: a checkpoint written, step 7 taken
        assert (out / ".state.tmp" / "trainable.safetensors").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [s["step"] for s in _steps(log)] == [1, 2, 3, 4, 5, 6]
    assert not (out / "step-6").exists()
    found = find_state(out / "state")
    assert found is not None and json.loads((found / "state.json").read_text())["step"] == 2
    assert read_extra(found)["trained_tokens"] == whole.steps[1]["trained_tokens"]

    again = ListReporter()
    got = sft.run(_cfg(base, out, **SETTINGS), _train(), again, resume=True)
    _assert_resumed_like(whole, want, killed=_steps(log), again=again, got=got, out=out)


def test_a_failed_background_write_fails_the_run_before_its_checkpoint(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openft.training import state

    real = state.save_file

    def full_disk_in_the_writer(tensors, path, *a, **kw):
        if threading.current_thread().name.startswith("openft-state-save"):
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(state, "save_file", full_disk_in_the_writer)
    reporter = ListReporter()
    out = tmp_path / "out"
    with pytest.raises(StateSaveError, match=r"\(step 2\) failed: OSError: .*No space left on device"):
        sft.run(_cfg(base, out, **SETTINGS), _train(), reporter)
    assert 2 <= len(reporter.steps) <= 6 and reporter.checkpoints == []
    assert not (out / "step-6").exists() and find_state(out / "state") is None


def _spawned(pid: int) -> list[int]:
    """The ranks (``spawn`` children) of the launcher process ``pid``, oldest first."""
    from tests.integration.test_distributed import _children

    return sorted(p for p in _children(pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())


def test_fsdp_ranks_killed_mid_background_write_resume_from_the_previous_state(
    base: str, tmp_path: Path
) -> None:
    """FSDP2 on 2 ranks: the periodic sharded saves run in the background (every rank's shards copied,
    then written while training goes on). A rank SIGKILLed while step 4's write is under way (its
    shards written, not yet renamed into place) leaves step 2's state; a new launch resumes there
    and ends with the uninterrupted run's losses and weights."""
    from openft.training import distributed

    whole = ListReporter()
    cfg = _cfg(base, tmp_path / "whole", parallelism="fsdp", **SETTINGS)
    want = distributed.launch(
        functools.partial(sft.run, cfg, _train(), resume=True), whole, nproc=2, threads=1
    )

    out, log, held = tmp_path / "killed", tmp_path / "steps.jsonl", tmp_path / "held"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OPENFT_TORCH_THREADS": "1",
        HOLD_ENV: f"4:{held}",  # rank 0 commits step 4's state: held with every rank's shards written
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, base, str(out), str(log), "fsdp"], cwd=ROOT, env=env
    )
    try:
        _wait(held.exists, "step 4's state write started", proc)
        _wait(lambda: len(_steps(log)) >= 6, "steps 5 and 6 ran during the write", proc)
        time.sleep(1.0)  # time enough to go wrong: a checkpoint written, step 7 taken
        assert (out / ".state.tmp" / "shards" / ".metadata").exists()
        ranks = _spawned(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        assert proc.wait(timeout=120) != 0  # the launcher gives up (no restarts asked)
    finally:
        proc.kill()
        proc.wait()
    assert [s["step"] for s in _steps(log)] == [1, 2, 3, 4, 5, 6]
    assert not (out / "step-6").exists()
    found = find_state(out / "state")
    assert found is not None and json.loads((found / "state.json").read_text())["step"] == 2

    again = ListReporter()
    cfg = _cfg(base, out, parallelism="fsdp", **SETTINGS)
    got = distributed.launch(
        functools.partial(sft.run, cfg, _train(), resume=True), again, nproc=2, threads=1
    )
    assert [m for _, m in again.messages if m.startswith("Job resumed")] == [
        "Job resumed at step 2 of 12 (epoch 1, batch 3)"
    ]
    _assert_resumed_like(whole, want, killed=_steps(log), again=again, got=got, out=out)
