"""What the data jobs (`rollout`, `pairs`, `label-steps`) share: their settings, their questions, the worker
that samples from a rollout backend, and the steps that run one job.

- `BackendArguments` (which policy samples, and how it runs), `SamplingArguments` (the sampling settings a
  request carries) and `JobArguments` (output folder, sharding, batches; extends `rlhf.jobs.settings.RunnerArguments`,
  which `mmalign bon` shares too): one class each, so a flag means the same and is checked the same in every job.
- `Question`, `read_questions` (JSON lines or an MMPR meta.json; every bad line one `JobInputError` naming
  file:line and the field), `json_lines`, `load_question_images`: the input of the rollout job, and of
  label-steps, whose solutions are questions with responses.
- `BackendWorker`: the base of a job's `process_fn`; the backend is built on first use in each worker process.
- `run_backend_job`: the settings checks of a resumed job, the backend's lifetime and `run_job`, in that order;
  `job_main`: a job's command line (parse, run, print, exit status).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhf.errors import UserError
from rlhf.jobs.runner import Failure, JobInputError, JobSummary
from rlhf.jobs.settings import RunnerArguments, check_settings, refuse_changed

from .backends.base import BACKENDS, BackendUnavailable, RolloutBackend, SamplingParams

# backend name -> the constructor parameter that names the policy
MODEL_PARAMETER = {"hf": "model_name_or_path", "vllm": "model_path", "openai": "model"}
RUN_ONLY_BACKEND_KEYS = ("batch_size", "device", "max_concurrency")  # how a backend runs, not what it makes
IMAGE_KEYS = ("image", "images")
ANSWER_KEYS = ("answer", "answer_gt")


# -- settings ------------------------------------------------------------------------------------------------------

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

    def fingerprint(self) -> dict[str, Any]:
        """What of the backend shapes a job's records, for its settings file: the backend and its constructor
        arguments without those that say only how it runs (`RUN_ONLY_BACKEND_KEYS`)."""
        kwargs = {k: v for k, v in self.kwargs().items() if k not in RUN_ONLY_BACKEND_KEYS}
        return {"backend": self.backend, **kwargs}

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
    from rlhf.data.mmpr import is_mmpr_meta

    if is_mmpr_meta(path):
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
    """The question's images as RGB PIL images, each path confined to the question's image root
    (`rlhf.data.images.resolve_image`, the rule of every reader); ValueError/ImageLoadError naming the file on failure."""
    from rlhf.data.images import load_image, resolve_image

    return [load_image(resolve_image(q.image_root, ref)) for ref in q.image_refs]


# -- the work ------------------------------------------------------------------------------------------------------

class BackendWorker:
    """The base of a data job's process_fn: a batch of items in, one record or `Failure` per item out, in order.

    A subclass gives `prepare(item)`, the work of one item (or its Failure; an unreadable image or an image path
    outside the root, ImageLoadError or ValueError, fails that item only), and `complete(items, work)`, one
    outcome per prepared item from one pass of the backend. Picklable: the backend (`settings.backend`, a
    `BackendArguments`) is built on first use in each worker process by `open_backend`, or handed in for a single
    process; `continuation`: the job continues partial assistant messages, checked when the backend is built."""

    continuation = False

    def __init__(self, settings: Any, backend: RolloutBackend | None = None):
        self.settings = settings
        self.backend = backend

    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": None}

    @staticmethod
    def item_id(item: Any) -> str:
        return item.id

    def open_backend(self) -> RolloutBackend:
        if self.backend is None:
            self.backend = self.settings.backend.make(continuation=self.continuation)
        return self.backend

    def prepare(self, item: Any) -> Any:
        raise NotImplementedError

    def complete(self, items: list, work: list) -> list[dict | Failure]:
        raise NotImplementedError

    def __call__(self, items: list) -> list[dict | Failure]:
        from rlhf.data.images import ImageLoadError

        outcomes: dict[str, dict | Failure] = {}
        asked, work = [], []
        for item in items:
            try:
                prepared = self.prepare(item)
            except (ImageLoadError, ValueError) as err:
                prepared = Failure(self.item_id(item), str(err))
            if isinstance(prepared, Failure):
                outcomes[self.item_id(item)] = prepared
            else:
                asked.append(item)
                work.append(prepared)
        if asked:
            for item, outcome in zip(asked, self.complete(asked, work), strict=True):
                outcomes[self.item_id(item)] = outcome
        return [outcomes[self.item_id(item)] for item in items]


# -- the job -------------------------------------------------------------------------------------------------------

def run_backend_job(items: list, worker: BackendWorker, job: JobArguments, *, name: str, desc: str,
                    settings_file: str, fingerprint: dict[str, Any],
                    changed: tuple[dict[str, Any], Callable[[dict, str], dict | None]] | None = None,
                    needs_backend: bool = True) -> JobSummary:
    """Run a data job's `items` through `worker` (`rlhf.jobs.runner.run_job`, records in `job.output_dir`/NAME.jsonl)
    and return the JobSummary, after the steps every data job takes first:

    1. resuming is safe: a folder whose records were made with other settings (`fingerprint`, kept in
       `settings_file`) is refused with one line (`check_settings`), and so is one whose finished records' input
       changed under the same id (`changed` = (content by id now, the same read from a record): `refuse_changed`);
    2. the backend: one handed in (`worker.backend`) stays open for its owner. Else, when `needs_backend`, it is
       built here, so a policy that cannot be used stops the job at start with one line (BackendUnavailable), kept
       for a single local worker, closed again when each local worker process builds its own; with Ray each actor
       builds its own where the GPUs are. A backend built here or by the worker is closed when the job ends."""
    from rlhf.jobs.runner import Executor, run_job

    check_settings(job.output_dir, settings_file, fingerprint, job.resume)
    if job.resume and changed is not None:
        refuse_changed(job.output_dir, name, *changed, shard_index=job.own_shard)
    owned = worker.backend is None
    if owned and needs_backend and job.executor != Executor.RAY:
        worker.open_backend()
        if job.workers > 1:  # checked here; each worker process builds its own
            worker.backend.close()
            worker.backend = None
    try:
        return run_job(items, worker, job.output_dir, name=name, num_shards=job.num_shards,
                       shard_index=job.shard_index, batch_size=job.batch_size, desc=desc,
                       fatal_errors=(BackendUnavailable,), **job.run_kwargs())
    finally:
        if owned and worker.backend is not None:
            worker.backend.close()


def job_main(argv: list[str], prog: str, arguments: type, sampling: type, run: Callable[..., Any],
             report: Callable[[Any, JobArguments], tuple[JobSummary, list[str]]]) -> int:
    """The command line of a data job: its `arguments`, `BackendArguments`, `sampling` and `JobArguments` from
    `--config RECIPE.yaml` and flags, `run(...)` with them, the lines of `report(result, job)` (which also picks the
    JobSummary out of the result) on stdout; 0, or 1 when more than `max_failure_rate` of the items failed."""
    from rlhf.args import parse_job_args

    *settings, job = parse_job_args((arguments, BackendArguments, sampling, JobArguments), argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary, lines = report(run(*settings, job), job)  # run_job logs the summary line
    for line in lines:
        print(line)
    return job.failure_status(summary)
