from __future__ import annotations

import random

import torch

from openft.models.render import IGNORE_INDEX, Rendered
from openft.training.collate import collate_sft, length_grouped_batches


def test_right_pads_ids_mask_and_labels() -> None:
    a = Rendered(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7])
    b = Rendered(input_ids=[8], labels=[IGNORE_INDEX])
    batch = collate_sft([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX] * 3]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_vision_tensors_concatenate_and_token_types_pad() -> None:
    def vis(n_patches: int, grid: list[int], types: list[int]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.ones(n_patches, 4),
            "image_grid_thw": torch.tensor([grid]),
            "mm_token_type_ids": torch.tensor(types),
        }

    a = Rendered(
        input_ids=[1, 9, 2], labels=[IGNORE_INDEX] * 3, vision=vis(4, [1, 2, 2], [0, 1, 0]), n_image_tokens=1
    )
    text_only = Rendered(input_ids=[1, 2, 3, 4], labels=[1, 2, 3, 4])
    c = Rendered(
        input_ids=[9, 9], labels=[IGNORE_INDEX] * 2, vision=vis(8, [1, 2, 4], [1, 1]), n_image_tokens=2
    )
    batch = collate_sft([a, text_only, c], pad_id=0)
    assert batch["pixel_values"].shape == (12, 4)
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4]]
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]


def test_length_grouped_batches_cover_every_index_once_and_group_lengths() -> None:
    lengths = [random.Random(i).randint(1, 500) for i in range(100)]
    batches = length_grouped_batches(lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert len(batches) == 13 and all(len(b) <= 8 for b in batches)
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spread) / len(spread) < 100  # random batches would spread ~400
    assert batches == length_grouped_batches(lengths, 8, random.Random(0))
    assert batches != length_grouped_batches(lengths, 8, random.Random(1))


def test_token_type_ids_are_padded_under_the_key_the_items_carry() -> None:
    """Gemma 3 takes ``token_type_ids`` (its bidirectional image attention reads them): they are
    padded per row like ``mm_token_type_ids``, not concatenated like pixels, and no
    ``mm_token_type_ids`` (which Gemma 3 would silently ignore) is invented."""
    a = Rendered(
        input_ids=[1, 9, 9, 2],
        labels=[IGNORE_INDEX] * 4,
        vision={"pixel_values": torch.ones(1, 3, 4, 4), "token_type_ids": torch.tensor([0, 1, 1, 0])},
        n_image_tokens=2,
    )
    text_only = Rendered(input_ids=[1, 2], labels=[1, 2])
    batch = collate_sft([a, text_only], pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "token_type_ids"}
    assert batch["token_type_ids"].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert batch["pixel_values"].shape == (1, 3, 4, 4)
