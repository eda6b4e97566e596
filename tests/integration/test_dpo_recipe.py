"""End-to-end DPO on CPU with the tiny VLM: SFT first, then DPO moves the model to the preferred style."""

from __future__ import annotations

import io
import math
import random
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import openft.training.loss as loss_module
from openft.datasets.formats import ChatExample, ImagePart, Message, PreferenceExample, TextPart
from openft.errors import JobCancelled
from openft.models.loader import load_model, read_marker, resolve_base
from openft.models.render import render_chat
from openft.training.config import LoraConfig
from openft.training.recipes import dpo, sft
from openft.training.reporter import ListReporter
from tests.integration.test_sft_recipe import _cfg

# The task: name the animal fixed for the one colour word hidden among filler words. Two styles
# answer it: lowercase ("cat") and UPPERCASE ("CAT"). SFT sees both styles equally often, so it
# learns the task but not a style; DPO then prefers UPPERCASE over the same answer in lowercase.
KEYS = {"red": "cat", "green": "dog", "blue": "bird", "yellow": "fish"}
FILLER = "the a of to and in is it you that he was for on are with as his they be at one have this".split()
N_SFT, SFT_EPOCHS, SFT_LR = 160, 4, 1e-3
N_DPO, DPO_EPOCHS, DPO_LR, BETA = 64, 2, 3e-4, 0.1
BATCH = 8


def _prompt(rng: random.Random) -> tuple[str, str]:
    colour = rng.choice(sorted(KEYS))
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), colour)
    return " ".join(words) + "?", KEYS[colour]


def _user(text: str) -> Message:
    return Message("user", (TextPart(text),))


def _reply(text: str) -> Message:
    return Message("assistant", (TextPart(text),), weight=1)


def _pair(line: int, prompt: str, answer: str) -> PreferenceExample:
    return PreferenceExample(
        line=line, prompt=(_user(prompt),), preferred=_reply(answer.upper()), non_preferred=_reply(answer)
    )


def _generate(model, processor, prompt: str) -> str:
    r = render_chat(processor, [_user(prompt)], add_generation_prompt=True)
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False
        )
    return processor.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _styles(base: str, weights: Path, held_out: list[tuple[str, str]]) -> tuple[int, int]:
    """(UPPERCASE right answers, lowercase right answers) among greedy replies to held-out prompts."""
    model, processor = load_model(base, weights, device="cpu")
    answers = [_generate(model, processor, p) for p, _ in held_out]
    upper = sum(a == want.upper() for a, (_, want) in zip(answers, held_out, strict=True))
    lower = sum(a == want for a, (_, want) in zip(answers, held_out, strict=True))
    return upper, lower


@pytest.fixture(scope="module")
def base() -> str:
    from tests.conftest import model_cache

    return resolve_base("openft-tiny-vlm", model_cache())


@pytest.mark.slow  # trains SFT then DPO to a measurable preference (minutes on 2 cores)
def test_sft_then_dpo_makes_the_preferred_style_win(base: str, tmp_path: Path) -> None:
    rng = random.Random(0)
    sft_data = []
    for i in range(N_SFT):
        prompt, answer = _prompt(rng)
        style = answer.upper() if i % 2 else answer
        sft_data.append(ChatExample(line=i + 1, messages=(_user(prompt), _reply(style))))
    train = [_pair(i + 1, *_prompt(rng)) for i in range(N_DPO)]
    valid = [_pair(i + 1, *_prompt(rng)) for i in range(16)]
    held_out = [_prompt(rng) for _ in range(40)]

    start = time.perf_counter()
    sft_result = sft.run(
        _cfg(base, tmp_path / "sft", n_epochs=SFT_EPOCHS, batch_size=BATCH, learning_rate=SFT_LR),
        sft_data,
        ListReporter(),
    )
    sft_s = time.perf_counter() - start
    reporter = ListReporter()
    start = time.perf_counter()
    result = dpo.run(
        _cfg(
            base,
            tmp_path / "dpo",
            n_epochs=DPO_EPOCHS,
            batch_size=BATCH,
            learning_rate=DPO_LR,
            init_weights=sft_result.weights_dir,
        ),
        train,
        reporter,
        beta=BETA,
        valid_examples=valid,
    )
    dpo_s = time.perf_counter() - start

    steps = reporter.steps
    assert result.steps == len(steps) == math.ceil(N_DPO / BATCH) * DPO_EPOCHS
    assert [c["epoch"] for c in reporter.checkpoints] == list(range(1, DPO_EPOCHS + 1))
    assert read_marker(result.weights_dir) == {"kind": "full", "base_model": base}
    # The reference is the SFT model itself: the first step starts exactly at log 2.
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    first_acc = sum(s["reward_accuracy"] for s in steps[:2]) / 2
    last_acc = sum(s["reward_accuracy"] for s in steps[-4:]) / 4
    assert last_acc > first_acc and last_acc >= 0.9, (first_acc, last_acc)
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert steps[-1]["full_valid_reward_accuracy"] >= 0.9 and steps[-1]["full_valid_reward_margin"] > 0

    before = _styles(base, sft_result.weights_dir, held_out)
    after = _styles(base, result.weights_dir, held_out)
    print(
        f"sft {sft_s:.1f}s, dpo {dpo_s:.1f}s ({len(steps)} steps); held-out UPPER/lower before DPO "
        f"{before}, after {after} of {len(held_out)}; reward_accuracy {first_acc:.2f} -> {last_acc:.2f}, "
        f"full_valid_reward_accuracy {steps[-1]['full_valid_reward_accuracy']:.2f}"
    )
    assert after[0] >= 0.8 * len(held_out), (before, after)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (112, 112), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_lora_with_image_prompts_reports_every_metric_and_writes_adapter_checkpoints(
    base: str, tmp_path: Path
) -> None:
    colours = {"red": (220, 20, 20), "blue": (20, 20, 220)}
    pairs = []
    for i in range(6):
        name = sorted(colours)[i % 2]
        prompt = Message("user", (ImagePart(url="data:", data=_png(colours[name])), TextPart("colour?")))
        other = "blue" if name == "red" else "red"
        pairs.append(
            PreferenceExample(
                line=i + 1, prompt=(prompt,), preferred=_reply(name), non_preferred=_reply(other)
            )
        )
    rng = random.Random(5)
    pairs += [_pair(7 + i, *_prompt(rng)) for i in range(2)]  # mixed batches: text-only rows too
    lora = LoraConfig(r=4, alpha=8, modules_to_save=("embed_tokens", "lm_head"))
    reporter = ListReporter()
    result = dpo.run(
        _cfg(base, tmp_path / "out", n_epochs=2, lora=lora, valid_every=1),
        pairs,
        reporter,
        beta=0.1,
        valid_examples=pairs[:3],
    )
    assert result.steps == 4 and [c["step"] for c in reporter.checkpoints] == [2, 4]
    train_keys = {
        "step", "total_steps", "epoch", "trained_tokens", "train_loss", "train_mean_token_accuracy",
        "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
    }  # fmt: skip
    valid_keys = {"valid_loss", "valid_mean_token_accuracy", "valid_reward_accuracy", "valid_reward_margin"}
    full_keys = {"full_" + k for k in valid_keys}
    assert set(reporter.steps[0]) == train_keys | valid_keys
    assert set(reporter.steps[1]) == train_keys | valid_keys | full_keys  # epoch end
    assert reporter.steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)  # fresh LoRA = reference
    processor = load_model(base, device="cpu")[1]
    per_epoch = sum(
        len(render_chat(processor, (*p.prompt, reply)).input_ids)
        for p in pairs
        for reply in (p.preferred, p.non_preferred)
    )
    assert reporter.steps[-1]["trained_tokens"] == 2 * per_epoch
    assert read_marker(result.weights_dir) == {"kind": "adapter", "base_model": base}
    model, processor = load_model(base, result.weights_dir, device="cpu")
    assert type(model).__name__ == "PeftModel"


@pytest.mark.slow
def test_micro_batches_match_the_full_batch_and_same_seed_same_losses(base: str, tmp_path: Path) -> None:
    rng = random.Random(6)
    pairs = [_pair(i + 1, *_prompt(rng)) for i in range(8)]
    runs = {}
    for name, micro in (("a", None), ("b", None), ("micro", 2)):
        reporter = ListReporter()
        dpo.run(_cfg(base, tmp_path / name, n_epochs=2, micro_batch_size=micro), pairs, reporter, beta=0.1)
        runs[name] = [s["train_loss"] for s in reporter.steps]
    assert runs["a"] == runs["b"]
    assert runs["micro"] == pytest.approx(runs["a"], abs=1e-4)


@pytest.mark.slow
def test_should_stop_cancels(base: str, tmp_path: Path) -> None:
    rng = random.Random(7)
    pairs = [_pair(i + 1, *_prompt(rng)) for i in range(12)]
    reporter = ListReporter(stop_after=2)
    with pytest.raises(JobCancelled):
        dpo.run(_cfg(base, tmp_path / "out", n_epochs=3), pairs, reporter, beta=0.1)
    assert len(reporter.steps) == 2 and reporter.checkpoints == []


@pytest.mark.slow
def test_labelled_only_logits_give_the_losses_of_full_logits(base: str, tmp_path: Path) -> None:
    rng = random.Random(16)
    pairs = [_pair(i + 1, *_prompt(rng)) for i in range(8)]
    runs = {}
    for name, labelled in (("labelled", True), ("full", False)):
        reporter = ListReporter()
        dpo.run(_cfg(base, tmp_path / name, n_epochs=2, labelled_logits=labelled), pairs, reporter, beta=0.1)
        runs[name] = reporter.steps
    for key in ("train_loss", "train_mean_token_accuracy", "reward_margin"):
        assert [s[key] for s in runs["labelled"]] == pytest.approx([s[key] for s in runs["full"]], abs=1e-4)
    assert runs["labelled"][-1]["train_loss"] != runs["labelled"][0]["train_loss"]  # it trained


@pytest.mark.slow
def test_chunked_loss_gives_the_losses_of_plain_logits(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DPO's summed reply log-probs from the chunked loss (full fine-tuning: the lm_head
    trains through the chunked backward; precomputed reference) against plain logits."""
    # 8 rows a chunk at the tiny model's 2,048-token vocabulary: its batches would otherwise fit
    # one default chunk, which takes the plain one-chunk path instead of the chunked Function.
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 8 * 2048)
    rng = random.Random(17)
    pairs = [_pair(i + 1, *_prompt(rng)) for i in range(8)]
    runs = {}
    for kernel in ("chunked", "plain"):
        reporter = ListReporter()
        dpo.run(_cfg(base, tmp_path / kernel, n_epochs=2, loss_kernel=kernel), pairs, reporter, beta=0.1)
        runs[kernel] = reporter.steps
    for key in ("train_loss", "train_mean_token_accuracy", "reward_margin"):
        got, want = [s[key] for s in runs["chunked"]], [s[key] for s in runs["plain"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key
    assert runs["chunked"][-1]["train_loss"] != runs["chunked"][0]["train_loss"]  # it trained
