"""Background state saves: the bytes of a synchronous save even while training goes on, one write
at a time, and a failed write that cannot go unnoticed."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from openft.training.async_save import StateSaveError, StateWriter, snapshot
from openft.training.state import capture_rng, load_state, save_state
from tests.unit.training.test_train_state import _setup, _step


def _save(directory: Path, model, opt, sched, **kw) -> Path:
    return save_state(
        directory,
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=3,
        epoch=1,
        batch_in_epoch=3,
        rng_states=kw.pop("rng_states"),
        extra={"trained_tokens": 30},
        **kw,
    )


def test_a_background_save_writes_the_bytes_of_a_synchronous_one_while_training_goes_on(
    tmp_path: Path,
) -> None:
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    rng = capture_rng()
    sync = _save(tmp_path / "sync", model, opt, sched, rng_states=rng)
    after_save = [_step(model, opt, sched) for _ in range(2)]  # what the uninterrupted run does next

    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    gate = threading.Event()
    copied, saved_sched = snapshot(model, opt, sched)
    with StateWriter() as writer:
        writer.submit(
            lambda: (
                gate.wait(),
                _save(tmp_path / "async", model, opt, saved_sched, rng_states=rng, copied=copied),
            ),
            "step 3",
        )
        for _ in range(2):  # the live weights and AdamW moments change before the write starts
            _step(model, opt, sched)
        gate.set()
    files = sorted(p.name for p in sync.iterdir())
    assert files == sorted(p.name for p in (tmp_path / "async").iterdir())
    for name in files:
        assert (sync / name).read_bytes() == (tmp_path / "async" / name).read_bytes(), name

    # ...and it resumes into the same next losses as the run that never stopped.
    model, opt, sched = _setup()  # same frozen weights (they are not part of the state)
    load_state(tmp_path / "async", model=model, optimizer=opt, scheduler=sched)
    torch.set_rng_state(rng["torch"])
    assert [_step(model, opt, sched) for _ in range(2)] == after_save


def test_one_write_at_a_time_in_submission_order() -> None:
    order: list[int] = []
    first_running, release = threading.Event(), threading.Event()

    def first() -> None:
        first_running.set()
        release.wait()
        order.append(1)

    writer = StateWriter()
    writer.submit(first, "one")
    first_running.wait()
    submitted = threading.Event()

    def submit_second() -> None:
        writer.submit(lambda: order.append(2), "two")
        submitted.set()

    t = threading.Thread(target=submit_second)
    t.start()
    assert not submitted.wait(0.2)  # the second save waits for the first write to finish
    release.set()
    t.join()
    writer.close()
    assert order == [1, 2]


def test_a_failed_write_is_raised_by_the_next_save_with_what_failed() -> None:
    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writer = StateWriter()
    writer.submit(full_disk, "step 40")
    with pytest.raises(StateSaveError, match=r"state \(step 40\) failed: OSError: .*No space left on device"):
        writer.submit(lambda: None, "step 80")
    writer.close()  # raised once: nothing more pending


def test_leaving_the_run_waits_for_the_write_and_raises_its_error() -> None:
    done = threading.Event()
    with pytest.raises(StateSaveError, match="disk gone"):
        with StateWriter() as writer:
            writer.submit(
                lambda: (threading.Event().wait(0.05), done.set(), _raise(OSError("disk gone"))), "x"
            )
    assert done.is_set()

    # A run already failing keeps its own error; the write's failure is attached to it.
    with pytest.raises(RuntimeError, match="worker died") as caught:
        with StateWriter() as writer:
            writer.submit(lambda: _raise(OSError("disk gone")), "step 2")
            raise RuntimeError("worker died")
    assert any("step 2" in note and "disk gone" in note for note in caught.value.__notes__)


def _raise(exc: BaseException) -> None:
    raise exc
