from __future__ import annotations

import math

import pytest
import torch

from openft.models.render import IGNORE_INDEX
from openft.training.loss import dpo_loss, dpo_metrics, sequence_logprobs


def test_dpo_loss_matches_a_hand_computed_value() -> None:
    # beta=0.1, pi_c=-1, ref_c=-2, pi_r=-3, ref_r=-2:
    #   reward_chosen   = 0.1 * (-1 - -2) =  0.1
    #   reward_rejected = 0.1 * (-3 - -2) = -0.1
    #   loss = -log(sigmoid(0.1 - -0.1)) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    loss, rc, rr = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1
    )
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-6)
    assert rc.tolist() == pytest.approx([0.1]) and rr.tolist() == pytest.approx([-0.1])


def test_dpo_loss_is_log2_when_policy_equals_reference_and_means_over_pairs() -> None:
    same = torch.tensor([-4.0, -7.0])
    loss, rc, rr = dpo_loss(same, same, same, same, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2))
    assert rc.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]
    # Two pairs with margins 0.2 and -0.2: the mean of the two per-pair losses.
    loss, _, _ = dpo_loss(
        torch.tensor([-1.0, -3.0]),
        torch.tensor([-3.0, -1.0]),
        torch.full((2,), -2.0),
        torch.full((2,), -2.0),
        0.1,
    )
    expected = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(0.2))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down_and_rewards_are_detached() -> None:
    pc, pr = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    loss, rc, rr = dpo_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending the loss raises log pi(chosen)
    assert pc.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(-0) = -0.1 * 0.5
    assert not rc.requires_grad and not rr.requires_grad


def test_reward_metrics() -> None:
    rc = torch.tensor([0.3, 0.1, -0.2, 0.0])
    rr = torch.tensor([0.1, 0.2, -0.4, 0.0])  # margins 0.2, -0.1, 0.2, 0 (a tie is not a win)
    m = dpo_metrics(rc, rr)
    assert m["rewards_chosen"] == pytest.approx(0.05)
    assert m["rewards_rejected"] == pytest.approx(-0.025)
    assert m["reward_margin"] == pytest.approx(0.075)
    assert m["reward_accuracy"] == pytest.approx(0.5)


def test_sequence_logprobs_sums_label_tokens_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]])
    logp = torch.log_softmax(logits, -1)
    # Position t predicts token t+1: row 0 scores tokens 3 (from t=1) and 1 (from t=2); row 1 token 2 (t=0).
    expected = [logp[0, 1, 3] + logp[0, 2, 1], logp[1, 0, 2]]
    assert sequence_logprobs(logits, labels).tolist() == pytest.approx([e.item() for e in expected], abs=1e-6)
    assert sequence_logprobs(logits[:1], torch.full((1, 4), IGNORE_INDEX)).tolist() == [0.0]
