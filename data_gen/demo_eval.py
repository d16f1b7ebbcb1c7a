"""The demo's evaluation stage: policies, Best-of-k with the PRM, and the PRM's step judgements.

- greedy accuracy of the SFT and the MPO policy on the held-out test questions (`data_gen.evaluate`), with where
  their answers first go wrong;
- Best-of-k, k = 1..N, on the `test_rollout` samples: the PRM's pick (`reward.PRMScorer`, `aggregation`) against
  majority vote, pass@k and a random pick (`reward.bon`);
- the PRM's step macro-F1 (step score > `step_threshold`; the score is each P(+) or its running minimum or
  product, as `step_scores` says) against the held-out Monte Carlo labels (`heldout_labels`) and against the task's
  exact step labels (`data_gen.task.step_truth`) of every test response; and, for reference, how well the Monte
  Carlo labels themselves match the exact ones;
- whether the PRM checks each kind of step: the AUC of P(+) between right and wrong steps of a kind (reading,
  partial sum, answer), counting only steps whose earlier steps are all right (a step judged on its own).
"""

from __future__ import annotations

import json
import logging
from itertools import accumulate
from operator import mul
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from .demo import Demo

logger = logging.getLogger("mmalign.demo")

MAX_STEPS = 12  # as the PRM recipe's max_steps_per_solution


def _step_scores(probs: list[float], how: str) -> list[float]:
    """The scores judged against step labels: each P(+) (raw), the lowest P(+) so far (running_min), or the product
    of the P(+) so far (running_product: with teacher forcing each P(+) assumes the steps before it right, so the
    product is the chance that every step up to here is)."""
    if how == "raw":
        return list(probs)
    return list(accumulate(probs, min if how == "running_min" else mul))


def _read_jsonl(path: Path) -> list[dict]:
    from .rollout import json_lines

    return [obj for _, _, obj in json_lines(path)]


def _image(record: dict, default_root: Path) -> Image.Image:
    root = Path(record.get("image_root") or default_root)
    if not root.is_absolute() and not (root / record["image"]).is_file():
        root = default_root / root
    with Image.open(root / record["image"]) as im:
        return im.convert("RGB")


def _policy_accuracy(path: Path, items, batch_size: int) -> tuple[float, list[str], dict[str, int]]:
    from rlhf.models import load_model_and_processor

    from .evaluate import first_errors, greedy_accuracy

    model, processor = load_model_and_processor(str(path))
    model.eval()
    acc, responses = greedy_accuracy(model, processor, items, batch_size=batch_size)
    return acc, responses, first_errors(items, responses)


def evaluate(demo: "Demo", folder: Path) -> None:
    from tqdm.auto import tqdm

    from reward.bon import QuestionResponses, bon_metrics, markdown_table, plot_curve
    from reward.eval_job import step_auc, step_f1
    from reward.formats import hard_label, read_jsonl
    from reward.scorer import PRMScorer
    from rlhf.models import load_model_and_processor

    from .demo import TEST_START
    from .rollout import pass_counts
    from .task import TileSumTask, claim_kind, step_truth

    a = demo.args
    metrics: dict[str, Any] = {}
    items = TileSumTask().items("test", a.test_questions, TEST_START)

    # 1. greedy accuracy of both policies
    for name in ("sft", "mpo"):
        acc, responses, errors = _policy_accuracy(demo.dir(name) / "final", items, a.eval_batch_size)
        metrics[f"{name}_greedy_acc"] = round(acc, 4)
        metrics[f"{name}_first_errors"] = errors
        with (folder / f"{name}_greedy.jsonl").open("w", encoding="utf-8") as f:
            for it, r in zip(items, responses):
                f.write(json.dumps({"id": it.id, "answer": it.answer, "response": r}) + "\n")
        logger.info("greedy accuracy %s: %.3f (first errors %s)", name, acc, errors)

    # 2. Best-of-k with the PRM
    prm, processor = load_model_and_processor(str(demo.dir("prm") / "final"))
    prm.eval()
    scorer = PRMScorer(prm, processor, aggregation=a.aggregation, max_steps=MAX_STEPS, batch_size=16, max_patches=1,
                       step_split=a.step_split, system=a.prm_system_prompt or None)
    values = {r["id"]: r["values"] for r in _read_jsonl(demo.dir("questions") / "test.jsonl")}
    records = sorted(_read_jsonl(demo.dir("test_rollout") / "rollouts.jsonl"), key=lambda r: r["id"])
    questions, exact_labels, exact_probs, scored = [], [], [], []
    by_kind: dict[str, tuple[list[bool], list[float]]] = {"reading": ([], []), "sum": ([], []), "answer": ([], [])}
    for r in tqdm(records, desc="PRM scoring", unit="question"):
        responses = [x for x in r["responses"] if not x.get("reference")]
        image = _image(r, demo.dir("questions"))
        scores = scorer.score_many(r["question"], [image], [x["text"] for x in responses])
        questions.append(QuestionResponses([s.score for s in scores], [x["answer"] for x in responses],
                                           [bool(x["correct"]) for x in responses]))
        for x, s in zip(responses, scores):
            steps = scorer.steps_of(x["text"])
            truth = step_truth(values[r["id"]], steps)
            exact_labels += truth
            exact_probs += _step_scores(s.step_scores, a.step_scores)
            for i, (step, good, p) in enumerate(zip(steps, truth, s.step_scores)):
                kind = claim_kind(step.splitlines()[0]) if step.strip() else None
                if kind and (i == 0 or truth[i - 1]):  # judged on its own: every earlier step is right
                    by_kind[kind][0].append(good)
                    by_kind[kind][1].append(p)
        scored.append({"id": r["id"], "scores": [round(s.score, 5) for s in scores],
                       "correct": [bool(x["correct"]) for x in responses]})
    with (folder / "bon_scores.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in scored)
    n = min(q.n for q in questions)
    bon = bon_metrics(questions, ks=list(range(1, n + 1)))
    k8 = 8 if n >= 8 else n
    metrics |= {f"bon_prm_acc@{k8}": bon["prm_best_of_k"][k8], f"majority_acc@{k8}": bon["majority_vote"][k8],
                f"random_acc@{k8}": bon["random"][k8], f"pass@{k8}": bon["pass_at_k"][k8]}
    metrics["bon"] = {m: {str(k): round(v, 4) for k, v in by_k.items()} for m, by_k in bon.items()}
    metrics["bon_table"] = markdown_table(bon)
    plot_curve(bon, folder / "bon_curve.png", title=f"Best-of-k on {len(questions)} held-out questions "
                                                    f"({a.bon_policy.upper()} policy)")

    # 3. step judgements: exact labels of every test response, and the held-out Monte Carlo labels
    exact = step_f1(exact_labels, exact_probs, a.step_threshold)
    metrics["step_scores"] = a.step_scores
    metrics["prm_step_auc"] = {kind: None if (v := step_auc(*pair)) is None else round(v, 4)
                               for kind, pair in by_kind.items()}
    metrics["prm_step_f1_exact"] = round(exact["macro_f1"], 4)
    metrics["prm_step_exact_detail"] = exact
    mc_labels, mc_probs, mc_exact = [], [], []
    heldout = demo.dir("heldout_labels")
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
    mc = step_f1(mc_labels, mc_probs, a.step_threshold)
    metrics["prm_step_f1"] = round(mc["macro_f1"], 4)
    metrics["prm_step_mc_detail"] = mc
    if len(mc_exact) == len(mc_labels) and mc_labels:
        agree = step_f1(mc_exact, [1.0 if y else 0.0 for y in mc_labels], 0.5)
        metrics["mc_labels_vs_exact_f1"] = round(agree["macro_f1"], 4)
    label_summary = demo.dir("label_steps") / "label_summary.json"
    if label_summary.is_file():
        metrics["label_steps"] = json.loads(label_summary.read_text())
    for name, file in (("pairs", "summary.json"), ("rollout", "summary.json")):
        path = demo.dir(name) / file
        if path.is_file():
            metrics[f"{name}_summary"] = json.loads(path.read_text())
    correct, total, _ = pass_counts(demo.dir("rollout") / "rollouts.jsonl")
    metrics["train_pass_rate"] = round(correct / total, 4) if total else None
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("Best-of-%d: PRM %.3f, majority %.3f, random %.3f, pass %.3f; PRM step F1 %.3f (MC), %.3f (exact)",
                k8, metrics[f"bon_prm_acc@{k8}"], metrics[f"majority_acc@{k8}"], metrics[f"random_acc@{k8}"],
                metrics[f"pass@{k8}"], metrics["prm_step_f1"], metrics["prm_step_f1_exact"])

