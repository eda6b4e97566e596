"""Registry: load once per (base, weights), LRU order, eviction by model id, thread safety."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from openft.inference.registry import LoadedModel, ModelRef, Registry


class _Tok:
    eos_token_id = 2
    pad_token_id = 0

    def get_vocab(self) -> dict[str, int]:
        return {"<|endoftext|>": 0, "<|im_end|>": 2}


class _Config:
    max_position_embeddings = 64

    def get_text_config(self) -> _Config:
        return self


class _Model:
    config = _Config()
    generation_config = None

    def __init__(self, name: str) -> None:
        self.name = name


class _Processor:
    tokenizer = _Tok()


class FakeLoader:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, Path | None]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, base: str, weights_dir: Path | None, *, device: str) -> tuple[Any, Any]:
        with self._lock:
            self.calls.append((base, weights_dir))
        time.sleep(self.delay)
        return _Model(f"{base}|{weights_dir}"), _Processor()


def ref(model_id: str, weights: str | None = None, base: str = "base") -> ModelRef:
    return ModelRef(id=model_id, base=base, weights_dir=Path(weights) if weights else None)


def test_loads_once_and_reuses() -> None:
    loader = FakeLoader()
    reg = Registry(device="cpu", loader=loader)
    a = reg.get(ref("ft:a", "/w/a"))
    assert reg.get(ref("ft:a", "/w/a")) is a
    assert loader.calls == [("base", Path("/w/a"))]
    assert isinstance(a, LoadedModel)
    assert a.eos_token_ids == frozenset({0, 2}) and a.pad_token_id == 0 and a.context_length == 64


def test_lru_unloads_least_recently_used() -> None:
    loader = FakeLoader()
    reg = Registry(device="cpu", max_loaded=2, loader=loader)
    reg.get(ref("base"))
    reg.get(ref("ft:a", "/w/a"))
    reg.get(ref("base"))  # touch: ft:a is now the oldest
    reg.get(ref("ft:b", "/w/b"))
    assert reg.loaded_ids() == ["base", "ft:b"]
    reg.get(ref("ft:a", "/w/a"))
    assert len(loader.calls) == 4


def test_evict_by_model_id() -> None:
    loader = FakeLoader()
    reg = Registry(device="cpu", loader=loader)
    reg.get(ref("ft:a", "/w/a"))
    reg.get(ref("ft:b", "/w/b"))
    reg.evict("ft:a")
    reg.evict("ft:unknown")  # no error
    assert reg.loaded_ids() == ["ft:b"]
    reg.get(ref("ft:a", "/w/a"))
    assert len(loader.calls) == 3


def test_concurrent_gets_load_once() -> None:
    loader = FakeLoader(delay=0.2)
    reg = Registry(device="cpu", loader=loader)
    results: list[LoadedModel] = []
    threads = [
        threading.Thread(target=lambda: results.append(reg.get(ref("ft:a", "/w/a")))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loader.calls) == 1
    assert len({id(r) for r in results}) == 1


def test_different_keys_load_in_parallel() -> None:
    loader = FakeLoader(delay=0.3)
    reg = Registry(device="cpu", loader=loader)
    threads = [threading.Thread(target=reg.get, args=(ref(f"ft:{i}", f"/w/{i}"),)) for i in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Not a speed assertion: just that one slow load did not block the others behind one lock.
    assert time.monotonic() - start < 0.3 * 3
    assert len(loader.calls) == 3


def test_bad_max_loaded() -> None:
    with pytest.raises(ValueError):
        Registry(max_loaded=0)
