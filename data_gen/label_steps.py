"""`mmalign label-steps --config RECIPE.yaml`: Monte Carlo step labels in VisualPRM400K format (reference section 3).

Input (`solutions`): JSON lines, either the rollout job's output (up to `solutions_per_question` of each question's
`responses` are labelled, in order) or one solution per question:

    {"id", "image" | "images" (optional), "question", "answer", "responses": [{"text", "correct", ...}, ...]}
    {"id", "image" | "images" (optional), "question", "answer", "solution": "step 1\\n\\nstep 2 ..."}

Each solution is split into steps (`reward.steps.segment_steps`: blank lines, even merge above
`max_steps_per_solution`). For step i the policy continues the answer `steps[0..i]` joined by blank lines (the
`assistant_prefix` of a request with the rollout's prompt), `num_continuations` times. `mc_prefix` (`MCPrefix`)
says how that prefix ends: `internvl` (the default, InternVL's pipeline) with the last step and no separator, so the
policy writes what follows itself; `blank_line` (ours, mmalign's default before) with one more blank line, so the
policy starts the next step. With `step_split` (ours), a blank-line step is also cut at each match of that pattern,
and a step ending at such a cut is continued from the solution text up to the cut in either style (the policy
finishes the line itself); a continuation is correct when the answer extracted from prefix + continuation is judged
correct (`reward.verify.judge`). The step's score is mc_i = correct / sampled and its label is `+` iff the score >
`label_threshold` (published: 0).

Modes (`MCMode`):

- `faithful`, the published procedure: every step gets all `num_continuations` continuations. With `early_stop`,
  the steps after the first `-` step get score 0 and no continuations (`num_mc_total` 0); with the published
  threshold 0 that is the first step with mc = 0, as in the VisualPRM code.
- `adaptive` (mmalign's own, not published): a step draws its continuations in rounds, in index order, and stops
  as soon as its label is certain: at the first correct continuation for threshold 0, or after all of them are
  wrong. The first round draws `first_round` continuations and each later one as many as were drawn so far
  (2, 2, 4, 8 of 16), so a step that is `+` at once costs `first_round` continuations and any step at most 4 rounds.
  Continuation j of a step has the same seed in both modes (`continuation_seed`: the run seed, the solution id, the
  step and j), so with a backend that honours per-request seeds adaptive gives exactly faithful's labels from fewer
  continuations. Its scores are NOT 16-sample estimates: `num_mc_total` is the number actually sampled and records
  carry `"mc_mode": "adaptive"`; the label still equals `score > label_threshold`.
- `search` (ours; OmegaPRM's binary search, with adaptive's stopping inside each estimate): under the monotone
  assumption (once a prefix cannot reach the answer, no longer prefix can), only the first `-` step has to be found.
  The last step's prefix is the whole solution, so its label is the solution's own verdict, judged without sampling:
  a correct solution is `+` throughout at no cost; for a wrong one the first `-` step lies in 0..n-1 and is found by
  a search that samples only the steps it probes. A probe that comes out `-` costs all `num_continuations`, a `+`
  one often only `first_round`, so each probe splits the candidates unevenly, fewer on the `-` side
  (`search_split`: for 2 and 16 about 1:4; for equal costs plain bisection). Steps before the first `-` step are
  `+` and the rest `-`. A `-` step that was not sampled has score 0 and `num_mc_total` 0 (as after an early stop);
  a `+` step that was not sampled is written as 1 correct of 1: its witness is the solution's own text after it
  followed by a correct continuation of a later probed step (or, for a correct solution, the solution itself).
  Records carry `"mc_mode": "search"` and `"searched_steps"` (the probes in order); `num_continuations_sampled`
  counts only the continuations actually sampled. Where a solution is not
  monotone the labels differ from faithful's; `benchmarks/label_steps.py` measures how often. Fewer continuations
  are not less wall time on an in-process backend: each probe waits for the one before it, so a batch holds one
  probe per solution. Measured on the demo (2,048 solutions of a 48% tiny policy, hf backend, batch 32, 2 CPU
  cores): adaptive 818 s at ~1,650-2,100 generated tokens/s; search reached 257 solutions in 251 s at ~570
  tokens/s, slower per solution than adaptive (and was stopped there). Search pays off where requests are
  cheap to issue in parallel (a server with many solutions in flight), not on a small in-process batch.

Output in `output_dir` (resuming, sharding, failures.jsonl and summary.json as in `rlhf.jobs.runner`; one item =
one solution, id `{question id}#{response index}`, committed whole or not at all):

    mc.jsonl             raw Monte Carlo records (`reward.formats.MCRecord`): {"id", "image", "question", "answer",
                         "steps_with_score": [{"step", "score", "num_mc_correct", "num_mc_total"}], "question_id",
                         "solution_index", "response", "response_correct", "mc_mode", "early_stop",
                         "num_continuations", "label_threshold", "num_continuations_sampled", "num_generated_tokens",
                         "step_settings": {"step_split", "max_steps_per_solution"}}
    visualprm.jsonl      the VisualPRM400K conversations (`reward.formats.ConversationRecord`), rebuilt from mc.jsonl,
                         image paths relative to meta.json's root, each with its "step_settings"
    meta.json            InternVL's meta file for it: {name: {"annotation": "visualprm.jsonl", "root": the folder
                         holding every image, relative to output_dir, "repeat_time": 1}}: `mmalign prm --data` it
    label_summary.json   solutions, steps, share of `+` steps, continuations sampled (and what faithful would
                         sample), generated tokens
    label_steps_settings.json   the settings that shape the records; a resumed run must use the same ones

Every record says how its solution was cut into steps (`"step_settings"`, `reward.step_settings`): `mmalign prm`
checks that its data agree on them, saves them with the PRM, and the PRM's scoring cuts text the same way.

Train soft-label PRMs on the scores of faithful runs only; adaptive and search scores serve the hard labels. Image
paths in mc.jsonl are relative to `output_dir`; in visualprm.jsonl to meta.json's root (the PRM job confines every
path to its image root). visualprm.jsonl, meta.json and label_summary.json are written when a run covers the whole
input (num_shards 1; rerun with num_shards 1 to merge).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from reward.step_settings import RECORD_KEY as STEP_SETTINGS_KEY, StepSettings
from rlhf.choices import parse_choice
from rlhf.errors import UserError
from rlhf.jobs.runner import Failure, JobInputError, item_seed
from rlhf.processing import with_placeholders

from .backends.base import GenerationRequest, RolloutBackend
from .job_common import (BackendArguments, BackendWorker, JobArguments, Question, SamplingArguments, job_main,
                         load_question_images, read_questions, run_backend_job)
from .prompts import PromptTemplate, build_prompt

MC_NAME = "mc"
VISUALPRM_FILE = "visualprm.jsonl"
META_FILE = "meta.json"
LABEL_SUMMARY_FILE = "label_summary.json"
SETTINGS_FILE = "label_steps_settings.json"


class MCMode(StrEnum):
    """How many Monte Carlo continuations a step gets (not `reward.prm_config.LabelMode`, the PRM's target)."""

    FAITHFUL = "faithful"  # all num_continuations (published)
    ADAPTIVE = "adaptive"  # in rounds, until the label is certain (mmalign's own)
    SEARCH = "search"  # the first `-` step by search under the monotone assumption, adaptive inside (mmalign's own)


class MCPrefix(StrEnum):
    """How the continued prefix of a step that ends a blank-line piece ends."""

    INTERNVL = "internvl"  # "\n\n".join(steps[0..i]), no separator after the last step (InternVL's pipeline)
    BLANK_LINE = "blank_line"  # the same plus one blank line: the policy starts the next step (mmalign's own)


# -- the Monte Carlo estimate ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MCSettings:
    """What decides the labels. `answer_threshold` is the verifier's (a continuation is correct iff its answer
    scores > it); `label_threshold` the step label's (`+` iff mc > it)."""

    num_continuations: int = 16
    mode: MCMode = MCMode.FAITHFUL
    early_stop: bool = False
    first_round: int = 2
    label_threshold: float = 0.0
    answer_threshold: float = 0.9
    sampling: SamplingArguments = field(default_factory=SamplingArguments)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_choice(MCMode, self.mode, "mode", UserError))
        for name in ("num_continuations", "first_round"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.label_threshold < 1.0:
            raise UserError(f"label_threshold must be in [0, 1) (mc scores are at most 1), got {self.label_threshold}")
        if not 0.0 <= self.answer_threshold < 1.0:
            raise UserError(f"answer_threshold must be in [0, 1), got {self.answer_threshold}")


@dataclass
class MCTask:
    """One solution to label: the rollout prompt (user text with its images, system prompt), its steps, the
    ground-truth answer."""

    id: str
    prompt: str
    images: list = field(default_factory=list)
    system: str | None = None
    steps: list[str] = field(default_factory=list)
    answer: str = ""
    prefixes: list[str] | None = None  # the text continued after each step (default: `step_prefix`)
    prefix_style: MCPrefix = MCPrefix.INTERNVL  # of the default prefixes

    def prefix(self, step: int) -> str:
        return self.prefixes[step] if self.prefixes is not None else step_prefix(self.steps, step, self.prefix_style)


@dataclass
class MCResult:
    """The Monte Carlo outcome of one solution: per step (num_mc_correct, num_mc_total), the labels, and the tokens
    generated for it."""

    correct: list[int]
    sampled: list[int]
    labels: list[bool]
    num_generated_tokens: int = 0

    searched: list[int] | None = None  # search mode: the steps probed, in order
    applied: dict | None = None  # server backends: the sampling settings the server was sent and accepted

    @property
    def scores(self) -> list[float]:
        """mc = correct / sampled; a step never sampled scores its label (0.0 after an early stop, 1.0 or 0.0 where
        search inferred it)."""
        return [c / k if k else float(label) for c, k, label in zip(self.correct, self.sampled, self.labels)]

    @property
    def num_continuations(self) -> int:
        return sum(self.sampled)


def continuation_seed(base_seed: int, solution_id: str, step: int, index: int) -> int:
    """The seed of continuation `index` from step `step` of a solution: the same in both modes and in any batch."""
    return item_seed(base_seed, solution_id, step, index)


def step_prefix(steps: list[str], step: int, style: MCPrefix | str = MCPrefix.INTERNVL) -> str:
    """The answer the policy continues from step `step` (0-based): steps 0..step joined by blank lines; with
    `blank_line` also the blank line after which the next step starts."""
    from reward.steps import STEP_SEPARATOR, join_steps

    return join_steps(steps[:step + 1]) + (STEP_SEPARATOR if MCPrefix(style) is MCPrefix.BLANK_LINE else "")


def styled_prefix(prefix: str, style: MCPrefix | str) -> str:
    """A `reward.steps.Step.prefix` (a blank-line piece's ends with one blank line; a `step_split` cut's at the
    cut) in `style`: `internvl` drops that blank line."""
    from reward.steps import STEP_SEPARATOR

    if MCPrefix(style) is MCPrefix.INTERNVL and prefix.endswith(STEP_SEPARATOR):
        return prefix[: -len(STEP_SEPARATOR)]
    return prefix


def search_split(first_round: int, num_continuations: int) -> float:
    """The share of the candidates for the first `-` step a search probe leaves on its `-` side: with costs a = a
    `+` probe's (`first_round`) and b = a `-` probe's (`num_continuations`), the root z of z^a + z^b = 1 gives z^b
    (the split of unequal-cost search: both outcomes leave equal work per continuation spent). a = b gives 1/2,
    plain bisection; a = 2, b = 16 gives 0.188."""
    a, b = max(1, first_round), max(1, num_continuations)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        z = (lo + hi) / 2
        lo, hi = (z, hi) if z ** a + z ** b < 1 else (lo, z)
    return lo ** b


class _Search:
    """The first `-` step f of one solution, by search over its steps: f is in [lo, hi]; `probe` is the step sampled
    next (None once lo == hi)."""

    __slots__ = ("lo", "hi", "split", "order")

    def __init__(self, n_steps: int, solution_correct: bool, split: float):
        self.lo, self.hi, self.split, self.order = 0, n_steps if solution_correct else n_steps - 1, split, []
        if solution_correct:
            self.lo = n_steps  # the last step is `+`: under the monotone assumption, every step is

    @property
    def probe(self) -> int | None:
        if self.lo >= self.hi:
            return None
        candidates = self.hi - self.lo + 1  # f = lo .. hi
        return min(self.hi - 1, self.lo + max(1, round(self.split * candidates)) - 1)

    def update(self, step: int, label: bool) -> None:
        self.order.append(step)
        if label:
            self.lo = step + 1
        else:
            self.hi = step


class _Cell:
    """The continuations of one step of one task so far."""

    __slots__ = ("correct", "sampled", "label")

    def __init__(self) -> None:
        self.correct = self.sampled = 0
        self.label: bool | None = None  # None while undecided


def _decide(cell: _Cell, s: MCSettings) -> bool | None:
    """The cell's label once certain: faithful waits for all continuations; adaptive stops when the label can no
    longer change (mc = correct / N only grows with more correct ones and is at most (correct + left) / N)."""
    from reward.conversation import hard_label

    n = s.num_continuations
    if cell.sampled >= n:
        return hard_label(cell.correct / n, s.label_threshold)
    if s.mode is not MCMode.FAITHFUL:
        if hard_label(cell.correct / n, s.label_threshold):
            return True
        if not hard_label((cell.correct + n - cell.sampled) / n, s.label_threshold):
            return False
    return None


def _wanted(cells: list[_Cell], s: MCSettings) -> list[int]:
    """The steps of one task that sample in the next round: every undecided one, or with early stop only the first
    undecided one, and none after a `-` step."""
    out = []
    for i, cell in enumerate(cells):
        if cell.label is False and s.early_stop:
            break
        if cell.label is None:
            out.append(i)
            if s.early_stop:
                break
    return out


def monte_carlo(tasks: list[MCTask], backend: RolloutBackend, settings: MCSettings) -> list[MCResult | str]:
    """Label every step of every task; a task whose continuations the backend failed gives its one-line reason.

    Rounds: each round asks the backend, in one `generate` call, for the next continuations of every step still
    undecided in every task (faithful: all that are left; adaptive: `first_round`, then as many as were drawn so
    far; search: the same for the one step each task probes next), one request per continuation (n = 1) seeded by
    `continuation_seed`."""
    from reward.verify import judge

    s = settings
    cells = {t.id: [_Cell() for _ in t.steps] for t in tasks}
    searches: dict[str, _Search] = {}
    if s.mode is MCMode.SEARCH:
        split = search_split(s.first_round, s.num_continuations)
        for t in tasks:  # the last prefix is the whole solution: judged as it stands
            whole = judge(t.prefix(len(t.steps) - 1), t.answer, threshold=s.answer_threshold).correct
            searches[t.id] = _Search(len(t.steps), whole, split)
    tokens = dict.fromkeys(cells, 0)
    applied: dict[str, dict] = {}  # per solution: what its first continuation's server applied
    failed: dict[str, str] = {}
    params = s.sampling.params(1)
    while True:
        requests, keys = [], []
        for task in tasks:
            if task.id in failed:
                continue
            wanted = _wanted(cells[task.id], s) if task.id not in searches else [
                i for i in [searches[task.id].probe] if i is not None]
            for i in wanted:
                cell = cells[task.id][i]
                left = s.num_continuations - cell.sampled
                prefix = task.prefix(i)
                size = left if s.mode is MCMode.FAITHFUL else min(left, max(s.first_round, cell.sampled))
                for j in range(cell.sampled, cell.sampled + size):
                    requests.append(GenerationRequest(
                        id=f"{task.id}/step{i}/{j}", prompt=task.prompt, images=task.images, sampling=params,
                        seed=continuation_seed(s.sampling.seed, task.id, i, j), system=task.system,
                        assistant_prefix=prefix, group=task.id))  # one failed: the solution fails, skip the rest
                    keys.append((task, i, prefix))
        if not requests:
            break
        results = backend.generate(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
        asked: set[tuple[str, int]] = set()
        for (task, i, prefix), result in zip(keys, results):
            if task.id in failed:
                continue
            if not result.ok or len(result.texts) != 1:
                failed[task.id] = f"backend: {result.error or f'{len(result.texts)} texts for n = 1'}"
                continue
            cell = cells[task.id][i]
            cell.sampled += 1
            cell.correct += judge(prefix + result.texts[0], task.answer, threshold=s.answer_threshold).correct
            tokens[task.id] += result.num_generated_tokens or 0
            if result.applied is not None:
                applied.setdefault(task.id, result.applied)
            asked.add((task.id, i))
        for task_id, i in asked:
            label = cells[task_id][i].label = _decide(cells[task_id][i], s)
            if task_id in searches and label is not None:
                searches[task_id].update(i, label)
    out: list[MCResult | str] = []
    for task in tasks:
        if task.id in failed:
            out.append(failed[task.id])
            continue
        row = cells[task.id]
        search = searches.get(task.id)
        # steps never sampled are `-` after an early stop; search labels the steps before its first `-` one `+`
        labels = [bool(c.label) for c in row] if search is None else [i < search.lo for i in range(len(row))]
        out.append(MCResult([c.correct for c in row], [c.sampled for c in row], labels, tokens[task.id],
                            None if search is None else list(search.order), applied.get(task.id)))
    return out


# -- input -----------------------------------------------------------------------------------------------------------

@dataclass
class SolutionItem:
    """One solution to label (the job's item)."""

    id: str
    question: Question
    index: int
    text: str
    correct: bool | None = None  # the rollout's verdict, when the input has one
    prompt_template: str = PromptTemplate.BOXED.value
    system_prompt: str | None = None
    record_images: list[str] = field(default_factory=list)  # image paths as the outputs write them


def solution_id(question_id: str, index: int) -> str:
    return f"{question_id}#{index}"


def read_solutions(path: str | Path, *, image_root: str | Path | None = None, per_question: int = 4,
                   prompt_template: str | None = None, system_prompt: str | None = None) -> list[SolutionItem]:
    """The solutions of a rollout output or a one-solution-per-question file (see the module docstring); a bad
    line is a one-line JobInputError naming file:line and the field. Images resolve against `image_root`, else
    the record's `image_root` (rollout output), else the file's folder. `prompt_template`/`system_prompt` None
    take the record's (rollout output), else the boxed template and no system prompt."""
    path = Path(path)
    questions = read_questions(path, image_root)  # id, question, answer and image checks
    with path.open(encoding="utf-8") as f:
        line_numbers = [n for n, text in enumerate(f, start=1) if text.strip()]
    if len(line_numbers) != len(questions):
        raise JobInputError(f"{path}: expected JSON lines of solutions, not an MMPR meta.json")
    items = []
    for line, q in zip(line_numbers, questions):
        where = f"{path}:{line}"
        if q.answer is None:
            raise JobInputError(f"{where}: answer: missing; Monte Carlo labels judge continuations against it")
        meta = q.meta
        if image_root is None and isinstance(meta.get("image_root"), str) and q.image_key:
            q.image_root = meta["image_root"]
        template = prompt_template or meta.get("prompt_template") or PromptTemplate.BOXED.value
        try:
            build_prompt("", template)
        except UserError as err:
            raise JobInputError(f"{where}: prompt_template: {err}") from None
        system = system_prompt if system_prompt is not None else meta.get("system_prompt")
        for index, text, correct in _responses(meta, where)[:per_question]:
            items.append(SolutionItem(solution_id(q.id, index), q, index, text, correct, template, system))
    return items


def _responses(meta: dict[str, Any], where: str) -> list[tuple[int, str, bool | None]]:
    if ("responses" in meta) == ("solution" in meta):
        raise JobInputError(f"{where}: expected either 'responses' (the rollout job's output) or 'solution' "
                            "(one solution text)")
    if "solution" in meta:
        if not isinstance(meta["solution"], str):
            raise JobInputError(f"{where}: solution: expected a string, got {meta['solution']!r:.60}")
        return [(0, meta["solution"], None)]
    responses = meta["responses"]
    if not isinstance(responses, list):
        raise JobInputError(f"{where}: responses: expected a list, got {responses!r:.60}")
    out = []
    for k, r in enumerate(responses):
        text = r.get("text") if isinstance(r, dict) else r
        if not isinstance(text, str):
            raise JobInputError(f"{where}: responses[{k}]: expected a string or an object with a 'text' string, "
                                f"got {r!r:.60}")
        correct = r.get("correct") if isinstance(r, dict) else None
        out.append((k, text, correct if isinstance(correct, bool) else None))
    return out


# -- the work --------------------------------------------------------------------------------------------------------

@dataclass
class LabelSettings:
    mc: MCSettings
    steps: StepSettings  # its segmentation cuts the solutions and goes into every record (not its system prompt)
    backend: BackendArguments
    mc_prefix: MCPrefix = MCPrefix.INTERNVL


class LabelStepsWorker(BackendWorker):
    """process_fn of the job: a batch of solutions in, one Monte Carlo record (or Failure) per solution out."""

    continuation = True

    def prepare(self, item: SolutionItem) -> MCTask | Failure:
        steps = self.settings.steps.segment(item.text)
        if not steps:
            return Failure(item.id, "the solution is empty (no steps to label)")
        images = load_question_images(item.question)
        return MCTask(item.id, build_prompt(item.question.question, item.prompt_template), images,
                      item.system_prompt, [s.text for s in steps], item.question.answer,
                      [styled_prefix(s.prefix, self.settings.mc_prefix) for s in steps])

    def complete(self, items: list[SolutionItem], tasks: list[MCTask]) -> list[dict | Failure]:
        results = monte_carlo(tasks, self.open_backend(), self.settings.mc)
        return [Failure(item.id, result) if isinstance(result, str) else self.record(item, task, result)
                for item, task, result in zip(items, tasks, results, strict=True)]

    def record(self, item: SolutionItem, task: MCTask, result: MCResult) -> dict[str, Any]:
        from reward.formats import MCRecord, MCStep

        mc = self.settings.mc
        steps = [MCStep(step, score, *((1, 1) if k == 0 and label else (c, k)))  # search: a witnessed `+` step
                 for step, score, c, k, label in zip(task.steps, result.scores, result.correct, result.sampled,
                                                     result.labels)]
        # prompt_template: the prompt the policy saw, so that PRM rows wrap the question as InternVL's pipeline does
        meta = {"question_id": item.question.id, "solution_index": item.index, "response": item.text,
                "response_correct": item.correct, "mc_mode": mc.mode.value, "early_stop": mc.early_stop,
                "num_continuations": mc.num_continuations, "label_threshold": mc.label_threshold,
                "num_continuations_sampled": result.num_continuations,
                "num_generated_tokens": result.num_generated_tokens, "mc_prefix": self.settings.mc_prefix.value,
                "prompt_template": item.prompt_template}
        if result.searched is not None:
            meta["searched_steps"] = result.searched
        if result.applied is not None:  # a server backend: the sampling fields it was sent after adapting to it
            meta["sampling_applied"] = result.applied
        meta[STEP_SETTINGS_KEY] = self.settings.steps.segmentation()  # the PRM job checks and keeps them
        question = with_placeholders(item.question.question, len(item.record_images))
        return MCRecord(question=question, steps=steps, images=list(item.record_images), id=item.id,
                        answer=item.question.answer, meta=meta).to_json()


# -- outputs ---------------------------------------------------------------------------------------------------------

@dataclass
class LabelSummary:
    """What the labels of a whole job folder add up to. `faithful_continuations` is what the faithful mode samples
    for the same labels (num_continuations per step that was not early-stopped)."""

    solutions: int = 0
    steps: int = 0
    positive_steps: int = 0
    continuations_sampled: int = 0
    faithful_continuations: int = 0
    generated_tokens: int = 0
    mc_mode: str = ""

    @property
    def positive_share(self) -> float:
        return self.positive_steps / self.steps if self.steps else 0.0

    def line(self) -> str:
        saved = (f" ({self.faithful_continuations / self.continuations_sampled:.1f}x fewer than faithful's "
                 f"{self.faithful_continuations})"
                 if self.mc_mode != MCMode.FAITHFUL and self.continuations_sampled else "")
        return (f"label-steps ({self.mc_mode}): {self.solutions} solutions, {self.steps} steps, "
                f"{100 * self.positive_share:.1f}% positive, {self.continuations_sampled} continuations sampled"
                f"{saved}, {self.generated_tokens} generated tokens")


def _faithful_steps(record, labels: list[bool]) -> int:
    """How many steps of the record the faithful mode samples: those sampled here, or for search every step
    (with early stop, up to the first `-` one)."""
    if record.meta.get("mc_mode") != MCMode.SEARCH:
        return sum(s.num_mc_total > 0 for s in record.steps)  # early stop: up to the first `-` step
    if record.meta.get("early_stop") and False in labels:
        return labels.index(False) + 1
    return len(labels)


def image_root_of(output_dir: Path, records) -> Path:
    """The deepest folder holding every image of `records` (paths relative to `output_dir`); `output_dir` itself
    when they hold no image."""
    folders = {(output_dir / ref).resolve().parent for r in records for ref in r.images}
    return Path(os.path.commonpath(sorted(folders))) if folders else output_dir.resolve()


def write_outputs(output_dir: str | Path) -> LabelSummary:
    """visualprm.jsonl, meta.json and label_summary.json from the merged mc.jsonl (each written to a temporary file
    first). meta.json is InternVL's meta format: {name: {"annotation": "visualprm.jsonl", "root": the deepest
    folder holding every image, relative to output_dir, "repeat_time": 1}}; visualprm.jsonl's image paths are
    relative to that root, so `mmalign prm --data OUTPUT_DIR/meta.json` reads them confined to it."""
    from reward.conversation import hard_label
    from reward.formats import ConversationRecord, read_jsonl, write_jsonl

    output_dir = Path(output_dir)
    records = read_jsonl(output_dir / f"{MC_NAME}.jsonl", "mc")
    summary = LabelSummary()
    conversations = []
    for r in records:
        threshold = r.meta.get("label_threshold", 0.0)
        labels = [hard_label(s.score, threshold) for s in r.steps]
        kept = {key: r.meta[key] for key in ("prompt_template", STEP_SETTINGS_KEY) if r.meta.get(key)}
        conversations.append(ConversationRecord(question=r.question, steps=[s.step for s in r.steps], labels=labels,
                                                images=list(r.images), id=r.id,
                                                meta={"mc_mode": r.meta.get("mc_mode"), **kept}))
        summary.solutions += 1
        summary.steps += len(labels)
        summary.positive_steps += sum(labels)
        summary.continuations_sampled += r.meta.get("num_continuations_sampled", sum(s.num_mc_total for s in r.steps))
        summary.faithful_continuations += r.meta.get("num_continuations", 0) * _faithful_steps(r, labels)
        summary.generated_tokens += r.meta.get("num_generated_tokens", 0)
        summary.mc_mode = r.meta.get("mc_mode", summary.mc_mode)
    root = image_root_of(output_dir, conversations)
    for c in conversations:  # mc.jsonl paths are relative to output_dir; visualprm.jsonl's to the meta.json root
        c.images = [os.path.relpath((output_dir / ref).resolve(), root) for ref in c.images]
    tmp = output_dir / f"{VISUALPRM_FILE}.tmp"
    write_jsonl(tmp, conversations)
    tmp.replace(output_dir / VISUALPRM_FILE)
    meta = {output_dir.resolve().name or "visualprm": {
        "annotation": VISUALPRM_FILE, "root": os.path.relpath(root, output_dir.resolve()), "repeat_time": 1}}
    tmp = output_dir / f"{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output_dir / META_FILE)
    data = asdict(summary) | {"positive_share": round(summary.positive_share, 6)}
    tmp = output_dir / f"{LABEL_SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(output_dir / LABEL_SUMMARY_FILE)
    return summary


# -- the job ---------------------------------------------------------------------------------------------------------

@dataclass
class LabelStepsArguments:
    solutions: str = field(metadata={"help": "Rollout output (responses) or JSON lines with one 'solution' each."})
    image_root: str | None = field(default=None, metadata={
        "help": "Root of relative image paths (default: the record's image_root, else the file's folder)."})
    solutions_per_question: int = field(default=4, metadata={"help": "Responses labelled per question (published: "
                                                                     "4, sampled at temperature 1.0)."})
    max_steps_per_solution: int = field(default=12, metadata={
        "help": "More steps are merged evenly (12; 16 for InternVL3). Train and score the PRM with the same."})
    step_split: str | None = field(default=None, metadata={
        "help": "Ours: a regular expression that also ends a step at each match inside a blank-line step, e.g. "
                "'(?<=,)(?= )|(?= and )' for one step per listed value (score with the same pattern)."})
    num_continuations: int = field(default=16, metadata={"help": "Continuations per step (published: 16)."})
    mode: str = field(default=MCMode.FAITHFUL.value, metadata={"help": f"{', '.join(MCMode)}: all "
                      "continuations per step (published), rounds until the label is certain (ours), or a search "
                      "for the first '-' step under the monotone assumption, with adaptive's rounds (ours)."})
    mc_prefix: str = field(default=MCPrefix.INTERNVL.value, metadata={
        "help": f"{', '.join(MCPrefix)}: a step's continuation starts right after its text (InternVL's pipeline), "
                "or after one more blank line (ours; mmalign's default before). step_split cuts end at the cut "
                "either way."})
    early_stop: bool = field(default=False, metadata={
        "help": "Steps after the first '-' step get score 0 without continuations (the VisualPRM code's default; "
                "the InternVL3 data turned it off)."})
    first_round: int = field(default=2, metadata={
        "help": "adaptive and search: continuations of a step's first round; each later round draws as many as so "
                "far."})
    label_threshold: float = field(default=0.0, metadata={"help": "A step is '+' iff its mc score > this."})
    answer_threshold: float = field(default=0.9, metadata={"help": "A continuation is correct iff its answer "
                                                                   "scores > this."})
    prompt_template: str | None = field(default=None, metadata={
        "help": f"{', '.join(PromptTemplate)} or a format string with {{question}} (default: the rollout's, else "
                "boxed)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System prompt (default: the rollout's)."})

    def __post_init__(self) -> None:  # the Monte Carlo settings are checked by MCSettings
        for name in ("solutions_per_question", "max_steps_per_solution"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.mode = parse_choice(MCMode, self.mode, "mode", UserError).value
        self.mc_prefix = parse_choice(MCPrefix, self.mc_prefix, "mc_prefix", UserError).value
        self.step_settings()  # step_split checked, one line

    def step_settings(self) -> StepSettings:
        """How the solutions are cut into steps, as every record says (`reward.step_settings`)."""
        return StepSettings(self.step_split, self.max_steps_per_solution)

    def mc_settings(self, sampling: SamplingArguments) -> MCSettings:
        return MCSettings(self.num_continuations, MCMode(self.mode), self.early_stop, self.first_round,
                          self.label_threshold, self.answer_threshold, sampling)


def _record_images(item: SolutionItem, output_dir: Path) -> list[str]:
    """The item's image paths relative to the output folder."""
    root = Path(item.question.image_root or ".")
    return [os.path.relpath((root / ref).resolve(), output_dir.resolve()) for ref in item.question.image_refs]


def run(args: LabelStepsArguments, backend_args: BackendArguments, sampling: SamplingArguments, job: JobArguments,
        *, backend: RolloutBackend | None = None):
    """Run the job; returns (JobSummary, LabelSummary or None when this run covered one shard only).
    `backend` replaces the one `backend_args` would build (and is left open)."""
    items = read_solutions(args.solutions, image_root=args.image_root, per_question=args.solutions_per_question,
                           prompt_template=args.prompt_template, system_prompt=args.system_prompt)
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    items = [replace(item, record_images=_record_images(item, output_dir)) for item in items]
    settings = LabelSettings(args.mc_settings(sampling), args.step_settings(), backend_args, MCPrefix(args.mc_prefix))
    where = ("solutions", "image_root", "solutions_per_question")  # which input, not how its records are made
    fingerprint = {k: v for k, v in asdict(args).items() if k not in where} | {"sampling": asdict(sampling)}
    fingerprint["backend"] = backend_args.fingerprint()
    # a finished record whose solution or answer changed in the input: refused, one line
    changed = ({i.id: {"solution": i.text, "answer": i.question.answer} for i in items},
               lambda r, _: {"solution": r.get("response"), "answer": r.get("answer")})
    summary = run_backend_job(items, LabelStepsWorker(settings, backend), job, name=MC_NAME, desc="label-steps",
                              settings_file=SETTINGS_FILE, fingerprint=fingerprint, changed=changed)
    labels = write_outputs(output_dir) if job.num_shards == 1 else None
    return summary, labels


def _report(result, job: JobArguments) -> tuple[Any, list[str]]:
    summary, labels = result
    return summary, [labels.line()] if labels is not None else []


def main(argv: list[str]) -> int:
    return job_main(argv, "mmalign label-steps", LabelStepsArguments, SamplingArguments, run, _report)
