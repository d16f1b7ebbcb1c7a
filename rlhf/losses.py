"""The Mixed Preference Optimization terms as pure functions (reference section 1).

Notation: `logp` is the SUM of a response's token log-probabilities; the implicit reward is
`r(y) = beta * (logp_policy(y|x) - logp_ref(y|x))`.

    L = w_p * L_pref + w_q * L_qual + w_g * L_gen

The trainer (unfused path) and the fused chunked path both call these functions; nothing else computes MPO math.
δ, the quality term's reward shift, is state across steps: a `RewardShiftTracker` owned by the trainer, handed
down to the loss and updated there from each forward's rewards before use (`shift_for`).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import torch
import torch.nn.functional as F


class MPOTerm(StrEnum):
    """The MPO loss terms, by their TRL `loss_type` names."""

    PREFERENCE = "sigmoid"
    QUALITY = "bco_pair"
    GENERATION = "sft"


MPO_LOSS_TYPES = [MPOTerm.PREFERENCE.value, MPOTerm.QUALITY.value, MPOTerm.GENERATION.value]
MPO_LOSS_WEIGHTS = [0.8, 0.2, 1.0]
TERM_METRIC = {MPOTerm.PREFERENCE: "preference_loss", MPOTerm.QUALITY: "quality_loss", MPOTerm.GENERATION: "generation_loss"}


class RewardShift(StrEnum):
    """How δ, the reward shift of the quality (BCO) term, is computed."""

    # Published MPO (InternVL's trainer): a cumulative mean of per-step batch means. Each forward, each rank adds ONE
    # sample, the mean of its batch's chosen and rejected rewards, whatever its batch size.
    RUNNING_MEAN = "running_mean"
    # Ours: a cumulative mean of every reward seen so far (each reward weighted once, so a rank or step with a bigger
    # batch counts more). Agrees with RUNNING_MEAN only when every step on every rank has the same batch size.
    REWARD_MEAN = "reward_mean"
    NONE = "none"  # δ = 0, what TRL 1.16's `bco_pair` computes


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(y) = beta * (logp_policy - logp_ref), per sequence."""
    return beta * (policy_logps - ref_logps)


def preference_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """DPO ("sigmoid"), per pair: -log σ(r_c - r_r)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def quality_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, delta: torch.Tensor | float
) -> torch.Tensor:
    """BCO ("bco_pair") with reward shift δ, per pair: -log σ(r_c - δ) - log σ(-(r_r - δ))."""
    return -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))


def generation_loss(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """SFT, a scalar: token-mean negative log-likelihood over all chosen response tokens of the micro-batch."""
    mask = chosen_mask.to(chosen_token_logps.dtype)
    return -(chosen_token_logps * mask).sum() / mask.sum().clamp(min=1)


def update_running_mean(
    mean: torch.Tensor, count: torch.Tensor, batch_sum: torch.Tensor, batch_count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count-weighted cumulative mean (TRL's `RunningMoments.update`):
    new_mean = mean + (batch_mean - mean) * batch_count / (count + batch_count).

    What counts as one sample is the caller's choice: the InternVL trainer updates δ with one sample per rank and
    step (that rank's batch mean of rewards), so `batch_sum` is the sum of the ranks' batch means and `batch_count`
    the world size; `reward_shift='reward_mean'` (ours) passes every reward instead."""
    total = count + batch_count
    batch_mean = batch_sum / batch_count
    return mean + (batch_mean - mean) * (batch_count / total), total


def reward_shift_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, per_reward: bool = False
                       ) -> torch.Tensor:
    """(sum, count) of the samples one rank adds to δ's running mean in one forward, float64; summed over ranks, they
    are `update_running_mean`'s `batch_sum` and `batch_count`.

    Published (InternVL's trainer, `per_reward=False`): one sample, the mean of this batch's chosen and rejected
    rewards, whatever the batch size. Ours (`per_reward=True`): every reward is a sample."""
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach().double()
    if per_reward:
        return torch.stack([rewards.sum(), rewards.new_tensor(rewards.numel())])
    return torch.stack([rewards.mean(), rewards.new_tensor(1.0)])


class RewardShiftTracker:
    """δ under one `RewardShift` rule, with the running statistics it needs: `mean` and `count` (float64 0-dim
    tensors, the sample count in the rule's unit) and `delta`, the δ the last forward used (0.0 before any).

    `update(chosen_rewards, rejected_rewards) -> δ` folds one forward's rewards in BEFORE δ is used, as InternVL's
    trainer does (`reward_shift_stats`, `update_running_mean`), and returns the new mean in the rewards' dtype and
    device; under `none` it returns 0.0 and keeps nothing. `reduce` sums one rank's (sum, count) over the ranks
    (the trainer passes its accelerator's all-reduce), so every rank holds the same δ. `state_dict` /
    `load_state_dict` carry the statistics through a checkpoint (`mpo_state.json`)."""

    def __init__(self, rule: RewardShift | str = RewardShift.RUNNING_MEAN,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.rule = RewardShift(rule)
        self.reduce = reduce
        self.mean = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.delta: torch.Tensor | float = 0.0

    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor | float:
        if self.rule is RewardShift.NONE:
            return 0.0
        stats = reward_shift_stats(chosen_rewards, rejected_rewards, per_reward=self.rule is RewardShift.REWARD_MEAN)
        if self.reduce is not None:
            stats = self.reduce(stats)
        stats = stats.cpu()
        self.mean, self.count = update_running_mean(self.mean, self.count, stats[0], stats[1])
        self.delta = self.mean.to(chosen_rewards.device, chosen_rewards.dtype)
        return self.delta

    def state_dict(self) -> dict[str, float]:
        return {"reward_shift_mean": float(self.mean), "reward_shift_count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean = torch.tensor(state["reward_shift_mean"], dtype=torch.float64)
        self.count = torch.tensor(state["reward_shift_count"], dtype=torch.float64)


def shift_for(delta: RewardShiftTracker | torch.Tensor | float, chosen_rewards: torch.Tensor,
              rejected_rewards: torch.Tensor) -> torch.Tensor | float:
    """δ of this forward: a tracker updated from its (detached) rewards before use, or a fixed value as given."""
    if isinstance(delta, RewardShiftTracker):
        return delta.update(chosen_rewards.detach(), rejected_rewards.detach())
    return delta


def mpo_losses(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    delta: torch.Tensor | float,
    chosen_token_logps: torch.Tensor | None,
    chosen_mask: torch.Tensor | None,
    loss_types: list[str],
    loss_weights: list[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted MPO total and the unweighted batch-mean of each term (keyed by `TERM_METRIC`)."""
    terms: dict[str, torch.Tensor] = {}
    total = chosen_rewards.new_zeros(())
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        term = MPOTerm(loss_type)
        if term is MPOTerm.PREFERENCE:
            value = preference_loss(chosen_rewards, rejected_rewards).mean()
        elif term is MPOTerm.QUALITY:
            value = quality_loss(chosen_rewards, rejected_rewards, delta).mean()
        else:
            value = generation_loss(chosen_token_logps, chosen_mask)
        terms[TERM_METRIC[term]] = value
        total = total + weight * value
    return total, terms
