from __future__ import annotations

import math

import torch

from openft.training.loss import IGNORE_INDEX, sft_loss


def test_mean_ce_over_label_tokens_only() -> None:
    # Position t predicts label t+1. Vocab 3; two label tokens (positions 2 and 3).
    logits = torch.tensor([[[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 1]])
    loss, acc = sft_loss(logits, labels)
    p0 = math.exp(5) / (math.exp(5) + 2)  # logits[1] -> label 0, correct
    p1 = 1 / (math.exp(5) + 2)  # logits[2] -> label 1, wrong (argmax is 2)
    assert math.isclose(loss.item(), -(math.log(p0) + math.log(p1)) / 2, rel_tol=1e-5)
    assert acc.item() == 0.5


def test_padding_and_batch_mean_is_per_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor(
        [[IGNORE_INDEX, 1, 2, 3, IGNORE_INDEX], [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    )
    loss, _ = sft_loss(logits, labels)
    pairs = [(0, 0, 1), (0, 1, 2), (0, 2, 3), (1, 0, 4)]
    want = sum(-torch.log_softmax(logits[b, t], -1)[y] for b, t, y in pairs) / len(pairs)
    assert torch.allclose(loss, want)


def test_no_label_tokens_gives_zero_but_differentiable() -> None:
    logits = torch.randn(1, 4, 3, requires_grad=True)
    loss, acc = sft_loss(logits, torch.full((1, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0
