"""MPO terms against worked numbers. softplus(x) = log(1 + e^x) = -log σ(-x)."""

import math

import pytest
import torch

from rlhf.losses import (
    MPO_LOSS_TYPES,
    MPO_LOSS_WEIGHTS,
    RewardShiftTracker,
    generation_loss,
    implicit_rewards,
    mpo_losses,
    preference_loss,
    quality_loss,
    reward_shift_stats,
    shift_for,
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


def _delta_over_steps(steps, per_reward):
    """δ after each step; `steps` lists, per step, each rank's (chosen rewards, rejected rewards). The per-rank
    stats are summed over ranks, as the trainer's all-reduce does."""
    mean = count = torch.zeros((), dtype=torch.float64)
    out = []
    for ranks in steps:
        stats = sum(reward_shift_stats(torch.tensor(c), torch.tensor(r), per_reward=per_reward) for c, r in ranks)
        mean, count = update_running_mean(mean, count, stats[0], stats[1])
        out.append((mean.item(), count.item()))
    return out


def test_reward_shift_per_step_batch_mean_varying_batches_and_ranks():
    # InternVL's trainer: every forward, each rank's batch mean mean(cat(chosen, rejected)) is ONE sample of the
    # cumulative mean (the per-rank scalars are gathered first), whatever the batch size.
    # step 1: rank 0 has 2 pairs, chosen [1, 3], rejected [0, 0] -> batch mean 1.0
    #         rank 1 has 1 pair,  chosen [4],    rejected [2]    -> batch mean 3.0
    #   published:  δ = (1 + 3) / 2 = 2.0 (count 2);   per reward: (1+3+0+0+4+2) / 6 = 10/6 (count 6)
    # step 2: rank 0 has 1 pair, chosen [2], rejected [0] -> 1.0; rank 1 has 3 pairs of zeros -> 0.0
    #   published:  δ = (1 + 3 + 1 + 0) / 4 = 1.25;     per reward: (10 + 2) / (6 + 2 + 6) = 12/14
    steps = [[([1.0, 3.0], [0.0, 0.0]), ([4.0], [2.0])],
             [([2.0], [0.0]), ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])]]
    assert _delta_over_steps(steps, per_reward=False) == [(2.0, 2.0), (1.25, 4.0)]
    ours = _delta_over_steps(steps, per_reward=True)
    assert ours[0] == (pytest.approx(10 / 6), 6.0) and ours[1] == (pytest.approx(12 / 14), 14.0)


def test_reward_shift_single_rank_batches_of_one_to_four():
    # One rank, batches of 1 to 4 pairs. Step k's rewards: chosen all k, rejected all 0 -> batch mean k / 2.
    # published: δ_k = mean(1/2, 2/2, ..., k/2): 0.5, 0.75, 1.0, 1.25 (one sample per step)
    # per reward: step k adds 2k rewards summing to k*k: δ_4 = (1 + 4 + 9 + 16) / (2 + 4 + 6 + 8) = 30 / 20 = 1.5
    steps = [[([float(k)] * k, [0.0] * k)] for k in (1, 2, 3, 4)]
    assert [m for m, _ in _delta_over_steps(steps, per_reward=False)] == [0.5, 0.75, 1.0, 1.25]
    assert _delta_over_steps(steps, per_reward=True)[-1] == (pytest.approx(1.5), 20.0)
    # equal batch sizes on every step and rank: both rules give the same δ (the released batch-1 recipes)
    even = [[([1.0, 2.0], [0.0, 1.0]), ([3.0, 0.0], [1.0, 1.0])], [([0.5, 0.5], [0.5, 0.5]), ([2.0, 2.0], [0.0, 0.0])]]
    a = [m for m, _ in _delta_over_steps(even, per_reward=False)]
    b = [m for m, _ in _delta_over_steps(even, per_reward=True)]
    assert a == pytest.approx(b) and a == pytest.approx([9 / 8, (9 + 2 + 4) / 16])


def test_reward_shift_tracker_rules_and_state():
    # The single-rank steps above (step k: chosen all k, rejected all 0, k pairs): running_mean gives
    # 0.5, 0.75, 1.0, 1.25 (one sample per step); reward_mean 1.5 over 20 rewards after step 4; none 0 throughout.
    steps = [(torch.full((k,), float(k)), torch.zeros(k)) for k in (1, 2, 3, 4)]
    published, ours, off = RewardShiftTracker("running_mean"), RewardShiftTracker("reward_mean"), RewardShiftTracker("none")
    deltas = [published.update(c, r) for c, r in steps]
    assert [d.item() for d in deltas] == [0.5, 0.75, 1.0, 1.25]
    assert deltas[-1].dtype == torch.float32 and published.delta is deltas[-1]  # in the rewards' dtype; kept for the log
    assert (published.mean.dtype, published.count.item()) == (torch.float64, 4.0)
    for c, r in steps:
        ours.update(c, r)
    assert (ours.mean.item(), ours.count.item()) == (pytest.approx(1.5), 20.0)
    assert [off.update(c, r) for c, r in steps] == [0.0] * 4 and off.state_dict() == {
        "reward_shift_mean": 0.0, "reward_shift_count": 0.0}
    # a checkpoint's state continues exactly: after steps 1-2 (mean 0.75, count 2), step 3 gives 1.0
    resumed = RewardShiftTracker("running_mean")
    resumed.load_state_dict({"reward_shift_mean": 0.75, "reward_shift_count": 2.0})
    assert resumed.update(*steps[2]).item() == 1.0 and resumed.state_dict() == {
        "reward_shift_mean": 1.0, "reward_shift_count": 3.0}


def test_reward_shift_tracker_sums_over_ranks():
    # step 1 of the two-rank example above, seen from rank 0 (chosen [1, 3], rejected [0, 0]: batch mean 1.0);
    # `reduce` adds rank 1's (sum 3.0, count 1) as the all-reduce would: δ = (1 + 3) / 2 = 2.0 over 2 samples
    seen = []

    def all_reduce(stats):
        seen.append(stats.tolist())
        return stats + torch.tensor([3.0, 1.0], dtype=torch.float64)

    tracker = RewardShiftTracker("running_mean", reduce=all_reduce)
    assert tracker.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])).item() == 2.0
    assert seen == [[1.0, 1.0]] and tracker.count.item() == 2.0
    assert RewardShiftTracker("none", reduce=all_reduce).update(torch.ones(1), torch.ones(1)) == 0.0
    assert len(seen) == 1  # none takes part in no collective


def test_shift_for_updates_a_tracker_and_passes_a_value():
    chosen = torch.tensor([1.0, 3.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0])
    assert shift_for(0.125, chosen, rejected) == 0.125
    delta = shift_for(RewardShiftTracker("reward_mean"), chosen, rejected)
    assert delta.item() == 1.0 and not delta.requires_grad  # (1 + 3 + 0 + 0) / 4, from detached rewards


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
