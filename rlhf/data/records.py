"""A preference record, a problem found in one, and the error that lists them all.

A problem prints as one line `file:line: field: message` (`file[row]: ...` for rows of a table); a
`DataValidationError` carries every problem found, never only the first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from PIL import Image

from ..errors import UserError

MAX_PRINTED_PROBLEMS = 50
RECORD_FIELD = "record"  # the field named by a problem that concerns the whole line (malformed JSON, not an object)


class Position(StrEnum):
    """How `line` locates a record: a 1-based line of a JSON-lines file, or a 0-based row of a table."""

    LINE = "line"
    ROW = "row"


@dataclass
class PreferenceRecord:
    """One preference pair. `question` carries one `<image>` placeholder per image.

    Images are either files (`image_paths`, absolute with symlinks and `..` resolved) or in memory (`images`, PIL
    images from a `datasets.Dataset`). `read_issues` holds (field, message) pairs found while reading (malformed JSON,
    missing field, wrong type); `validate_records` reports them. `raw` is the record as read (the parsed JSON object,
    or the line's text when it did not parse), written to the rejects file when the record is skipped.
    """

    source: str
    line: int
    question: str
    chosen: str
    rejected: str
    image_paths: list[str] = field(default_factory=list)
    max_dynamic_patch: int | None = None
    answer_gt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list, repr=False)
    system: str | None = None
    file: str = ""
    position: Position = Position.LINE
    image_root: str | None = None  # images must resolve inside it; None: no containment check
    question_key: str = "question"  # the field named in question problems (MMPR's; "prompt" for TRL data)
    image_key: str = "image"  # the field named in image problems (MMPR's; "images" or "image" for TRL data)
    data_augment: bool = False
    raw: Any = field(default=None, repr=False, compare=False)
    read_issues: list[tuple[str, str]] = field(default_factory=list, repr=False)

    @property
    def n_images(self) -> int:
        return len(self.image_paths) + len(self.images)

    @property
    def tiles_per_image(self) -> int | None:
        """Tile budget per image: `max(1, max_dynamic_patch // n_images)` (None: the processor's default)."""
        if self.max_dynamic_patch is None:
            return None
        return max(1, self.max_dynamic_patch // max(1, self.n_images))

    @property
    def key(self) -> tuple[str, str, int]:
        """Identifies the record in its file; repeated copies (repeat_time > 1) share it."""
        return (self.source, self.file, self.line)


@dataclass(frozen=True)
class RecordProblem:
    """One thing wrong with one record (or with a data set's entry in meta.json, then `line` is None)."""

    source: str
    file: str
    line: int | None
    field: str
    message: str
    position: Position = Position.LINE

    def __str__(self) -> str:
        return f"{_where(self.file, self.line, self.position)}: {self.field}: {self.message}"

    def in_source(self) -> str:
        """The problem located by data-set name: `mmpr_demo line 17: message`."""
        return f"{self.source} {self.position} {self.line}: {self.message}"


def _where(file: str, line: int | None, position: Position) -> str:
    if line is None:
        return file
    return f"{file}[{line}]" if position is Position.ROW else f"{file}:{line}"


def record_problem(record: PreferenceRecord, field_: str, message: str) -> RecordProblem:
    """A problem of `record`, located where the record is."""
    return RecordProblem(record.source, record.file, record.line, field_, message, record.position)


def format_problems(problems: Sequence[RecordProblem], *, limit: int = MAX_PRINTED_PROBLEMS, hint: str = "") -> str:
    """A count header, then one problem per line, at most `limit` lines and `... and N more`; one problem is one
    line."""
    if len(problems) == 1:
        return f"{problems[0]}" + (f" ({hint})" if hint else "")
    n_records = len({(p.source, p.file, p.line) for p in problems})
    unit = "record" if any(p.line is not None for p in problems) else "data set"  # line None: a meta.json entry
    header = f"{len(problems)} problem{'' if len(problems) == 1 else 's'} in {n_records} {unit}"
    header += "" if n_records == 1 else "s"
    lines = [header + (f" ({hint})" if hint else "") + ":"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


class DataValidationError(UserError, ValueError):
    """Bad training data; the message lists every problem found (see `format_problems`)."""

    def __init__(self, problems: Sequence[RecordProblem], *, hint: str = "", message: str | None = None):
        self.problems = list(problems)
        super().__init__(message if message is not None else format_problems(self.problems, hint=hint))



def type_name(value: Any) -> str:
    """A JSON value's type as a problem names it: `null`, `str`, `list`, ..."""
    return "null" if value is None else type(value).__name__

