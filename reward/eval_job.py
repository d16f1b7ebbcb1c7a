"""`mmalign eval-prm --config RECIPE.yaml`: step-level macro-F1 of a PRM on VisualProcessBench-format data.

Metric (reference section 3, VisualProcessBench): a step is predicted correct iff its P(`+`) > threshold. Per
source, F1 of the positive steps and F1 of the negative steps (each class in turn as "positive"; neutral steps are
ignored), macro-F1 = their mean; the reported number is the mean of the per-source macro-F1s. A class with no
label and no prediction in a source has F1 = 0 (scikit-learn's default `zero_division=0`).

The source of a row is its `source` (or `data_source`) key, else its file's name (VisualProcessBench ships one file
per source). The threshold is fixed (`threshold`, default 0.5) or chosen on held-out data: `threshold_data`
(separate files) or `threshold_split_ratio` (that fraction of the solutions of every source, drawn with
`split_seed`). The chosen threshold maximises the source-averaged macro-F1 on the held-out data (`best_threshold`);
evaluation then runs on the rest. Writes `prm_eval.json` (with the step settings scored with), `prm_eval.md` and
`prm_scores.jsonl`.

The rows give their steps, so only the PRM's system prompt of its step settings shapes what it sees; the settings
come from its checkpoint as in `mmalign bon` (`reward.step_settings`: `--system_prompt`, `--step_split` and
`--max_steps_per_solution` may only repeat them).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

from .bon_job import REJECTS_FILE, ScorerArguments, load_scorer, parse, read_records
from .prm_metrics import step_f1

logger = logging.getLogger("mmalign.eval_prm")
SOURCE_KEYS = ("source", "data_source")

# -- pure metrics ----------------------------------------------------------------------------------------------------


def step_auc(labels: Sequence[bool | None], probs: Sequence[float]) -> float | None:
    """Area under the ROC curve of the scores for `+` against `-` steps: the chance that a random `+` step scores
    above a random `-` one, ties counting half (Mann-Whitney, from average ranks); None labels are ignored, and
    None is returned when either class is missing."""
    if len(labels) != len(probs):
        raise ValueError(f"{len(labels)} labels but {len(probs)} scores")
    pairs = sorted((p, y) for y, p in zip(labels, probs) if y is not None)
    n_pos = sum(y for _, y in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # ranks 1..n, tied scores share their average rank
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += sum(y for _, y in pairs[i:j]) * (i + j + 1) / 2
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def grouped_step_auc(labels: Sequence[bool | None], probs: Sequence[float], groups: Sequence[Hashable]
                     ) -> float | None:
    """`step_auc` counting only pairs of a `+` and a `-` step in the same group: the chance that, within a group, a
    random `+` step scores above a random `-` one (ties half), pooled over every such pair. With groups = (question,
    step index), a PRM that scores only the image and the position of a step gets exactly 0.5, whatever its pooled
    `step_auc`; only what the steps say moves it. None when no group holds both classes."""
    if not len(labels) == len(probs) == len(groups):
        raise ValueError(f"{len(labels)} labels, {len(probs)} scores and {len(groups)} groups")
    by_group: dict[Hashable, tuple[list[float], list[float]]] = {}
    for y, p, g in zip(labels, probs, groups):
        if y is not None:
            by_group.setdefault(g, ([], []))[0 if y else 1].append(p)
    wins, pairs = 0.0, 0
    for right, wrong in by_group.values():
        for p in right:
            wins += sum(1.0 if p > q else 0.5 if p == q else 0.0 for q in wrong)
        pairs += len(right) * len(wrong)
    return wins / pairs if pairs else None


StepsBySource = Mapping[str, tuple[Sequence[bool | None], Sequence[float]]]


def source_macro_f1(by_source: StepsBySource, threshold: float) -> dict[str, Any]:
    """Per-source `step_f1` and the mean macro-F1 over sources."""
    if not by_source:
        raise ValueError("no sources to evaluate")
    per_source = {s: step_f1(labels, probs, threshold) for s, (labels, probs) in sorted(by_source.items())}
    return {"macro_f1": sum(r["macro_f1"] for r in per_source.values()) / len(per_source), "per_source": per_source}


def best_threshold(by_source: StepsBySource) -> float:
    """The threshold maximising the source-averaged macro-F1. Candidates: 0 and every distinct score (predictions
    change only there); ties go to the candidate closest to 0.5, then the smaller."""
    candidates = sorted({0.0} | {float(p) for _, probs in by_source.values() for p in probs})
    return max(candidates, key=lambda t: (source_macro_f1(by_source, t)["macro_f1"], -abs(t - 0.5), -t))


def split_heldout(sources: Sequence[str], ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out, rest) indices: round(ratio * n) solutions of every source, drawn with `seed`; at least one
    solution of a source stays in the rest."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"threshold_split_ratio must be in (0, 1), got {ratio}")
    rng = random.Random(seed)
    held: list[int] = []
    for source in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == source]
        rng.shuffle(idx)
        held += idx[:min(round(ratio * len(idx)), len(idx) - 1)]
    held.sort()
    chosen = set(held)
    return held, [i for i in range(len(sources)) if i not in chosen]


def markdown_table(result: dict[str, Any], threshold: float) -> str:
    lines = [f"Threshold {threshold:.4g} on P(+). Macro-F1 over positive and negative steps, neutral ignored.", "",
             "| source | positive | negative | F1 (+) | F1 (-) | macro-F1 |", "|---|---:|---:|---:|---:|---:|"]
    for source, r in result["per_source"].items():
        lines.append(f"| {source} | {r['n_positive']} | {r['n_negative']} | {100 * r['f1_positive']:.1f} | "
                     f"{100 * r['f1_negative']:.1f} | {100 * r['macro_f1']:.1f} |")
    lines.append(f"| **mean over sources** | | | | | **{100 * result['macro_f1']:.1f}** |")
    return "\n".join(lines) + "\n"


# -- the job ---------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments(ScorerArguments):
    threshold: float = field(default=0.5, metadata={"help": "Fixed threshold on P(+) (when none is chosen)."})
    threshold_split_ratio: float = field(default=0.0, metadata={
        "help": "Choose the threshold on this fraction of every source's solutions and evaluate on the rest."})
    threshold_data: list[str] | None = field(default=None, metadata={
        "help": "Held-out file(s) to choose the threshold on (then all of `data` is evaluated)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the held-out draw."})

    def __post_init__(self):
        super().__post_init__()
        if self.threshold_data and self.threshold_split_ratio:
            raise UserError("give threshold_data or threshold_split_ratio, not both")
        if not 0.0 <= self.threshold_split_ratio < 1.0:
            raise UserError(f"threshold_split_ratio must be in [0, 1), got {self.threshold_split_ratio}")


@dataclass
class BenchRow:
    record: Any  # ProcessBenchRecord with resolved image paths
    source: str
    line: int
    path: str


def parse_row(obj: Any, line: int, path: str, root: Path) -> BenchRow:
    from .checks import FormatError
    from .formats import ProcessBenchRecord

    record = ProcessBenchRecord.from_json(obj)
    resolved = []
    for i, image in enumerate(record.images):
        full = root / image
        if not full.is_file():
            name = "image" if len(record.images) == 1 else f"image[{i}]"
            raise FormatError(name, f"an existing image file ({full} not found)")
        resolved.append(str(full))
    record.images = resolved
    source = next((record.meta[k] for k in SOURCE_KEYS if isinstance(record.meta.get(k), str)), Path(path).stem)
    return BenchRow(record, source, line, path)


def score_rows(scorer, rows: list[BenchRow]) -> list[list[float]]:
    """Step scores of every row; rows with the same question and images share one prefix pass."""
    from tqdm.auto import tqdm

    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.record.question, tuple(row.record.images)), []).append(i)
    scores: list[list[float]] = [[] for _ in rows]
    for idx in tqdm(list(groups.values()), desc="eval-prm", unit="question"):
        first = rows[idx[0]].record
        for i, s in zip(idx, scorer.score_many(first.question, first.images, [rows[i].record.steps for i in idx])):
            scores[i] = s.step_scores
    return scores


def by_source(rows: Sequence[BenchRow], scores: Sequence[list[float]], idx: Sequence[int]) -> dict:
    out: dict[str, tuple[list, list]] = {}
    for i in idx:
        labels, probs = out.setdefault(rows[i].source, ([], []))
        labels += rows[i].record.labels
        probs += scores[i]
    return out


def main(argv: list[str]) -> int:
    args = parse(argv, EvalArguments, prog="mmalign eval-prm")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    read = dict(skip_invalid=args.skip_invalid, parse=parse_row)
    rows = read_records(args.data, args.image_root, rejects=out / REJECTS_FILE, **read)
    held_rows = (read_records(args.threshold_data, args.image_root, rejects=out / f"heldout.{REJECTS_FILE}", **read)
                 if args.threshold_data else [])
    scorer = load_scorer(args)
    scores = score_rows(scorer, rows)
    summary: dict[str, Any] = {"model": args.model_name_or_path, "step_settings": scorer.settings.to_json()}
    evaluate = list(range(len(rows)))
    if args.threshold_data:
        held = by_source(held_rows, score_rows(scorer, held_rows), range(len(held_rows)))
        threshold, origin = best_threshold(held), f"chosen on {', '.join(args.threshold_data)}"
    elif args.threshold_split_ratio:
        held_idx, evaluate = split_heldout([r.source for r in rows], args.threshold_split_ratio, args.split_seed)
        if not held_idx:
            raise UserError(f"threshold_split_ratio {args.threshold_split_ratio} holds out no solution; raise it")
        held = by_source(rows, scores, held_idx)
        threshold = best_threshold(held)
        origin = f"chosen on a held-out {args.threshold_split_ratio:g} of every source (seed {args.split_seed})"
    else:
        held, threshold, origin = None, args.threshold, "fixed"
    if held is not None:
        n_held = len(held_rows) if args.threshold_data else len(rows) - len(evaluate)
        summary["heldout"] = {"n_solutions": n_held, **source_macro_f1(held, threshold)}
    result = source_macro_f1(by_source(rows, scores, evaluate), threshold)
    summary.update(threshold=threshold, threshold_from=origin, n_solutions=len(evaluate), **result,
                   scoring=asdict(scorer.stats))
    (out / "prm_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown_table(result, threshold)
    (out / "prm_eval.md").write_text(f"# PRM evaluation: {Path(args.model_name_or_path).name}\n\n"
                                     f"Threshold {origin}; {len(evaluate)} solutions evaluated.\n\n{table}")
    with (out / "prm_scores.jsonl").open("w", encoding="utf-8") as f:
        held_out = set(range(len(rows))) - set(evaluate)
        for i, row in enumerate(rows):
            f.write(json.dumps({"file": row.path, "line": row.line, "id": row.record.id, "source": row.source,
                                "step_scores": scores[i], "process_correctness": row.record.correctness,
                                "heldout": i in held_out}) + "\n")
    logger.info("%s", table)
    return 0
