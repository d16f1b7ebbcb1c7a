"""The MMPR reader: a `meta.json` naming data sets, each an annotation file of JSON lines, read with InternVL's rules.

    records = read_mmpr("data/meta.json")

InternVL's rules, kept here: relative paths resolve against the working directory first (then meta.json's folder),
`repeat_time` repeats or subsamples a data set, a question with images but no `<image>` gets one per image in front,
`"image": ""` is a text-only sample. Errors in meta.json itself raise `DataValidationError` listing all of them;
errors in annotation lines become records with read issues (reference section 2 has the format).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..processing import IMAGE_PLACEHOLDER, with_placeholders
from .jsonl import json_lines, record_object
from .records import DataValidationError, PreferenceRecord, RecordProblem, type_name

logger = logging.getLogger(__name__)

PLACEHOLDERS_ADDED = "_placeholders_added"  # a transient meta flag: a multi-image question given its placeholders


class MMPRKey(StrEnum):
    """Keys of one data set's entry in an MMPR `meta.json`."""

    ROOT = "root"
    ANNOTATION = "annotation"
    DATA_AUGMENT = "data_augment"
    REPEAT_TIME = "repeat_time"
    LENGTH = "length"
    MAX_DYNAMIC_PATCH = "max_dynamic_patch"


class MMPRField(StrEnum):
    """Fields of one MMPR annotation line; other keys (chosen_meta, rejected_meta, ...) go to `record.meta`."""

    IMAGE = "image"
    QUESTION = "question"
    CHOSEN = "chosen"
    REJECTED = "rejected"
    ANSWER_GT = "answer_gt"


def is_mmpr_meta(path: str | Path) -> bool:
    """Whether `path` is an MMPR meta.json: a `.json` file holding an object of entries that each name an
    annotation file (`"annotation"`)."""
    path = Path(path)
    if path.suffix != ".json":
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(isinstance(v, dict) and MMPRKey.ANNOTATION in v for v in data.values())


def read_mmpr(meta_path: str | Path, *, default_max_dynamic_patch: int = 12, seed: int = 0,
              data_root: str | Path | None = None, cwd: str | Path | None = None) -> list[PreferenceRecord]:
    """Read every data set of an MMPR `meta.json` into records, repeated or subsampled by `repeat_time`.

    Relative `root`/`annotation` paths resolve as InternVL resolves them, against the working directory (`cwd`,
    default the process's: InternVL's own meta files hold paths like `MMPR-v1.2/images/...` and are run from the
    parent folder); when a path does not exist there, against meta.json's folder (mmalign's own meta files, e.g.
    those of `mmalign pairs`). With `data_root`, against it alone. One log line per data set says which was used.
    Image paths resolve against `root`. `repeat_time` as InternVL: above 1, the records repeated `int(repeat_time)`
    times (2.5 -> twice); below 1, a seeded sample of `int(n * repeat_time)` records (kept in file order). The
    same object appears once per repeat. `data_augment: true` is refused (InternVL's random JPEG re-compression
    of training images is not implemented). Errors in meta.json itself raise DataValidationError listing all of
    them; errors in annotation lines become records with read issues (see `validate_records`).
    """
    meta_path = Path(meta_path)
    meta_label = str(meta_path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataValidationError([], message=f"{meta_label}: file not found (expected an MMPR meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError([], message=f"{meta_label}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise DataValidationError(
            [], message=f"{meta_label}: expected an object mapping data-set names to entries, got {type_name(meta)}"
        )

    if data_root is not None:
        bases = [(Path(data_root).resolve(), "data_root")]
    else:
        bases = [(Path(cwd if cwd is not None else Path.cwd()).resolve(), "the working directory, as InternVL"),
                 (meta_path.resolve().parent, "meta.json's folder")]
    entries, problems = [], []
    for name, entry in meta.items():
        parsed = _parse_meta_entry(name, entry, bases, meta_label, default_max_dynamic_patch, problems)
        if parsed is not None:
            entries.append(parsed)
    if problems:
        raise DataValidationError(problems, hint=f"fix {meta_label}")

    records: list[PreferenceRecord] = []
    for entry in entries:
        dataset = _read_annotation(entry)
        if entry.length is not None and entry.length != len(dataset):
            logger.warning(
                "%s: %s: meta.json says length %d but %s has %d records",
                meta_label, entry.name, entry.length, entry.annotation, len(dataset),
            )  # fmt: skip
        records += repeat_records(dataset, entry.repeat_time, seed=seed, salt=entry.name)
    return records


def repeat_records(
    records: Sequence[PreferenceRecord], repeat_time: float, *, seed: int, salt: str = ""
) -> list[PreferenceRecord]:
    """InternVL's rule: `repeat_time` >= 1 gives `int(repeat_time)` full copies (2.5 -> 2: the fraction above 1 is
    dropped); below 1, a seeded subset of `int(n * repeat_time)` records, kept in file order.

    The subset depends only on (seed, salt, n), so reruns pick the same records.
    """
    if repeat_time >= 1:
        return list(records) * int(repeat_time)
    k = math.floor(len(records) * repeat_time + 1e-9)
    rng = random.Random(f"{seed}:{salt}")  # str seeds hash with sha512: stable across processes
    subset = sorted(rng.sample(range(len(records)), k))
    return [records[i] for i in subset]


@dataclass
class _MetaEntry:
    name: str
    root: Path | None
    annotation: Path
    data_augment: bool
    repeat_time: float
    length: int | None
    max_dynamic_patch: int


def _resolve(value: str, bases: list[tuple[Path, str]], exists: Callable[[Path], bool]) -> tuple[Path, str]:
    """(path, how): `value` against the first base where it exists, else against the first base."""
    if Path(value).expanduser().is_absolute():
        return Path(value).expanduser().resolve(), "absolute"
    for base, how in bases:
        if exists((base / value).resolve()):
            return (base / value).resolve(), how
    return (bases[0][0] / value).resolve(), bases[0][1]


def _parse_meta_entry(
    name: str, entry: Any, bases: list[tuple[Path, str]], meta_label: str, default_mdp: int,
    problems: list[RecordProblem],
) -> _MetaEntry | None:
    def bad(key: str, message: str) -> None:
        problems.append(RecordProblem(name, meta_label, None, f"{name}.{key}" if key else name, message))

    if not isinstance(entry, dict):
        bad("", f"expected an object with '{MMPRKey.ANNOTATION}' and '{MMPRKey.ROOT}', got {type_name(entry)}")
        return None
    n_before = len(problems)
    unknown = sorted(set(entry) - set(MMPRKey))
    if unknown:  # other InternVL meta files carry extra keys: not fatal, but not silent either
        logger.warning("%s: %s: ignoring unknown keys %s (known: %s)", meta_label, name, unknown, ", ".join(MMPRKey))

    used = {}

    def locate(key: MMPRKey, written: str, exists: Callable[[Path], bool], missing: str) -> Path:
        path, used[key] = _resolve(written, bases, exists)
        if not exists(path):
            tried = " or ".join(str(b) for b, _ in bases)
            bad(key, f"{missing}: {written}" + ("" if Path(written).is_absolute() else f" (relative to {tried})"))
        return path

    root = entry.get(MMPRKey.ROOT)
    if root is not None:
        if not isinstance(root, str) or not root:
            bad(MMPRKey.ROOT, f"expected a folder path (string), got {root!r}")
            root = None
        else:
            root = locate(MMPRKey.ROOT, root, Path.is_dir, "folder not found")

    annotation = entry.get(MMPRKey.ANNOTATION)
    if not isinstance(annotation, str) or not annotation:
        bad(MMPRKey.ANNOTATION, f"expected a JSON-lines file path (string), got {annotation!r}")
    else:
        annotation = locate(MMPRKey.ANNOTATION, annotation, Path.is_file, "file not found")

    data_augment = entry.get(MMPRKey.DATA_AUGMENT, False)
    if not isinstance(data_augment, bool):
        bad(MMPRKey.DATA_AUGMENT, f"expected true or false, got {data_augment!r}")
    elif data_augment:
        bad(MMPRKey.DATA_AUGMENT, "true is not supported (InternVL re-compresses training images as JPEG at a "
            "random quality; mmalign does not): set it to false")

    repeat_time = entry.get(MMPRKey.REPEAT_TIME, 1.0)
    if isinstance(repeat_time, bool) or not isinstance(repeat_time, int | float) or not repeat_time > 0:
        bad(MMPRKey.REPEAT_TIME, f"expected a number > 0 (2.0 repeats twice, 0.5 takes half), got {repeat_time!r}")

    length = entry.get(MMPRKey.LENGTH)
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        bad(MMPRKey.LENGTH, f"expected a record count (integer >= 0), got {length!r}")

    mdp = entry.get(MMPRKey.MAX_DYNAMIC_PATCH, default_mdp)
    if isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1:
        bad(MMPRKey.MAX_DYNAMIC_PATCH, f"expected an integer >= 1, got {mdp!r}")

    if len(problems) > n_before:
        return None
    relative = {key: how for key, how in used.items() if how != "absolute"}
    if relative:
        hows = sorted(set(relative.values()))
        logger.info("%s: %s: %s resolved against %s", meta_label, name, " and ".join(relative),
                    " / ".join(f"{how} ({next(str(b) for b, h in bases if h == how)})" for how in hows))
    return _MetaEntry(name, root, annotation, data_augment, float(repeat_time), length, mdp)


def _read_annotation(entry: _MetaEntry) -> list[PreferenceRecord]:
    file = str(entry.annotation)
    records = []
    for line_no, raw in json_lines(entry.annotation):
        record = PreferenceRecord(
            source=entry.name,
            line=line_no,
            question="",
            chosen="",
            rejected="",
            max_dynamic_patch=entry.max_dynamic_patch,
            file=file,
            image_root=None if entry.root is None else str(entry.root),
            data_augment=entry.data_augment,
            raw=raw,
        )
        _fill_mmpr(record, raw, entry.root)
        records.append(record)
    added = [r.line for r in records if r.meta.pop(PLACEHOLDERS_ADDED, False)]
    if added:
        shown = ", ".join(map(str, added[:10])) + (f" and {len(added) - 10} more" if len(added) > 10 else "")
        logger.warning("%s: %s: %d multi-image question%s without %s placeholders (line%s %s) got one '%s\\n' per "
                       "image in front; InternVL's training drops such records", file, entry.name, len(added),
                       "" if len(added) == 1 else "s", IMAGE_PLACEHOLDER, "" if len(added) == 1 else "s", shown,
                       IMAGE_PLACEHOLDER)
    return records


def _fill_mmpr(record: PreferenceRecord, raw: Any, root: Path | None) -> None:
    raw = record_object(record, raw)
    if raw is None:
        return
    issues = record.read_issues

    for name in (MMPRField.QUESTION, MMPRField.CHOSEN, MMPRField.REJECTED):
        value = raw.get(name)
        if name not in raw:
            issues.append((name, "missing; expected a string"))
        elif not isinstance(value, str):
            issues.append((name, f"expected a string, got {type_name(value)}"))
        else:
            setattr(record, name, value)

    answer_gt = raw.get(MMPRField.ANSWER_GT)
    if answer_gt is None or isinstance(answer_gt, str):
        record.answer_gt = answer_gt
    elif isinstance(answer_gt, int | float) and not isinstance(answer_gt, bool):
        record.answer_gt = str(answer_gt)
    else:
        issues.append((MMPRField.ANSWER_GT, f"expected a string or number, got {type_name(answer_gt)}"))
    record.meta = {k: v for k, v in raw.items() if k not in set(MMPRField)}

    value = raw.get(MMPRField.IMAGE)
    refs = [] if value == "" else _image_refs(value, MMPRField.IMAGE, issues)  # InternVL: "" is a text-only sample
    if refs and root is None:
        issues.append((MMPRField.IMAGE, f"data set {record.source!r} has no '{MMPRKey.ROOT}' in meta.json"))
        return
    record.image_paths = [str((root / ref).resolve()) for ref in refs]
    if len(refs) > 1 and IMAGE_PLACEHOLDER not in record.question:
        record.meta[PLACEHOLDERS_ADDED] = True  # reported per data set by _read_annotation
    record.question = with_placeholders(record.question, record.n_images)


def _image_refs(value: Any, key: str, issues: list[tuple[str, str]]) -> list[str]:
    """Image paths from `None | str | list[str]`; a wrong type becomes a read issue."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        issues.append((key, f"expected a path or a list of paths (non-empty strings), got {value!r:.80}"))
        return []
    return values
