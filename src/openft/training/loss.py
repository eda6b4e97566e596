"""Training losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over label tokens, and the fraction of them predicted exactly (argmax).

    ``logits`` (B, T, V) at position t predict token t+1, so labels are shifted left by one.
    Returns ``(loss, accuracy)``; with no label tokens the loss is 0 (still differentiable) and
    accuracy is 0.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    n = mask.sum()
    if n == 0:
        return shift_logits.sum() * 0.0, torch.zeros((), device=logits.device)
    loss = (
        F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        / n
    )
    with torch.no_grad():
        correct = (shift_logits.argmax(-1) == shift_labels) & mask
        accuracy = correct.sum().float() / n
    return loss, accuracy
