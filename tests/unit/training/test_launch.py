"""``distributed.launch``: N ranks on gloo, rank 0's reporter served by the launcher, a rank's error
re-raised with its fields, a silently killed rank restarting all of them, and a give-up."""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from openft.errors import InvalidRequest
from openft.training import distributed
from openft.training.reporter import ListReporter

pytestmark = pytest.mark.slow  # each launch starts fresh Python processes that import torch


def _sum_ranks(marker: Path, *, reporter) -> int:
    """Every rank contributes rank+1; rank 0 reports the sum. With ``marker`` missing, the last
    rank creates it and SIGKILLs itself first (so only the first attempt dies)."""
    if distributed.rank() == distributed.world_size() - 1 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    (total,) = distributed.all_sum(distributed.rank() + 1)
    reporter.on_message(f"sum {total:g}")
    assert not reporter.should_stop()
    return int(total)


def _fail_on_last(*, reporter) -> None:
    if distributed.rank() == distributed.world_size() - 1:
        raise InvalidRequest("line 3: no assistant message", param="training_file", code="bad_line")
    dist.barrier()  # the other ranks wait for it, then fail because it is gone


def _always_die(*, reporter) -> None:
    if distributed.rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()


def test_ranks_report_through_rank_0_and_a_killed_rank_restarts_all(tmp_path: Path) -> None:
    reporter = ListReporter()
    out = distributed.launch(functools.partial(_sum_ranks, tmp_path / "died"), reporter, nproc=2, threads=1)
    assert out == 3  # 1 + 2: both ranks took part, rank 0's result came back
    messages = [m for _, m in reporter.messages]
    assert (
        messages[0] == "rank 1 was killed by SIGKILL without reporting an error; restarting all 2 "
        "processes from the last saved state (restart 1 of 3)"
    )
    assert messages[1:] == ["sum 3"]  # rank 0 only, once (the first attempt died before reporting)


def test_a_rank_error_is_raised_with_its_fields() -> None:
    with pytest.raises(InvalidRequest) as e:
        distributed.launch(_fail_on_last, ListReporter(), nproc=2, threads=1)
    assert (e.value.message, e.value.param, e.value.code) == (
        "line 3: no assistant message",
        "training_file",
        "bad_line",
    )


def test_ranks_lost_every_time_give_up() -> None:
    reporter = ListReporter()
    with pytest.raises(distributed.RanksLost, match="rank 1 was killed by SIGKILL"):
        distributed.launch(_always_die, reporter, nproc=2, threads=1, max_restarts=1)
    assert len(reporter.messages) == 1  # one restart announced, then the give-up
