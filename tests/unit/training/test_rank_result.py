"""A rank's result reaches the launcher by value, even when the rank is gone before it is read."""

from __future__ import annotations

import multiprocessing as mp

import torch

from openft.training import distributed


def _send_and_exit(conn) -> None:
    distributed.send_result(conn, {"w": torch.arange(4.0)})


def test_tensors_in_a_result_survive_the_rank_that_sent_them() -> None:
    # With the pipe's own pickler the tensor travelled as a shared-memory handle served by the
    # rank; read after the rank exited, the launcher got nothing (the job's result was None).
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    rank = ctx.Process(target=_send_and_exit, args=(theirs,))
    rank.start()
    rank.join()
    outcome = distributed._Outcome()
    outcome.take(0, ours, None)
    assert outcome.finished == {0}
    assert torch.equal(outcome.result["w"], torch.arange(4.0))
