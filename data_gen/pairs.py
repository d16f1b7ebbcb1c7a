"""`mmalign pairs --config RECIPE.yaml`: MMPR preference pairs from rollouts (reference section 2).

Per question (a record of the rollout job), responses are deduplicated by text and grouped: correct, wrong (an
answer that is not correct) and unparseable (no answer: the format negatives). Responses with an empty text or an
`<image>` placeholder are left out (counted as invalid). Three pair sets:

- correctness: correct x wrong, dropping a pair when the chosen answer is a substring of the rejected answer;
- format_negative: correct x unparseable, a separate set;
- dropout_ntp: a chosen response (a correct one; any valid one for a question without an answer) keeps the
  first `floor(dropout_ratio * words)` of its words as a prefix (`dropout_words`: InternVL's `split(' ')` by
  default, or ours, any whitespace), the policy continues the
  prefix WITHOUT the image, rejected = prefix + continuation. For the questions `dropout_ntp` selects ("all",
  "unverifiable": those without an answer, "none"); text-only questions are skipped (there is no image to drop).

Each of the first two sets keeps at most `max_pairs_per_question` pairs per question, a seeded choice
(`item_seed(seed, id, set)`) when there are more, in (chosen, rejected) order. With `answer_fix` the chosen
response's final answer (the last `\\boxed{}`, else the text after the last "Answer:") is rewritten to the
ground truth string. With `truncate_rejected` (ours) every rejected response ends with its first step that differs
from the chosen response (`truncate_at_divergence`).

Output in `output_dir`, the MMPR format that `mmalign mpo` reads unchanged:

    meta.json                    one entry per non-empty pair set: {"root", "annotation", "data_augment",
                                 "repeat_time", "length"}; root = the rollouts' image folder (their common
                                 ancestor when there are several), absolute; images are paths relative to it
    correctness.jsonl, format_negative.jsonl, dropout_ntp.jsonl
                                 {"image", "question" (the prompt the policy saw), "chosen", "rejected",
                                  "answer_gt", "chosen_meta", "rejected_meta", "id", "question_id"}
    pair_groups.jsonl            the pairs of each question (the resumable work of `rlhf.jobs.runner`)
    summary.json                 questions, pass rate, pairs and pairs per question per set, dropped counts
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from reward.steps import STEP_BREAK, split_steps
from reward.verify import fix_answer
from rlhf.choices import parse_choice
from rlhf.errors import UserError
from rlhf.jobs.runner import Failure, JobInputError, JobSummary, item_seed
from rlhf.jobs.settings import content_sha
from rlhf.processing import IMAGE_PLACEHOLDER, with_placeholders

from .backends.base import GenerationRequest, RolloutBackend
from .job_common import (BackendArguments, BackendWorker, JobArguments, SamplingArguments, job_main, json_lines,
                         run_backend_job)
from .prompts import build_prompt
from .rollout import ROLLOUTS_NAME

logger = logging.getLogger("mmalign.pairs")

GROUPS_NAME = "pair_groups"
SETTINGS_FILE = "pairs_settings.json"


class PairSet(StrEnum):
    CORRECTNESS = "correctness"
    FORMAT_NEGATIVE = "format_negative"
    DROPOUT_NTP = "dropout_ntp"


class DropoutSelection(StrEnum):
    """Which questions get DropoutNTP pairs."""

    NONE = "none"
    UNVERIFIABLE = "unverifiable"  # questions without an answer (the published use)
    ALL = "all"


# -- the rules, as pure functions ----------------------------------------------------------------------------------

def group_responses(responses: list[dict]) -> tuple[list[int], list[int], list[int], dict[str, int]]:
    """(correct, wrong, unparseable) response indices, first occurrence of each text only, and the counts of
    `duplicate` and `invalid` (empty text or an `<image>` placeholder) responses left out."""
    groups: tuple[list[int], list[int], list[int]] = ([], [], [])
    seen: set[str] = set()
    dropped = {"duplicate": 0, "invalid": 0}
    for i, r in enumerate(responses):
        text = r["text"]
        if not text.strip() or IMAGE_PLACEHOLDER in text:
            dropped["invalid"] += 1
        elif text in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(text)
            groups[0 if r.get("correct") else 2 if r.get("answer") is None else 1].append(i)
    return *groups, dropped


def cap(pairs: list, max_pairs: int, rng: random.Random) -> list:
    """At most `max_pairs` of `pairs`: a seeded choice, kept in their original order."""
    if len(pairs) <= max_pairs:
        return list(pairs)
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), max_pairs))]


def correctness_pairs(responses: list[dict], correct: list[int], wrong: list[int]) -> tuple[list, int]:
    """correct x wrong (index pairs), without the pairs whose chosen answer is a substring of the rejected answer;
    and how many were dropped by that rule."""
    pairs = [(c, w) for c in correct for w in wrong]
    kept = [(c, w) for c, w in pairs if responses[c]["answer"].strip() not in responses[w]["answer"]]
    return kept, len(pairs) - len(kept)


class DropoutWords(StrEnum):
    """How DropoutNTP counts the words of the chosen response."""

    SPACE = "space"  # InternVL: text.split(' '), the first int(ratio * n) pieces joined by ' ', then stripped
    WHITESPACE = "whitespace"  # ours: runs of any whitespace (newlines too) separate words; the prefix keeps the text
    #                            verbatim up to the end of the k-th word


def dropout_prefix(text: str, ratio: float = 0.5, words: DropoutWords | str = DropoutWords.SPACE
                   ) -> tuple[str, int, int]:
    """(prefix, k, n): k = floor(ratio * n) of the text's n words kept as the prefix; k = 0 gives an empty prefix.

    `space` (published, InternVL's DropoutNTP): words are the pieces of `text.split(' ')`, so a line break does not
    separate words ("3\n\nThe" is one piece) and empty pieces (double spaces) count; the prefix is the first k
    pieces joined by ' ' and stripped. `whitespace` (ours): words are runs of non-whitespace characters."""
    if DropoutWords(words) is DropoutWords.SPACE:
        pieces = text.split(" ")
        k = math.floor(ratio * len(pieces))
        return " ".join(pieces[:k]).strip(), k, len(pieces)
    found = list(re.finditer(r"\S+", text))
    k = math.floor(ratio * len(found))
    return (text[:found[k - 1].end()] if k else ""), k, len(found)


def truncate_at_divergence(chosen: str, rejected: str) -> tuple[str, int, int]:
    """(rejected cut after its first step that differs from the chosen step at the same index, steps kept, steps of
    the rejected response). Steps are separated by blank lines and compared stripped; the cut keeps the rejected
    text verbatim up to the end of that step. A rejected response whose steps all match the chosen ones (a prefix
    of it) is kept whole.

    Why (ours): in a pair where the rejected response misreads a value, every later step of it is arithmetic that
    is right for the misread value; the preference term then pushes down correct arithmetic. On the demo's policy
    (51% greedy) MPO on whole pairs lowered greedy accuracy and on cut pairs raised it (numbers in
    data_gen/recipes/demo/pairs.yaml)."""
    chosen_steps = split_steps(chosen)
    pieces, start = [], 0
    for m in STEP_BREAK.finditer(rejected):  # the step breaks of split_steps
        pieces.append((start, m.start()))
        start = m.end()
    pieces.append((start, len(rejected)))
    pieces = [(a, b) for a, b in pieces if rejected[a:b].strip()]
    for k, (a, b) in enumerate(pieces):
        if k >= len(chosen_steps) or rejected[a:b].strip() != chosen_steps[k]:
            return rejected[:b], k + 1, len(pieces)
    return rejected, len(pieces), len(pieces)


def strip_images(question: str) -> str:
    """The question without its `<image>` placeholders (and the newline after each)."""
    return re.sub(re.escape(IMAGE_PLACEHOLDER) + r"\n?", "", question).strip()


def prompt_with_images(question: str, template: str, n_images: int) -> str:
    return with_placeholders(build_prompt(question, template), n_images)


# -- the work ------------------------------------------------------------------------------------------------------

@dataclass
class DropoutSampling(SamplingArguments):
    max_new_tokens: int = field(default=2048, metadata={"help": "New tokens of a DropoutNTP continuation at most."})


@dataclass
class PairsArguments:
    rollouts: str = field(metadata={"help": "The rollout job's rollouts.jsonl, or its output folder."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the records' image paths (default: "
                                                                   "each record's image_root)."})
    max_pairs_per_question: int = field(default=15, metadata={"help": "Per question and pair set (3 for very "
                                                                        "large sets)."})
    format_negatives: bool = field(default=True, metadata={"help": "Make the correct x unparseable pair set."})
    answer_fix: bool = field(default=False, metadata={"help": "Rewrite the chosen final answer to the ground truth."})
    dropout_ntp: str = field(default=DropoutSelection.UNVERIFIABLE.value, metadata={
        "help": f"Questions that get DropoutNTP pairs: {', '.join(DropoutSelection)}."})
    dropout_ratio: float = field(default=0.5, metadata={"help": "Fraction of the chosen words kept as prefix."})
    dropout_pairs_per_question: int = field(default=1, metadata={"help": "DropoutNTP pairs per question."})
    dropout_words: str = field(default=DropoutWords.SPACE.value, metadata={
        "help": "How the DropoutNTP prefix counts words: space (InternVL: text.split(' ')) or whitespace (ours: any "
                "whitespace, newlines included, separates words)."})
    truncate_rejected: bool = field(default=False, metadata={
        "help": "Ours, not in MMPR: cut every rejected response after its first step (blank-line separated) that "
                "differs from the chosen response's step at the same index."})

    def __post_init__(self) -> None:
        parse_choice(DropoutSelection, self.dropout_ntp, "dropout_ntp", UserError)
        parse_choice(DropoutWords, self.dropout_words, "dropout_words", UserError)
        if not 0 < self.dropout_ratio < 1:
            raise UserError(f"dropout_ratio must be in (0, 1), got {self.dropout_ratio}")
        for name in ("max_pairs_per_question", "dropout_pairs_per_question"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")


def wants_dropout(args: PairsArguments, record: dict) -> bool:
    if not record.get("image") and not record.get("images"):
        return False
    return args.dropout_ntp == DropoutSelection.ALL or (
        args.dropout_ntp == DropoutSelection.UNVERIFIABLE and record.get("answer") is None)


@dataclass
class PairsSettings:
    args: PairsArguments
    sampling: DropoutSampling
    backend: BackendArguments


class PairsWorker(BackendWorker):
    """process_fn of the pairs job: rollout records in, one group record (every pair of the question) out. The
    backend (for DropoutNTP only) is built on first use, or handed in."""

    continuation = True

    @staticmethod
    def item_id(record: dict) -> str:
        return str(record["id"])

    def prepare(self, record: dict) -> tuple[dict, list[tuple]] | Failure:
        """The question's group, and the DropoutNTP continuations it wants (see `dropout_requests`)."""
        try:
            group = self.group(record)
        except (ValueError, KeyError, TypeError) as err:
            return Failure(self.item_id(record), f"{type(err).__name__}: {err}")
        return group, self.dropout_requests(record, group) if wants_dropout(self.settings.args, record) else []

    def complete(self, records: list[dict], work: list[tuple[dict, list[tuple]]]) -> list[dict | Failure]:
        ntp = [entry for _, entries in work for entry in entries]
        failed: dict[str, Failure] = {}
        if ntp:
            results = self.open_backend().generate([entry[-1] for entry in ntp])
            for (group, c, chosen, prefix, kept, _), result in zip(ntp, results, strict=True):
                if not result.ok:
                    failed[group["id"]] = Failure(group["id"], f"DropoutNTP continuation: {result.error}")
                else:
                    self.add_dropout_pair(group, c, chosen, prefix, kept, result.texts[0], result.num_generated_tokens,
                                          result.applied)
        return [failed.get(group["id"], group) for group, _ in work]

    def group(self, record: dict) -> dict:
        from rlhf.data.images import resolve_image  # an image path outside the root is a ValueError

        qid, responses, gt = str(record["id"]), record["responses"], record.get("answer")
        key = "images" if "images" in record else "image"
        refs = record.get(key)
        refs = [] if refs is None else [refs] if isinstance(refs, str) else list(refs)
        root = self.settings.args.image_root or record.get("image_root")
        if refs and not root:
            raise ValueError("record has images but no image_root; set image_root")
        paths = [resolve_image(root, ref) for ref in refs]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"image not found: {missing[0]}")
        correct, wrong, unparseable, dropped = group_responses(responses)
        cx, dropped["substring"] = correctness_pairs(responses, correct, wrong)
        sets = {PairSet.CORRECTNESS: cx,
                PairSet.FORMAT_NEGATIVE: [(c, u) for c in correct for u in unparseable] if self.settings.args.format_negatives
                else []}
        group: dict[str, Any] = {"id": qid, "images": [str(p) for p in paths], "image_roots": [str(root)] * len(paths),
                                 "multi": isinstance(record.get(key), list),
                                 "prompt": prompt_with_images(record["question"], record["prompt_template"], len(refs)),
                                 "answer": gt, "pass_rate": record.get("pass_rate"), "num_generated_tokens": 0,
                                 "dropped": dropped | {"cap": 0, "identical": 0},
                                 "input_sha": content_sha(record)}  # a resumed run refuses a changed record
        for name, pairs in sets.items():
            kept = cap(pairs, self.settings.args.max_pairs_per_question, random.Random(item_seed(self.settings.sampling.seed, qid, name)))
            group["dropped"]["cap"] += len(pairs) - len(kept)
            group[name] = [p for p in (self.pair(responses, c, r, gt) for c, r in kept) if self.distinct(group, p)]
        group[PairSet.DROPOUT_NTP] = []
        return group

    @staticmethod
    def distinct(group: dict, pair: dict) -> bool:
        """False (counted as dropped "identical") when chosen and rejected read the same."""
        if pair["chosen"].strip() != pair["rejected"].strip():
            return True
        group["dropped"]["identical"] += 1
        return False

    def chosen_text(self, response: dict, gt: str | None) -> tuple[str, bool]:
        text = response["text"]
        if self.settings.args.answer_fix and gt is not None:
            fixed = fix_answer(text, gt.strip())
            return fixed, fixed != text
        return text, False

    def pair(self, responses: list[dict], c: int, r: int, gt: str | None) -> dict:
        chosen, fixed = self.chosen_text(responses[c], gt)
        meta = ("answer", "correct", "score", "matcher")
        rejected, cut = self.rejected_text(chosen, responses[r]["text"])
        return {"chosen": chosen, "rejected": rejected,
                "chosen_meta": {"response": c, **{k: responses[c].get(k) for k in meta}, "answer_fixed": fixed},
                "rejected_meta": {"response": r, **{k: responses[r].get(k) for k in meta}, **cut}}

    def rejected_text(self, chosen: str, rejected: str) -> tuple[str, dict[str, int]]:
        """The rejected text, cut at its first divergent step with `truncate_rejected` (then also the steps kept
        and the steps it had, for the pair's rejected_meta)."""
        if not self.settings.args.truncate_rejected:
            return rejected, {}
        cut, kept, total = truncate_at_divergence(chosen, rejected)
        return cut, {"steps_kept": kept, "steps": total}

    def dropout_requests(self, record: dict, group: dict) -> list[tuple]:
        """(group, chosen index, chosen text, prefix, words kept, request) for each DropoutNTP pair to make."""
        responses, gt = record["responses"], record.get("answer")
        correct, wrong, unparseable, _ = group_responses(responses)
        pool = correct if gt is not None else sorted(correct + wrong + unparseable)
        pool = [i for i in pool
                if dropout_prefix(responses[i]["text"], self.settings.args.dropout_ratio, self.settings.args.dropout_words)[0]]
        rng = random.Random(item_seed(self.settings.sampling.seed, group["id"], PairSet.DROPOUT_NTP.value))
        prompt = build_prompt(strip_images(record["question"]), record["prompt_template"])
        out = []
        for k, c in enumerate(cap(pool, self.settings.args.dropout_pairs_per_question, rng)):
            text, _ = self.chosen_text(responses[c], gt)
            prefix, kept, _ = dropout_prefix(text, self.settings.args.dropout_ratio, self.settings.args.dropout_words)
            request = GenerationRequest(id=f"{group['id']}#ntp{k}", prompt=prompt, sampling=self.settings.sampling.params(1),
                                        seed=item_seed(self.settings.sampling.seed, group["id"], PairSet.DROPOUT_NTP.value, k),
                                        system=record.get("system_prompt"), assistant_prefix=prefix)
            out.append((group, c, text, prefix, kept, request))
        return out

    def add_dropout_pair(self, group: dict, c: int, chosen: str, prefix: str, kept: int, continuation: str,
                         tokens: int | None, applied: dict | None = None) -> None:
        group["num_generated_tokens"] += tokens or 0
        rejected, cut = self.rejected_text(chosen, prefix + continuation)
        pair = {"chosen": chosen, "rejected": rejected, "chosen_meta": {"response": c},
                "rejected_meta": {"prefix_words": kept, "prefix_chars": len(prefix), "continuation_tokens": tokens,
                                  **cut, **({"sampling_applied": applied} if applied is not None else {})}}
        if self.distinct(group, pair):  # the same ending without the image makes no pair
            group[PairSet.DROPOUT_NTP].append(pair)


# -- the MMPR files ------------------------------------------------------------------------------------------------

def write_mmpr(output_dir: str | Path, groups: list[dict]) -> dict[str, int]:
    """Write the pair sets of `groups` (in order) as MMPR annotation files + meta.json; returns pairs per set."""
    output_dir = Path(output_dir)
    roots = [r for g in groups for r in g["image_roots"]]
    root = os.path.commonpath(roots) if roots else None
    meta, counts = {}, {}
    for name in PairSet:
        lines = []
        for g in groups:
            for k, pair in enumerate(g[name]):
                record: dict[str, Any] = {}
                if g["images"]:
                    rel = [os.path.relpath(p, root) for p in g["images"]]
                    record["image"] = rel if g["multi"] else rel[0]
                record |= {"question": g["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                           "answer_gt": g["answer"], "chosen_meta": pair["chosen_meta"],
                           "rejected_meta": pair["rejected_meta"], "id": f"{g['id']}/{name}/{k}",
                           "question_id": g["id"]}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        counts[name] = len(lines)
        path = output_dir / f"{name}.jsonl"
        if not lines:
            path.unlink(missing_ok=True)
            continue
        _write_atomic(path, "".join(lines))
        meta[name] = {"root": root, "annotation": path.name, "data_augment": False, "repeat_time": 1,
                      "length": len(lines)}
        if root is None:
            del meta[name]["root"]
    _write_atomic(output_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return counts


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def summarize(groups: list[dict], counts: dict[str, int]) -> dict[str, Any]:
    n = len(groups)
    rates = [g["pass_rate"] for g in groups if g["pass_rate"] is not None]
    dropped: dict[str, int] = {}
    for g in groups:
        for key, value in g["dropped"].items():
            dropped[key] = dropped.get(key, 0) + value
    return {"questions": n, "questions_with_answer": len(rates),
            "mean_pass_rate": sum(rates) / len(rates) if rates else None,
            "pairs": counts, "pairs_per_question": {k: v / n if n else 0.0 for k, v in counts.items()},
            "questions_with_pairs": {name.value: sum(bool(g[name]) for g in groups) for name in PairSet},
            "dropped": dropped}


def summary_line(summary: dict[str, Any]) -> str:
    rate = summary["mean_pass_rate"]
    head = (f"pairs: {summary['questions']} questions ({summary['questions_with_answer']} with an answer"
            + (f", mean pass rate {rate:.3f}" if rate is not None else "") + ")")
    sets = ", ".join(f"{k} {v} ({summary['pairs_per_question'][k]:.2f}/question)" for k, v in summary["pairs"].items())
    return f"{head}: {sets}"


# -- the job -------------------------------------------------------------------------------------------------------

def read_rollouts(path: str | Path) -> list[dict]:
    """The records of a rollouts.jsonl (or of the rollout folder holding one); one-line errors naming file:line."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{ROLLOUTS_NAME}.jsonl"
    if not path.is_file():
        raise JobInputError(f"{path}: rollouts file not found (merge a sharded rollout job by rerunning it with "
                            "num_shards 1)")
    records = []
    for where, _, record in json_lines(path):
        if not isinstance(record, dict):
            raise JobInputError(f"{where}: expected a JSON object (a record of the rollout job)")
        for key, ok, expected in (
            ("id", isinstance(record.get("id"), (str, int)), "a string or integer"),
            ("question", isinstance(record.get("question"), str), "a string"),
            ("prompt_template", isinstance(record.get("prompt_template"), str), "a string"),
            ("responses", isinstance(record.get("responses"), list) and all(
                isinstance(r, dict) and isinstance(r.get("text"), str) for r in record["responses"]),
             "a list of {text, answer, correct, ...} objects"),
        ):
            if not ok:
                raise JobInputError(f"{where}: {key}: expected {expected} (a record of the rollout job)")
        _check_types(record, where)
        records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(record: dict, where: str) -> None:
    """The typed fields of a rollout record, numbers as answers made strings (`"answer": 42` is "42")."""
    def bad(key: str, expected: str, value: Any) -> JobInputError:
        return JobInputError(f"{where}: {key}: expected {expected}, got {value!r:.60}")

    answer = record.get("answer")
    if _number(answer):
        record["answer"] = answer = str(answer)
    if answer is not None and not isinstance(answer, str):
        raise bad("answer", "a string, a number or null", answer)
    if record.get("pass_rate") is not None and not _number(record["pass_rate"]):
        raise bad("pass_rate", "a number or null", record["pass_rate"])
    for i, r in enumerate(record["responses"]):
        if _number(r.get("answer")):
            r["answer"] = str(r["answer"])
        for key, ok, expected in (
            ("answer", r.get("answer") is None or isinstance(r.get("answer"), str), "a string, a number or null"),
            ("correct", r.get("correct") is None or isinstance(r.get("correct"), bool), "true, false or null"),
            ("score", r.get("score") is None or _number(r.get("score")), "a number or null"),
            ("num_tokens", r.get("num_tokens") is None or _number(r.get("num_tokens")), "a number or null"),
        ):
            if not ok:
                raise bad(f"responses[{i}].{key}", expected, r.get(key))
    for key in ("image_root", "system_prompt"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise bad(key, "a string or null", record[key])


def run(args: PairsArguments, backend_args: BackendArguments, sampling: DropoutSampling, job: JobArguments,
        *, backend: RolloutBackend | None = None) -> dict[str, Any]:
    """Run the pairs job; returns the summary (also in summary.json). `backend` replaces the one `backend_args`
    would build (needed only for DropoutNTP)."""
    from rlhf.jobs.runner import ResultStore

    records = read_rollouts(args.rollouts)
    fingerprint = {"pairs": asdict(args), "sampling": asdict(sampling), "backend": backend_args.fingerprint()}
    changed = ({str(r["id"]): {"rollout record": content_sha(r)} for r in records},
               lambda g, _: {"rollout record": g["input_sha"]} if "input_sha" in g else None)
    systems = {r.get("system_prompt") for r in records} - {None}
    if systems:  # MMPR records carry no system prompt: training must add it
        logger.warning("the rollouts used a system prompt; train on these pairs with --system_prompt %r",
                       sorted(systems)[0])
    # in the driver only for DropoutNTP, and then built up front: one line at start when the policy cannot be used
    needs_backend = job.backend_in_driver and any(wants_dropout(args, r) for r in records)
    job_summary = run_backend_job(records, PairsWorker(PairsSettings(args, sampling, backend_args), backend), job,
                                  name=GROUPS_NAME, desc="pairs", settings_file=SETTINGS_FILE,
                                  fingerprint=fingerprint, changed=changed, needs_backend=needs_backend)
    if job.num_shards > 1:
        return {"job": asdict(job_summary)}
    with ResultStore(job.output_dir, GROUPS_NAME) as store:
        groups = list(store.records())
    counts = write_mmpr(job.output_dir, groups)
    summary = summarize(groups, counts) | {"job": asdict(job_summary)}
    _write_atomic(Path(job.output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _report(summary: dict[str, Any], job: JobArguments) -> tuple[JobSummary, list[str]]:
    if "pairs" not in summary:
        return JobSummary(**summary["job"]), ["shard done: rerun with num_shards 1 once every shard has ended to "
                                              "write meta.json"]
    return JobSummary(**summary["job"]), [summary_line(summary), f"MMPR data: {Path(job.output_dir) / 'meta.json'}"]


def main(argv: list[str]) -> int:
    return job_main(argv, "mmalign pairs", PairsArguments, DropoutSampling, run, _report)
