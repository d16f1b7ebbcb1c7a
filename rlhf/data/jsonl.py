"""JSON lines as the preference readers read them: every line becomes a value or a `Malformed`, never a stop.

A malformed line (bad UTF-8, bad JSON) or a value that is not an object becomes a read issue of its record, which
`rlhf.data.validate.validate_records` reports with every other problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .records import RECORD_FIELD, PreferenceRecord, type_name


class Malformed(NamedTuple):
    """A line that did not parse: its text (kept for the rejects file) and why."""

    text: str
    error: str


def json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(1-based line number, parsed value or Malformed) for every non-blank line; never stops at a bad line."""
    with open(path, "rb") as f:
        for line_no, data in enumerate(f, start=1):
            try:
                text = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                text = data.decode("utf-8", "replace").rstrip("\r\n")
                yield line_no, Malformed(text, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, Malformed(text, f"malformed JSON: {exc.msg} (column {exc.colno})")


def record_object(record: PreferenceRecord, raw: Any) -> Mapping | None:
    """`raw` when it is a JSON object; else None, with a read issue on the whole record (a malformed line's text
    becomes `record.raw`)."""
    if isinstance(raw, Malformed):
        record.raw = raw.text
        record.read_issues.append((RECORD_FIELD, raw.error))
        return None
    if not isinstance(raw, Mapping):
        record.read_issues.append((RECORD_FIELD, f"expected a JSON object, got {type_name(raw)}"))
        return None
    return raw
