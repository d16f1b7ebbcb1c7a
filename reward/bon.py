"""Best-of-N evaluation: accuracy against the number of sampled responses k (pure functions, no model).

For each question we hold N responses in sampling order, each with a PRM score, an extracted answer (None when
the response has none) and its correctness. For k = 1, 2, 4, ..., up to N (N itself added when it is not a power of
two) we report four accuracies, averaged over questions:

- `prm_best_of_k`: the response with the highest PRM score among the FIRST k responses is right. Ties go to the
  earliest response. The first k of N i.i.d. samples are themselves an i.i.d. sample of k, so no random subsets
  are drawn: the numbers are exact and reproducible.
- `majority_vote`: the most frequent extracted answer among the first k (exact string match after stripping
  whitespace; responses without an answer do not vote) is right. Ties go to the answer that appears first in
  sampling order. An answer counts as right when its first response is correct (equal strings judged against the
  same ground truth get the same verdict). No answer at all counts as wrong.
- `pass_at_k`: at least one of k responses is right, by the unbiased estimator over all n responses of the
  question, `1 - C(n - c, k) / C(n, k)` with c the number of correct ones (Chen et al., 2021).
- `random`: the expected accuracy of picking one of the first k responses uniformly at random, i.e. the fraction
  correct among the first k (computed exactly, not sampled).

With questions of different N, k runs up to the smallest N (every k uses k responses of every question).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from math import comb
from pathlib import Path


class BoNMethod(StrEnum):
    """Selection methods reported against k."""

    PRM = "prm_best_of_k"
    MAJORITY = "majority_vote"
    PASS = "pass_at_k"
    RANDOM = "random"


METHOD_LABELS: dict[BoNMethod, str] = {
    BoNMethod.PRM: "PRM Best-of-k",
    BoNMethod.MAJORITY: "Majority vote@k",
    BoNMethod.PASS: "Pass@k",
    BoNMethod.RANDOM: "Random choice@k",
}


@dataclass
class QuestionResponses:
    """The N responses to one question, in sampling order."""

    scores: list[float]
    answers: list[str | None]
    correct: list[bool]

    def __post_init__(self):
        if not self.scores:
            raise ValueError("a question needs at least one response")
        if not len(self.scores) == len(self.answers) == len(self.correct):
            raise ValueError(f"scores, answers and correct differ in length: "
                             f"{len(self.scores)}, {len(self.answers)}, {len(self.correct)}")

    @property
    def n(self) -> int:
        return len(self.scores)


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, plus n itself: k_values(6) == [1, 2, 4, 6]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def best_index(scores: Sequence[float], k: int) -> int:
    """Index of the highest score among the first k; the earliest on a tie."""
    head = scores[:k]
    return max(range(len(head)), key=lambda i: (head[i], -i))


def majority_answer(answers: Sequence[str | None], k: int) -> int | None:
    """Index of the first response carrying the most frequent answer among the first k (ties: the answer seen
    first), or None when none of them has an answer."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers[:k]):
        if answer is None or not answer.strip():
            continue
        key = answer.strip()
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    winner = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[winner]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def random_at_k(correct: Sequence[bool], k: int) -> float:
    """Expected accuracy of a uniform pick among the first k."""
    return sum(map(bool, correct[:k])) / k


def question_accuracy(q: QuestionResponses, method: BoNMethod, k: int) -> float:
    if method == BoNMethod.PRM:
        return float(q.correct[best_index(q.scores, k)])
    if method == BoNMethod.MAJORITY:
        i = majority_answer(q.answers, k)
        return 0.0 if i is None else float(q.correct[i])
    if method == BoNMethod.PASS:
        return pass_at_k(q.n, sum(map(bool, q.correct)), k)
    return random_at_k(q.correct, k)


def bon_metrics(questions: Sequence[QuestionResponses], ks: Sequence[int] | None = None
                ) -> dict[str, dict[int, float]]:
    """{method: {k: accuracy averaged over questions}} for k in `ks` (default: `k_values` of the smallest N)."""
    if not questions:
        raise ValueError("no questions to evaluate")
    n_min = min(q.n for q in questions)
    ks = list(ks) if ks is not None else k_values(n_min)
    if any(k < 1 or k > n_min for k in ks):
        raise ValueError(f"every k must be in [1, {n_min}] (the fewest responses of a question), got {ks}")
    return {m.value: {k: sum(question_accuracy(q, m, k) for q in questions) / len(questions) for k in ks}
            for m in BoNMethod}


def markdown_table(metrics: dict[str, dict[int, float]]) -> str:
    """Accuracy (%) against k: one row per k, one column per method."""
    methods = [BoNMethod(m) for m in metrics]
    ks = sorted(next(iter(metrics.values())))
    lines = ["| k | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
             "|---:|" + "---:|" * len(methods)]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(f"{100 * metrics[m.value][k]:.1f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(metrics: dict[str, dict[int, float]], path: str | Path, title: str = "Best-of-N") -> Path:
    """Accuracy against k (log2 axis), one line per method; a headless PNG."""
    from rlhf.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for method, values in metrics.items():
        ks = sorted(values)
        ax.plot(ks, [100 * values[k] for k in ks], marker="o", label=METHOD_LABELS[BoNMethod(method)])
    ax.set_xscale("log", base=2)
    ks = sorted(next(iter(metrics.values())))
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (responses per question)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)


__all__ = ["BoNMethod", "METHOD_LABELS", "QuestionResponses", "k_values", "best_index", "majority_answer",
           "pass_at_k", "random_at_k", "question_accuracy", "bon_metrics", "markdown_table", "plot_curve"]
