"""PRM data formats (reference section 3): four record kinds, lossless conversions between them, JSON lines.

Four record kinds, each a dataclass with `from_json` / `to_json`, read and written as JSON lines:

- `StepwiseRecord` (mmalign's own): `{"id", "images": [...], "question", "steps": [...], "labels": [...], "answer",
  "source", "meta"}`; labels are all hard (`true`/`false`) or all soft (numbers in [0, 1]).
- `MCRecord` (raw Monte Carlo, the VisualPRM400K raw format): `{"image", "question", "steps_with_score": [{"step",
  "score", "num_mc_correct", "num_mc_total"}], ...}`; every other top-level key (`response`, `question_orig`,
  `mc_mode`, ...) is kept in `meta` and written back at top level, so nothing is lost.
- `ConversationRecord` (VisualPRM400K training format): `{"image", "conversations": [system, human, gpt, ...]}`,
  held parsed (question, steps, hard labels) and written back as the identical conversation
  (`reward.conversation`).
- `ProcessBenchRecord` (VisualProcessBench rows): `{"image", "question", "response": {"steps",
  "process_correctness": [1 | -1 | 0, ...]}}`; neutral (0) steps are kept.

`"image"` may be a path, a list of paths, or absent (text-only); records hold `images: list[str]` and write one
image as a string, several as a list, none by leaving the key out. The kinds share their field checks
(`reward.checks`) and the checks of what they have in common (question, images, id, answer, meta).

Bad input raises `reward.checks.FormatError`, one line naming the file, the line, the field and what was expected:
`data/x.jsonl:17: field 'steps_with_score[2].score': expected a number in [0, 1], got 1.5`.

Conversions (`mc_to_stepwise`, `stepwise_to_mc`, `stepwise_to_conversation`, `conversation_to_stepwise`) are
lossless: MC counts travel in `StepwiseRecord.meta["num_mc_correct"/"num_mc_total"]`; only hardening soft labels
into `+`/`-` loses information, and only when the labels were soft.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any, ClassVar

from . import checks
from .checks import FormatError
from .conversation import from_visualprm_conversation, hard_label, to_visualprm_conversation

MC_COUNT_KEYS = ("num_mc_correct", "num_mc_total")  # where mc_to_stepwise keeps the counts in StepwiseRecord.meta


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


# -- records ---------------------------------------------------------------------------------------------------------


@dataclass
class _Record:
    """What the four record kinds share: a question, images, an id, meta and (all but ConversationRecord) an answer.

    `__post_init__` checks the fields in the order a line lists them: the question, then the kind's own steps and
    labels (`_check_steps`), then the shared fields, so the first problem of a line is the one reported. The shared
    fields with defaults are keyword-only, so each kind's own fields follow the question.
    """

    question: str
    images: list[str] = field(default_factory=list, kw_only=True)
    id: str | int | None = field(default=None, kw_only=True)
    meta: dict[str, Any] = field(default_factory=dict, kw_only=True)

    IMAGES_KEY: ClassVar[str] = "image"  # the JSON key that holds the images
    OPTIONAL_TEXTS: ClassVar[tuple[str, ...]] = ("answer",)  # optional string fields
    KNOWN: ClassVar[tuple[str, ...]] = ()  # the format's own top-level keys, which `meta` may not use

    def __post_init__(self):
        self.question = checks.text(self.question, "question")
        self._check_steps()
        self.images = checks.image_paths(self.images, self.IMAGES_KEY)
        self.id = checks.record_id(self.id)
        for name in self.OPTIONAL_TEXTS:
            setattr(self, name, checks.optional_text(getattr(self, name), name))
        self.meta = checks.meta(self.meta)
        if self.KNOWN:
            checks.extra_keys(self.meta, self.KNOWN)

    def _check_steps(self) -> None:
        raise NotImplementedError

    @classmethod
    def _shared_from_json(cls, obj: dict[str, Any]) -> dict[str, Any]:
        """`images`, `id` and `meta` (every key the format does not know) of an InternVL-format line."""
        return {"images": checks.image_field(obj.get("image")), "id": obj.get("id"),
                "meta": {k: v for k, v in obj.items() if k not in cls.KNOWN}}

    def _json_head(self, *, question: bool = True) -> dict[str, Any]:
        """The first keys of an InternVL-format line: `id`, `image`, then `question` and `answer` when asked."""
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        if self.images:
            out["image"] = self.images[0] if len(self.images) == 1 else list(self.images)
        if question:
            out["question"] = self.question
            if getattr(self, "answer", None) is not None:
                out["answer"] = self.answer
        return out


@dataclass
class StepwiseRecord(_Record):
    """One solution with a label per step; mmalign's own PRM training and data-generation record."""

    kind: ClassVar[RecordKind] = RecordKind.STEPWISE
    steps: list[str]
    labels: list[bool] | list[float]
    answer: str | None = None
    source: str | None = None

    FIELDS: ClassVar[tuple[str, ...]] = ("id", "images", "question", "steps", "labels", "answer", "source", "meta")
    REQUIRED: ClassVar[tuple[str, ...]] = ("question", "steps", "labels")
    IMAGES_KEY: ClassVar[str] = "images"
    OPTIONAL_TEXTS: ClassVar[tuple[str, ...]] = ("answer", "source")

    def _check_steps(self) -> None:
        self.steps = checks.steps(self.steps)
        self.labels = checks.labels(self.labels, len(self.steps))

    @property
    def soft(self) -> bool:
        """True when the labels are Monte Carlo scores rather than +/- decisions."""
        return not isinstance(self.labels[0], bool)

    def hard_labels(self, threshold: float = 0.0) -> list[bool]:
        return [hard_label(v, threshold) for v in self.labels]

    @classmethod
    def from_json(cls, obj: Any) -> StepwiseRecord:
        obj = checks.json_object(obj)
        unknown = sorted(set(obj) - set(cls.FIELDS))
        if unknown:
            raise checks.fail(unknown[0], f"only the fields {', '.join(cls.FIELDS)} (put anything else in meta)")
        for key in cls.REQUIRED:
            checks.required(obj, key)
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
        self.step = checks.step_text(self.step, f"{name}.step")
        self.score = checks.unit_interval(self.score, f"{name}.score")
        self.num_mc_correct = checks.count(self.num_mc_correct, f"{name}.num_mc_correct")
        self.num_mc_total = checks.count(self.num_mc_total, f"{name}.num_mc_total")
        if self.num_mc_correct > self.num_mc_total:
            raise checks.fail(f"{name}.num_mc_correct", f"at most num_mc_total ({self.num_mc_total})",
                              self.num_mc_correct)
        expected = self.num_mc_correct / self.num_mc_total if self.num_mc_total else 0.0
        if abs(self.score - expected) > 1e-6:
            raise checks.fail(f"{name}.score", f"num_mc_correct / num_mc_total = {expected:.6g}", self.score)
        return self


@dataclass
class MCRecord(_Record):
    """A raw Monte Carlo record (VisualPRM400K raw); unknown top-level keys live in `meta` and go back top-level."""

    kind: ClassVar[RecordKind] = RecordKind.MC
    steps: list[MCStep]
    answer: str | None = None

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "question", "answer", "steps_with_score")

    def _check_steps(self) -> None:
        if not isinstance(self.steps, list) or not self.steps:
            raise checks.fail("steps_with_score", "a non-empty list of steps", self.steps)
        for i, step in enumerate(self.steps):
            if not isinstance(step, MCStep):
                raise checks.fail(f"steps_with_score[{i}]", "an MCStep", step)
            step.validate(f"steps_with_score[{i}]")

    @classmethod
    def from_json(cls, obj: Any) -> MCRecord:
        obj = checks.json_object(obj)
        raw_steps = checks.required(obj, "steps_with_score")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise checks.fail("steps_with_score", "a non-empty list of {step, score, num_mc_correct, num_mc_total}",
                              raw_steps)
        steps = []
        for i, raw in enumerate(raw_steps):
            name = f"steps_with_score[{i}]"
            keys = tuple(MCStep.__dataclass_fields__)
            if not isinstance(raw, dict) or set(raw) != set(keys):
                raise checks.fail(name, f"an object with exactly the keys {', '.join(keys)}", raw)
            steps.append(MCStep(**raw))
        return cls(question=checks.required(obj, "question"), steps=steps, answer=obj.get("answer"),
                   **cls._shared_from_json(obj))

    def to_json(self) -> dict[str, Any]:
        out = self._json_head()
        out["steps_with_score"] = [
            {"step": s.step, "score": s.score, "num_mc_correct": s.num_mc_correct, "num_mc_total": s.num_mc_total}
            for s in self.steps
        ]
        out.update(self.meta)
        return out


@dataclass
class ConversationRecord(_Record):
    """A VisualPRM400K training record, held parsed; `to_json` writes the identical conversation back."""

    kind: ClassVar[RecordKind] = RecordKind.CONVERSATION
    steps: list[str]
    labels: list[bool]

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "conversations")
    OPTIONAL_TEXTS: ClassVar[tuple[str, ...]] = ()

    def _check_steps(self) -> None:
        self.steps = checks.steps(self.steps)
        self.labels = checks.hard_labels(self.labels, len(self.steps))

    @property
    def conversations(self) -> list[dict[str, str]]:
        return to_visualprm_conversation(self.question, self.steps, self.labels)

    @classmethod
    def from_json(cls, obj: Any) -> ConversationRecord:
        obj = checks.json_object(obj)
        try:
            question, steps, labels = from_visualprm_conversation(checks.required(obj, "conversations"))
        except FormatError as err:
            raise err.under("conversations") from None
        return cls(question=question, steps=steps, labels=labels, **cls._shared_from_json(obj))

    def to_json(self) -> dict[str, Any]:
        out = self._json_head(question=False)
        out["conversations"] = self.conversations
        out.update(self.meta)
        return out


@dataclass
class ProcessBenchRecord(_Record):
    """A VisualProcessBench row: human step labels 1 (correct), -1 (wrong), 0 (neutral, kept). `meta` holds the
    unknown top-level keys, and the unknown keys of `response` under "response"."""

    kind: ClassVar[RecordKind] = RecordKind.PROCESSBENCH
    steps: list[str]
    correctness: list[int]
    answer: str | None = None

    KNOWN: ClassVar[tuple[str, ...]] = ("id", "image", "question", "answer")
    RESPONSE: ClassVar[tuple[str, ...]] = ("steps", "process_correctness")

    def __post_init__(self):
        super().__post_init__()
        if "response" in self.meta:
            checks.extra_keys(checks.meta(self.meta["response"], "meta.response"), self.RESPONSE, "meta.response")

    def _check_steps(self) -> None:
        self.steps = checks.steps(self.steps, "response.steps")
        allowed = sorted(int(j) for j in StepJudgement)
        if not isinstance(self.correctness, list) or len(self.correctness) != len(self.steps):
            raise checks.fail("response.process_correctness", f"a list of {len(self.steps)} labels (one per step)",
                              self.correctness)
        for i, v in enumerate(self.correctness):
            if isinstance(v, bool) or v not in allowed:
                raise checks.fail(f"response.process_correctness[{i}]", " or ".join(map(str, allowed)), v)
        self.correctness = [int(v) for v in self.correctness]

    @property
    def labels(self) -> list[bool | None]:
        """True (positive), False (negative) or None (neutral) per step."""
        return [None if v == StepJudgement.NEUTRAL else v == StepJudgement.POSITIVE for v in self.correctness]

    @classmethod
    def from_json(cls, obj: Any) -> ProcessBenchRecord:
        obj = checks.json_object(obj)
        response = checks.required(obj, "response")
        if not isinstance(response, dict):
            raise checks.fail("response", 'an object {"steps": [...], "process_correctness": [...]}', response)
        for key in cls.RESPONSE:
            if key not in response:
                raise checks.fail(f"response.{key}", "this field (it is required)")
        question = checks.required(obj, "question")
        shared = cls._shared_from_json(obj)
        shared["meta"].pop("response")
        response_extra = {k: v for k, v in response.items() if k not in cls.RESPONSE}
        if response_extra:
            shared["meta"]["response"] = response_extra
        return cls(question=question, steps=response["steps"], correctness=response["process_correctness"],
                   answer=obj.get("answer"), **shared)

    def to_json(self) -> dict[str, Any]:
        out = self._json_head()
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


def _take_str(meta: dict[str, Any], key: str) -> str | None:
    """Pop `meta[key]` when it is a string (the inverse of putting an optional field into meta)."""
    return meta.pop(key) if isinstance(meta.get(key), str) else None


def _put(meta: dict[str, Any], key: str, value: Any, name: str) -> None:
    if value is None:
        return
    if key in meta:
        raise checks.fail(f"meta.{key}", f"no {key!r} key in meta while the record's {name} is set (it would be lost)")
    meta[key] = value


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
        raise checks.fail("labels", "soft labels (MC scores) to make a Monte Carlo record, got true/false labels")
    meta = dict(record.meta)
    counts = []
    for key in MC_COUNT_KEYS:
        value = meta.pop(key, None)
        if not isinstance(value, list) or len(value) != n:
            raise checks.fail(f"meta.{key}", f"a list of {n} counts (as mc_to_stepwise writes)", value)
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
