"""End-to-end SFT on CPU with the tiny VLM: the loop learns a rule and writes loadable checkpoints."""

from __future__ import annotations

import io
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import openft.training.loss as loss_module
from openft.datasets.formats import ChatExample, ImagePart, Message, TextPart
from openft.models.loader import load_model, read_marker, resolve_base
from openft.models.render import render_chat
from openft.training.config import TrainConfig
from openft.training.recipes import sft
from openft.training.reporter import ListReporter

# Rule: the reply is the noun fixed for the one colour word hidden among random filler words.
# Held-out prompts are fresh random fillers, so only the rule (find the colour) answers them.
KEYS = {
    "red": "cat",
    "green": "dog",
    "blue": "bird",
    "yellow": "fish",
    "black": "tree",
    "white": "flower",
    "orange": "car",
    "purple": "boat",
}
N_TRAIN, N_EPOCHS, BATCH, LR = 240, 6, 8, 1e-3
FILLER = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
)


def _prompt(rng: random.Random) -> tuple[str, str]:
    colour = rng.choice(sorted(KEYS))
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    words.insert(rng.randint(0, len(words)), colour)
    return " ".join(words) + "?", KEYS[colour]


def _example(line: int, prompt: str, answer: str) -> ChatExample:
    return ChatExample(
        line=line,
        messages=(
            Message("user", (TextPart(prompt),)),
            Message("assistant", (TextPart(answer),), weight=1),
        ),
    )


def _generate(model, processor, prompt: str) -> str:
    r = render_chat(processor, [Message("user", (TextPart(prompt),))], add_generation_prompt=True)
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    return processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.slow
def test_sft_learns_a_rule_and_generalises(tmp_path: Path) -> None:
    rng = random.Random(0)
    train = [_example(i + 1, *_prompt(rng)) for i in range(N_TRAIN)]
    held_out = [_prompt(rng) for _ in range(50)]
    base = resolve_base("openft-tiny-vlm", tmp_path / "cache")
    cfg = TrainConfig(
        base_model=base,
        output_dir=tmp_path / "out",
        n_epochs=N_EPOCHS,
        batch_size=BATCH,
        learning_rate=LR,
        seed=0,
        device="cpu",
    )
    reporter = ListReporter()
    start = time.perf_counter()
    result = sft.run(cfg, train, reporter)
    elapsed = time.perf_counter() - start

    losses = [s["train_loss"] for s in reporter.steps]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first / 4, (first, last)
    assert result.steps == len(reporter.steps) == -(-N_TRAIN // BATCH) * N_EPOCHS
    assert [c["epoch"] for c in reporter.checkpoints] == list(range(1, N_EPOCHS + 1))
    assert read_marker(result.weights_dir) == {"kind": "full", "base_model": base}

    model, processor = load_model(base, result.weights_dir, device="cpu")
    answers = [_generate(model, processor, p) for p, _ in held_out]
    correct = sum(a == want for a, (_, want) in zip(answers, held_out, strict=True))
    print(
        f"sft rule: {elapsed:.1f}s train, loss {first:.2f} -> {last:.3f}, held-out {correct}/{len(held_out)}"
    )
    assert correct >= 0.9 * len(held_out), list(zip(answers, held_out, strict=True))[:10]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return resolve_base("openft-tiny-vlm", tmp_path_factory.mktemp("cache"))


def _cfg(base: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        **{
            "base_model": base,
            "output_dir": out,
            "n_epochs": 1,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "seed": 0,
            "device": "cpu",
            **kw,
        }
    )


def _png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_same_seed_same_losses_and_pinned_first_loss(base: str, tmp_path: Path) -> None:
    rng = random.Random(1)
    train = [_example(i + 1, *_prompt(rng)) for i in range(12)]
    a, b = ListReporter(), ListReporter()
    sft.run(_cfg(base, tmp_path / "a"), train, a)
    sft.run(_cfg(base, tmp_path / "b"), train, b)
    losses = [s["train_loss"] for s in a.steps]
    assert losses == [s["train_loss"] for s in b.steps]
    # The random-init tiny model starts near uniform over its 2,048-token vocabulary (ln 2048 = 7.6).
    assert 6.5 < losses[0] < 8.5, losses
    assert [s["step"] for s in a.steps] == [1, 2, 3]
    assert a.steps[-1]["trained_tokens"] == sum(
        len(render_chat(load_model(base, device="cpu")[1], ex.messages).input_ids) for ex in train
    )


@pytest.mark.slow
def test_should_stop_cancels(base: str, tmp_path: Path) -> None:
    from openft.errors import JobCancelled

    rng = random.Random(2)
    train = [_example(i + 1, *_prompt(rng)) for i in range(12)]
    reporter = ListReporter(stop_after=2)
    with pytest.raises(JobCancelled):
        sft.run(_cfg(base, tmp_path / "out", n_epochs=3), train, reporter)
    assert len(reporter.steps) == 2 and reporter.checkpoints == []


@pytest.mark.slow
def test_vision_smoke_two_steps_make_a_loadable_checkpoint(base: str, tmp_path: Path) -> None:
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    train = []
    for i in range(4):
        name = sorted(colours)[i % 2]
        size = (112, 112) if i < 2 else (168, 84)
        msgs = (
            Message(
                "user",
                (
                    ImagePart(
                        url="data:", data=_png(colours[name], size), detail="low" if i == 3 else "auto"
                    ),
                    TextPart("colour?"),
                ),
            ),
            Message("assistant", (TextPart(name),)),
        )
        train.append(ChatExample(line=i + 1, messages=msgs))
    train.append(_example(5, "no image here?", "red"))  # mixed batch: text-only rows get zero token types
    reporter = ListReporter()
    result = sft.run(_cfg(base, tmp_path / "out", batch_size=3), train, reporter)
    assert result.steps == 2 and len(reporter.steps) == 2
    assert all(s["train_loss"] > 0 for s in reporter.steps)
    assert reporter.checkpoints[0]["weights_dir"] == result.weights_dir == tmp_path / "out" / "step-2"
    model, processor = load_model(base, result.weights_dir, device="cpu")
    r = render_chat(processor, train[0].messages[:1], add_generation_prompt=True)
    ids = torch.tensor([r.input_ids])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=r.vision["pixel_values"],
        image_grid_thw=r.vision["image_grid_thw"],
        mm_token_type_ids=r.vision["mm_token_type_ids"][None],
        max_new_tokens=3,
        do_sample=False,
    )
    assert out.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_lora_checkpoint_is_an_adapter_and_continues(base: str, tmp_path: Path) -> None:
    from openft.training.config import LoraConfig

    rng = random.Random(3)
    train = [_example(i + 1, *_prompt(rng)) for i in range(8)]
    lora = LoraConfig(r=4, alpha=8, modules_to_save=("embed_tokens", "lm_head"))
    first = sft.run(_cfg(base, tmp_path / "a", lora=lora), train, ListReporter())
    assert read_marker(first.weights_dir) == {"kind": "adapter", "base_model": base}
    assert (first.weights_dir / "adapter_config.json").exists() and not (
        first.weights_dir / "model.safetensors"
    ).exists()
    model, _ = load_model(base, first.weights_dir, device="cpu")
    assert type(model).__name__ == "PeftModel" and not model.training
    # Continue from it: as an adapter (LoRA) and folded into full weights (full fine-tuning).
    again = sft.run(
        _cfg(base, tmp_path / "b", lora=lora, init_weights=first.weights_dir), train, ListReporter()
    )
    assert read_marker(again.weights_dir)["kind"] == "adapter"
    full = sft.run(_cfg(base, tmp_path / "c", init_weights=first.weights_dir), train, ListReporter())
    assert read_marker(full.weights_dir)["kind"] == "full"
    load_model(base, full.weights_dir, device="cpu")


@pytest.mark.slow
def test_keeps_only_the_newest_checkpoints(base: str, tmp_path: Path) -> None:
    rng = random.Random(4)
    train = [_example(i + 1, *_prompt(rng)) for i in range(8)]
    reporter = ListReporter()
    result = sft.run(_cfg(base, tmp_path / "out", n_epochs=3, keep_checkpoints=2), train, reporter)
    assert [c["step"] for c in reporter.checkpoints] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["step-4", "step-6"]
    assert (
        result.weights_dir == tmp_path / "out" / "step-6"
        and result.trained_tokens == reporter.steps[-1]["trained_tokens"]
    )


# --- validation metrics, micro-batches, resumable state (issue 7), what trains (issue 5) ------------


def _weights(weights_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = (
        "adapter_model.safetensors"
        if (weights_dir / "adapter_model.safetensors").exists()
        else "model.safetensors"
    )
    return load_file(str(weights_dir / name))


def _assert_close_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


@pytest.mark.slow
def test_validation_metrics_on_a_fixed_sample_and_full_pass_each_epoch(base: str, tmp_path: Path) -> None:
    rng = random.Random(5)
    train = [_example(i + 1, *_prompt(rng)) for i in range(12)]
    valid = [_example(i + 1, *_prompt(rng)) for i in range(5)]
    reporter = ListReporter()
    sft.run(_cfg(base, tmp_path / "out", n_epochs=2, valid_every=2), train, reporter, valid_examples=valid)
    with_valid = [s["step"] for s in reporter.steps if "valid_loss" in s]
    with_full = [s["step"] for s in reporter.steps if "full_valid_loss" in s]
    assert with_valid == [2, 3, 4, 6]  # every 2 steps, and at each epoch end
    assert with_full == [3, 6]
    for s in reporter.steps:
        if "valid_loss" in s:
            assert s["valid_loss"] > 0 and 0 <= s["valid_mean_token_accuracy"] <= 1
    # 5 examples fit in the sample, so sample and full pass agree at epoch ends.
    end = reporter.steps[2]
    assert abs(end["valid_loss"] - end["full_valid_loss"]) < 1e-6
    assert reporter.steps[-1]["full_valid_loss"] < reporter.steps[2]["full_valid_loss"]  # it learns
    for c in reporter.checkpoints:
        assert {
            "valid_loss",
            "valid_mean_token_accuracy",
            "full_valid_loss",
            "full_valid_mean_token_accuracy",
        } <= set(c["metrics"])
    # Default cadence: ~10 evaluations per run, at least one per epoch.
    auto = ListReporter()
    sft.run(_cfg(base, tmp_path / "auto", n_epochs=1, batch_size=1), train, auto, valid_examples=valid[:2])
    assert [s["step"] for s in auto.steps if "valid_loss" in s] == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
def test_micro_batches_equal_the_full_batch(base: str, tmp_path: Path) -> None:
    rng = random.Random(6)
    train = [_example(i + 1, *_prompt(rng)) for i in range(8)]  # prompts of different lengths
    full, micro = ListReporter(), ListReporter()
    a = sft.run(_cfg(base, tmp_path / "a", n_epochs=2), train, full)
    b = sft.run(_cfg(base, tmp_path / "b", n_epochs=2, micro_batch_size=3), train, micro)
    for x, y in zip(full.steps, micro.steps, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5, (x, y)
        assert abs(x["train_mean_token_accuracy"] - y["train_mean_token_accuracy"]) < 1e-6
    _assert_close_weights(a.weights_dir, b.weights_dir, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_stop_then_resume_replays_the_uninterrupted_run(base: str, tmp_path: Path, kind: str) -> None:
    from openft.errors import JobCancelled
    from openft.training.config import LoraConfig

    rng = random.Random(7)
    train = [_example(i + 1, *_prompt(rng)) for i in range(12)]
    valid = [_example(i + 1, *_prompt(rng)) for i in range(3)]
    # LoRA with dropout: the resumed run must also restore the RNG to draw the same masks.
    extra = (
        {"lora": LoraConfig(r=4, alpha=8, dropout=0.1, modules_to_save=("lm_head",))}
        if kind == "lora"
        else {}
    )
    cfg = {"n_epochs": 2, "valid_every": 2, **extra}

    whole = ListReporter()
    want = sft.run(_cfg(base, tmp_path / "whole", **cfg), train, whole, valid_examples=valid)

    out = tmp_path / "paused"
    first = ListReporter(stop_after=4)  # mid-epoch 2 (an epoch is 3 steps)
    with pytest.raises(JobCancelled):
        sft.run(_cfg(base, out, **cfg), train, first, valid_examples=valid)
    assert (out / "state" / "state.json").exists() and (out / "step-3").is_dir()
    second = ListReporter()
    got = sft.run(_cfg(base, out, **cfg), train, second, valid_examples=valid, resume=True)

    assert [s["step"] for s in second.steps] == [5, 6]
    assert any("resumed at step 4 of 6" in m for _, m in second.messages)
    for x, y in zip(whole.steps, first.steps + second.steps, strict=True):
        for key in ("train_loss", "valid_loss", "full_valid_loss"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
        assert x["trained_tokens"] == y["trained_tokens"]
    assert got.steps == want.steps == 6 and got.trained_tokens == want.trained_tokens
    assert [c["step"] for c in second.checkpoints] == [6]
    assert sorted(p.name for p in out.iterdir()) == ["step-3", "step-6"]  # done: state removed
    _assert_close_weights(want.weights_dir, got.weights_dir, atol=1e-5)


@pytest.mark.slow
def test_crash_resumes_from_the_last_saved_state(base: str, tmp_path: Path) -> None:
    from openft.errors import JobCancelled

    class Crash(ListReporter):
        def on_step(self, metrics):
            if metrics["step"] == 3:
                raise RuntimeError("worker died")
            super().on_step(metrics)

    rng = random.Random(8)
    train = [_example(i + 1, *_prompt(rng)) for i in range(8)]
    whole = ListReporter()
    sft.run(_cfg(base, tmp_path / "whole", batch_size=2, state_every_steps=2), train, whole)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError):
        sft.run(_cfg(base, out, batch_size=2, state_every_steps=2), train, Crash())
    shutil.copytree(out / "state", tmp_path / "crashed-state")
    again = ListReporter()
    sft.run(_cfg(base, out, batch_size=2, state_every_steps=2), train, again, resume=True)
    assert [s["step"] for s in again.steps] == [3, 4]  # state of step 2; step 3 replays
    for x, y in zip(whole.steps[2:], again.steps, strict=True):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-5
    # State saved under other settings is not resumed: a warning, then a fresh start.
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "crashed-state", other / "state")
    changed = ListReporter(stop_after=1)
    with pytest.raises(JobCancelled):
        sft.run(_cfg(base, other, batch_size=2, learning_rate=5e-4), train, changed, resume=True)
    assert [s["step"] for s in changed.steps] == [1]
    assert any(level == "warn" and "starting from the beginning" in m for level, m in changed.messages)


@pytest.mark.slow
def test_a_crash_as_an_epoch_ends_keeps_the_epoch_and_its_checkpoint(base: str, tmp_path: Path) -> None:
    """Dying while the epoch's checkpoint is being recorded neither loses it nor retrains the epoch."""

    class DiesRecording(ListReporter):
        def on_checkpoint(self, weights_dir, *, step, epoch, metrics):
            raise RuntimeError("worker died")

    rng = random.Random(9)
    train = [_example(i + 1, *_prompt(rng)) for i in range(8)]
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        sft.run(_cfg(base, out, n_epochs=2), train, DiesRecording())
    again = ListReporter()
    sft.run(_cfg(base, out, n_epochs=2), train, again, resume=True)
    assert any("resumed at step 2 of 4" in m for _, m in again.messages)
    assert [c["step"] for c in again.checkpoints] == [2, 4]  # epoch 1's checkpoint recorded after all
    assert [s["step"] for s in again.steps] == [3, 4]


def _two_colour_pictures() -> list[ChatExample]:
    """Four tiny examples: a red or a blue picture, answered with its colour."""
    return [
        ChatExample(
            line=i + 1,
            messages=(
                Message("user", (ImagePart(url="data:", data=_png(c, (56, 56))), TextPart("colour?"))),
                Message("assistant", (TextPart(name),)),
            ),
        )
        for i, (name, c) in enumerate([("red", (220, 20, 20)), ("blue", (20, 20, 220))] * 2)
    ]


@pytest.mark.slow
def test_full_fine_tuning_freezes_the_vision_tower_unless_asked(base: str, tmp_path: Path) -> None:
    train = _two_colour_pictures()
    before = _weights(Path(base))
    frozen_rep = ListReporter()
    frozen = _weights(sft.run(_cfg(base, tmp_path / "a", batch_size=2), train, frozen_rep).weights_dir)
    thawed = _weights(
        sft.run(
            _cfg(base, tmp_path / "b", batch_size=2, train_vision_tower=True), train, ListReporter()
        ).weights_dir
    )

    def changed(w: dict[str, torch.Tensor], key: str) -> bool:
        return not torch.equal(w[key], before[key])

    # Saved files use Qwen2-VL's on-disk key layout (``visual.*``, ``model.layers.*``).
    tower, merger, lm = (
        "visual.blocks.0.attn.qkv.weight",
        "visual.merger.mlp.0.weight",
        "model.layers.0.self_attn.q_proj.weight",
    )
    assert (changed(frozen, tower), changed(frozen, merger), changed(frozen, lm)) == (False, True, True)
    assert (changed(thawed, tower), changed(thawed, merger), changed(thawed, lm)) == (True, True, True)
    assert any("trainable parameters (full fine-tuning)" in m for _, m in frozen_rep.messages)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(base: str, tmp_path: Path) -> None:
    from openft.training.config import LoraConfig

    train = _two_colour_pictures()
    # LoRA on language model and vision tower, projector in full: every trainable kind at once.
    cfg = {
        "batch_size": 2,
        "lora": LoraConfig(r=4, alpha=8),
        "train_vision_tower": True,
        "train_projector": True,
    }
    plain, ckpt = ListReporter(), ListReporter()
    sft.run(_cfg(base, tmp_path / "a", **cfg), train, plain)
    sft.run(_cfg(base, tmp_path / "b", gradient_checkpointing=True, **cfg), train, ckpt)
    assert [s["train_loss"] for s in plain.steps] == pytest.approx(
        [s["train_loss"] for s in ckpt.steps], abs=1e-6
    )
    assert any("gradient checkpointing" in m for _, m in ckpt.messages)
    assert any("vision tower" in m and "LoRA" in m for _, m in ckpt.messages)


@pytest.mark.slow
def test_packing_labelled_logits_and_prefetch_give_the_losses_of_the_plain_loop(
    base: str, tmp_path: Path
) -> None:
    """The efficient loop (packed rows, lm_head on labelled positions only, background collation)
    against padding + full-vocabulary logits + inline collation: the same per-step losses,
    validation losses and accuracies, over two epochs of updates."""
    rng = random.Random(11)
    train = [_example(i + 1, *_prompt(rng)) for i in range(16)]
    valid = [_example(i + 1, *_prompt(rng)) for i in range(6)]
    fast, plain = ListReporter(), ListReporter()
    sft.run(_cfg(base, tmp_path / "fast", n_epochs=2, packing=True), train, fast, valid_examples=valid)
    sft.run(
        _cfg(base, tmp_path / "plain", n_epochs=2, packing=False, labelled_logits=False, prefetch=False),
        train,
        plain,
        valid_examples=valid,
    )
    assert len(fast.steps) == len(plain.steps) == 8
    for key in ("train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy"):
        got = [s[key] for s in fast.steps if key in s]
        want = [s[key] for s in plain.steps if key in s]
        assert got and got == pytest.approx(want, abs=1e-4), key
    assert fast.steps[-1]["train_loss"] < fast.steps[0]["train_loss"]
    assert any("packed" in m for _, m in fast.messages)
    assert not any("packed" in m for _, m in plain.messages)


@pytest.mark.slow
def test_chunked_loss_gives_the_per_step_losses_of_plain_logits(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``loss_kernel`` 'chunked' (what 'auto' picks on CPU: no (n, V) logits) against 'plain', full
    fine-tuning so the lm_head trains through the chunked backward: the same per-step losses, accuracies and validation losses."""
    # 8 rows a chunk at the tiny model's 2,048-token vocabulary: its batches would otherwise fit
    # one default chunk, which takes the plain one-chunk path instead of the chunked Function.
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 8 * 2048)
    rng = random.Random(12)
    train = [_example(i + 1, *_prompt(rng)) for i in range(12)]
    valid = [_example(i + 1, *_prompt(rng)) for i in range(4)]
    runs = {}
    for kernel in ("chunked", "plain"):
        reporter = ListReporter()
        sft.run(
            _cfg(base, tmp_path / kernel, n_epochs=2, loss_kernel=kernel),
            train,
            reporter,
            valid_examples=valid,
        )
        runs[kernel] = reporter
    chunked, plain = runs["chunked"].steps, runs["plain"].steps
    assert len(chunked) == len(plain) == 6
    for key in ("train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy"):
        got = [s[key] for s in chunked if key in s]
        assert got and got == pytest.approx([s[key] for s in plain if key in s], rel=1e-5), key
    assert chunked[-1]["train_loss"] < chunked[0]["train_loss"]
    assert any("chunked linear cross-entropy" in m for _, m in runs["chunked"].messages)
    assert any("chunked loss" in m for _, m in runs["chunked"].messages)  # the training-plan line
