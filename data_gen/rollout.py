"""`mmalign rollout --config RECIPE.yaml`: sample K responses per question and judge each against the answer.

Input (`questions`): JSON lines, one question each,

    {"id": "q1", "image": "a.png" | "images": ["a.png", "b.png"] (optional), "question": "<image>\\n...",
     "answer": "24" (optional; also read from "answer_gt")}

with image paths relative to `image_root` (default: the file's folder), or an MMPR meta.json (each distinct
(image, question) of its pairs becomes one question with id `{data set}:{line}` and its `answer_gt`).

Output in `output_dir` (see `rlhf.jobs.runner` for resuming, sharding, failures.jsonl and summary.json):

    rollouts.jsonl    {"id", "image" | "images" (as given), "image_root", "question", "answer", "prompt_template",
                       "system_prompt", "sampling", "responses": [{"text", "answer", "correct", "score", "matcher",
                       "num_tokens"}], "pass_rate", "num_generated_tokens", "meta"}
    rollout_settings.json   the settings that shape the records; a resumed run must use the same ones

Sample j of question `id` is seeded from `item_seed(seed, id)` and j alone, so a rerun, a resumed run or another
sharding gives the same responses. With `reference_key`, the question's reference solution is judged and added
as one more response marked `"reference": true` (pass_rate counts the samples only). A question without an answer
gets its responses' extracted answers with `correct`, `score`, `matcher` and `pass_rate` null. `num_tokens` is
the backend's token count for the request spread evenly over its responses (backends report one count per request).
An unreadable image or an image path outside the root fails that question (failures.jsonl, retried on the next
run); the job goes on. A backend that cannot be reached stops the job at start with one line.

The argument classes here are shared with the `pairs` and `label-steps` jobs (`JobArguments` extends
`rlhf.jobs.settings.RunnerArguments`, which `mmalign bon` shares too).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhf.errors import UserError
from rlhf.jobs.runner import Failure, JobInputError, item_seed
from rlhf.jobs.settings import RunnerArguments, check_settings, refuse_changed

from .backends.base import BACKENDS, BackendUnavailable, GenerationRequest, RolloutBackend, SamplingParams
from .prompts import AUTO_SYSTEM, PromptTemplate, build_prompt, is_boxed_template, rollout_system_prompt

logger = logging.getLogger("mmalign.rollout")

ROLLOUTS_NAME = "rollouts"
SETTINGS_FILE = "rollout_settings.json"
# backend name -> the constructor parameter that names the policy
MODEL_PARAMETER = {"hf": "model_name_or_path", "vllm": "model_path", "openai": "model"}
IMAGE_KEYS = ("image", "images")
ANSWER_KEYS = ("answer", "answer_gt")
ANSWER_MODE_AUTO = "auto"  # judging mode by each question's data set name (reward.verify.mode_for_source)
UNBOXED_JUDGE_WHOLE = "judge_whole"  # InternVL: under a boxed prompt, a response without a box is judged whole
UNBOXED = (UNBOXED_JUDGE_WHOLE, "format_negative")


# -- settings shared by the data jobs ------------------------------------------------------------------------------

@dataclass
class BackendArguments:
    """Which policy samples, and how it runs."""

    backend: str = field(default="hf", metadata={"help": f"Rollout backend: {', '.join(BACKENDS)}."})
    model: str | None = field(default=None, metadata={
        "help": "The policy: a checkpoint folder or embedded name (hf), a model path (vllm), a served model name "
                "(openai)."})
    backend_kwargs: dict | str | None = field(default=None, metadata={
        "help": "More constructor arguments of the backend, a mapping (YAML) or JSON text, e.g. "
                "'{\"batch_size\": 16, \"device\": \"cuda\"}' for hf or '{\"base_url\": ...}' for openai."})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if isinstance(self.backend_kwargs, str):
            try:
                self.backend_kwargs = json.loads(self.backend_kwargs)
            except json.JSONDecodeError as err:
                raise UserError(f"backend_kwargs: not JSON ({err.msg}): {self.backend_kwargs!r:.80}") from None
        if not isinstance(self.backend_kwargs or {}, dict):
            raise UserError(f"backend_kwargs must be a mapping, got {self.backend_kwargs!r:.80}")

    def kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.backend_kwargs or {})
        if self.model is not None:
            kwargs[MODEL_PARAMETER[self.backend]] = self.model
        return kwargs

    def make(self, continuation: bool = False) -> RolloutBackend:
        """The backend, built and checked (BackendUnavailable, one line, when it cannot be used); `continuation`:
        the job continues partial assistant messages (label-steps, DropoutNTP), checked up front too."""
        from .backends.base import make_backend

        try:
            backend = make_backend(self.backend, **self.kwargs())
        except TypeError as err:  # a misspelt backend_kwargs key
            raise UserError(f"backend {self.backend!r}: {err}") from None
        backend.check()
        if continuation:
            backend.check_continuation()
        return backend


@dataclass
class SamplingArguments:
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: no cut)."})
    top_k: int | None = field(default=50, metadata={"help": "Top-k cut (None: no cut)."})
    max_new_tokens: int = field(default=4096, metadata={"help": "New tokens per response at most."})
    seed: int = field(default=0, metadata={"help": "Base seed; question `id` samples with item_seed(seed, id)."})

    def __post_init__(self) -> None:  # before the first item: a setting that fails every item stops the job here
        from rlhf.args import SettingError

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

        for name, ok, expected in (
            ("temperature", number(self.temperature) and 0 <= self.temperature < float("inf"), "a number >= 0"),
            ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", self.top_k is None or (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                                             and self.top_k >= 1), "an integer >= 1, or null for no cut"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
             and self.max_new_tokens >= 1, "an integer >= 1"),
            ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool), "an integer"),
        ):
            if not ok:
                raise SettingError(name, expected, getattr(self, name))

    def params(self, n: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, n=n, seed=self.seed)


@dataclass
class JobArguments(RunnerArguments):
    """A data job's folder, sharding and batches; where its workers run and resuming are `RunnerArguments`
    (`rlhf.jobs.settings`), shared with `mmalign bon`."""

    output_dir: str = field(kw_only=True, metadata={"help": "Where the job writes (one job per folder)."})
    num_shards: int = field(default=1, metadata={"help": "Split the job over this many machines..."})
    shard_index: int = field(default=0, metadata={"help": "...and run this shard (merge with num_shards 1)."})
    batch_size: int = field(default=8, metadata={"help": "Questions handed to the backend at once."})
    max_failure_rate: float = field(default=0.5, metadata={
        "help": "Exit with status 1 (one summary line) when more than this share of the items processed in a run "
                "failed; every failure is in failures.jsonl either way. 1: never."})

    def __post_init__(self) -> None:
        from rlhf.args import SettingError

        super().__post_init__()
        for name in ("num_shards", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(name, "an integer >= 1", value)
        rate = self.max_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise SettingError("max_failure_rate", "a number in [0, 1]", rate)

    @property
    def own_shard(self) -> int | None:
        """The shard whose files this run writes, None for the merged files (num_shards 1)."""
        return self.shard_index if self.num_shards > 1 else None

    def failure_status(self, summary) -> int:
        """0, or 1 with one line on stderr when more than `max_failure_rate` of the processed items failed."""
        import sys

        if summary.processed and summary.failed / summary.processed > self.max_failure_rate:
            share = "every item" if summary.failed == summary.processed else \
                f"{summary.failed} of {summary.processed} items"
            print(f"{summary.name}: {share} failed this run (more than max_failure_rate {self.max_failure_rate:g}); "
                  f"see {Path(self.output_dir) / 'failures.jsonl'} for the reasons; a rerun retries them",
                  file=sys.stderr)
            return 1
        return 0


def parse_args(types: tuple, argv: list[str], prog: str) -> tuple:
    from rlhf.args import parse_job_args

    return parse_job_args(types, argv, prog)


def resolve_image(root: str | Path, ref: str) -> Path:
    """`ref` resolved against `root` (symlinks and `..` followed); ValueError when it lands outside `root`
    (`rlhf.data.images.resolve_image`, the rule of every reader)."""
    from rlhf.data.images import resolve_image as confined

    return confined(root, ref)


# -- questions -----------------------------------------------------------------------------------------------------

@dataclass
class Question:
    id: str
    question: str
    answer: str | None
    image_key: str | None = None  # "image" or "images" as in the input; None: text only
    image_value: str | list[str] | None = None  # as given
    image_root: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # the MMPR data set a question of a meta.json came from

    @property
    def source(self) -> str | None:
        """The data set name that picks the judging mode: the question's `source` field, else its MMPR data set."""
        source = self.meta.get("source")
        return source if isinstance(source, str) and source else self.dataset

    @property
    def image_refs(self) -> list[str]:
        v = self.image_value
        return [] if v is None else [v] if isinstance(v, str) else list(v)


def _is_meta(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(isinstance(v, dict) and "annotation" in v for v in data.values())


def json_lines(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(`file:line`, line number, value) for every non-blank line; malformed JSON is a one-line JobInputError."""
    with path.open(encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, line_no, json.loads(text)
            except json.JSONDecodeError as err:
                raise JobInputError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None


def read_questions(path: str | Path, image_root: str | Path | None = None) -> list[Question]:
    """Questions from a JSON-lines file or an MMPR meta.json; a bad line is a one-line JobInputError naming
    file:line and the field."""
    path = Path(path)
    if not path.is_file():
        raise JobInputError(f"{path}: questions file not found")
    if _is_meta(path):
        return _questions_from_mmpr(path)
    root = str(Path(image_root if image_root is not None else path.parent).resolve())
    questions, first_line = [], {}
    for where, line_no, obj in json_lines(path):
        q = _question(obj, where, root)
        if q.id in first_line:
            raise JobInputError(f"{where}: id: duplicate {q.id!r} (first at line {first_line[q.id]})")
        first_line[q.id] = line_no
        questions.append(q)
    return questions


def _question(obj: Any, where: str, root: str) -> Question:
    def bad(key: str, expected: str, got: Any = None) -> JobInputError:
        return JobInputError(f"{where}: {key}: expected {expected}, got {got!r:.60}")

    if not isinstance(obj, dict):
        raise bad("record", "a JSON object", obj)
    qid = obj.get("id")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
        raise bad("id", "a non-empty string or integer", qid)
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("question", "a non-empty string", question)
    answer_key = next((k for k in ANSWER_KEYS if k in obj), None)
    answer = obj.get(answer_key) if answer_key else None
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise bad(answer_key, "a non-empty string, a number or null", answer)
    keys = [k for k in IMAGE_KEYS if obj.get(k) is not None]
    if len(keys) > 1:
        raise JobInputError(f"{where}: image: give either 'image' or 'images', not both")
    key = keys[0] if keys else None
    value = obj.get(key) if key else None
    refs = [value] if isinstance(value, str) else value
    if key and (not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs)):
        raise bad(key, "a path or a non-empty list of paths", value)
    n_placeholders, n_images = question.count("<image>"), len(refs or [])
    if n_placeholders not in (0, n_images):
        raise JobInputError(f"{where}: question: has {n_placeholders} <image> placeholder(s) but the record has "
                            f"{n_images} image(s)")
    known = {"id", "question", *ANSWER_KEYS, *IMAGE_KEYS}
    return Question(id=str(qid), question=question, answer=answer, image_key=key, image_value=value,
                    image_root=root if key else None, meta={k: v for k, v in obj.items() if k not in known})


def _questions_from_mmpr(path: Path) -> list[Question]:
    from rlhf.data.mmpr import read_mmpr

    questions, seen = [], set()
    for record in read_mmpr(path):
        issues = [(f, m) for f, m in record.read_issues if f.split("[")[0] in ("record", "question", "image")]
        if issues:
            raise JobInputError(f"{record.file}:{record.line}: {issues[0][0]}: {issues[0][1]}")
        value = record.raw.get("image")
        key = (record.source, record.question, json.dumps(value))
        if key in seen:
            continue
        seen.add(key)
        questions.append(Question(id=f"{record.source}:{record.line}", question=record.question,
                                  answer=record.answer_gt if (record.answer_gt or "").strip() else None,
                                  image_key="image" if value is not None else None, image_value=value,
                                  image_root=record.image_root if value is not None else None,
                                  dataset=record.source))
    return questions


def load_question_images(q: Question) -> list:
    """The question's images as RGB PIL images; ValueError/ImageLoadError naming the file on failure."""
    from rlhf.data.images import load_image

    return [load_image(resolve_image(q.image_root, ref)) for ref in q.image_refs]


# -- the work ------------------------------------------------------------------------------------------------------

@dataclass
class RolloutSettings:
    num_samples: int
    prompt_template: str
    system_prompt: str | None
    threshold: float
    reference_key: str | None
    sampling: SamplingArguments
    backend: BackendArguments
    answer_mode: str = ANSWER_MODE_AUTO
    unboxed: str = "judge_whole"

    def mode(self, q: Question) -> str:
        """The judging mode of question `q`: the setting, or with 'auto' InternVL's mode for its data set's name
        (the `source` field, or the MMPR data set it came from; `math` when it has none)."""
        if self.answer_mode != ANSWER_MODE_AUTO:
            return self.answer_mode
        from reward.verify import mode_for_source

        return mode_for_source(q.source).value


class RolloutWorker:
    """process_fn of the rollout job: a batch of questions in, one judged record (or Failure) per question out.
    Picklable: the backend is built on first use in each worker process (or handed in for a single process)."""

    def __init__(self, settings: RolloutSettings, backend: RolloutBackend | None = None):
        self.settings = settings
        self.backend = backend

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "backend": None}

    def __call__(self, questions: list[Question]) -> list[dict | Failure]:
        from rlhf.data.images import ImageLoadError

        if self.backend is None:
            self.backend = self.settings.backend.make()
        s = self.settings
        outcomes: dict[str, dict | Failure] = {}
        requests, asked = [], []
        for q in questions:
            try:
                images = load_question_images(q)
            except (ImageLoadError, ValueError) as err:
                outcomes[q.id] = Failure(q.id, str(err))
                continue
            seed = item_seed(s.sampling.seed, q.id)
            requests.append(GenerationRequest(id=q.id, prompt=build_prompt(q.question, s.prompt_template),
                                              images=images, sampling=s.sampling.params(s.num_samples), seed=seed,
                                              system=s.system_prompt))
            asked.append(q)
        for q, request, result in zip(asked, requests, self.backend.generate(requests), strict=True):
            if not result.ok:
                outcomes[q.id] = Failure(q.id, f"backend: {result.error}")
                continue
            outcomes[q.id] = self.record(q, request, result.texts, result.num_generated_tokens)
            if result.applied is not None:  # what a server was sent after adapting to it
                outcomes[q.id]["sampling"]["applied"] = result.applied
        return [outcomes[q.id] for q in questions]

    def judge(self, text: str, answer: str, mode: str):
        """The verdict of one response. Under a boxed prompt a response without a (closed) `\\boxed{}` is judged
        as a whole, as InternVL's pipeline does (`unboxed: judge_whole`), so it is a wrong answer, not a format
        negative; `unboxed: format_negative` (ours) falls back to an "Answer:" line and else leaves no answer."""
        from reward.verify import boxed_answer, judge

        s = self.settings
        if s.unboxed == UNBOXED_JUDGE_WHOLE and is_boxed_template(s.prompt_template) and boxed_answer(text) is None \
                and text.strip():
            return judge(text, answer, threshold=s.threshold, mode=mode, extracted=True)
        return judge(text, answer, threshold=s.threshold, mode=mode)

    def record(self, q: Question, request: GenerationRequest, texts: list[str], tokens: int | None) -> dict:
        from reward.verify import extract_answer, judge

        def judged(text: str, n: int | None) -> dict:
            if q.answer is None:
                return {"text": text, "answer": extract_answer(text), "correct": None, "score": None,
                        "matcher": None, "num_tokens": n}
            v = self.judge(text, q.answer, self.settings.mode(q))
            return {"text": text, "answer": v.answer, "correct": v.correct, "score": v.score, "matcher": v.matcher,
                    "num_tokens": n}

        responses = [judged(text, n) for text, n in zip(texts, _spread(tokens, len(texts)))]
        passed = None if q.answer is None else sum(r["correct"] for r in responses) / max(1, len(responses))
        reference = q.meta.get(self.settings.reference_key) if self.settings.reference_key else None
        if isinstance(reference, str) and reference.strip():
            responses.append(judged(reference, 0) | {"reference": True})
        sampling = asdict(request.sampling) | {"seed": request.seed}
        sampling.pop("stop", None)
        record: dict[str, Any] = {"id": q.id}
        if q.image_key:
            record[q.image_key] = q.image_value
            record["image_root"] = q.image_root
        record |= {
            "question": q.question, "answer": q.answer, "prompt_template": self.settings.prompt_template,
            "system_prompt": self.settings.system_prompt, "sampling": sampling, "responses": responses,
            "pass_rate": passed,
            "num_generated_tokens": tokens or 0, "meta": q.meta,
        }
        return record


def _spread(total: int | None, n: int) -> list[int | None]:
    """`total` tokens over n responses as evenly as possible (the first ones get the remainder)."""
    if total is None or n == 0:
        return [None] * n
    return [total // n + (i < total % n) for i in range(n)]


# -- the job -------------------------------------------------------------------------------------------------------

@dataclass
class RolloutArguments:
    questions: str = field(metadata={"help": "Question JSON lines (id, image/images, question, answer) or an MMPR "
                                             "meta.json."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths (default: the "
                                                                   "questions file's folder)."})
    num_samples: int = field(default=32, metadata={"help": "Responses per question (K)."})
    prompt_template: str = field(default=PromptTemplate.BOXED.value, metadata={
        "help": f"{', '.join(PromptTemplate)}, or a format string with {{question}}."})
    system_prompt: str | None = field(default=AUTO_SYSTEM, metadata={
        "help": "System prompt of every request: 'auto' (the model family's default: InternVL's system message for an "
                "InternVL checkpoint, as InternVL's rollouts; none for other models), 'internvl2_5', any text, or "
                "''/null for none."})
    unboxed: str = field(default=UNBOXED_JUDGE_WHOLE, metadata={
        "help": "Under a boxed prompt, a response without \\boxed{}: judge_whole (InternVL: the whole response is "
                "the answer, so it is a wrong answer) or format_negative (ours: an 'Answer:' line, else no answer, a "
                "format negative for the pairs job)."})
    answer_mode: str = field(default=ANSWER_MODE_AUTO, metadata={
        "help": "How answers are judged: 'auto' (by each question's data set name as InternVL does: chartqa "
                "relaxed, docvqa/infographics anls, geometry sets geometry, else math) or one of "
                "math, exact, relaxed, anls, geometry, multiple_choice, all (ours: every matcher, 5% on every number)."})
    threshold: float = field(default=0.9, metadata={"help": "A response is correct iff its score > threshold."})
    reference_key: str | None = field(default=None, metadata={
        "help": "A question field holding a reference solution (e.g. 'solution'): judged and added after the "
                "samples as a response with \"reference\": true (not counted in pass_rate)."})

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise UserError(f"num_samples must be >= 1, got {self.num_samples}")
        build_prompt("", self.prompt_template)  # one line when the template is neither a name nor has {question}
        if self.unboxed not in UNBOXED:
            raise UserError(f"unboxed must be one of {', '.join(UNBOXED)}, got {self.unboxed!r}")
        if self.answer_mode != ANSWER_MODE_AUTO:
            from reward.verify import answer_mode

            try:
                answer_mode(self.answer_mode)
            except ValueError as err:
                raise UserError(f"answer_mode: {err} (or {ANSWER_MODE_AUTO})") from None


def run(args: RolloutArguments, backend_args: BackendArguments, sampling: SamplingArguments, job: JobArguments,
        *, backend: RolloutBackend | None = None):
    """Run the rollout job; returns the JobSummary. `backend` replaces the one `backend_args` would build."""
    from rlhf.jobs.runner import run_job

    questions = read_questions(args.questions, args.image_root)
    system = rollout_system_prompt(args.system_prompt, backend_args.model)
    if args.system_prompt == AUTO_SYSTEM:
        logger.info("system prompt: %s", "none (not an InternVL checkpoint)" if system is None
                    else "InternVL's default system message (an InternVL checkpoint; system_prompt '' for none)")
    settings = RolloutSettings(args.num_samples, args.prompt_template, system, args.threshold,
                               args.reference_key, sampling, backend_args, args.answer_mode, args.unboxed)
    fingerprint = asdict(settings)
    fingerprint["backend"] = {"backend": backend_args.backend, **backend_args.kwargs()}
    for key in ("batch_size", "device", "max_concurrency"):  # how it runs, not what it makes
        fingerprint["backend"].pop(key, None)
    check_settings(job.output_dir, SETTINGS_FILE, fingerprint, job.resume)
    if job.resume:
        check_unchanged(questions, job)
    owned = backend is None  # a backend handed in stays open for its owner
    if owned and job.executor == "ray":  # each actor builds its own, where the GPUs are
        backend = None
    elif owned:
        backend = backend_args.make()
        if job.workers > 1:  # checked here; each worker process builds its own
            backend.close()
            backend = None
    worker = RolloutWorker(settings, backend)
    try:
        return run_job(questions, worker, job.output_dir, name=ROLLOUTS_NAME, num_shards=job.num_shards,
                       shard_index=job.shard_index, batch_size=job.batch_size, desc="rollout",
                       fatal_errors=(BackendUnavailable,), **job.run_kwargs())
    finally:
        if owned and worker.backend is not None:
            worker.backend.close()


def _content(q: Question) -> dict[str, Any]:
    """What a record keeps of its question: a finished record is reused only while these match the input."""
    return {"question": q.question, "answer": q.answer, "image": q.image_value, "meta": q.meta}


def check_unchanged(questions: list[Question], job: JobArguments) -> None:
    """Refuse (one line) to resume when a finished record's question, answer, images or extra fields differ from
    the input item of the same id: its responses were made for other content."""
    by_id = {q.id: q for q in questions}

    def recorded(record: dict, item_id: str) -> dict:
        q = by_id[item_id]
        return {"question": record.get("question"), "answer": record.get("answer"),
                "image": record.get(q.image_key) if q.image_key else record.get("image", record.get("images")),
                "meta": record.get("meta", {})}

    refuse_changed(job.output_dir, ROLLOUTS_NAME, {q.id: _content(q) for q in questions}, recorded,
                   shard_index=job.own_shard)


def pass_counts(path: str | Path) -> tuple[int, int, int]:
    """(correct samples, samples, questions) over the questions with an answer of a rollouts file; reference
    responses are not samples."""
    correct = total = questions = 0
    for _, _, record in json_lines(Path(path)):
        if record.get("pass_rate") is not None:
            questions += 1
            samples = [r for r in record["responses"] if not r.get("reference")]
            correct += sum(bool(r["correct"]) for r in samples)
            total += len(samples)
    return correct, total, questions


def pass_rate_line(output_dir: str | Path) -> str:
    """`pass rate 0.125 over 32 questions with an answer (128 samples)` for the merged rollouts file."""
    path = Path(output_dir) / f"{ROLLOUTS_NAME}.jsonl"
    if not path.is_file():
        return "no merged rollouts yet (run with num_shards 1 to merge the shards)"
    correct, total, questions = pass_counts(path)
    return f"pass rate {correct / max(1, total):.3f} over {questions} questions with an answer ({total} samples)"


def main(argv: list[str]) -> int:
    args, backend_args, sampling, job = parse_args(
        (RolloutArguments, BackendArguments, SamplingArguments, JobArguments), argv, "mmalign rollout")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run(args, backend_args, sampling, job)  # run_job logs the summary line
    if job.num_shards == 1:
        print(pass_rate_line(job.output_dir))
    return job.failure_status(summary)
