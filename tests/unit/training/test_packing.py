"""Padding-free packing and labelled-only logits: the same numbers as padding and full logits.

Tiny random models built here (a Llama and a Qwen2-VL text stack): packed rows must give every
example exactly the logits it gets alone in a padded batch (no attention across examples), and
the labelled-only ``lm_head`` must give the same loss and gradients as full-vocabulary logits.
"""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from openft.models.render import IGNORE_INDEX, Rendered
from openft.training.collate import collate_packed, collate_sft, prefetched
from openft.training.config import TrainConfig
from openft.training.loss import predicting_positions, sft_loss, shifted_targets, token_loss
from openft.training.setup import Feeder, attention_for, packing_for, wants_packing

VOCAB = 64


_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""The text stack every model here shares."""


def _mrope_text(**rope: object) -> dict[str, object]:
    """``_TEXT`` with M-RoPE over 8-wide heads (sections 2 + 1 + 1 = head_dim / 2)."""
    rope_parameters = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1], **rope}
    return {**_TEXT, "rope_parameters": rope_parameters}


_VISION = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
"""Qwen2.5-VL's and Qwen3-VL's one-block vision tower."""


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**_TEXT, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def _qwen2_vl() -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=_mrope_text(),
        vision_config={"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 32},
        attn_implementation="sdpa",
    )
    return Qwen2VLForConditionalGeneration(config).eval()


def _qwen2_5_vl() -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=_mrope_text(),
        vision_config=_VISION,
        attn_implementation="sdpa",
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen3_vl() -> Qwen3VLForConditionalGeneration:
    """Interleaved M-RoPE; its text model reads a 4-row position tensor's first row as text positions."""
    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config={**_mrope_text(mrope_interleaved=True), "head_dim": 8},
        vision_config={**_VISION, "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
        attn_implementation="sdpa",
    )
    return Qwen3VLForConditionalGeneration(config).eval()


BUILDS = [_llama, _qwen2_vl, _qwen2_5_vl, _qwen3_vl]
BUILD_IDS = ["llama", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"]


def _items() -> list[Rendered]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n, prompt in ((7, 3), (12, 5), (4, 2)):
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append(Rendered(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def _feeder(*, packing: bool, mrope: bool = False, labelled: bool = True) -> Feeder:
    return Feeder(
        device=torch.device("cpu"),
        pad_id=0,
        packing=packing,
        mrope=mrope,
        labelled_logits=labelled,
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )


def test_packed_collate_restarts_positions_and_drops_each_first_label() -> None:
    a = Rendered(input_ids=[5, 6, 7], labels=[5, 6, 7])
    b = Rendered(input_ids=[8, 9], labels=[8, IGNORE_INDEX])
    batch = collate_packed([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # b's first token would be "predicted" by a's last one: never a target.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]]
    assert "attention_mask" not in batch
    assert collate_packed([a, b], mrope=True)["position_ids"].shape == (4, 1, 5)
    with pytest.raises(ValueError, match="text-only"):
        collate_packed([Rendered(input_ids=[1], labels=[1], vision={"pixel_values": torch.ones(1)})])


@pytest.mark.parametrize("build", BUILDS, ids=BUILD_IDS)
def test_packed_rows_see_only_their_own_example(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    items = _items()
    mrope = packing_for(model) == "mrope"
    assert packing_for(model) == ("1d" if build is _llama else "mrope")
    padded = collate_sft(items, pad_id=0)
    packed = collate_packed(items, mrope=mrope)
    with torch.no_grad():
        want = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        # use_cache=False: with a cache transformers does not read packed position ids as boundaries.
        got = model(**{k: packed[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits[0]
    start = 0
    for row, r in enumerate(items):
        n = len(r.input_ids)
        torch.testing.assert_close(got[start : start + n], want[row, :n], atol=1e-5, rtol=1e-4)
        start += n


@pytest.mark.parametrize("build", BUILDS, ids=BUILD_IDS)
def test_packing_and_labelled_logits_give_the_loss_and_gradients_of_padded_full_logits(build) -> None:  # type: ignore[no-untyped-def]
    model = build().train()
    items = _items()
    mrope = packing_for(model) == "mrope"
    results = {}
    for name, feeder in {
        "padded-full": _feeder(packing=False, labelled=False),
        "padded-labelled": _feeder(packing=False),
        "packed-labelled": _feeder(packing=True, mrope=mrope),
        "packed-full": _feeder(packing=True, mrope=mrope, labelled=False),
    }.items():
        model.zero_grad(set_to_none=True)
        scores = feeder.forward(model, feeder.collate(items))
        loss, accuracy = token_loss(scores.logits, scores.targets)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.item(), accuracy.item(), grads, scores.logits.shape)
    # The reference: the original full-logits loss on the padded batch.
    padded = collate_sft(items, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference = sft_loss(logits, padded["labels"])[0].item()
    n_targets = sum(1 for r in items for t in r.labels[1:] if t != IGNORE_INDEX)
    base_loss, base_acc, base_grads, _ = results["padded-full"]
    assert base_loss == pytest.approx(reference, abs=1e-6)
    for name, (loss, acc, grads, shape) in results.items():
        assert shape == (n_targets, VOCAB), name  # one logit row per labelled token, never per position
        assert loss == pytest.approx(base_loss, abs=1e-5), name
        assert acc == base_acc, name
        assert grads.keys() == base_grads.keys(), name
        for k, g in grads.items():
            torch.testing.assert_close(g, base_grads[k], atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


def test_image_batches_fall_back_to_padding() -> None:
    feeder = _feeder(packing=True, mrope=True)
    vision = {"pixel_values": torch.ones(4, 3), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    items = [*_items()[:1], Rendered(input_ids=[1, 2, 3], labels=[1, 2, 3], vision=vision)]
    assert "attention_mask" in feeder.collate(items)
    assert "position_ids" in feeder.collate(_items())


def test_predicting_positions_and_targets_line_up() -> None:
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]])
    keep = predicting_positions(labels)
    assert keep.tolist() == [[False, True, True, False], [True, False, False, False]]
    targets, rows = shifted_targets(labels, keep)
    assert targets.tolist() == [7, 8, 9] and rows.tolist() == [0, 0, 1]


def test_prefetched_keeps_order_runs_ahead_on_another_thread_and_stops_cleanly() -> None:
    threads = set()

    def work(x: int) -> int:
        threads.add(threading.current_thread().name)
        return x * x

    assert list(prefetched(work, range(10), ahead=2)) == [x * x for x in range(10)]
    assert all(t.startswith("openft-collate") for t in threads)
    assert list(prefetched(work, range(5), ahead=0)) == [0, 1, 4, 9, 16]
    it = prefetched(work, range(1000), ahead=3)
    assert next(it) == 0
    it.close()  # a stop mid-epoch: pending work is dropped, nothing hangs
    assert not any(t.name.startswith("openft-collate") and t.is_alive() for t in threading.enumerate())


def test_packing_defaults_to_on_only_with_flash_attention(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = TrainConfig(
        base_model="b", output_dir=tmp_path, n_epochs=1, batch_size=2, learning_rate=1e-3, seed=0
    )
    assert attention_for(cfg, torch.device("cpu")) == "sdpa"
    assert not wants_packing(cfg, "sdpa") and wants_packing(cfg, "flash_attention_2")
    forced = TrainConfig(**{**cfg.__dict__, "packing": True, "attn_implementation": "eager"})
    assert attention_for(forced, torch.device("cpu")) == "eager" and wants_packing(forced, "eager")
    assert not wants_packing(TrainConfig(**{**cfg.__dict__, "packing": False}), "flash_attention_2")
