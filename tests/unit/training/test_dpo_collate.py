from __future__ import annotations

import pytest
import torch

from openft.models.render import IGNORE_INDEX, Rendered
from openft.training.collate import collate_preference

P = IGNORE_INDEX


def test_chosen_rows_first_then_rejected_in_one_padded_batch() -> None:
    # Two pairs sharing their prompts ([1, 2] and [1]); replies end with end-of-turn 9.
    chosen = [Rendered([1, 2, 5, 9], [P, P, 5, 9]), Rendered([1, 6, 6, 6, 9], [P, 6, 6, 6, 9])]
    rejected = [Rendered([1, 2, 7, 9], [P, P, 7, 9]), Rendered([1, 8, 9], [P, 8, 9])]
    batch = collate_preference(chosen, rejected, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (4, 5)
    assert batch["input_ids"].tolist() == [[1, 2, 5, 9, 0], [1, 6, 6, 6, 9], [1, 2, 7, 9, 0], [1, 8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[P, P, 5, 9, P], [P, 6, 6, 6, 9], [P, P, 7, 9, P], [P, 8, 9, P, P]]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 4, 3]


def test_image_prompt_pixels_repeat_once_per_side() -> None:
    def vision(types: list[int]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.ones(4, 3),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
            "mm_token_type_ids": torch.tensor(types),
        }

    chosen = [Rendered([9, 5, 7], [P, 5, 7], vision=vision([1, 0, 0]), n_image_tokens=1)]
    rejected = [Rendered([9, 6, 6, 7], [P, 6, 6, 7], vision=vision([1, 0, 0, 0]), n_image_tokens=1)]
    batch = collate_preference(chosen, rejected, pad_id=0)
    assert batch["pixel_values"].shape == (8, 3)
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0]]


def test_mismatched_sides_are_a_bug() -> None:
    with pytest.raises(ValueError):
        collate_preference([Rendered([1], [1])], [], pad_id=0)
