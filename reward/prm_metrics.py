"""Step-level evaluation of a PRM's P(`+`) against the true labels (pure functions), and the Trainer's
`compute_metrics` built on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import EvalPrediction

IGNORE = -100  # padding of per-step prediction tables (the value transformers' evaluation loop pads with)


def f1(tp: int, fp: int, fn: int) -> float:
    """2 tp / (2 tp + fp + fn); 0 when the class is neither labelled nor predicted."""
    return 0.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def step_f1(labels: Sequence[bool | None], probs: Sequence[float], threshold: float) -> dict[str, float]:
    """F1 of positive and of negative steps and their mean, predicting `+` iff prob > threshold; None labels
    (neutral) are ignored."""
    if len(labels) != len(probs):
        raise ValueError(f"{len(labels)} labels but {len(probs)} scores")
    pairs = [(y, p > threshold) for y, p in zip(labels, probs) if y is not None]
    tp = sum(y and p for y, p in pairs)
    tn = sum(not y and not p for y, p in pairs)
    fp = sum(not y and p for y, p in pairs)  # predicted +, labelled -
    fn = sum(y and not p for y, p in pairs)  # predicted -, labelled +
    f1_pos, f1_neg = f1(tp, fp, fn), f1(tn, fn, fp)
    return {"f1_positive": f1_pos, "f1_negative": f1_neg, "macro_f1": (f1_pos + f1_neg) / 2,
            "n_positive": tp + fn, "n_negative": tn + fp}


def step_metrics(p_plus: torch.Tensor, positive: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Step-level metrics of P(`+`) against the true labels (`positive`: True for `+`).

    A step is predicted `-` iff P(+) < 0.5. Precision/recall/F1 are those of the `-` class (the error-finding
    class; 0 when undefined); the F1 is `f1`, as `step_f1`'s `f1_negative`. ECE: P(+) in `bins` equal-width bins
    ([0, 0.1), ..., [0.9, 1.0]), the count-weighted mean of |mean P(+) - fraction of `+`| per bin. Brier:
    mean (P(+) - y)^2 with y = 1 for `+`.
    """
    p = p_plus.double().flatten()
    y = positive.bool().flatten()
    n = p.numel()
    if n == 0:
        return {"step_accuracy": 0.0, "minus_precision": 0.0, "minus_recall": 0.0, "minus_f1": 0.0, "ece": 0.0,
                "brier": 0.0, "num_steps": 0.0}
    pred_minus, true_minus = p < 0.5, ~y
    tp = (pred_minus & true_minus).sum().item()
    precision = tp / max(pred_minus.sum().item(), 1)
    recall = tp / max(true_minus.sum().item(), 1)
    fp, fn = pred_minus.sum().item() - tp, true_minus.sum().item() - tp
    which = torch.clamp((p * bins).floor().long(), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.sum().item() / n * abs(p[in_bin].mean().item() - y[in_bin].double().mean().item())
    return {
        "step_accuracy": (pred_minus == true_minus).double().mean().item(),
        "minus_precision": precision,
        "minus_recall": recall,
        "minus_f1": f1(tp, fp, fn),
        "ece": ece,
        "brier": ((p - y.double()) ** 2).mean().item(),
        "num_steps": float(n),
    }


def prm_eval_metrics(prediction: EvalPrediction, threshold: float = 0.0, bins: int = 10) -> dict[str, float]:
    """`compute_metrics` for the Trainer: predictions are per-row P(+) tables, label_ids the per-row scores, both
    padded with -100 (see `reward.prm_trainer.VisualPRMTrainer.prediction_step`)."""
    p, scores = (torch.as_tensor(x) for x in (prediction.predictions, prediction.label_ids))
    keep = scores != IGNORE
    return step_metrics(p[keep], scores[keep] > threshold, bins)


__all__ = ["IGNORE", "step_metrics", "prm_eval_metrics"]
