"""Process-reward data formats (reference section 3): step splitting, the VisualPRM conversation, record types.

Four record kinds, each a dataclass with `from_json` / `to_json`, read and written as JSON lines:

- `StepwiseRecord` (mmalign's own): `{"id", "images": [...], "question", "steps": [...], "labels": [...], "answer",
  "source", "meta"}`; labels are all hard (`true`/`false`) or all soft (numbers in [0, 1]).
- `MCRecord` (raw Monte Carlo, the VisualPRM400K raw format): `{"image", "question", "steps_with_score": [{"step",
  "score", "num_mc_correct", "num_mc_total"}], ...}`; every other top-level key (`response`, `question_orig`,
  `mc_mode`, ...) is kept in `meta` and written back at top level, so nothing is lost.
- `ConversationRecord` (VisualPRM400K training format): `{"image", "conversations": [system, human, gpt, ...]}`,
  held parsed (question, steps, hard labels) and written back as the identical conversation.
- `ProcessBenchRecord` (VisualProcessBench rows): `{"image", "question", "response": {"steps",
  "process_correctness": [1 | -1 | 0, ...]}}`; neutral (0) steps are kept.

`"image"` may be a path, a list of paths, or absent (text-only); records hold `images: list[str]` and write one
image as a string, several as a list, none by leaving the key out.

Bad input raises `FormatError`, one line naming the file, the line, the field and what was expected:
`data/x.jsonl:17: field 'steps_with_score[2].score': expected a number in [0, 1], got 1.5`.

Conversions (`mc_to_stepwise`, `stepwise_to_mc`, `stepwise_to_conversation`, `conversation_to_stepwise`) are
lossless: MC counts travel in `StepwiseRecord.meta["num_mc_correct"/"num_mc_total"]`; only hardening soft labels
into `+`/`-` loses information, and only when the labels were soft.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, ClassVar

from rlhf.errors import UserError
from rlhf.processing import IM_END, IM_START

from .steps import STEP_BREAK, STEP_SEPARATOR, join_steps, split_steps  # noqa: F401 (the formats' public names)

# The system prompt the released VisualPRM checkpoint expects; an interface constant, reproduced verbatim.
PRM_SYSTEM_PROMPT = """\
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide \
a problem statement followed by the first step of the solution process. For each subsequent turn, I will give you \
a new step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process."""

QUESTION_HEADER = "### Question:\n"
SOLUTION_HEADER = "\n\n### Solution Process:\n"
MC_COUNT_KEYS = ("num_mc_correct", "num_mc_total")  # where mc_to_stepwise keeps the counts in StepwiseRecord.meta


class Judgement(StrEnum):
    """The PRM's answer to one step."""

    PLUS = "+"  # the solution is correct up to this step
    MINUS = "-"


class Role(StrEnum):
    """`from` of a VisualPRM400K conversation turn."""

    SYSTEM = "system"
    HUMAN = "human"
    GPT = "gpt"


class StepJudgement(IntEnum):
    """A VisualProcessBench human step label (`process_correctness`)."""

    POSITIVE = 1
    NEGATIVE = -1
    NEUTRAL = 0  # ignored by the macro-F1, kept by the reader


class RecordKind(StrEnum):
    """The record kinds `read_jsonl` reads."""

    STEPWISE = "stepwise"
    MC = "mc"
    CONVERSATION = "conversation"
    PROCESSBENCH = "processbench"


# -- errors --------------------------------------------------------------------------------------------------------


class FormatError(UserError, ValueError):
    """Bad PRM data: one line naming where (file:line, when known), the field and what was expected."""

    def __init__(self, field: str | None, expected: str, *, path: str | Path | None = None,
                 line: int | None = None):
        self.field, self.expected, self.path, self.line = field, expected, path, line
        where = "" if path is None else f"{path}: " if line is None else f"{path}:{line}: "
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}expected {expected}")

    def at(self, path: str | Path, line: int) -> FormatError:
        """The same error, located in a file."""
        return type(self)(self.field, self.expected, path=path, line=line)

    def under(self, prefix: str) -> FormatError:
        """The same error with the field nested under `prefix` (e.g. `conversations`)."""
        inner = self.field or ""
        nested = prefix + (inner if inner.startswith("[") else f".{inner}" if inner else "")
        return type(self)(nested, self.expected, path=self.path, line=self.line)


class EmptyStepError(FormatError):
    """A solution step that is empty or only whitespace. The PRM job skips such a record as a counted reject (it
    happens in VisualPRM400K's raw files); every other format error stops the job."""


class JudgementTokenError(UserError, ValueError):
    """A tokenizer cannot give the `+`/`-` judgements one token each."""


_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(field: str | None, expected: str, got: Any = _MISSING) -> FormatError:
    return FormatError(field, expected if got is _MISSING else f"{expected}, got {_show(got)}")


# -- field checks (each returns the normalised value or raises FormatError) -----------------------------------------


def _text(value: Any, name: str, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str) or (not blank_ok and not value.strip()):
        raise _fail(name, "a string" if blank_ok else "a non-empty string", value)
    return value


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else _text(value, name, blank_ok=True)


def _record_id(value: Any, name: str = "id") -> str | int | None:
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    raise _fail(name, "a string or an integer", value)


def _meta(value: Any, name: str = "meta") -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(name, "an object with string keys", value)
    return value


def _image_paths(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise _fail(name, "a list of image paths", value)
    for i, path in enumerate(value):
        _text(path, f"{name}[{i}]")
    return list(value)


def _image_field(value: Any, name: str = "image") -> list[str]:
    """JSON `image`: a path, a list of paths, or null/absent for a text-only sample."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_text(value, name)]
    if isinstance(value, list):
        return _image_paths(value, name)
    raise _fail(name, "an image path or a list of image paths", value)


def _image_json(images: list[str]) -> dict[str, Any]:
    return {} if not images else {"image": images[0] if len(images) == 1 else list(images)}


def _step_text(value: Any, name: str) -> str:
    """A step: a non-empty string (`EmptyStepError` for an empty or blank one)."""
    if isinstance(value, str) and not value.strip():
        raise EmptyStepError(name, f"a non-empty step, got {_show(value)}")
    return _text(value, name)


def _steps(value: Any, name: str = "steps") -> list[str]:
    if not isinstance(value, list) or not value:
        raise _fail(name, "a non-empty list of steps (strings)", value)
    for i, step in enumerate(value):
        _step_text(step, f"{name}[{i}]")
    return list(value)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _unit_interval(value: Any, name: str) -> float:
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise _fail(name, "a number in [0, 1]", value)
    return float(value)


def _count(value: Any, name: str) -> int:
    if not _is_number(value) or value < 0 or value != int(value):
        raise _fail(name, "a non-negative integer", value)
    return int(value)


def _labels(value: Any, n_steps: int, name: str = "labels") -> list[bool] | list[float]:
    """All hard (bools) or all soft (numbers in [0, 1], returned as floats); one per step."""
    if not isinstance(value, list) or len(value) != n_steps:
        raise _fail(name, f"a list of {n_steps} labels (one per step)", value)
    if all(isinstance(v, bool) for v in value):
        return list(value)
    if any(isinstance(v, bool) for v in value):
        raise _fail(name, "labels all true/false (hard) or all numbers in [0, 1] (soft), not a mix", value)
    return [_unit_interval(v, f"{name}[{i}]") for i, v in enumerate(value)]


def _hard_labels(value: Any, n_steps: int, name: str = "labels") -> list[bool]:
    if not isinstance(value, list) or len(value) != n_steps or not all(isinstance(v, bool) for v in value):
        raise _fail(name, f"a list of {n_steps} true/false labels (one per step)", value)
    return list(value)


def _extra_keys(meta: dict[str, Any], known: Iterable[str], name: str = "meta") -> None:
    clash = sorted(set(meta) & set(known))
    if clash:
        raise _fail(name, f"no keys that the record format itself uses ({', '.join(sorted(known))})", clash)


def _take_str(meta: dict[str, Any], key: str) -> str | None:
    """Pop `meta[key]` when it is a string (the inverse of putting an optional field into meta)."""
    return meta.pop(key) if isinstance(meta.get(key), str) else None


def _put(meta: dict[str, Any], key: str, value: Any, name: str) -> None:
    if value is None:
        return
    if key in meta:
        raise _fail(f"meta.{key}", f"no {key!r} key in meta while the record's {name} is set (it would be lost)")
    meta[key] = value


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(None, "a JSON object per line", value)
    return value


def _required(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise _fail(key, "this field (it is required)")
    return obj[key]


# -- steps and labels ------------------------------------------------------------------------------------------------

def hard_label(score: float, threshold: float = 0.0) -> bool:
    """`+` iff score > threshold; the published labelling uses threshold 0 (any correct continuation)."""
    return bool(score > threshold)


def to_visualprm_conversation(question: str, steps: Sequence[str], labels: Sequence[bool | float],
                              threshold: float = 0.0, *, system: str = PRM_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The VisualPRM400K multi-turn conversation: system prompt, then per step a human turn (the first one carries
    the question, `<image>` placeholder included) and a gpt turn `+`/`-`. Soft labels give `+` iff > threshold."""
    question = _text(question, "question")
    if SOLUTION_HEADER in question:
        raise _fail("question", f"no {SOLUTION_HEADER!r} inside the question (it would not parse back)")
    steps = _steps(list(steps) if isinstance(steps, (list, tuple)) else steps)
    labels = _labels(list(labels) if isinstance(labels, (list, tuple)) else labels, len(steps))
    conversation = [{"from": Role.SYSTEM.value, "value": system}]
    for i, (step, label) in enumerate(zip(steps, labels)):
        user = f"{QUESTION_HEADER}{question}{SOLUTION_HEADER}{step}" if i == 0 else step
        judgement = Judgement.PLUS if hard_label(label, threshold) else Judgement.MINUS
        conversation += [{"from": Role.HUMAN.value, "value": user}, {"from": Role.GPT.value, "value": judgement.value}]
    return conversation


def outcome_example(steps: Sequence[str], labels: Sequence[bool | float], response: str | None = None
                    ) -> tuple[list[str], list[bool | float]]:
    """The outcome-reward (ORM) variant of one labelled solution, as InternVL's VisualPRM pipeline writes it: the
    whole solution in one turn (`response` when given, else the steps joined by blank lines, stripped), judged by
    its LAST step's label. `to_visualprm_conversation` of the result is InternVL's ORM conversation."""
    if not steps:
        raise _fail("steps", "a non-empty list of steps", list(steps))
    whole = response.strip() if isinstance(response, str) and response.strip() else join_steps(steps).strip()
    return [whole], [labels[-1]]


def from_visualprm_conversation(conversations: Any, *, system: str = PRM_SYSTEM_PROMPT
                                ) -> tuple[str, list[str], list[bool]]:
    """Parse a VisualPRM400K conversation back into (question, steps, labels). Raises `FormatError` naming the
    turn (`[3].from`, ...) when the structure differs from what `to_visualprm_conversation` writes."""
    layout = "a list of turns: system, then (human, gpt) pairs, one pair per step"
    if not isinstance(conversations, list):
        raise _fail(None, layout, conversations)
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            raise _fail(f"[{i}]", 'a turn {"from": ..., "value": ...} with exactly these keys', turn)
        want = Role.SYSTEM if i == 0 else Role.HUMAN if i % 2 else Role.GPT
        if turn["from"] != want:
            raise _fail(f"[{i}].from", repr(want.value), turn["from"])
        _text(turn["value"], f"[{i}].value", blank_ok=True)
    if len(conversations) < 3 or len(conversations) % 2 == 0:
        raise _fail(None, f"{layout} (ending with a gpt judgement), got {len(conversations)} turns")
    if conversations[0]["value"] != system:
        expected = "the PRM system prompt (reward.formats.PRM_SYSTEM_PROMPT)" if system == PRM_SYSTEM_PROMPT \
            else "the given system prompt"
        raise _fail("[0].value", expected, conversations[0]["value"])
    first = conversations[1]["value"]
    if not first.startswith(QUESTION_HEADER) or SOLUTION_HEADER not in first:
        raise _fail("[1].value", f"{QUESTION_HEADER!r} + question + {SOLUTION_HEADER!r} + first step", first)
    question, step_1 = first[len(QUESTION_HEADER):].split(SOLUTION_HEADER, 1)
    question = _text(question, "[1].value (question)")
    steps = [step_1] + [turn["value"] for turn in conversations[3::2]]
    for i, step in enumerate(steps):
        _step_text(step, f"[{2 * i + 1}].value")
    labels = []
    for i, turn in enumerate(conversations[2::2]):
        if turn["value"] not in tuple(Judgement):
            raise _fail(f"[{2 * i + 2}].value", " or ".join(repr(j.value) for j in Judgement), turn["value"])
        labels.append(turn["value"] == Judgement.PLUS)
    return question, steps, labels


# -- records ---------------------------------------------------------------------------------------------------------


@dataclass
class StepwiseRecord:
    """One solution with a label per step; mmalign's own PRM training and data-generation record."""

    kind: ClassVar[RecordKind] = RecordKind.STEPWISE
    question: str
    steps: list[str]
    labels: list[bool] | list[float]
    images: list[str] = field(default_factory=list)
    id: str | int | None = None
    answer: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("id", "images", "question", "steps", "labels", "answer", "source", "meta")
    REQUIRED: ClassVar[tuple[str, ...]] = ("question", "steps", "labels")

    def __post_init__(self):
        self.question = _text(self.question, "question")
        self.steps = _steps(self.steps)
        self.labels = _labels(self.labels, len(self.steps))
        self.images = _image_paths(self.images, "images")
        self.id = _record_id(self.id)
        self.answer = _optional_text(self.answer, "answer")
        self.source = _optional_text(self.source, "source")
        self.meta = _meta(self.meta)

    @property
    def soft(self) -> bool:
        """True when the labels are Monte Carlo scores rather than +/- decisions."""
        return not isinstance(self.labels[0], bool)

    def hard_labels(self, threshold: float = 0.0) -> list[bool]:
        return [hard_label(v, threshold) for v in self.labels]

    @classmethod
    def from_json(cls, obj: Any) -> StepwiseRecord:
        obj = _object(obj)
        unknown = sorted(set(obj) - set(cls.FIELDS))
        if unknown:
            raise _fail(unknown[0], f"only the fields {', '.join(cls.FIELDS)} (put anything else in meta)")
        for key in cls.REQUIRED:
            _required(obj, key)
        return cls(**{k: v for k, v in obj.items() if v is not None or k in cls.REQUIRED})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out.update(images=list(self.images), question=self.question, steps=list(self.steps), labels=list(self.labels))
        out.update({k: v for k, v in (("answer", self.answer), ("source", self.source)) if v is not None})
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass
class MCStep:
    """One step of a raw Monte Carlo record: `score = num_mc_correct / num_mc_total` (0 with no rollouts, as the
    early stop writes after the first step that scored 0)."""

    step: str
    score: float
    num_mc_correct: int
    num_mc_total: int

    def validate(self, name: str) -> MCStep:
        self.step = _step_text(self.step, f"{name}.step")
        self.score = _unit_interval(self.score, f"{name}.score")
        self.num_mc_correct = _count(self.num_mc_correct, f"{name}.num_mc_correct")
        self.num_mc_total = _count(self.num_mc_total, f"{name}.num_mc_total")
        if self.num_mc_correct > self.num_mc_total:
            raise _fail(f"{name}.num_mc_correct", f"at most num_mc_total ({self.num_mc_total})", self.num_mc_correct)
        expected = self.num_mc_correct / self.num_mc_total if self.num_mc_total else 0.0
        if abs(self.score - expected) > 1e-6:
            raise _fail(f"{name}.score", f"num_mc_correct / num_mc_total = {expected:.6g}", self.score)
        return self


@dataclass
class MCRecord:
    """A raw Monte Carlo record (VisualPRM400K raw); unknown top-level keys live in `meta` and go back top-level."""

    kind: ClassVar[RecordKind] = RecordKind.MC
    question: str
    steps: list[MCStep]
    images: list[str] = field(default_factory=list)
    id: str | int | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "question", "answer", "steps_with_score")

    def __post_init__(self):
        self.question = _text(self.question, "question")
        if not isinstance(self.steps, list) or not self.steps:
            raise _fail("steps_with_score", "a non-empty list of steps", self.steps)
        for i, step in enumerate(self.steps):
            if not isinstance(step, MCStep):
                raise _fail(f"steps_with_score[{i}]", "an MCStep", step)
            step.validate(f"steps_with_score[{i}]")
        self.images = _image_paths(self.images, "image")
        self.id = _record_id(self.id)
        self.answer = _optional_text(self.answer, "answer")
        self.meta = _meta(self.meta)
        _extra_keys(self.meta, self.KNOWN)

    @classmethod
    def from_json(cls, obj: Any) -> MCRecord:
        obj = _object(obj)
        raw_steps = _required(obj, "steps_with_score")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise _fail("steps_with_score", "a non-empty list of {step, score, num_mc_correct, num_mc_total}",
                        raw_steps)
        steps = []
        for i, raw in enumerate(raw_steps):
            name = f"steps_with_score[{i}]"
            keys = tuple(MCStep.__dataclass_fields__)
            if not isinstance(raw, dict) or set(raw) != set(keys):
                raise _fail(name, f"an object with exactly the keys {', '.join(keys)}", raw)
            steps.append(MCStep(**raw))
        return cls(
            question=_required(obj, "question"),
            steps=steps,
            images=_image_field(obj.get("image")),
            id=obj.get("id"),
            answer=obj.get("answer"),
            meta={k: v for k, v in obj.items() if k not in cls.KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out.update(_image_json(self.images))
        out["question"] = self.question
        if self.answer is not None:
            out["answer"] = self.answer
        out["steps_with_score"] = [
            {"step": s.step, "score": s.score, "num_mc_correct": s.num_mc_correct, "num_mc_total": s.num_mc_total}
            for s in self.steps
        ]
        out.update(self.meta)
        return out


@dataclass
class ConversationRecord:
    """A VisualPRM400K training record, held parsed; `to_json` writes the identical conversation back."""

    kind: ClassVar[RecordKind] = RecordKind.CONVERSATION
    question: str
    steps: list[str]
    labels: list[bool]
    images: list[str] = field(default_factory=list)
    id: str | int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "conversations")

    def __post_init__(self):
        self.question = _text(self.question, "question")
        self.steps = _steps(self.steps)
        self.labels = _hard_labels(self.labels, len(self.steps))
        self.images = _image_paths(self.images, "image")
        self.id = _record_id(self.id)
        self.meta = _meta(self.meta)
        _extra_keys(self.meta, self.KNOWN)

    @property
    def conversations(self) -> list[dict[str, str]]:
        return to_visualprm_conversation(self.question, self.steps, self.labels)

    @classmethod
    def from_json(cls, obj: Any) -> ConversationRecord:
        obj = _object(obj)
        try:
            question, steps, labels = from_visualprm_conversation(_required(obj, "conversations"))
        except FormatError as err:
            raise err.under("conversations") from None
        return cls(question=question, steps=steps, labels=labels, images=_image_field(obj.get("image")),
                   id=obj.get("id"), meta={k: v for k, v in obj.items() if k not in cls.KNOWN})

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out.update(_image_json(self.images))
        out["conversations"] = self.conversations
        out.update(self.meta)
        return out


@dataclass
class ProcessBenchRecord:
    """A VisualProcessBench row: human step labels 1 (correct), -1 (wrong), 0 (neutral, kept)."""

    kind: ClassVar[RecordKind] = RecordKind.PROCESSBENCH
    question: str
    steps: list[str]
    correctness: list[int]
    images: list[str] = field(default_factory=list)
    id: str | int | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys; extra `response` keys under "response"

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "question", "answer")
    RESPONSE: ClassVar[tuple[str, ...]] = ("steps", "process_correctness")

    def __post_init__(self):
        self.question = _text(self.question, "question")
        self.steps = _steps(self.steps, "response.steps")
        allowed = sorted(int(j) for j in StepJudgement)
        if not isinstance(self.correctness, list) or len(self.correctness) != len(self.steps):
            raise _fail("response.process_correctness", f"a list of {len(self.steps)} labels (one per step)",
                        self.correctness)
        for i, v in enumerate(self.correctness):
            if isinstance(v, bool) or v not in allowed:
                raise _fail(f"response.process_correctness[{i}]", " or ".join(map(str, allowed)), v)
        self.correctness = [int(v) for v in self.correctness]
        self.images = _image_paths(self.images, "image")
        self.id = _record_id(self.id)
        self.answer = _optional_text(self.answer, "answer")
        self.meta = _meta(self.meta)
        _extra_keys(self.meta, self.KNOWN)
        if "response" in self.meta:
            _extra_keys(_meta(self.meta["response"], "meta.response"), self.RESPONSE, "meta.response")

    @property
    def labels(self) -> list[bool | None]:
        """True (positive), False (negative) or None (neutral) per step."""
        return [None if v == StepJudgement.NEUTRAL else v == StepJudgement.POSITIVE for v in self.correctness]

    @classmethod
    def from_json(cls, obj: Any) -> ProcessBenchRecord:
        obj = _object(obj)
        response = _required(obj, "response")
        if not isinstance(response, dict):
            raise _fail("response", 'an object {"steps": [...], "process_correctness": [...]}', response)
        for key in cls.RESPONSE:
            if key not in response:
                raise _fail(f"response.{key}", "this field (it is required)")
        meta = {k: v for k, v in obj.items() if k not in cls.KNOWN and k != "response"}
        response_extra = {k: v for k, v in response.items() if k not in cls.RESPONSE}
        if response_extra:
            meta["response"] = response_extra
        return cls(question=_required(obj, "question"), steps=response["steps"],
                   correctness=response["process_correctness"], images=_image_field(obj.get("image")),
                   id=obj.get("id"), answer=obj.get("answer"), meta=meta)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out.update(_image_json(self.images))
        out["question"] = self.question
        if self.answer is not None:
            out["answer"] = self.answer
        meta = dict(self.meta)
        out["response"] = {"steps": list(self.steps), "process_correctness": list(self.correctness),
                           **meta.pop("response", {})}
        out.update(meta)
        return out


Record = StepwiseRecord | MCRecord | ConversationRecord | ProcessBenchRecord
RECORD_TYPES: dict[RecordKind, type] = {
    RecordKind.STEPWISE: StepwiseRecord,
    RecordKind.MC: MCRecord,
    RecordKind.CONVERSATION: ConversationRecord,
    RecordKind.PROCESSBENCH: ProcessBenchRecord,
}


# -- conversions -----------------------------------------------------------------------------------------------------


def mc_to_stepwise(record: MCRecord) -> StepwiseRecord:
    """Soft labels = the MC scores; the counts go to `meta["num_mc_correct"/"num_mc_total"]`, a string `source`
    key of the raw record to `source`, every other raw key stays in meta."""
    meta = dict(record.meta)
    source = _take_str(meta, "source")
    correct, total = MC_COUNT_KEYS
    _put(meta, correct, [s.num_mc_correct for s in record.steps], "MC counts")
    _put(meta, total, [s.num_mc_total for s in record.steps], "MC counts")
    return StepwiseRecord(question=record.question, steps=[s.step for s in record.steps],
                          labels=[s.score for s in record.steps], images=list(record.images), id=record.id,
                          answer=record.answer, source=source, meta=meta)


def stepwise_to_mc(record: StepwiseRecord) -> MCRecord:
    """The inverse of `mc_to_stepwise`: needs soft labels and the counts in meta."""
    n = len(record.steps)
    if not record.soft:
        raise _fail("labels", "soft labels (MC scores) to make a Monte Carlo record, got true/false labels")
    meta = dict(record.meta)
    counts = []
    for key in MC_COUNT_KEYS:
        value = meta.pop(key, None)
        if not isinstance(value, list) or len(value) != n:
            raise _fail(f"meta.{key}", f"a list of {n} counts (as mc_to_stepwise writes)", value)
        counts.append(value)
    _put(meta, "source", record.source, "source")
    steps = [MCStep(step, score, correct, total)
             for step, score, correct, total in zip(record.steps, record.labels, *counts)]
    return MCRecord(question=record.question, steps=steps, images=list(record.images), id=record.id,
                    answer=record.answer, meta=meta)


def stepwise_to_conversation(record: StepwiseRecord, threshold: float = 0.0) -> ConversationRecord:
    """Hard labels as they are, soft labels as `+` iff > threshold; answer/source go to top-level keys."""
    meta = dict(record.meta)
    _put(meta, "answer", record.answer, "answer")
    _put(meta, "source", record.source, "source")
    return ConversationRecord(question=record.question, steps=list(record.steps),
                              labels=record.hard_labels(threshold), images=list(record.images), id=record.id,
                              meta=meta)


def conversation_to_stepwise(record: ConversationRecord) -> StepwiseRecord:
    """The inverse of `stepwise_to_conversation` (exact for hard labels)."""
    meta = dict(record.meta)
    answer, source = _take_str(meta, "answer"), _take_str(meta, "source")
    return StepwiseRecord(question=record.question, steps=list(record.steps), labels=list(record.labels),
                          images=list(record.images), id=record.id, answer=answer, source=source, meta=meta)


# -- JSON lines ------------------------------------------------------------------------------------------------------


def _record_type(kind: RecordKind | str) -> type:
    try:
        return RECORD_TYPES[RecordKind(kind)]
    except ValueError:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(RecordKind)}") from None


def _no_constants(name: str) -> Any:
    raise FormatError(None, f"standard JSON numbers, got {name}")


def parse_jsonl_line(raw: bytes, line_no: int) -> Any:
    """The JSON value of one raw line of a JSON-lines file (a BOM allowed on line 1), None for a blank line;
    `FormatError` (without a location) for bad UTF-8, malformed JSON or NaN/Infinity constants."""
    try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise FormatError(None, f"UTF-8 text (bad byte at column {err.start + 1})") from None
    if not line.strip():
        return None
    try:
        return json.loads(line, parse_constant=_no_constants)
    except json.JSONDecodeError as err:
        raise FormatError(None, f"one JSON object per line ({err.msg} at column {err.colno})") from None


def iter_jsonl(path: str | Path, kind: RecordKind | str) -> Iterator[Record]:
    """Records of one kind from a JSON-lines file; blank lines are skipped; any bad line raises `FormatError`
    located at `path:line`."""
    cls = _record_type(kind)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise FormatError(None, "an existing JSON-lines file (not found)", path=path) from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                obj = parse_jsonl_line(raw, line_no)
                if obj is None:
                    continue
                record = cls.from_json(obj)
            except FormatError as err:
                raise err.at(path, line_no) from None
            yield record


def read_jsonl(path: str | Path, kind: RecordKind | str) -> list[Record]:
    return list(iter_jsonl(path, kind))


def write_jsonl(path: str | Path, records: Iterable[Record], *, append: bool = False) -> int:
    """Write records (all of one kind) as JSON lines; returns how many were written."""
    count, first = 0, None
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for record in records:
            first = first or type(record)
            if type(record) is not first or first not in RECORD_TYPES.values():
                raise TypeError(f"write_jsonl({str(path)!r}): record {count} is a {type(record).__name__}; expected "
                                f"one of {', '.join(t.__name__ for t in RECORD_TYPES.values())}, the same for every "
                                f"record of a file (the first was a {first.__name__})")
            f.write(json.dumps(record.to_json(), ensure_ascii=False, allow_nan=False) + "\n")
            count += 1
    return count


# -- tokenizer check -------------------------------------------------------------------------------------------------


def check_judgement_tokens(tokenizer: Any, plus: str = Judgement.PLUS.value, minus: str = Judgement.MINUS.value,
                           *, before: str = f"{IM_START}assistant\n", after: str = IM_END) -> tuple[int, int]:
    """Token ids of the `+` and `-` judgements, checked to be usable by the PRM.

    Each must encode (without special tokens) to exactly one token that is not the unknown token, and keep that
    single token inside an assistant turn (`before + judgement + after` must encode as
    `encode(before) + [id] + encode(after)`, so it merges with neither side); the two ids must differ.
    Raises `JudgementTokenError` naming the tokenizer and the pieces it produced.
    """
    name = f"tokenizer {getattr(tokenizer, 'name_or_path', '') or '<built in-process>'!r} " \
           f"({type(tokenizer).__name__})"

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def pieces(ids: list[int]) -> list[str]:
        return list(tokenizer.convert_ids_to_tokens(ids))

    ids = []
    for piece in (plus, minus):
        alone = encode(piece)
        if len(alone) != 1:
            raise JudgementTokenError(f"{name} encodes the judgement {piece!r} as {len(alone)} tokens {pieces(alone)}; "
                                      "the PRM needs exactly one: pick judgement strings that are single tokens")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and alone[0] == unk:
            raise JudgementTokenError(f"{name} encodes the judgement {piece!r} as the unknown token "
                                      f"{pieces(alone)}; it is not in the vocabulary")
        in_turn, expected = encode(before + piece + after), encode(before) + alone + encode(after)
        if in_turn != expected:
            raise JudgementTokenError(f"{name} merges the judgement {piece!r} with the assistant turn around it: "
                                      f"{pieces(in_turn)} instead of {pieces(expected)}")
        ids.append(alone[0])
    if ids[0] == ids[1]:
        raise JudgementTokenError(f"{name} gives {plus!r} and {minus!r} the same token id {ids[0]}")
    return ids[0], ids[1]
