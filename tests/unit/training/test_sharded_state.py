"""The sharded (torch.distributed.checkpoint) training state: a save killed part-way leaves the
previous state, and the state round-trips into a sharded and an unsharded model. One process in a
1-rank gloo group, FSDP2 over a small network (the 2-rank cases are in test_distributed.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from openft.training import sharded_state
from openft.training.sharded_state import is_sharded, load_sharded_state, save_sharded_state
from openft.training.state import find_state


@pytest.fixture
def group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _net(shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)  # frozen weights are not part of the state
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    model(torch.ones(3, 4)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    optimizer.zero_grad()


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in model.named_parameters()
    }


def _save(directory: Path, model, optimizer, scheduler, step: int, writer=None) -> None:  # type: ignore[no-untyped-def]
    save_sharded_state(
        directory,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        epoch=1,
        batch_in_epoch=step,
        rng_states={"torch": torch.get_rng_state()},
        extra={"n": step},
        writer=writer,
    )


def test_a_save_killed_midway_leaves_the_previous_state(
    group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.distributed.checkpoint as dcp

    model, optimizer, scheduler = _net(shard=True)
    _step(model, optimizer, scheduler)
    state = tmp_path / "state"
    _save(state, model, optimizer, scheduler, step=1)
    saved = _full(model)
    assert is_sharded(state) and not (state / "trainable.safetensors").exists()
    _step(model, optimizer, scheduler)

    real_save = dcp.save

    def killed(*args, **kwargs):  # type: ignore[no-untyped-def]
        real_save(*args, **kwargs)  # every shard written...
        raise KeyboardInterrupt("killed")  # ...and the process dies before the rename

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(state, model, optimizer, scheduler, step=2)
    monkeypatch.setattr(dcp, "save", real_save)
    assert find_state(state) == state

    fresh, fresh_optimizer, fresh_scheduler = _net(shard=True)
    resumed = load_sharded_state(state, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert (resumed.step, resumed.batch_in_epoch, resumed.extra) == (1, 1, {"n": 1})
    for name, t in _full(fresh).items():
        assert torch.equal(t, saved[name]), name
    # A later save replaces the half-written folder it finds.
    _save(state, model, optimizer, scheduler, step=2)
    assert (
        sharded_state.load_sharded_state(
            state, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler
        ).step
        == 2
    )


def test_the_state_resumes_unsharded_with_the_same_next_step(group: None, tmp_path: Path) -> None:
    """Saved from shards, loaded into a plain model: weights, AdamW moments and schedule carry over,
    so the next step is the one the sharded model takes."""
    model, optimizer, scheduler = _net(shard=True)
    _step(model, optimizer, scheduler)
    _save(tmp_path / "state", model, optimizer, scheduler, step=1)
    plain, plain_optimizer, plain_scheduler = _net(shard=False)
    load_sharded_state(tmp_path / "state", model=plain, optimizer=plain_optimizer, scheduler=plain_scheduler)
    assert plain_scheduler.last_epoch == scheduler.last_epoch == 1
    _step(model, optimizer, scheduler)
    _step(plain, plain_optimizer, plain_scheduler)
    ours, theirs = _full(plain), _full(model)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, rtol=1e-6, atol=1e-7, msg=name)


def test_a_background_save_writes_the_shards_as_they_were_when_asked(
    group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writer``: the call returns with the shards copied; steps taken before the write (held
    back here until they ran) change nothing in it, and the state appears once it is written."""
    import threading

    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from openft.training.async_save import StateWriter

    stepped = threading.Event()
    real_write = FileSystemWriter.write_data

    def held_write(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        assert stepped.wait(60)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(FileSystemWriter, "write_data", held_write)
    model, optimizer, scheduler = _net(shard=True)
    _step(model, optimizer, scheduler)
    saved = _full(model)
    state = tmp_path / "state"
    with StateWriter() as writer:
        _save(state, model, optimizer, scheduler, step=1, writer=writer)
        _step(model, optimizer, scheduler)  # the live weights, moments and schedule move on
        _step(model, optimizer, scheduler)
        assert find_state(state) is None
        stepped.set()
    assert find_state(state) == state
    fresh, fresh_optimizer, fresh_scheduler = _net(shard=True)
    resumed = load_sharded_state(state, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert (resumed.step, resumed.extra, fresh_scheduler.last_epoch) == (1, {"n": 1}, 1)
    for name, t in _full(fresh).items():
        assert torch.equal(t, saved[name]), name


def test_a_failed_background_save_is_raised_and_leaves_the_previous_state(
    group: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from openft.training.async_save import StateSaveError, StateWriter

    model, optimizer, scheduler = _net(shard=True)
    _step(model, optimizer, scheduler)
    state = tmp_path / "state"
    _save(state, model, optimizer, scheduler, step=1)

    def full_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sharded_state, "commit_state", full_disk)
    writer = StateWriter()
    _save(state, model, optimizer, scheduler, step=2, writer=writer)
    with pytest.raises(StateSaveError, match=r"\(step 2\) failed: OSError: .*No space left"):
        writer.close()
    fresh, fresh_optimizer, fresh_scheduler = _net(shard=True)
    assert (
        load_sharded_state(state, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler).step == 1
    )
