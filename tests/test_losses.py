"""MPO terms against worked numbers. softplus(x) = log(1 + e^x) = -log σ(-x)."""

import math

import pytest
import torch

from rlhf.losses import (
    MPO_LOSS_TYPES,
    MPO_LOSS_WEIGHTS,
    generation_loss,
    implicit_rewards,
    mpo_losses,
    preference_loss,
    quality_loss,
    update_running_mean,
)

CHOSEN = torch.tensor([0.5, -0.2], dtype=torch.float64)
REJECTED = torch.tensor([0.1, 0.3], dtype=torch.float64)


def test_implicit_rewards():
    # beta * (logp - ref): 0.1 * (-10 - -12) = 0.2 ; 0.1 * (-5 - -4) = -0.1
    r = implicit_rewards(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -4.0]), 0.1)
    assert r.tolist() == pytest.approx([0.2, -0.1])


def test_preference_loss_worked():
    # pair 1: margin 0.5 - 0.1 = 0.4  -> log(1 + e^-0.4) = log(1.670320) = 0.5130153
    # pair 2: margin -0.2 - 0.3 = -0.5 -> log(1 + e^0.5) = log(2.648721) = 0.9740770
    assert preference_loss(CHOSEN, REJECTED).tolist() == pytest.approx([0.5130153, 0.9740770], abs=1e-7)


def test_quality_loss_worked_with_shift():
    # δ = 0.125
    # pair 1: log(1 + e^-(0.5-0.125)) + log(1 + e^(0.1-0.125)) = 0.5249 + 0.6789 = 1.2038486
    # pair 2: log(1 + e^-(-0.2-0.125)) + log(1 + e^(0.3-0.125)) = 0.8699 + 0.7834 = 1.6532630
    assert quality_loss(CHOSEN, REJECTED, 0.125).tolist() == pytest.approx([1.2038486, 1.6532630], abs=1e-7)


def test_quality_loss_without_shift_is_trl_bco_pair():
    # δ = 0: -log σ(r_c) - log σ(-r_r), TRL 1.16's bco_pair
    expected = -torch.nn.functional.logsigmoid(CHOSEN) - torch.nn.functional.logsigmoid(-REJECTED)
    assert torch.allclose(quality_loss(CHOSEN, REJECTED, 0.0), expected)
    # pair 1 by hand: log(1 + e^-0.5) + log(1 + e^0.1) = 0.474077 + 0.744397
    assert quality_loss(CHOSEN, REJECTED, 0.0)[0].item() == pytest.approx(0.474077 + 0.744397, abs=1e-6)


def test_generation_loss_is_token_mean_over_batch():
    # tokens counted: -1, -2 (row 1, third masked) and -0.5, -1.5, -2.5 (row 2) -> (1+2+0.5+1.5+2.5)/5 = 1.5
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert generation_loss(logps, mask).item() == pytest.approx(1.5)
    # not the mean of per-row means ((1.5 + 1.5) / 2 = 1.5 here by chance: change row 2)
    logps2 = torch.tensor([[-1.0, -2.0, -3.0], [-3.0, -3.0, -3.0]])
    assert generation_loss(logps2, mask).item() == pytest.approx((1 + 2 + 9) / 5)


def test_running_mean_count_weighted():
    # prior: mean 0.2 over 4 rewards; batch: 0.5, -0.2, 0.1, 0.3 (sum 0.7, 4 rewards)
    # -> (0.2 * 4 + 0.7) / 8 = 0.1875
    mean, count = update_running_mean(torch.tensor(0.2, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64),
                                      torch.tensor(0.7, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    assert mean.item() == pytest.approx(0.1875, abs=1e-12)
    assert count.item() == 8
    # from zero state the first update is the batch mean
    mean, count = update_running_mean(torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                                      torch.tensor(0.7, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    assert mean.item() == pytest.approx(0.175)


def test_mpo_total_and_terms():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    total, terms = mpo_losses(CHOSEN, REJECTED, 0.125, logps, mask, MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS)
    pref, qual, gen = 0.7435461, 1.4285558, 1.5  # means of the pair values above
    assert terms["preference_loss"].item() == pytest.approx(pref, abs=1e-7)
    assert terms["quality_loss"].item() == pytest.approx(qual, abs=1e-7)
    assert terms["generation_loss"].item() == pytest.approx(gen)
    assert total.item() == pytest.approx(0.8 * pref + 0.2 * qual + 1.0 * gen, abs=1e-7)
    assert total.item() == pytest.approx(2.3805480, abs=1e-6)


def test_mpo_gradients_flow_through_rewards():
    c = CHOSEN.clone().requires_grad_(True)
    total, _ = mpo_losses(c, REJECTED, 0.0, None, None, ["sigmoid"], [1.0])
    total.backward()
    # d/dr_c of mean(-log σ(r_c - r_r)) = -(1 - σ(margin)) / 2
    expected = [-(1 - 1 / (1 + math.exp(-0.4))) / 2, -(1 - 1 / (1 + math.exp(0.5))) / 2]
    assert c.grad.tolist() == pytest.approx(expected, abs=1e-9)


def test_unknown_term_rejected():
    with pytest.raises(ValueError):
        mpo_losses(CHOSEN, REJECTED, 0.0, None, None, ["hinge"], [1.0])
