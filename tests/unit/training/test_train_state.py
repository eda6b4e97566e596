"""Resumable training state: round trip, atomic replacement, RNG, mismatch detection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from openft.training.state import (
    capture_rng,
    find_state,
    load_state,
    read_extra,
    remove_state,
    restore_rng,
    save_state,
)


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen weights are not part of the state
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def _step(model, opt, sched) -> float:
    loss = model(torch.randn(5, 3)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    for _ in range(3):
        _step(model, opt, sched)
    state_dir = tmp_path / "state"
    save_state(
        state_dir,
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=3,
        epoch=2,
        batch_in_epoch=1,
        rng_states=capture_rng(),
        extra={"trained_tokens": 42, "fingerprint": "abc"},
    )
    py_next = random.random()
    want = [_step(model, opt, sched) for _ in range(3)]
    want_weights = {k: v.clone() for k, v in model.state_dict().items()}

    other, opt2, sched2 = _setup(seed=0)  # same frozen init, as a rebuilt base model would be
    assert read_extra(state_dir) == {"trained_tokens": 42, "fingerprint": "abc"}
    st = load_state(find_state(state_dir), model=other, optimizer=opt2, scheduler=sched2)
    assert (st.step, st.epoch, st.batch_in_epoch) == (3, 2, 1)
    assert st.extra["trained_tokens"] == 42
    restore_rng(st.rng_states)
    assert random.random() == py_next
    got = [_step(other, opt2, sched2) for _ in range(3)]
    assert got == want
    assert sched2.get_last_lr() == sched.get_last_lr()
    for k, v in other.state_dict().items():
        assert torch.equal(v, want_weights[k]), k
    assert sorted(p.name for p in state_dir.iterdir()) == [
        "optimizer.pt",
        "rng.pt",
        "scheduler.pt",
        "state.json",
        "trainable.safetensors",
    ]


def test_replacement_is_atomic_and_falls_back_to_the_set_aside_copy(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    state_dir = tmp_path / "state"
    assert find_state(state_dir) is None
    kw = {"model": model, "optimizer": opt, "scheduler": sched, "rng_states": {}}
    save_state(state_dir, step=1, epoch=1, batch_in_epoch=1, **kw)
    save_state(state_dir, step=2, epoch=1, batch_in_epoch=2, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no tmp/old left behind
    # A crash between "rename old aside" and "rename new in": only the old copy exists.
    state_dir.rename(tmp_path / ".state.old")
    (tmp_path / ".state.tmp").mkdir()  # a half-written copy is ignored
    found = find_state(state_dir)
    assert found == tmp_path / ".state.old"
    assert load_state(found, **{k: v for k, v in kw.items() if k != "rng_states"}).step == 2
    remove_state(state_dir)
    assert list(tmp_path.iterdir()) == []


def test_other_trainable_weights_are_refused(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    save_state(
        tmp_path / "s",
        model=model,
        optimizer=opt,
        scheduler=sched,
        step=0,
        epoch=1,
        batch_in_epoch=0,
        rng_states={},
    )
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="other trainable weights"):
        load_state(tmp_path / "s", model=model, optimizer=opt, scheduler=sched)


def test_a_state_gathered_from_fsdp_shards_resumes_on_one_process(tmp_path: Path) -> None:
    """FSDP used to write its gathered weights and an optimizer state keyed by parameter name (what
    ``get_optimizer_state_dict`` returns; it now saves sharded, see test_sharded_state.py); a job
    saved that way and taken over by a one-process worker loads it and continues exactly as the
    uninterrupted run."""
    from openft.training.state import _optimizer_keyed

    model, opt, sched = _setup()
    for _ in range(2):
        _step(model, opt, sched)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = _optimizer_keyed(opt.state_dict(), names, by_name=True)
    assert set(by_name["state"]) == set(names) == set(by_name["param_groups"][0]["params"])
    where = dict(step=2, epoch=1, batch_in_epoch=2, rng_states={})
    save_state(tmp_path / "state", model=model, optimizer=opt, scheduler=sched, **where)
    torch.save(by_name, tmp_path / "state" / "optimizer.pt")  # as the gathering FSDP save wrote it
    torch.manual_seed(7)
    want = [_step(model, opt, sched) for _ in range(2)]

    fresh, fresh_opt, fresh_sched = _setup()  # untrained: the same frozen weights only
    load_state(tmp_path / "state", model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    torch.manual_seed(7)
    assert [_step(fresh, fresh_opt, fresh_sched) for _ in range(2)] == want
