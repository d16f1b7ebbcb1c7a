"""The demo's evaluation stage: policies, Best-of-k with the PRM, and the PRM's step judgements.

- greedy accuracy of the SFT and the MPO policy on the held-out test questions (`data_gen.demo.accuracy`), with where
  their answers first go wrong;
- Best-of-k, k = 1..N, on the `test_rollout` samples: the PRM's pick (`reward.PRMScorer`, `aggregation`) against
  majority vote, pass@k and a random pick (`reward.bon`);
- the PRM's step macro-F1 (step score > `step_threshold`; the score is each P(+) or its running minimum or
  product, as `step_scores` says) against the held-out Monte Carlo labels (`heldout_labels`) and against the task's
  exact step labels (`data_gen.demo.task.step_truth`) of every test response; and, for reference, how well the Monte
  Carlo labels themselves match the exact ones;
- whether the PRM checks each kind of step: the AUC of P(+) between right and wrong steps of a kind (reading,
  partial sum, answer), counting only steps whose earlier steps are all right (a step judged on its own).

`evaluate(folder, inputs, settings)` reads the earlier stages' folders (`EvalInputs`) and the demo settings it needs
(`EvalSettings`, `EvalSettings.of(demo_arguments)`); the PRM is scored with the step settings saved beside its
weights (`reward.step_settings`: step split, step limit, system prompt, as its training data were labelled), and
writes metrics.json, the greedy responses, the PRM's scores and bon_curve.png into `folder`.
"""

from __future__ import annotations

import json
import logging
from itertools import accumulate
from operator import mul
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from .settings import METRICS_FILE, TEST_START

logger = logging.getLogger("mmalign.demo")

PRM_FIT_SOLUTIONS = 256  # training solutions the PRM's fit per kind of step is measured on


def _step_scores(probs: list[float], how: str) -> list[float]:
    """The scores judged against step labels: each P(+) (raw), the lowest P(+) so far (running_min), or the product
    of the P(+) so far (running_product: with teacher forcing each P(+) assumes the steps before it right, so the
    product is the chance that every step up to here is)."""
    if how == "raw":
        return list(probs)
    return list(accumulate(probs, min if how == "running_min" else mul))


STEP_KINDS = ("reading", "sum", "answer")


def derangement(n: int, seed: int) -> list[int]:
    """A fixed permutation of range(n) with no fixed point (Sattolo's algorithm: a uniformly random n-cycle), the
    same for the same (n, seed): question i is scored with the image of question result[i] in the ablation."""
    import random

    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    rng, order = random.Random(f"mmalign/demo/derangement/{seed}"), list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)  # j < i: never i itself, so the result is one cycle through every index
        order[i], order[j] = order[j], order[i]
    return order


def step_kind(step: str) -> str | None:
    """The kind of a step (reading, sum, answer) by its first claim; None for an empty or unparseable step."""
    from .task import claim_kind

    lines = [line for line in step.splitlines() if line.strip()]
    return claim_kind(lines[0]) if lines else None


READING_PIECES = ("first", "middle", "last")


def reading_piece(step: str) -> str | None:
    """Where a reading step sits in the list it is a piece of (cut by the demo's step_split): "first" (it opens the
    list: "The tiles show a,"), "last" (it closes it: "and d." or a whole list), "middle" ("b,"); None otherwise."""
    if step_kind(step) != "reading":
        return None
    text = step.strip()
    if text.endswith(".") or " and " in f" {text}":
        return "last"
    return "first" if text.lower().startswith("the tile") else "middle"


@dataclass
class TestScores:
    """The PRM's scores of every test response: Best-of-k inputs, the step scores judged against the exact labels,
    and, per kind of step, (exact label, P(+)) of the steps whose earlier steps are all right (judged on their own)."""

    questions: list = field(default_factory=list)
    exact_labels: list[bool] = field(default_factory=list)
    exact_probs: list[float] = field(default_factory=list)
    raw_probs: list[float] = field(default_factory=list)  # every step's P(+), in scoring order
    by_kind: dict[str, tuple[list[bool], list[float]]] = field(
        default_factory=lambda: {kind: ([], []) for kind in STEP_KINDS})
    by_piece: dict[str, tuple[list[bool], list[float]]] = field(
        default_factory=lambda: {piece: ([], []) for piece in READING_PIECES})  # reading steps by place in the list
    by_kind_at: dict[str, list[tuple[int, int]]] = field(
        default_factory=lambda: {kind: [] for kind in STEP_KINDS})  # (question, step index) of each by_kind entry
    scored: list[dict] = field(default_factory=list)

    def auc_by_kind(self) -> dict[str, float | None]:
        from reward.eval_job import step_auc

        return {kind: None if (v := step_auc(*pair)) is None else round(v, 4) for kind, pair in self.by_kind.items()}

    def auc_within_by_kind(self) -> dict[str, float | None]:
        """Per kind, the AUC over pairs of a right and a wrong step at the same question and step index
        (`reward.eval_job.grouped_step_auc`): 0.5 for a PRM whose scores follow only the image and the position."""
        from reward.eval_job import grouped_step_auc

        return {kind: None if (v := grouped_step_auc(*pair, self.by_kind_at[kind])) is None else round(v, 4)
                for kind, pair in self.by_kind.items()}

    def auc_by_piece(self) -> dict[str, float | None]:
        from reward.eval_job import step_auc

        return {k: None if (v := step_auc(*pair)) is None else round(v, 4) for k, pair in self.by_piece.items()}

    def image_sensitivity(self, other: "TestScores") -> float:
        """Mean |P(+) here - P(+) there| over every step: 0.0 exactly for a PRM that does not read the pixels."""
        if len(self.raw_probs) != len(other.raw_probs):
            raise ValueError(f"{len(self.raw_probs)} step scores here, {len(other.raw_probs)} there")
        diffs = [abs(x - y) for x, y in zip(self.raw_probs, other.raw_probs)]
        return sum(diffs) / len(diffs) if diffs else 0.0

    def balance_by_kind(self) -> dict[str, dict[str, int]]:
        return {kind: {"right": sum(labels), "wrong": len(labels) - sum(labels)}
                for kind, (labels, _) in self.by_kind.items()}


def score_test_responses(scorer, records: list[dict], images: list[Image.Image], values: dict[str, list[int]],
                         step_scores: str, desc: str) -> TestScores:
    """Score the responses of each test record with the PRM, record i with `images[i]`."""
    from tqdm.auto import tqdm

    from reward.bon import QuestionResponses

    from .task import step_truth

    out = TestScores()
    for r, image in tqdm(list(zip(records, images, strict=True)), desc=desc, unit="question"):
        responses = [x for x in r["responses"] if not x.get("reference")]
        scores = scorer.score_many(r["question"], [image], [x["text"] for x in responses])
        out.questions.append(QuestionResponses([s.score for s in scores], [x["answer"] for x in responses],
                                               [bool(x["correct"]) for x in responses]))
        for x, s in zip(responses, scores):
            steps = scorer.steps_of(x["text"])
            truth = step_truth(values[r["id"]], steps)
            out.exact_labels += truth
            out.exact_probs += _step_scores(s.step_scores, step_scores)
            out.raw_probs += s.step_scores
            for i, (step, good, p) in enumerate(zip(steps, truth, s.step_scores)):
                kind = step_kind(step)
                if kind and (i == 0 or truth[i - 1]):  # judged on its own: every earlier step is right
                    out.by_kind[kind][0].append(good)
                    out.by_kind[kind][1].append(p)
                    out.by_kind_at[kind].append((len(out.questions) - 1, i))
                    if piece := reading_piece(step):
                        out.by_piece[piece][0].append(good)
                        out.by_piece[piece][1].append(p)
        out.scored.append({"id": r["id"], "scores": [round(s.score, 5) for s in scores],
                           "correct": [bool(x["correct"]) for x in responses]})
    return out


def mc_agreement_by_kind(exact: list[bool], mc: list[bool], kinds: list[str | None]) -> dict[str, dict[str, Any]]:
    """Per kind of step: how many steps, the share whose Monte Carlo label equals the exact one, and the macro-F1 of
    the Monte Carlo labels against the exact ones (None where a kind has one class only)."""
    from reward.prm_metrics import step_f1

    out = {}
    for kind in STEP_KINDS:
        rows = [(e, m) for e, m, k in zip(exact, mc, kinds, strict=True) if k == kind]
        if not rows:
            out[kind] = {"steps": 0, "exact_right": 0, "mc_right": 0, "agreement": None, "macro_f1": None}
            continue
        e, m = zip(*rows)
        both = len(set(e)) == 2
        out[kind] = {"steps": len(rows), "exact_right": sum(e), "mc_right": sum(m),
                     "agreement": round(sum(x == y for x, y in rows) / len(rows), 4),
                     "macro_f1": round(step_f1(list(e), [float(y) for y in m], 0.5)["macro_f1"], 4) if both else None}
    return out


def mc_label_quality(mc_path: Path, values: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
    """`mc_agreement_by_kind` of a label-steps output (mc.jsonl) against the task's exact step labels."""
    from reward.conversation import hard_label
    from reward.formats import read_jsonl

    from .task import step_truth

    exact, mc, kinds = [], [], []
    for record in read_jsonl(mc_path, "mc"):
        steps = [s.step for s in record.steps]
        rid = str(record.meta.get("question_id") or record.id).rsplit("#", 1)[0]
        if steps and rid in values:
            exact += step_truth(values[rid], steps)
            mc += [hard_label(s.score) for s in record.steps]
            kinds += [step_kind(step) for step in steps]
    return mc_agreement_by_kind(exact, mc, kinds)


def prm_fit_by_kind(scorer, mc_path: Path, image_root: Path, limit: int, step_scores_how: str = "raw"
                    ) -> dict[str, dict[str, Any]]:
    """How the PRM fits its own training labels, per kind of step (reading, sum, answer) and per reading piece:
    steps, the share of `+` labels (the label balance it trained on) and the mean binary cross-entropy of its P(+)
    against them, over the first `limit` solutions of a label-steps output (mc.jsonl, paths relative to its folder).
    Only steps whose earlier labels are all `+` count: the scorer judges every step after `+` judgements, as the
    PRM trained on exactly those steps. A kind the PRM did not learn shows a loss near the entropy of its balance."""
    import math

    from reward.conversation import hard_label
    from reward.formats import read_jsonl

    rows: dict[str, list[tuple[bool, float]]] = {k: [] for k in (*STEP_KINDS, *(f"reading:{p}" for p in
                                                                                  READING_PIECES))}
    for record in read_jsonl(mc_path, "mc")[:limit]:
        steps = [s.step for s in record.steps]
        if not steps:
            continue
        images = [_image({"image": p}, image_root) for p in record.images]
        probs = scorer.score_many(record.question, images, [steps])[0].step_scores
        labels = [hard_label(s.score) for s in record.steps]
        for i, (step, label, p) in enumerate(zip(steps, labels, probs)):
            if not all(labels[:i]):  # scored after `+` steps (the scorer's context): judged on its own only
                break
            for key in (step_kind(step), (f"reading:{piece}" if (piece := reading_piece(step)) else None)):
                if key in rows:
                    rows[key].append((label, p))
    out = {}
    for key, pairs in rows.items():
        eps = 1e-6
        bce = [-math.log(max(eps, p if y else 1 - p)) for y, p in pairs]
        out[key] = {"steps": len(pairs), "plus_share": round(sum(y for y, _ in pairs) / len(pairs), 4) if pairs
                    else None, "bce": round(sum(bce) / len(bce), 4) if bce else None}
    return out


def prm_warnings(exact: dict[str, Any]) -> list[str]:
    """One plain line when the PRM's step judgements on the test responses are all one class."""
    tp_fn, tn_fp = exact["n_positive"], exact["n_negative"]
    if exact["f1_positive"] == 0.0 and tp_fn:
        return [f"the PRM judged every test step '-' ({tp_fn} of {tp_fn + tn_fp} steps are right): it learned one "
                "class only, so its step scores say nothing about the steps"]
    if exact["f1_negative"] == 0.0 and tn_fp:
        return [f"the PRM judged every test step '+' ({tn_fp} of {tp_fn + tn_fp} steps are wrong): it learned one "
                "class only, so its step scores say nothing about the steps"]
    return []


def _read_jsonl(path: Path) -> list[dict]:
    from ..job_common import json_lines

    return [obj for _, _, obj in json_lines(path)]


def _image(record: dict, default_root: Path) -> Image.Image:
    root = Path(record.get("image_root") or default_root)
    if not root.is_absolute() and not (root / record["image"]).is_file():
        root = default_root / root
    with Image.open(root / record["image"]) as im:
        return im.convert("RGB")


def _policy_accuracy(path: Path, items, batch_size: int) -> tuple[float, list[str], dict[str, int]]:
    from rlhf.models import load_model_and_processor

    from .accuracy import first_errors, greedy_accuracy

    model, processor = load_model_and_processor(str(path))
    model.eval()
    acc, responses = greedy_accuracy(model, processor, items, batch_size=batch_size)
    return acc, responses, first_errors(items, responses)


@dataclass(frozen=True)
class EvalSettings:
    """The demo settings (`pipeline.DemoArguments`) the evaluate stage reads."""

    test_questions: int
    min_tiles: int
    max_tiles: int
    layout: str
    bon_policy: str
    aggregation: str
    step_scores: str
    step_threshold: float
    eval_batch_size: int
    seed: int

    @classmethod
    def of(cls, args: Any) -> "EvalSettings":
        """The fields of this class, read from `args` (a `DemoArguments` or anything with those attributes)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class EvalInputs:
    """The folders of the earlier stages the evaluate stage reads: the questions, the policies' stage folders (each
    with its `final` model), the rollouts and pairs, and both label stages."""

    questions: Path
    sft: Path
    rollout: Path
    pairs: Path
    mpo: Path
    test_rollout: Path
    label_steps: Path
    heldout_labels: Path
    prm: Path


def evaluate(folder: Path, inputs: EvalInputs, settings: EvalSettings) -> None:
    """The evaluate stage: read the stages' outputs in `inputs`, write metrics.json and the rest into `folder`."""
    from reward.bon import bon_metrics, markdown_table, plot_curve
    from reward.prm_metrics import step_f1
    from reward.conversation import hard_label
    from reward.formats import read_jsonl
    from reward.scorer import PRMScorer
    from reward.step_settings import scoring_settings
    from rlhf.models import load_model_and_processor

    from ..rollout import pass_counts
    from .task import TileSumTask, step_truth

    a = settings
    metrics: dict[str, Any] = {}
    items = TileSumTask(min_tiles=a.min_tiles, max_tiles=a.max_tiles, layout=a.layout).items("test", a.test_questions, TEST_START)

    # 1. greedy accuracy of both policies
    for name in ("sft", "mpo"):
        acc, responses, errors = _policy_accuracy(getattr(inputs, name) / "final", items, a.eval_batch_size)
        metrics[f"{name}_greedy_acc"] = round(acc, 4)
        metrics[f"{name}_first_errors"] = errors
        with (folder / f"{name}_greedy.jsonl").open("w", encoding="utf-8") as f:
            for it, r in zip(items, responses):
                f.write(json.dumps({"id": it.id, "answer": it.answer, "response": r}) + "\n")
        logger.info("greedy accuracy %s: %.3f (first errors %s)", name, acc, errors)

    # 2. Best-of-k with the PRM, with each question's own image and, as an ablation, another question's image
    prm, processor = load_model_and_processor(str(inputs.prm / "final"))
    prm.eval()
    settings = scoring_settings(inputs.prm / "final")  # the step settings the PRM was trained with
    scorer = PRMScorer(prm, processor, aggregation=a.aggregation, batch_size=16, max_patches=1, settings=settings)
    metrics["prm_step_settings"] = settings.to_json()
    values = {r["id"]: r["values"] for r in _read_jsonl(inputs.questions / "test.jsonl")}
    records = sorted(_read_jsonl(inputs.test_rollout / "rollouts.jsonl"), key=lambda r: r["id"])
    images = [_image(r, inputs.questions) for r in records]
    swap = derangement(len(records), a.seed)
    real = score_test_responses(scorer, records, images, values, a.step_scores, "PRM scoring")
    ablated = score_test_responses(scorer, records, [images[j] for j in swap], values, a.step_scores,
                                   "PRM scoring, images swapped")
    with (folder / "bon_scores.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in real.scored)
    n = min(q.n for q in real.questions)
    bon = bon_metrics(real.questions, ks=list(range(1, n + 1)))
    bon_ablated = bon_metrics(ablated.questions, ks=list(range(1, n + 1)))
    k8 = 8 if n >= 8 else n
    metrics |= {f"bon_prm_acc@{k8}": bon["prm_best_of_k"][k8], f"majority_acc@{k8}": bon["majority_vote"][k8],
                f"random_acc@{k8}": bon["random"][k8], f"pass@{k8}": bon["pass_at_k"][k8],
                f"bon_prm_ablated_acc@{k8}": bon_ablated["prm_best_of_k"][k8]}
    metrics["bon"] = {m: {str(k): round(v, 4) for k, v in by_k.items()} for m, by_k in bon.items()}
    metrics["bon"]["prm_best_of_k_image_ablated"] = {str(k): round(v, 4)
                                                      for k, v in bon_ablated["prm_best_of_k"].items()}
    metrics["bon_table"] = markdown_table(bon)
    plot_curve(bon, folder / "bon_curve.png", title=f"Best-of-k on {len(real.questions)} held-out questions "
                                                    f"({a.bon_policy.upper()} policy)")

    # 3. step judgements: exact labels of every test response, and the held-out Monte Carlo labels
    exact = step_f1(real.exact_labels, real.exact_probs, a.step_threshold)
    metrics["step_scores"] = a.step_scores
    metrics["prm_step_auc"] = real.auc_by_kind()
    metrics["prm_step_auc_image_ablated"] = ablated.auc_by_kind()
    metrics["prm_step_auc_within_question"] = real.auc_within_by_kind()
    metrics["prm_step_auc_reading_pieces"] = real.auc_by_piece()
    metrics["prm_step_auc_reading_pieces_image_ablated"] = ablated.auc_by_piece()
    metrics["prm_step_f1_exact"] = round(exact["macro_f1"], 4)
    metrics["prm_step_f1_exact_image_ablated"] = round(
        step_f1(ablated.exact_labels, ablated.exact_probs, a.step_threshold)["macro_f1"], 4)
    metrics["prm_step_exact_detail"] = exact
    metrics["prm_step_label_balance"] = real.balance_by_kind()
    metrics["prm_image_sensitivity"] = round(real.image_sensitivity(ablated), 6)
    mc_labels, mc_probs, mc_exact, mc_kinds = [], [], [], []
    heldout = inputs.heldout_labels
    for record in read_jsonl(heldout / "mc.jsonl", "mc"):
        steps = [s.step for s in record.steps]
        if not steps:
            continue
        images = [_image({"image": p}, heldout) for p in record.images]
        probs = _step_scores(scorer.score_many(record.question, images, [steps])[0].step_scores, a.step_scores)
        mc_labels += [hard_label(s.score) for s in record.steps]
        mc_probs += probs
        rid = str(record.meta.get("question_id") or record.id).rsplit("#", 1)[0]
        if rid in values:
            mc_exact += step_truth(values[rid], steps)
            mc_kinds += [step_kind(step) for step in steps]
    mc = step_f1(mc_labels, mc_probs, a.step_threshold)
    metrics["prm_step_f1"] = round(mc["macro_f1"], 4)
    metrics["prm_step_mc_detail"] = mc
    if len(mc_exact) == len(mc_labels) and mc_labels:
        agree = step_f1(mc_exact, [1.0 if y else 0.0 for y in mc_labels], 0.5)
        metrics["mc_labels_vs_exact_f1"] = round(agree["macro_f1"], 4)
        metrics["mc_labels_vs_exact_by_kind"] = mc_agreement_by_kind(mc_exact, mc_labels, mc_kinds)
    train_values = {r["id"]: r["values"] for r in _read_jsonl(inputs.questions / "train.jsonl")}
    metrics["train_mc_labels_vs_exact_by_kind"] = mc_label_quality(inputs.label_steps / "mc.jsonl", train_values)
    metrics["prm_train_fit_by_kind"] = prm_fit_by_kind(scorer, inputs.label_steps / "mc.jsonl", inputs.label_steps,
                                                       PRM_FIT_SOLUTIONS)
    label_summary = inputs.label_steps / "label_summary.json"
    if label_summary.is_file():
        metrics["label_steps"] = json.loads(label_summary.read_text())
    for name, file in (("pairs", "summary.json"), ("rollout", "summary.json")):
        path = getattr(inputs, name) / file
        if path.is_file():
            metrics[f"{name}_summary"] = json.loads(path.read_text())
    correct, total, _ = pass_counts(inputs.rollout / "rollouts.jsonl")
    metrics["train_pass_rate"] = round(correct / total, 4) if total else None
    metrics["warnings"] = prm_warnings(exact)
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("Best-of-%d: PRM %.3f, majority %.3f, random %.3f, pass %.3f; PRM step F1 %.3f (MC), %.3f (exact)",
                k8, metrics[f"bon_prm_acc@{k8}"], metrics[f"majority_acc@{k8}"], metrics[f"random_acc@{k8}"],
                metrics[f"pass@{k8}"], metrics["prm_step_f1"], metrics["prm_step_f1_exact"])

