"""Frozen vision features computed once (``training.vision_cache``): the same losses as running the
tower every step, with each distinct image through the tower once, for every vision family.

Each family's tiny random model trains LoRA (tower and projector frozen: the default plan) for two
shuffled epochs with validation, once with ``cache_vision_features="on"`` and once ``"off"``. A
forward hook on the projector counts the image-feature rows produced: with the cache it must be
exactly one pass over the distinct images (train + validation), without it one per use.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
from openft.models.loader import resolve_base
from openft.training import setup as setup_mod
from openft.training.config import LoraConfig, TrainConfig
from openft.training.recipes import dpo, sft
from openft.training.reporter import ListReporter
from openft.training.trainable import projector_roots
from openft.training.vision_cache import VisionCache
from tests.tasks import SHAPE_COLOURS, shape_picture

pytestmark = pytest.mark.slow

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "smolvlm", "idefics3"]


def _build(family: str, root: Path) -> str:
    if family == "qwen2_vl":
        return resolve_base("openft-tiny-vlm", root / "cache")  # openft's own tiny Qwen2-VL
    if family in ("qwen2_5_vl", "qwen3_vl"):
        from tests.unit.models.tiny_qwen_vl import build_tiny_qwen_vl

        return str(build_tiny_qwen_vl(family, root / family))
    if family == "llava":
        from tests.unit.models.tiny_llava import build_tiny_llava

        return str(build_tiny_llava(root / family))
    if family == "gemma3":
        from tests.unit.models.tiny_gemma3 import build_tiny_gemma3

        return str(build_tiny_gemma3(root / family))
    from tests.unit.models.tiny_smolvlm import build_tiny_idefics3, build_tiny_smolvlm

    return str((build_tiny_smolvlm if family == "smolvlm" else build_tiny_idefics3)(root / family))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], str]:
    root = tmp_path_factory.mktemp("vcache")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = _build(family, root)
        return built[family]

    return get


def _examples(seed: int, n: int) -> list[ChatExample]:
    """Pictures answered with their colour; one example has two pictures, one none."""
    rng = random.Random(seed)
    colours = sorted(SHAPE_COLOURS)
    out = []
    for i in range(n):
        colour = rng.choice(colours)
        pictures = 2 if i == 1 else 0 if i == 2 else 1
        parts = [ImagePart(url="data:", data=shape_picture(rng, colour, "circle")) for _ in range(pictures)]
        out.append(
            ChatExample(
                line=i + 1,
                messages=(
                    Message("user", (*parts, TextPart("colour?"))),
                    Message("assistant", (TextPart(colour),), weight=1),
                ),
            )
        )
    return out


class _Projected:
    """Counts image-feature rows leaving the projector of every model ``sft.run`` builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows = 0
        original = setup_mod._build_model

        def build(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
            model, processor = original(*args, **kwargs)
            model.get_submodule(projector_roots(model)[0]).register_forward_hook(self._count)
            return model, processor

        monkeypatch.setattr(setup_mod, "_build_model", build)

    def _count(self, module: Any, args: Any, out: torch.Tensor) -> None:
        self.rows += out.numel() // out.shape[-1]


def _cfg(base: str, out: Path, cache: str, **kw: Any) -> TrainConfig:
    return TrainConfig(
        base_model=base,
        output_dir=out,
        n_epochs=2,
        batch_size=2,
        learning_rate=1e-2,
        seed=0,
        device="cpu",
        lora=LoraConfig(r=4, alpha=8),
        cache_vision_features=cache,  # type: ignore[arg-type]
        valid_every=2,
        **kw,
    )


def _distinct_image_rows(base: str, examples: list[ChatExample]) -> int:
    """Image tokens of the distinct examples with pictures: what one pass of the tower yields."""
    from openft.models.loader import load_model
    from openft.models.render import render_chat

    model, processor = load_model(base, device="cpu")
    token = model.config.image_token_id
    rendered = [render_chat(processor, ex.messages) for ex in examples]
    return sum(r.input_ids.count(token) for r in rendered if r.vision)


def _losses(rep: ListReporter) -> list[float]:
    return [s[k] for s in rep.steps for k in ("train_loss", "valid_loss", "full_valid_loss") if k in s]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_features_give_the_same_losses_with_one_tower_pass_per_image(
    family: str, models: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = models(family)
    train, valid = _examples(1, 6), _examples(2, 3)
    counter = _Projected(monkeypatch)

    cached = ListReporter()
    sft.run(_cfg(base, tmp_path / "on", "on"), train, cached, valid_examples=valid)
    rows_cached, counter.rows = counter.rows, 0
    plain = ListReporter()
    sft.run(_cfg(base, tmp_path / "off", "off"), train, plain, valid_examples=valid)

    assert len(cached.steps) == len(plain.steps) == 6
    assert _losses(cached) == pytest.approx(_losses(plain), abs=1e-6, rel=0)
    assert any("computed once and cached" in m for _, m in cached.messages)
    once = _distinct_image_rows(base, train + valid)
    assert rows_cached == once  # every distinct image through the tower exactly once
    assert counter.rows > 2 * once  # the uncached run encodes them every epoch and evaluation


class _TowerRuns:
    """Counts vision-tower rows (the projector's input after a pass of the tower) and keeps the
    projector's weights of every model ``sft.run`` builds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from openft.models.families import find_family

        self.rows = 0
        self.fresh = False
        self.projectors: list[dict[str, torch.Tensor]] = []
        """Per model: its projector's parameters (trained in place), and peft's frozen originals."""
        original = setup_mod._build_model

        def build(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
            model, processor = original(*args, **kwargs)
            family = find_family(model)
            tower = next(m for n, m in model.named_modules() if n and family.component(n) == "vision_tower")  # type: ignore[union-attr]
            tower.register_forward_hook(self._ran)
            model.get_submodule(projector_roots(model)[0]).register_forward_pre_hook(self._count)
            self.projectors.append(
                {n: p for n, p in model.named_parameters() if family.component(n) == "projector"}  # type: ignore[union-attr]
            )
            return model, processor

        monkeypatch.setattr(setup_mod, "_build_model", build)

    def _ran(self, *args: Any) -> None:
        self.fresh = True

    def _count(self, module: Any, args: tuple[Any, ...]) -> None:
        if self.fresh:  # the projector's input straight from a pass of the tower
            self.rows += args[0].numel() // args[0].shape[-1]
            self.fresh = False


def _tower_rows(base: str, examples: list[ChatExample]) -> int:
    """Vision-tower rows of the distinct examples with pictures: what one pass of the tower yields."""
    from openft.models.families import find_family
    from openft.models.loader import load_model
    from openft.models.render import render_chat

    model, processor = load_model(base, device="cpu")
    token = model.config.image_token_id
    per_token = find_family(model).patches_per_token(model.config)  # type: ignore[union-attr]
    rendered = [render_chat(processor, ex.messages) for ex in examples]
    return per_token * sum(r.input_ids.count(token) for r in rendered if r.vision)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_trained_projector_on_cached_tower_outputs_trains_as_without_the_cache(
    family: str, models: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoRA with ``train_projector``: the tower is frozen, its outputs are cached once per distinct
    image, and the projector still trains on them: the same losses and the same projector weights
    after two shuffled epochs with validation as running the tower every step."""
    base = models(family)
    train, valid = _examples(1, 6), _examples(2, 3)
    runs = _TowerRuns(monkeypatch)

    cached = ListReporter()
    sft.run(_cfg(base, tmp_path / "on", "on", train_projector=True), train, cached, valid_examples=valid)
    rows_cached, runs.rows = runs.rows, 0
    plain = ListReporter()
    sft.run(_cfg(base, tmp_path / "off", "off", train_projector=True), train, plain, valid_examples=valid)

    assert len(cached.steps) == len(plain.steps) == 6
    assert _losses(cached) == pytest.approx(_losses(plain), abs=1e-6, rel=0)
    assert any("trained projector: the tower's outputs" in m for _, m in cached.messages)
    on, off = runs.projectors
    trained = [n for n, p in off.items() if p.requires_grad]
    assert trained and sorted(trained) == sorted(n for n, p in on.items() if p.requires_grad)
    for name in trained:
        torch.testing.assert_close(on[name], off[name], rtol=0, atol=1e-6)
    # It did train: the weights moved from peft's frozen copy of the loaded projector.
    assert any(
        not torch.equal(off[n], off[n.replace(".modules_to_save.default.", ".original_module.")])
        for n in trained
    )
    once = _tower_rows(base, train + valid)
    assert rows_cached == once  # every distinct image through the tower exactly once
    assert runs.rows > 2 * once  # the uncached run encodes them every epoch and evaluation


def test_a_wrongly_keyed_cache_changes_the_losses(
    models: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The comparison above notices wrong features: a cache keyed by the vision tensors' shapes only
    (every same-sized picture shares one entry) trains on the wrong images."""
    base = models("qwen2_vl")
    train = _examples(1, 6)
    plain = ListReporter()
    sft.run(_cfg(base, tmp_path / "off", "off"), train, plain)

    def by_shape(self: VisionCache, item: Any) -> int:
        key = str([(k, tuple(v.shape)) for k, v in sorted(item.vision.items())]).encode()
        slot = self._slots.setdefault(key, len(self._entries))
        if slot == len(self._entries):
            self._entries.append(None)
            self._tokens.append(item.input_ids.count(self._token_id))
        return slot

    monkeypatch.setattr(VisionCache, "slot_of", by_shape)
    wrong = ListReporter()
    sft.run(_cfg(base, tmp_path / "wrong", "on"), train, wrong)
    assert _losses(wrong) != pytest.approx(_losses(plain), abs=1e-4)


@pytest.mark.parametrize("train_projector", [False, True])
def test_resumed_run_with_the_cache_matches_the_uninterrupted_run(
    models: Callable[[str], str], tmp_path: Path, train_projector: bool
) -> None:
    """The cache is in memory only: a run stopped mid-epoch 2 and resumed refills it and gives the
    losses of an uninterrupted run without it (projected features, or the tower's outputs under a
    trained projector, whose weights come back from the checkpoint)."""
    from openft.errors import JobCancelled

    base = models("qwen2_vl")
    train, valid = _examples(3, 6), _examples(4, 2)
    whole = ListReporter()
    kw = {"train_projector": train_projector}
    sft.run(_cfg(base, tmp_path / "whole", "off", **kw), train, whole, valid_examples=valid)
    out = tmp_path / "paused"
    first = ListReporter(stop_after=4)
    with pytest.raises(JobCancelled):
        sft.run(_cfg(base, out, "on", **kw), train, first, valid_examples=valid)
    second = ListReporter()
    sft.run(_cfg(base, out, "on", **kw), train, second, valid_examples=valid, resume=True)
    assert [s["step"] for s in second.steps] == [5, 6]
    assert _losses(first) + _losses(second) == pytest.approx(_losses(whole), abs=1e-6, rel=0)


@pytest.mark.parametrize("train_projector", [False, True])
def test_dpo_with_the_cache_matches_dpo_without(
    models: Callable[[str], str], tmp_path: Path, train_projector: bool
) -> None:
    """DPO's stacked chosen/rejected rows share their prompt's pictures: one cache entry serves both,
    and the reference (adapter disabled: peft's original projector under ``train_projector``)
    reuses it too."""
    from openft.datasets.formats import PreferenceExample

    base = models("qwen2_vl")
    pairs = []
    for ex in _examples(5, 6):
        prompt, reply = ex.messages
        other = Message("assistant", (TextPart("none"),), weight=1)
        pairs.append(PreferenceExample(line=ex.line, prompt=(prompt,), preferred=reply, non_preferred=other))
    runs = {}
    for cache in ("on", "off"):
        rep = ListReporter()
        dpo.run(_cfg(base, tmp_path / cache, cache, train_projector=train_projector), pairs, rep, beta=0.1)
        runs[cache] = rep
    assert _losses(runs["on"]) == pytest.approx(_losses(runs["off"]), abs=1e-6, rel=0)
    assert any("computed once and cached" in m for _, m in runs["on"].messages)


def test_full_fine_tuning_caches_the_tower_and_a_trained_tower_is_not_cached(
    models: Callable[[str], str], tmp_path: Path
) -> None:
    """Full fine-tuning trains the projector but not the tower: ``auto`` caches the tower's outputs,
    with the losses of ``off``. With ``train_vision_tower`` ``auto`` says why it does not cache and
    ``on`` is refused."""
    from openft.errors import InvalidRequest

    base = models("qwen2_vl")
    train, valid = _examples(1, 4), _examples(2, 2)
    cfg = TrainConfig(
        base_model=base,
        output_dir=tmp_path / "a",
        n_epochs=2,
        batch_size=2,
        learning_rate=1e-3,
        seed=0,
        device="cpu",
        valid_every=2,
    )
    runs = {}
    for cache in ("auto", "off"):
        rep = ListReporter()
        sft.run(
            TrainConfig(**{**cfg.__dict__, "output_dir": tmp_path / cache, "cache_vision_features": cache}),
            train,
            rep,
            valid_examples=valid,
        )
        runs[cache] = rep
    assert any("trained projector: the tower's outputs" in m for _, m in runs["auto"].messages)
    assert _losses(runs["auto"]) == pytest.approx(_losses(runs["off"]), abs=1e-6, rel=0)

    tower = {**cfg.__dict__, "n_epochs": 1, "train_vision_tower": True}
    rep = ListReporter()
    sft.run(TrainConfig(**{**tower, "output_dir": tmp_path / "t"}), train, rep)
    assert any("not cached: the vision tower trains" in m for _, m in rep.messages)
    with pytest.raises(InvalidRequest, match="cache_vision_features 'on' is not possible"):
        sft.run(
            TrainConfig(**{**tower, "output_dir": tmp_path / "b", "cache_vision_features": "on"}),
            train,
            ListReporter(),
        )


def test_two_ddp_processes_with_the_cache_match_them_without(
    models: Callable[[str], str], tmp_path: Path
) -> None:
    """Under DDP each rank keeps its own cache (no collective depends on it): 2 processes give the
    losses they give without the cache, an idle rank's weight-0 stand-in included (7 examples in
    batches of 2), and the 1-process losses up to reduction order."""
    import functools

    from openft.training import distributed

    base = models("qwen2_vl")
    train, valid = _examples(6, 7), _examples(7, 2)
    runs = {}
    for cache in ("on", "off"):
        rep = ListReporter()
        cfg = _cfg(base, tmp_path / cache, cache)
        distributed.launch(
            functools.partial(sft.run, cfg, train, valid_examples=valid), rep, nproc=2, threads=1
        )
        runs[cache] = rep
    one = ListReporter()
    sft.run(_cfg(base, tmp_path / "one", "off"), train, one, valid_examples=valid)
    assert len(runs["on"].steps) == 8
    assert _losses(runs["on"]) == pytest.approx(_losses(runs["off"]), abs=1e-6, rel=0)
    assert _losses(runs["on"]) == pytest.approx(_losses(one), rel=2e-3)
    assert any("computed once and cached" in m for _, m in runs["on"].messages)
