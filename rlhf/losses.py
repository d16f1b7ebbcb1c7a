"""The Mixed Preference Optimization terms as pure functions (reference section 1).

Notation: `logp` is the SUM of a response's token log-probabilities; the implicit reward is
`r(y) = beta * (logp_policy(y|x) - logp_ref(y|x))`.

    L = w_p * L_pref + w_q * L_qual + w_g * L_gen

The trainer (unfused path) and the fused chunked path both call these functions; nothing else computes MPO math.
"""

from __future__ import annotations

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
