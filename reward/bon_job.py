"""`mmalign bon --config RECIPE.yaml`: score N responses per question with a PRM, keep the best, evaluate Best-of-N.

Input: JSON lines, one question each:

    {"id": ..., "image": "a.png" | ["a.png", ...] (or "images": [...]), "question": "...", "answer": "gt" (optional),
     "responses": ["text", ...] | [{"text" | "response": "...", "answer": "...", "correct": true}, ...]}

Response objects are the rollout records of the data-generation jobs; their `answer` (extracted) and `correct`
are used when present, else the answer is extracted with `reward.verify.extract_answer` and judged against the
record's `answer` (or `answer_gt`) with `reward.verify.is_correct`. A question without either is scored and
selected but left out of the accuracy metrics. Relative image paths resolve against `image_root` (default: the
data file's folder). `id` is a non-empty string or an integer, unique over all files; a record without one is
keyed `FILE:LINE` (the data file as given) in scores.jsonl and keeps its line number as `id` in selected.jsonl.

The job runs in two phases.

1. Scoring, through the resumable runner of the data jobs (`rlhf.jobs.runner`), one item per question: the PRM
   scores every response of a question (`PRMScorer.score_many`), one line of `scores.jsonl` per question
   (`{"id", "scores": [solution score per response], "step_scores": [[step scores] per response], "scoring":
   {the scorer's work for it}, "input_sha"}`), committed with fsync as it comes. A rerun scores only the questions
   without a line (a killed run, even by SIGKILL, loses no finished question); a question that fails (the scorer
   raised for it) goes to failures.jsonl and is retried on the next run. `--executor ray --workers N` scores on N
   Ray actors (`--cpus_per_worker`, `--gpus_per_worker`, `--ray_address`), `--workers N` alone on N local
   processes: each loads its own PRM on its first question (`ScoreWorker`), and the files are the same as one
   local process writes (`rlhf.jobs.ray_executor`). These are the data jobs' `RunnerArguments`
   (`rlhf.jobs.settings`), with their meaning and checks, `--resume false` included (old files moved to *.bak).
   On a cluster the data files and images must be at the same paths on every node. A resumed run refuses (one
   line) a folder scored with other PRM settings (`bon_settings.json`: model, aggregation, method, the PRM's step
   settings, max_patches, dtype, trust_remote_code, seed) or a question whose text, images or responses changed
   since its line was written.
2. Best-of-N, from scores.jsonl and the input: `selected.jsonl` (per question: the selected response and every
   response's step and solution scores), `bon_metrics.json` (its `scoring` adds up the questions' `scoring`),
   `bon_table.md` and `bon_curve.png` (see `reward.bon` for the definitions): the numbers a single pass of the PRM
   over the questions gives. They are written only when every question has its scores; otherwise the job exits
   with status 1 and one line naming failures.jsonl, and no stale outputs of an earlier run are left behind.

A bad record stops the job with one line `file:line: field ...: expected ...`; with `--skip_invalid true` bad
records go to `rejects.jsonl` with their error and the job goes on.

The PRM's step settings (`step_split`, `max_steps_per_solution`, `system_prompt`: `reward.step_settings`) come from
its checkpoint's step_settings.json, which `mmalign prm` saves. The flags of the same names may only repeat them: one
that disagrees stops the job with one line before any scoring. A checkpoint without the file is scored with the
flags given and the defaults (no step_split, no step limit, the published system prompt) for the rest, with a
warning.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhf.choices import parse_choice
from rlhf.errors import UserError

from .checks import FormatError
from .scorer import Aggregation, ScoringMethod
from .step_settings import StepSettings, scoring_settings

logger = logging.getLogger("mmalign.bon")
REJECTS_FILE = "rejects.jsonl"
SCORES_NAME = "scores"  # scores.jsonl: the scoring phase's resumable work (rlhf.jobs.runner)
SETTINGS_FILE = "bon_settings.json"
# the ScorerArguments that change what the PRM gives (not how fast: batch_size, device); a resume must keep them,
# and the PRM's step settings (`step_settings`)
SCORE_SETTINGS = ("model_name_or_path", "aggregation", "method", "max_patches", "dtype", "trust_remote_code", "seed")
STEP_FLAGS = ("step_split", "max_steps_per_solution", "system_prompt")  # may only repeat the checkpoint's
OUTPUT_FILES = ("selected.jsonl", "bon_metrics.json", "bon_table.md", "bon_curve.png")  # made from scores.jsonl
INPUT_FIELDS = "question, images or responses"  # what refuse_changed names when a scored question changed
GROUND_TRUTH_KEYS = ("answer", "answer_gt")
TEXT_KEYS = ("text", "response")


@dataclass
class ScorerArguments:
    """Settings shared by the `bon` and `eval-prm` jobs: which PRM, how to run it."""

    model_name_or_path: str = field(metadata={"help": "PRM checkpoint folder, or an embedded name (tiny-internvl)."})
    data: list[str] = field(metadata={"help": "Input JSON-lines file(s)."})
    output_dir: str = field(metadata={"help": "Where the outputs are written."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths "
                                                                   "(default: each data file's folder)."})
    aggregation: str = field(default=Aggregation.MEAN.value, metadata={
        "help": f"Step scores -> solution score: {', '.join(Aggregation)}."})
    method: str = field(default=ScoringMethod.SHARED_PREFIX.value, metadata={
        "help": f"How the PRM runs (same scores, different cost): {', '.join(ScoringMethod)}."})
    max_steps_per_solution: int | None = field(default=None, metadata={
        "help": "More steps of a text solution are merged evenly (default: the PRM's step_settings.json; given, it "
                "must agree)."})
    step_split: str | None = field(default=None, metadata={
        "help": "Ours: the pattern that also ends steps inside blank-line steps (default: the PRM's "
                "step_settings.json; given, it must agree; '' for none)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "The PRM's system turn (default: the PRM's step_settings.json, else the published PRM prompt; "
                "given, it must agree; '' for none)."})
    batch_size: int = field(default=8, metadata={"help": "Solutions per forward pass."})
    max_patches: int | None = field(default=None, metadata={"help": "Tile budget per question (default: the "
                                                                      "processor's)."})
    dtype: str | None = field(default=None, metadata={"help": "float32 (default), bfloat16, float16 or auto."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if any)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow checkpoint code (off by default)."})
    seed: int = field(default=0, metadata={"help": "Seed of an embedded tiny model's random weights."})
    skip_invalid: bool = field(default=False, metadata={"help": f"Write bad records to {REJECTS_FILE} and go on."})

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = [self.data]
        for name, enum in (("aggregation", Aggregation), ("method", ScoringMethod)):
            parse_choice(enum, getattr(self, name), name, UserError)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        StepSettings(**{name: getattr(self, name) for name in STEP_FLAGS})  # each flag checked, one line


@dataclass
class BoNRecord:
    line: int
    path: str
    id: Any
    question: str
    images: list[str]
    ground_truth: str | None
    texts: list[str]
    answers: list[str | None]
    correct: list[bool | None]
    key: str | int  # the record's id, or FILE:LINE without one: its line in scores.jsonl

    def scoring_item(self) -> dict[str, Any]:
        """What the PRM sees of the question: the runner's item."""
        return {"id": self.key, "question": self.question, "images": self.images, "texts": self.texts}


def _str(value: Any, name: str, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str) or (not blank_ok and not value.strip()):
        raise FormatError(name, "a non-empty string" + (f", got {value!r:.60}" if value is not None else ""))
    return value


def _image_list(obj: dict, root: Path) -> list[str]:
    from rlhf.data.images import image_problem, resolve_image

    if "image" in obj and "images" in obj:
        raise FormatError("images", "either 'image' or 'images', not both")
    key = "images" if "images" in obj else "image"
    value = obj.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise FormatError(key, f"a path or a list of paths, got {value!r:.60}")
    paths = []
    for i, item in enumerate(items):
        name = key if isinstance(value, str) else f"{key}[{i}]"
        try:
            path = resolve_image(root, _str(item, name))
        except ValueError as err:
            raise FormatError(name, f"a path inside the image root ({err}); set image_root to the images' folder") \
                from None
        if not path.is_file():
            raise FormatError(name, f"an existing image file ({path} not found)")
        problem = image_problem(path)
        if problem is not None:
            raise FormatError(name, f"a readable image file ({problem})")
        paths.append(str(path))
    return paths


def _response(entry: Any, i: int, ground_truth: str | None) -> tuple[str, str | None, bool | None]:
    from .verify import extract_answer, is_correct

    name = f"responses[{i}]"
    if isinstance(entry, str):
        text, extra = entry, {}
    elif isinstance(entry, dict):
        key = next((k for k in TEXT_KEYS if k in entry), None)
        if key is None:
            raise FormatError(name, "a string or an object with a 'text' (or 'response') string")
        text, extra = _str(entry[key], f"{name}.{key}", blank_ok=True), entry
    else:
        raise FormatError(name, f"a string or an object with a 'text' string, got {entry!r:.60}")
    answer = extra.get("answer", _MISSING)
    if answer is _MISSING:
        answer = extract_answer(text)
    elif answer is not None:
        answer = _str(answer, f"{name}.answer", blank_ok=True)
    correct = extra.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise FormatError(f"{name}.correct", f"true or false, got {correct!r:.60}")
    if correct is None and ground_truth is not None:
        correct = is_correct(text, ground_truth)
    return text, answer, correct


_MISSING = object()


def _key(obj: dict, line: int, path: str) -> str | int:
    value = obj.get("id")
    if value is None:
        return f"{path}:{line}"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise FormatError("id", f"a non-empty string or an integer (it keys the question in {SCORES_NAME}.jsonl), "
                                f"got {value!r:.60}")
    return value


def parse_record(obj: Any, line: int, path: str, root: Path) -> BoNRecord:
    if not isinstance(obj, dict):
        raise FormatError(None, f"a JSON object per line, got {type(obj).__name__}")
    row_key = _key(obj, line, path)
    question = _str(obj.get("question"), "question")
    images = _image_list(obj, root)
    placeholders = question.count("<image>")
    if placeholders not in (0, len(images)):
        raise FormatError("question", f"one <image> placeholder per image (or none): {len(images)} image(s), got "
                          f"{placeholders} placeholder(s)")
    key = next((k for k in GROUND_TRUTH_KEYS if obj.get(k) is not None), None)
    ground_truth = None if key is None else _str(obj[key], key)
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses:
        raise FormatError("responses", "a non-empty list of responses")
    parsed = [_response(r, i, ground_truth) for i, r in enumerate(responses)]
    texts, answers, correct = (list(x) for x in zip(*parsed))
    return BoNRecord(line, path, obj.get("id", line), question, images, ground_truth, texts, answers, correct, row_key)


def read_records(paths: list[str], image_root: str | None, *, skip_invalid: bool, rejects: Path,
                 parse=parse_record) -> list:
    """Every record of every file, validated before any model work; bad ones raise or go to `rejects`."""
    records, bad, first = [], [], {}
    for path in paths:
        root = Path(image_root) if image_root else Path(path).parent
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read ({err})") from None
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise FormatError(None, f"one JSON object per line ({err.msg} at column {err.colno})") from None
                record = parse(obj, n, path, root)
                if isinstance(obj, dict) and obj.get("id") is not None:  # ids name the output rows
                    key = str(obj["id"])
                    if key in first:
                        raise FormatError("id", f"a unique id, got {obj['id']!r} again (first at {first[key]})")
                    first[key] = f"{path}:{n}"
                records.append(record)
            except FormatError as err:
                bad.append((err.at(path, n), raw))
    if bad and not skip_invalid:
        more = f" ({len(bad)} bad records in all)" if len(bad) > 1 else ""
        raise UserError(f"{bad[0][0]}{more}; fix them, or pass --skip_invalid true to write them to {rejects.name} "
                        "and go on")
    if bad:
        with rejects.open("w", encoding="utf-8") as f:
            for err, raw in bad:
                f.write(json.dumps({"file": err.path, "line": err.line, "error": str(err), "record": raw}) + "\n")
        logger.warning("skipped %d bad records (see %s)", len(bad), rejects)
    if not records:
        raise UserError(f"{', '.join(paths)}: no valid records")
    return records


def step_settings(args: ScorerArguments) -> StepSettings:
    """The PRM's step settings: its checkpoint's, which the flags may only repeat (`scoring_settings`)."""
    return scoring_settings(args.model_name_or_path, **{name: getattr(args, name) for name in STEP_FLAGS})


def load_scorer(args: ScorerArguments):
    import torch

    from rlhf.models import load_model_and_processor

    from .scorer import PRMScorer

    settings = step_settings(args)  # a flag that disagrees with the checkpoint: one line before loading it
    model, processor = load_model_and_processor(args.model_name_or_path, dtype=args.dtype, seed=args.seed,
                                                trust_remote_code=args.trust_remote_code)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return PRMScorer(model, processor, aggregation=args.aggregation, batch_size=args.batch_size, method=args.method,
                     max_patches=args.max_patches, settings=settings)


def parse(argv: list[str], cls=ScorerArguments, prog: str = "mmalign bon"):
    from rlhf.args import parse_job_args

    (args,) = parse_job_args((cls,), argv, prog)
    return args


class ScoreWorker:
    """process_fn of the scoring phase: questions (`BoNRecord.scoring_item`) in, one scores.jsonl row per question
    out. Picklable: the PRM is loaded on the first call in the process that runs it (this one, a local worker
    process or a Ray actor), or handed in. A PRM that cannot load stops the job (FatalJobError, one line): no later
    question could be scored either."""

    def __init__(self, args: ScorerArguments, scorer=None):
        self.args = args
        self.scorer = scorer

    def __getstate__(self) -> dict:
        return {"args": self.args, "scorer": None}

    def __call__(self, items: list[dict]) -> Iterator[dict]:
        from rlhf.jobs.runner import FatalJobError

        if self.scorer is None:
            try:
                self.scorer = load_scorer(self.args)
            except UserError as err:
                raise FatalJobError(str(err)) from err
            except Exception as err:
                raise FatalJobError(f"{self.args.model_name_or_path}: cannot load the PRM "
                                    f"({type(err).__name__}: {err})") from err
        for item in items:
            self.scorer.stats.reset()  # the work for this question alone, whoever scored the ones before
            scores = self.scorer.score_many(item["question"], item["images"], item["texts"])
            yield {"id": item["id"], "scores": [s.score for s in scores],
                   "step_scores": [s.step_scores for s in scores], "scoring": asdict(self.scorer.stats),
                   "input_sha": _input_sha(item)}


def _input_sha(item: dict) -> str:
    from rlhf.jobs.settings import content_sha

    return content_sha({k: v for k, v in item.items() if k != "id"})


def score_questions(records: list[BoNRecord], args: ScorerArguments, runner, *, scorer=None) -> dict[str, dict]:
    """Phase 1: every question's scores.jsonl row by id (as a string), scoring those without one through the
    runner (`runner`: RunnerArguments); questions that failed are missing (their reasons in failures.jsonl).
    `scorer` replaces the one each worker would load (a single local worker only)."""
    from rlhf.jobs.runner import ResultStore, run_job
    from rlhf.jobs.settings import check_settings, refuse_changed
    from rlhf.models import check_model_path

    out = Path(args.output_dir)
    items = [r.scoring_item() for r in records]
    if scorer is None:
        check_model_path(args.model_name_or_path)  # a model folder mistake: one line before any work
    settings = {k: getattr(args, k) for k in SCORE_SETTINGS} | {"step_settings": step_settings(args).to_json()}
    check_settings(out, SETTINGS_FILE, settings, runner.resume)
    if runner.resume:
        refuse_changed(out, SCORES_NAME, {str(i["id"]): {INPUT_FIELDS: _input_sha(i)} for i in items},
                       lambda row, _: {INPUT_FIELDS: row.get("input_sha")})
    for name in OUTPUT_FILES:  # an earlier run's: made anew from scores.jsonl after this, or not at all
        (out / name).unlink(missing_ok=True)
    run_job(items, ScoreWorker(args, scorer), out, name=SCORES_NAME, batch_size=1, desc="bon",
            **runner.run_kwargs())
    with ResultStore(out, SCORES_NAME) as store:
        return {str(row["id"]): row for row in store.records()}


def write_outputs(records: list[BoNRecord], scores: dict[str, dict], args: ScorerArguments) -> dict[str, Any]:
    """Phase 2: selected.jsonl, bon_metrics.json, bon_table.md and bon_curve.png from every question's scores;
    returns the bon_metrics.json summary."""
    from .bon import QuestionResponses, bon_metrics, markdown_table, plot_curve
    from .scorer import ScoringStats

    out = Path(args.output_dir)
    evaluated = []
    work = ScoringStats()
    with (out / "selected.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            scored = scores[str(r.key)]
            solution, step_scores = scored["scores"], scored["step_scores"]
            for name, value in scored["scoring"].items():
                setattr(work, name, getattr(work, name) + value)
            best = max(range(len(solution)), key=lambda i: (solution[i], -i))
            row = {"id": r.id, "question": r.question, "images": r.images, "answer": r.ground_truth,
                   "selected": best, "response": r.texts[best], "selected_answer": r.answers[best],
                   "selected_correct": r.correct[best], "score": solution[best],
                   "step_scores": step_scores[best], "scores": solution,
                   "all_step_scores": step_scores, "answers": r.answers, "correct": r.correct}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            if all(c is not None for c in r.correct):
                evaluated.append(QuestionResponses(solution, r.answers, r.correct))
    summary: dict[str, Any] = {"n_questions": len(records), "n_evaluated": len(evaluated),
                               "aggregation": args.aggregation, "scoring": asdict(work)}
    if evaluated:
        metrics = bon_metrics(evaluated)
        n = [q.n for q in evaluated]
        summary.update(n_responses_min=min(n), n_responses_max=max(n),
                       metrics={m: {str(k): v for k, v in ks.items()} for m, ks in metrics.items()})
        title = f"Best-of-N: {len(evaluated)} questions, PRM {Path(args.model_name_or_path).name}"
        (out / "bon_table.md").write_text(f"# {title}\n\nAccuracy (%) with the first k responses.\n\n"
                                          + markdown_table(metrics))
        plot_curve(metrics, out / "bon_curve.png", title="Best-of-N")
        logger.info("%s\n%s", title, markdown_table(metrics))
    else:
        logger.warning("no question has a ground truth or per-response correctness: selection only, no metrics")
    (out / "bon_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> int:
    import sys

    from rlhf.args import parse_job_args
    from rlhf.jobs.settings import RunnerArguments

    args, runner = parse_job_args((ScorerArguments, RunnerArguments), argv, "mmalign bon")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(args.data, args.image_root, skip_invalid=args.skip_invalid, rejects=out / REJECTS_FILE)
    scores = score_questions(records, args, runner)
    missing = [r for r in records if str(r.key) not in scores]
    if missing:
        print(f"{SCORES_NAME}: {len(missing)} of {len(records)} questions have no scores (first: id "
              f"{str(missing[0].key)!r}); see {out / 'failures.jsonl'} for the reasons; a rerun retries them, then "
              "writes the Best-of-N outputs", file=sys.stderr)
        return 1
    write_outputs(records, scores, args)
    logger.info("wrote %s", out)
    return 0
