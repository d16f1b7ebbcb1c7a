"""report.md of `mmalign demo`: what ran, how long each stage took, the numbers, and the targets met or missed."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from reward.conversation import PRM_SYSTEM_PROMPT

from .settings import TARGETS

STAGE_HELP = {
    "questions": "tile-sum questions written (train and held-out test)",
    "sft": "supervised warm-up of the tiny InternVL on gold chains of thought",
    "rollout": "samples of the SFT policy on training questions",
    "pairs": "correctness + DropoutNTP pairs (MMPR format), rejected cut after its first divergent step",
    "mpo": "MPO training, published objective",
    "test_rollout": "samples of the Best-of-N policy on test questions",
    "label_subsets": "solutions chosen for Monte Carlo labelling",
    "label_steps": "Monte Carlo step labels of SFT solutions (PRM training set)",
    "heldout_labels": "Monte Carlo step labels of test responses (held out)",
    "prm": "VisualPRM training",
    "evaluate": "greedy accuracy, Best-of-k, PRM step F1, image ablation",
}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cpu_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def targets(m: dict[str, Any], quick: bool) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows; `met` is None where the number is missing."""
    def row(name: str, measured: str, ok: bool | None) -> tuple[str, str, bool | None]:
        return name, measured, ok

    rows = []
    sft, mpo = m.get("sft_greedy_acc"), m.get("mpo_greedy_acc")
    rows.append(row(f"MPO greedy >= SFT greedy + {100 * TARGETS['mpo_gain']:.0f} points",
                    f"{_pct(mpo)} vs {_pct(sft)}", None if None in (sft, mpo) else mpo >= sft + TARGETS["mpo_gain"]))
    bon, maj, rnd = m.get("bon_prm_acc@8"), m.get("majority_acc@8"), m.get("random_acc@8")
    rows.append(row(f"PRM Best-of-8 >= majority@8 + {100 * TARGETS['bon_vs_majority']:.0f} points",
                    f"{_pct(bon)} vs {_pct(maj)}",
                    None if None in (bon, maj) else bon >= maj + TARGETS["bon_vs_majority"]))
    rows.append(row(f"PRM Best-of-8 >= random@8 + {100 * TARGETS['bon_vs_random']:.0f} points",
                    f"{_pct(bon)} vs {_pct(rnd)}",
                    None if None in (bon, rnd) else bon >= rnd + TARGETS["bon_vs_random"]))
    f1 = m.get("prm_step_f1_exact")
    rows.append(row(f"PRM step macro-F1 (exact labels) >= {TARGETS['prm_step_f1_exact']}",
                    "n/a" if f1 is None else f"{f1:.3f}", None if f1 is None else f1 >= TARGETS["prm_step_f1_exact"]))
    auc, ablated = m.get("prm_step_auc") or {}, m.get("prm_step_auc_image_ablated") or {}
    for kind, key in (("reading", "reading_auc"), ("sum", "sum_auc")):
        v = auc.get(kind)
        rows.append(row(f"PRM step AUC on {kind} steps >= {TARGETS[key]:.2f}", _num(v),
                        None if v is None else v >= TARGETS[key]))
    v = ablated.get("reading")
    rows.append(row(f"images swapped: reading-step AUC <= {TARGETS['ablated_reading_auc_max']:.2f}", _num(v),
                    None if v is None else v <= TARGETS["ablated_reading_auc_max"]))
    abl = m.get("bon_prm_ablated_acc@8")
    rows.append(row(f"PRM Best-of-8 >= Best-of-8 with swapped images + {100 * TARGETS['bon_vs_ablated']:.0f} points",
                    f"{_pct(bon)} vs {_pct(abl)}",
                    None if None in (bon, abl) else bon >= abl + TARGETS["bon_vs_ablated"]))
    limit = TARGETS["quick_minutes" if quick else "full_minutes"]
    total = m.get("total_minutes")
    rows.append(row(f"{'quick' if quick else 'full'} run <= {limit:.0f} minutes",
                    "n/a" if total is None else f"{total:.1f} min", None if total is None else total <= limit))
    return rows


def write_report(path: Path, m: dict[str, Any], args: Any, skipped: list[str]) -> Path:
    quick = bool(args.quick)
    lines = [f"# mmalign demo report{' (quick)' if quick else ''}", ""]
    lines += ["The InternVL3 post-training loop in miniature: a tiny InternVL-architecture policy (random init, "
              "tokenizer trained in-process) learns the tile-sum task, MPO on its own rollouts, Monte Carlo step "
              "labels, a VisualPRM, and Best-of-k on held-out questions.", ""]
    lines += [f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
              f"torch CPU kernels {_cpu_capability()}. Seed: {m.get('seed', args.seed)}. "
              f"Test questions: {args.test_questions}; samples per test question: {args.bon_samples} "
              f"({args.bon_policy.upper()} policy); PRM aggregation: {args.aggregation}; step threshold "
              f"{args.step_threshold}; steps: blank-line pieces"
              + (f", also cut at `{args.step_split}`" if args.step_split else "")
              + f"; PRM initialised from the {args.prm_init.upper()} policy, "
              + ("with the published system prompt" if args.prm_system_prompt == PRM_SYSTEM_PROMPT else
                 "with no system prompt" if not args.prm_system_prompt else "with its own system prompt")
              + f"; step judgements: {args.step_scores}.", ""]
    if quick:
        lines += ["**Quick run**: a few items and steps per stage, to check the wiring; its numbers mean nothing.",
                  ""]
    if m.get("warnings"):
        lines += ["## Warnings", "", *[f"- **{w}**" for w in m["warnings"]], ""]
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for name, measured, ok in targets(m, quick):
        verdict = "met" if ok else "n/a" if ok is None else "**missed**"
        if quick and "minutes" not in name:
            verdict = "not judged (quick)"
        lines.append(f"| {name} | {measured} | {verdict} |")
    lines += ["", "## Headline numbers", "", "| metric | value |", "|---|---:|"]
    for key in ("sft_greedy_acc", "mpo_greedy_acc", "bon_prm_acc@8", "majority_acc@8", "random_acc@8", "pass@8"):
        if key in m:
            lines.append(f"| {key} | {_pct(m[key])} |")
    for key in ("prm_step_f1", "prm_step_f1_exact", "mc_labels_vs_exact_f1"):
        if key in m:
            lines.append(f"| {key} | {m[key]:.3f} |")
    ablated = m.get("prm_step_auc_image_ablated") or {}
    for kind, auc in (m.get("prm_step_auc") or {}).items():
        lines.append(f"| prm_step_auc ({kind} steps) | {_num(auc)} (images swapped: {_num(ablated.get(kind))}) |")
    if "bon_prm_ablated_acc@8" in m:
        lines.append(f"| bon_prm_ablated_acc@8 (each test image replaced by another question's) | "
                     f"{_pct(m['bon_prm_ablated_acc@8'])} |")
    if m.get("train_pass_rate") is not None:
        lines.append(f"| SFT sample accuracy on training questions (rollout pass rate) | {_pct(m['train_pass_rate'])} |")
    lines += ["", "`prm_step_f1`: macro-F1 of the PRM's step judgements against held-out Monte Carlo labels; "
              "`prm_step_f1_exact`: against the task's exact step labels on every test response; "
              "`mc_labels_vs_exact_f1`: how well the Monte Carlo labels themselves match the exact ones; "
              "`prm_step_auc`: the chance that the PRM gives a right step of that kind a higher P(+) than a wrong one "
              "(exact labels, steps whose earlier steps are all right, pooled over positions: a prior by position or by "
              "the length of the list lifts it above 0.5 too); images swapped: the same PRM on the same responses with each "
              "test image replaced by the image of another test question (a fixed derangement), the ablation that "
              "shows whether the PRM reads the pixels.", ""]
    held, train = m.get("mc_labels_vs_exact_by_kind") or {}, m.get("train_mc_labels_vs_exact_by_kind") or {}
    balance = m.get("prm_step_label_balance") or {}
    if held or train or balance:
        lines += ["## Step kinds", "", "Test steps judged on their own (every earlier step right), by their exact "
                  "label; the Monte Carlo labels of the PRM's training set and of the held-out responses against the "
                  "exact labels (`+` share exact / Monte Carlo, agreement, macro-F1).", "",
                  "| kind | test steps right / wrong | PRM training labels: steps, `+` exact / MC, agreement, F1 | "
                  "held-out labels: steps, agreement, F1 |", "|---|---:|---:|---:|"]
        for kind in (balance or train or held):
            b, t, h = balance.get(kind, {}), train.get(kind, {}), held.get(kind, {})
            share = (f"{_pct(t['exact_right'] / t['steps'])} / {_pct(t['mc_right'] / t['steps'])}"
                     if t.get("steps") else "n/a")
            lines.append(f"| {kind} | {b.get('right', 'n/a')} / {b.get('wrong', 'n/a')} | {t.get('steps', 'n/a')}, "
                         f"{share}, {_pct(t.get('agreement'))}, {_num(t.get('macro_f1'))} | {h.get('steps', 'n/a')}, "
                         f"{_pct(h.get('agreement'))}, {_num(h.get('macro_f1'))} |")
        lines.append("")
    pieces, fit = m.get("prm_step_auc_reading_pieces") or {}, m.get("prm_train_fit_by_kind") or {}
    if pieces or fit:
        ablated = m.get("prm_step_auc_reading_pieces_image_ablated") or {}
        lines += ["## What the PRM judges", "", "Per kind of step (and per piece of the reading list: the first value, "
                  "the middle ones, the one that ends the list): the AUC of P(+) between right and wrong test steps "
                  "judged on their own, with the real and the swapped images; and how the PRM fits its training "
                  "labels (`+` share and binary cross-entropy of P(+) on the first training solutions; a loss near "
                  "the entropy of the `+` share means the kind was not learned). AUC within question: only pairs of "
                  "a right and a wrong step at the same question and step index, so a PRM that scores the image and "
                  "the position of a step but not what it says gets 0.5 there.", "",
                  "| steps | AUC | AUC within question | AUC, swapped images | training steps | training `+` share | "
                  "training BCE |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        auc, auc_ablated = m.get("prm_step_auc") or {}, m.get("prm_step_auc_image_ablated") or {}
        within = m.get("prm_step_auc_within_question") or {}
        rows = [(k, auc.get(k), within.get(k), auc_ablated.get(k), fit.get(k, {}))
                for k in ("reading", "sum", "answer")]
        rows += [(f"reading: {k}", pieces.get(k), None, ablated.get(k), fit.get(f"reading:{k}", {}))
                 for k in ("first", "middle", "last")]
        for name, a, w, b, f in rows:
            lines.append(f"| {name} | {_num(a)} | {_num(w)} | {_num(b)} | {f.get('steps', 'n/a')} | "
                         f"{_pct(f.get('plus_share'))} | {_num(f.get('bce'))} |")
        lines.append("")
    lines += ["## Stages", "", "Wall and CPU seconds of each stage (CPU: this process and its children; on 2 idle "
              "cores CPU seconds run up to twice the wall's), and the 1-minute load average at its start and end: a "
              "load above the core count means other programs shared the machine.", "",
              "| stage | what | wall s | CPU s | load start -> end |", "|---|---|---:|---:|---|"]
    usage = m.get("stage_usage", {})
    for name, seconds in m.get("stage_seconds", {}).items():
        note = " (done earlier)" if name in skipped else ""
        u = usage.get(name) or {}
        cpu = "n/a" if u.get("cpu_seconds") is None else f"{u['cpu_seconds']:.0f}"
        load = "n/a" if u.get("load_start") is None else f"{u['load_start']:.2f} -> {u['load_end']:.2f}"
        lines.append(f"| {name} | {STAGE_HELP.get(name, '')}{note} | {seconds:.0f} | {cpu} | {load} |")
    total_cpu = sum(u.get("cpu_seconds") or 0 for u in usage.values())
    lines.append(f"| **total** | | **{60 * m.get('total_minutes', 0):.0f}** | **{total_cpu:.0f}** | |")
    if "bon_table" in m:
        lines += ["", "## Best-of-k on held-out questions", "", m["bon_table"], "![Best-of-k](bon_curve.png)"]
    if (path.parent / "mpo_training.png").is_file():
        lines += ["", "## MPO training", "", "Reward margins, accuracy, the reward shift and the three unweighted "
                  "MPO terms per logging step.", "", "![MPO training](mpo_training.png)"]
    errors = [(k, m[f"{k}_first_errors"]) for k in ("sft", "mpo") if f"{k}_first_errors" in m]
    if errors:
        kinds = list(errors[0][1])
        lines += ["", "## Where greedy answers first go wrong", "", "| policy | " + " | ".join(kinds) + " |",
                  "|---|" + "---:|" * len(kinds)]
        for name, counts in errors:
            lines.append(f"| {name} | " + " | ".join(str(counts[k]) for k in kinds) + " |")
    ls = m.get("label_steps")
    if ls:
        lines += ["", "## Monte Carlo labels (PRM training set)", "",
                  f"{ls.get('solutions')} solutions, {ls.get('steps')} steps, {_pct(ls.get('positive_share'))} `+`; "
                  f"{ls.get('continuations_sampled')} continuations sampled ({ls.get('mc_mode')} mode; the "
                  f"published procedure would sample {ls.get('faithful_continuations')})."]
    ps = m.get("pairs_summary")
    if ps:
        lines += ["", "## Pairs", "", "```", str(ps), "```"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
