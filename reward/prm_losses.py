"""The VisualPRM judgement math as pure functions on logits (reference section 3, "Scoring" and training).

P(`+`), the number a PRM exists to produce, is the softmax over the two logits {`+`, `-`} at the position that
predicts the judgement token; with two classes that is sigmoid(logit(+) - logit(-)). `plus_probability` is the
only place it is computed: the trainer's evaluation metrics and `reward.scorer.PRMScorer` both call it.

Per supervised token (N judgements, then their N `<|im_end|>`):
- hard (published): full-vocabulary cross-entropy of the `+`/`-` token and of `<|im_end|>`;
- soft (mmalign's own): binary cross-entropy between P(`+`) and the Monte Carlo score, then the same `<|im_end|>`
  cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def plus_margin(judgement_logits: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """logit(`+`) - logit(`-`) in float32, the log-odds of P(`+`): (N, V) -> (N,)."""
    return judgement_logits[:, plus_id].float() - judgement_logits[:, minus_id].float()


def plus_probability(judgement_logits: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """P(`+`) renormalised over {`+`, `-`}: softmax of the two logits = sigmoid(logit(+) - logit(-)). (N, V) -> (N,)"""
    return torch.sigmoid(plus_margin(judgement_logits, plus_id, minus_id))


def hard_token_losses(judgement_logits: torch.Tensor, end_logits: torch.Tensor, judgement_targets: torch.Tensor,
                      end_targets: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary cross-entropy of each supervised token: N judgement tokens, then N `<|im_end|>`. -> (2N,)"""
    logits = torch.cat([judgement_logits, end_logits]).float()
    return F.cross_entropy(logits, torch.cat([judgement_targets, end_targets]), reduction="none")


def soft_token_losses(judgement_logits: torch.Tensor, end_logits: torch.Tensor, scores: torch.Tensor,
                      end_targets: torch.Tensor, plus_id: int, minus_id: int) -> torch.Tensor:
    """BCE(P(+) over {+, -}, Monte Carlo score) per judgement, then the `<|im_end|>` cross-entropy. -> (2N,)"""
    margin = plus_margin(judgement_logits, plus_id, minus_id)  # sigmoid(margin) = P(+): BCE on the logit, stable
    bce = F.binary_cross_entropy_with_logits(margin, scores.to(margin.dtype), reduction="none")
    return torch.cat([bce, F.cross_entropy(end_logits.float(), end_targets, reduction="none")])


__all__ = ["plus_margin", "plus_probability", "hard_token_losses", "soft_token_losses"]
