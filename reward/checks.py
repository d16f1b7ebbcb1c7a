"""Field checks of the PRM data formats: `FormatError`, and one check per kind of field.

Each check takes a value and the field's name, and returns the value normalised or raises `FormatError`, one line
naming where (file:line, once `at` locates it), the field and what was expected:
`data/x.jsonl:17: field 'steps_with_score[2].score': expected a number in [0, 1], got 1.5`.
The record kinds of `reward.formats` and the conversation parser of `reward.conversation` share them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

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


_MISSING = object()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fail(field: str | None, expected: str, got: Any = _MISSING) -> FormatError:
    """The error to raise: `field` expected `expected` (`, got <value>` when a value is given)."""
    return FormatError(field, expected if got is _MISSING else f"{expected}, got {_show(got)}")


def text(value: Any, name: str, *, blank_ok: bool = False) -> str:
    """A string; non-empty unless `blank_ok`."""
    if not isinstance(value, str) or (not blank_ok and not value.strip()):
        raise fail(name, "a string" if blank_ok else "a non-empty string", value)
    return value


def optional_text(value: Any, name: str) -> str | None:
    return None if value is None else text(value, name, blank_ok=True)


def record_id(value: Any, name: str = "id") -> str | int | None:
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return value
    raise fail(name, "a string or an integer", value)


def meta(value: Any, name: str = "meta") -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail(name, "an object with string keys", value)
    return value


def image_paths(value: Any, name: str) -> list[str]:
    if not isinstance(value, list):
        raise fail(name, "a list of image paths", value)
    for i, path in enumerate(value):
        text(path, f"{name}[{i}]")
    return list(value)


def image_field(value: Any, name: str = "image") -> list[str]:
    """JSON `image`: a path, a list of paths, or null/absent for a text-only sample."""
    if value is None:
        return []
    if isinstance(value, str):
        return [text(value, name)]
    if isinstance(value, list):
        return image_paths(value, name)
    raise fail(name, "an image path or a list of image paths", value)


def step_text(value: Any, name: str) -> str:
    """A step: a non-empty string (`EmptyStepError` for an empty or blank one)."""
    if isinstance(value, str) and not value.strip():
        raise EmptyStepError(name, f"a non-empty step, got {_show(value)}")
    return text(value, name)


def steps(value: Any, name: str = "steps") -> list[str]:
    if not isinstance(value, list) or not value:
        raise fail(name, "a non-empty list of steps (strings)", value)
    for i, step in enumerate(value):
        step_text(step, f"{name}[{i}]")
    return list(value)


def is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def unit_interval(value: Any, name: str) -> float:
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise fail(name, "a number in [0, 1]", value)
    return float(value)


def count(value: Any, name: str) -> int:
    if not is_number(value) or value < 0 or value != int(value):
        raise fail(name, "a non-negative integer", value)
    return int(value)


def labels(value: Any, n_steps: int, name: str = "labels") -> list[bool] | list[float]:
    """All hard (bools) or all soft (numbers in [0, 1], returned as floats); one per step."""
    if not isinstance(value, list) or len(value) != n_steps:
        raise fail(name, f"a list of {n_steps} labels (one per step)", value)
    if all(isinstance(v, bool) for v in value):
        return list(value)
    if any(isinstance(v, bool) for v in value):
        raise fail(name, "labels all true/false (hard) or all numbers in [0, 1] (soft), not a mix", value)
    return [unit_interval(v, f"{name}[{i}]") for i, v in enumerate(value)]


def hard_labels(value: Any, n_steps: int, name: str = "labels") -> list[bool]:
    if not isinstance(value, list) or len(value) != n_steps or not all(isinstance(v, bool) for v in value):
        raise fail(name, f"a list of {n_steps} true/false labels (one per step)", value)
    return list(value)


def extra_keys(meta: dict[str, Any], known: Iterable[str], name: str = "meta") -> None:
    """Refuse meta keys that the record's own format uses (writing the record back would clash)."""
    clash = sorted(set(meta) & set(known))
    if clash:
        raise fail(name, f"no keys that the record format itself uses ({', '.join(sorted(known))})", clash)


def json_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(None, "a JSON object per line", value)
    return value


def required(obj: dict[str, Any], key: str) -> Any:
    """`obj[key]`, which must be present."""
    if key not in obj:
        raise fail(key, "this field (it is required)")
    return obj[key]
