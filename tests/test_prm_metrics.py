"""reward.prm_metrics: one F1 for the trainer's `minus_f1` and eval-prm's step macro-F1."""

import pytest
import torch

from reward.prm_metrics import f1, step_f1, step_metrics


def test_f1_and_the_two_step_reports_agree_on_a_worked_example():
    # labels + + - - - (None ignored), P(+) 0.9 0.3 0.2 0.7 0.1 0.4: predicted + + at threshold 0.5: + - - + -
    labels = [True, True, False, False, False, None]
    probs = [0.9, 0.3, 0.2, 0.7, 0.1, 0.4]
    # positive class: tp 1 (0.9), fp 1 (0.7), fn 1 (0.3) -> 2/(2+1+1) = 0.5
    # negative class: tp 2 (0.2, 0.1), fp 1 (0.3), fn 1 (0.7) -> 4/(4+1+1) = 2/3
    assert f1(1, 1, 1) == 0.5 and f1(2, 1, 1) == pytest.approx(2 / 3) and f1(0, 0, 0) == 0.0
    r = step_f1(labels, probs, 0.5)
    assert r == pytest.approx({"f1_positive": 0.5, "f1_negative": 2 / 3, "macro_f1": 7 / 12,
                               "n_positive": 2, "n_negative": 3})
    m = step_metrics(torch.tensor(probs[:5]), torch.tensor(labels[:5]))
    assert m["minus_f1"] == pytest.approx(r["f1_negative"])  # the trainer's number is eval-prm's F1 of `-`
    assert m["minus_precision"] == pytest.approx(2 / 3) and m["minus_recall"] == pytest.approx(2 / 3)
