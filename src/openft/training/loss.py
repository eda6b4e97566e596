"""Training losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openft.models.render import IGNORE_INDEX


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions whose logits predict a labelled token (position t predicts label
    t+1; the last position predicts nothing). As transformers' boolean ``logits_to_keep`` it makes
    the model run its ``lm_head`` on these hidden states only, giving ``(n, V)`` logits in
    row-major order, the order :func:`shifted_targets` lists the targets in."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def shifted_targets(labels: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, rows)`` for the ``(n, V)`` logits at ``keep``: the token each predicts, and its row."""
    targets = labels[:, 1:][keep[:, :-1]]
    rows = keep.nonzero()[:, 0]
    return targets, rows


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``(n, V)`` logits (one per labelled token) against ``targets``, and the
    fraction predicted exactly (argmax); a loss of 0 (still differentiable) when ``n == 0``."""
    if targets.numel() == 0:
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    loss = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():
        accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, accuracy


def row_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Summed log-probability of each row's targets from ``(n, V)`` labelled-only logits: ``(n_rows,)``
    float32, 0 for a row without any. ``gather - logsumexp``, as in :func:`sequence_logprobs`."""
    flat = logits.float()
    token_logps = flat.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(flat, dim=-1)
    return torch.zeros(n_rows, device=logits.device, dtype=torch.float32).index_add(0, rows, token_logps)


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


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's label tokens: ``(B,)`` float32, 0 for a row without any.

    Same shift as :func:`sft_loss` (position t predicts token t+1). ``gather - logsumexp`` instead of
    a full ``log_softmax``: autograd then keeps only the logits, not a second (B, T, V) tensor.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    picked = shift_logits.gather(-1, shift_labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(shift_logits, dim=-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023) on summed response log-probs, one value per pair.

    The implicit reward of a reply is ``beta * (log pi(reply) - log ref(reply))``; the loss is
    ``-logsigmoid(reward_chosen - reward_rejected)`` averaged over pairs. Returns ``(loss,
    rewards_chosen, rewards_rejected)``; the rewards are detached, for metrics only.
    """
    rewards_chosen = beta * (policy_chosen - ref_chosen)
    rewards_rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()
    return loss, rewards_chosen.detach(), rewards_rejected.detach()


def dpo_metrics(rewards_chosen: torch.Tensor, rewards_rejected: torch.Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, their margin, and the fraction of pairs whose chosen
    reply out-scores the rejected one (a tie counts as wrong: a fresh policy starts at 0)."""
    margin = rewards_chosen.float() - rewards_rejected.float()
    values = torch.stack(
        [
            rewards_chosen.float().mean(),
            rewards_rejected.float().mean(),
            margin.mean(),
            (margin > 0).float().mean(),
        ]
    ).tolist()  # one host sync for all four
    return dict(
        zip(("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"), values, strict=True)
    )
