"""Validation of read records, before training: every problem of every record at once, then raise or skip.

    problems = validate_records(records)                    # fields, placeholders, images, paths
    records = split_valid(records, problems, skip_invalid=False, rejects_path=None)   # raise, or skip + log

A skipped record goes to the rejects file, as read and with its problems (`write_rejects`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing import IMAGE_PLACEHOLDER
from .images import image_problem
from .records import RECORD_FIELD, DataValidationError, PreferenceRecord, RecordProblem, record_problem

logger = logging.getLogger(__name__)


def validate_records(records: Iterable[PreferenceRecord], *, check_images: bool = True) -> list[RecordProblem]:
    """Every problem of every distinct record (repeated copies are checked once), in record order.

    Checks: read issues (malformed JSON, missing fields, wrong types), empty question/chosen/rejected, chosen ==
    rejected, `<image>` in a response, placeholder count != image count, image paths that resolve (symlinks and
    `..` followed) outside their root, and with `check_images` missing or undecodable image files. Files outside
    their root are never opened.
    """
    problems: list[RecordProblem] = []
    seen: set[tuple[str, str, int]] = set()
    image_errors: dict[str, str | None] = {}
    for record in records:
        if record.key in seen:
            continue
        seen.add(record.key)
        problems += _record_problems(record, check_images, image_errors)
    return problems


def _record_problems(
    record: PreferenceRecord, check_images: bool, image_errors: dict[str, str | None]
) -> list[RecordProblem]:
    problems = [record_problem(record, f, m) for f, m in record.read_issues]
    bad = {f.split("[")[0] for f, _ in record.read_issues}
    if RECORD_FIELD in bad:
        return problems

    texts_ok = {}
    keys = {"question": record.question_key, "chosen": "chosen", "rejected": "rejected"}  # attribute -> field
    for name, key in keys.items():
        if key in bad:
            continue
        if not getattr(record, name).strip():
            problems.append(record_problem(record, key, "empty (only whitespace)"))
        else:
            texts_ok[name] = getattr(record, name)
    chosen, rejected = texts_ok.get("chosen"), texts_ok.get("rejected")
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        problems.append(record_problem(record, "rejected", "identical to chosen"))
    for name in ("chosen", "rejected"):
        if IMAGE_PLACEHOLDER in texts_ok.get(name, ""):
            problems.append(record_problem(record, name, f"contains {IMAGE_PLACEHOLDER}; only the question may"))

    if record.image_key in bad:
        return problems
    question = texts_ok.get("question")
    n_placeholders = None if question is None else question.count(IMAGE_PLACEHOLDER)
    if n_placeholders is not None and n_placeholders != record.n_images:
        images = f"{record.n_images} image{'' if record.n_images == 1 else 's'}" if record.n_images else "no images"
        problems.append(record_problem(
            record, record.question_key,
            f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder{'' if n_placeholders == 1 else 's'} "
            f"but the record has {images}",
        ))  # fmt: skip

    for i, path in enumerate(record.image_paths):
        single = record.image_key == "image" and len(record.image_paths) == 1
        where = record.image_key if single else f"{record.image_key}[{i}]"
        if record.image_root is not None and not Path(path).is_relative_to(record.image_root):
            problems.append(
                record_problem(record, where, f"resolves to {path}, outside the image root {record.image_root}"))
        elif check_images:
            if path not in image_errors:
                image_errors[path] = image_problem(path)
            if image_errors[path] is not None:
                problems.append(record_problem(record, where, image_errors[path]))
    for i, image in enumerate(record.images):
        if image.width < 1 or image.height < 1:
            problems.append(
                record_problem(record, f"{record.image_key}[{i}]", f"empty image ({image.width}x{image.height})"))
    return problems


def split_valid(
    records: Sequence[PreferenceRecord],
    problems: Sequence[RecordProblem],
    *,
    skip_invalid: bool = False,
    rejects_path: str | Path | None = None,
) -> list[PreferenceRecord]:
    """The records without problems; by default raise DataValidationError listing all problems instead.

    With `skip_invalid`, each invalid record is written once (as read, with its problems) to `rejects_path` as JSON
    lines (the file is rewritten, empty when nothing was skipped) and every copy of it is dropped.
    """
    if problems and not skip_invalid:
        raise DataValidationError(problems, hint="fix them, or set skip_invalid to skip them and write a rejects file")
    by_key: dict[tuple[str, str, int | None], list[RecordProblem]] = {}
    for p in problems:
        by_key.setdefault((p.source, p.file, p.line), []).append(p)
    kept, rejected = [], {}
    for record in records:
        if record.key in by_key:
            rejected.setdefault(record.key, record)
        else:
            kept.append(record)
    if rejects_path is not None:
        write_rejects(rejects_path, [(r, by_key[k]) for k, r in rejected.items()])
    if rejected:
        target = rejects_path if rejects_path is not None else "(no rejects file)"
        logger.warning("skipped %d invalid records -> %s", len(rejected), target)
    return kept


def write_rejects(
    path: str | Path, rejects: Iterable[tuple[PreferenceRecord, Sequence[RecordProblem]]], *, append: bool = False
) -> int:
    """Write `{"source", "file", "line", "position", "problems", "record"}` per rejected record; returns the count."""
    n = 0
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for record, record_problems in rejects:
            entry = {
                "source": record.source,
                "file": record.file,
                "line": record.line,
                "position": str(record.position),
                "problems": [str(p) for p in record_problems],
                "record": record.raw,
            }
            f.write(json.dumps(entry, ensure_ascii=False, default=_json_default) + "\n")
            n += 1
    return n


def _json_default(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return f"<PIL image {value.mode} {value.width}x{value.height}>"
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return repr(value)
