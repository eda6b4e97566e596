"""Epoch batch order, micro-batches, loss-token counts and config checks."""

from __future__ import annotations

import pytest

from openft.models.render import IGNORE_INDEX, Rendered
from openft.training.collate import epoch_batches, micro_batches, target_tokens
from openft.training.config import TrainConfig


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = [(i * 37) % 101 for i in range(50)]
    a = epoch_batches(lengths, 4, seed=3, epoch=2)
    assert a == epoch_batches(lengths, 4, seed=3, epoch=2)  # a resumed run replays it
    assert a != epoch_batches(lengths, 4, seed=3, epoch=3)
    assert a != epoch_batches(lengths, 4, seed=4, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(50))


def test_micro_batches() -> None:
    assert micro_batches([5, 6, 7, 8, 9], None) == [[5, 6, 7, 8, 9]]
    assert micro_batches([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
    assert micro_batches([5, 6], 8) == [[5, 6]]


def test_target_tokens_skip_the_unpredictable_first_token() -> None:
    assert target_tokens(Rendered(input_ids=[1, 2, 3], labels=[1, 2, IGNORE_INDEX])) == 1
    assert target_tokens(Rendered(input_ids=[1, 2, 3], labels=[IGNORE_INDEX, 2, 3])) == 2


def test_config_reports_every_problem(tmp_path) -> None:
    with pytest.raises(ValueError) as e:
        TrainConfig(
            base_model="x",
            output_dir=tmp_path,
            n_epochs=0,
            batch_size=1,
            learning_rate=1e-3,
            seed=0,
            micro_batch_size=0,
            state_every_steps=-1,
        )
    msg = str(e.value)
    assert "n_epochs" in msg and "micro_batch_size" in msg and "state_every_steps" in msg
    ok = TrainConfig(
        base_model="x", output_dir=tmp_path, n_epochs=1, batch_size=1, learning_rate=1e-3, seed=0
    )
    assert (ok.train_vision_tower, ok.train_projector, ok.bf16, ok.gradient_checkpointing) == (
        False,
        False,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("world", "batch", "size", "lockstep", "expected"),
    [
        # 3 examples on 2 ranks in micro-batches of 1: rank 1 has one fewer; FSDP pads it.
        (2, [7, 8, 9], 1, False, [[([7], True), ([9], True)], [([8], True)]]),
        (2, [7, 8, 9], 1, True, [[([7], True), ([9], True)], [([8], True), ([7], False)]]),
        # One example on 2 ranks: the idle rank runs a weight-0 stand-in either way.
        (2, [7], None, False, [[([7], True)], [([7], False)]]),
        (3, [1, 2, 3, 4, 5], 2, True, [[([1, 4], True)], [([2, 5], True)], [([3], True)]]),
    ],
)
def test_rank_micro_batches_keep_ranks_in_step(monkeypatch, world, batch, size, lockstep, expected) -> None:
    """Each rank's micro-batches of a global batch; under FSDP every rank runs as many as rank 0,
    and the chunks that count cover the batch exactly once."""
    from openft.training import distributed

    got = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        got.append(distributed.rank_micro_batches(batch, size, lockstep=lockstep))
    assert got == expected
    assert sorted(i for chunks in got for c, counts in chunks if counts for i in c) == sorted(batch)
    if lockstep:
        assert len({len(chunks) for chunks in got}) == 1
