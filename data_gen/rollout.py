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

The settings, questions, worker base and job steps it shares with `pairs` and `label-steps` are in
`data_gen.job_common`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.jobs.runner import Failure, item_seed

from .backends.base import GenerationRequest, RolloutBackend
from .job_common import (BackendArguments, BackendWorker, JobArguments, Question, SamplingArguments, job_main,
                         json_lines, load_question_images, read_questions, run_backend_job)
from .prompts import AUTO_SYSTEM, PromptTemplate, build_prompt, is_boxed_template, rollout_system_prompt

logger = logging.getLogger("mmalign.rollout")

ROLLOUTS_NAME = "rollouts"
SETTINGS_FILE = "rollout_settings.json"
ANSWER_MODE_AUTO = "auto"  # judging mode by each question's data set name (reward.verify.mode_for_source)
UNBOXED_JUDGE_WHOLE = "judge_whole"  # InternVL: under a boxed prompt, a response without a box is judged whole
UNBOXED = (UNBOXED_JUDGE_WHOLE, "format_negative")


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


class RolloutWorker(BackendWorker):
    """process_fn of the rollout job: a batch of questions in, one judged record (or Failure) per question out."""

    def prepare(self, q: Question) -> GenerationRequest:
        s = self.settings
        images = load_question_images(q)
        return GenerationRequest(id=q.id, prompt=build_prompt(q.question, s.prompt_template), images=images,
                                 sampling=s.sampling.params(s.num_samples), seed=item_seed(s.sampling.seed, q.id),
                                 system=s.system_prompt)

    def complete(self, questions: list[Question], requests: list[GenerationRequest]) -> list[dict | Failure]:
        outcomes: list[dict | Failure] = []
        for q, request, result in zip(questions, requests, self.open_backend().generate(requests), strict=True):
            if not result.ok:
                outcomes.append(Failure(q.id, f"backend: {result.error}"))
                continue
            outcomes.append(self.record(q, request, result.texts, result.num_generated_tokens))
            if result.applied is not None:  # what a server was sent after adapting to it
                outcomes[-1]["sampling"]["applied"] = result.applied
        return outcomes

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
    questions = read_questions(args.questions, args.image_root)
    system = rollout_system_prompt(args.system_prompt, backend_args.model)
    if args.system_prompt == AUTO_SYSTEM:
        logger.info("system prompt: %s", "none (not an InternVL checkpoint)" if system is None
                    else "InternVL's default system message (an InternVL checkpoint; system_prompt '' for none)")
    settings = RolloutSettings(args.num_samples, args.prompt_template, system, args.threshold,
                               args.reference_key, sampling, backend_args, args.answer_mode, args.unboxed)
    fingerprint = asdict(settings) | {"backend": backend_args.fingerprint()}
    return run_backend_job(questions, RolloutWorker(settings, backend), job, name=ROLLOUTS_NAME, desc="rollout",
                           settings_file=SETTINGS_FILE, fingerprint=fingerprint, changed=_changed(questions))


def _content(q: Question) -> dict[str, Any]:
    """What a record keeps of its question: a finished record is reused only while these match the input."""
    return {"question": q.question, "answer": q.answer, "image": q.image_value, "meta": q.meta}


def _changed(questions: list[Question]) -> tuple[dict[str, Any], Any]:
    """What `run_backend_job` compares to refuse (one line) resuming when a finished record's question, answer,
    images or extra fields differ from the input item of the same id: its responses were made for other content."""
    by_id = {q.id: q for q in questions}

    def recorded(record: dict, item_id: str) -> dict:
        q = by_id[item_id]
        return {"question": record.get("question"), "answer": record.get("answer"),
                "image": record.get(q.image_key) if q.image_key else record.get("image", record.get("images")),
                "meta": record.get("meta", {})}

    return {q.id: _content(q) for q in questions}, recorded


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


def _report(summary, job: JobArguments) -> tuple[Any, list[str]]:
    return summary, [pass_rate_line(job.output_dir)] if job.num_shards == 1 else []


def main(argv: list[str]) -> int:
    return job_main(argv, "mmalign rollout", RolloutArguments, SamplingArguments, run, _report)
