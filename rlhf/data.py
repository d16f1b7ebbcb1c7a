"""Preference records for MPO: read MMPR folders and TRL preference data sets, validate them, fit them to max_length.

The flow before training (each step reports every bad record at once, never only the first):

    records = read_mmpr("data/meta.json")                   # or read_preference_dataset(ds_or_file)
    problems = validate_records(records)                    # fields, placeholders, images, paths
    records = split_valid(records, problems, skip_invalid=False, rejects_path=None)   # raise, or skip + log
    records, _ = check_lengths(records, count_tokens, max_length=8192, on_overflow="skip")

Reading never stops at a bad line: a malformed JSON line, a missing field or a wrong type becomes a record that
carries its read issues, which `validate_records` reports with everything else (reference section 2 has the MMPR
format). A problem prints as one line `file:line: field: message` (`file[row]: ...` for rows of a table).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from .errors import UserError
from .processing import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

MAX_PRINTED_PROBLEMS = 50
RECORD_FIELD = "record"  # the field named by a problem that concerns the whole line (malformed JSON, not an object)
PLACEHOLDERS_ADDED = "_placeholders_added"  # a transient meta flag: a multi-image question given its placeholders


class Position(StrEnum):
    """How `line` locates a record: a 1-based line of a JSON-lines file, or a 0-based row of a table."""

    LINE = "line"
    ROW = "row"


class OverflowAction(StrEnum):
    """What `check_lengths` does with a record whose prompt (image tokens included) leaves no room for a response."""

    SKIP = "skip"  # drop it and log one line per record
    ERROR = "error"  # raise DataValidationError listing every such record
    REJECT = "reject"  # drop it, log, and append it to the rejects file


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


class TRLField(StrEnum):
    """Columns of TRL's preference format (explicit prompt, or implicit prompt inside chosen/rejected)."""

    PROMPT = "prompt"
    CHOSEN = "chosen"
    REJECTED = "rejected"
    IMAGES = "images"
    IMAGE = "image"


# ----------------------------------------------------------------------------------------------------- records


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
    question_key: str = MMPRField.QUESTION  # the field named in question problems ("prompt" for TRL data)
    image_key: str = MMPRField.IMAGE  # the field named in image problems
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


def _problem(record: PreferenceRecord, field_: str, message: str) -> RecordProblem:
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


class ImageLoadError(UserError, OSError):
    """An image file that is missing or cannot be decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise ImageLoadError naming the file and the reason."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None


# ------------------------------------------------------------------------------------------------ reading MMPR


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
            [], message=f"{meta_label}: expected an object mapping data-set names to entries, got {_type(meta)}"
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
        bad("", f"expected an object with '{MMPRKey.ANNOTATION}' and '{MMPRKey.ROOT}', got {_type(entry)}")
        return None
    n_before = len(problems)
    unknown = sorted(set(entry) - set(MMPRKey))
    if unknown:  # other InternVL meta files carry extra keys: not fatal, but not silent either
        logger.warning("%s: %s: ignoring unknown keys %s (known: %s)", meta_label, name, unknown, ", ".join(MMPRKey))

    tried = " or ".join(str(b) for b, _ in bases)
    used = {}
    root = entry.get(MMPRKey.ROOT)
    if root is not None:
        if not isinstance(root, str) or not root:
            bad(MMPRKey.ROOT, f"expected a folder path (string), got {root!r}")
            root = None
        else:
            written = root
            root, used[MMPRKey.ROOT] = _resolve(written, bases, Path.is_dir)
            if not root.is_dir():
                where = "" if Path(written).is_absolute() else f" (relative to {tried})"
                bad(MMPRKey.ROOT, f"folder not found: {written}{where}")

    annotation = entry.get(MMPRKey.ANNOTATION)
    if not isinstance(annotation, str) or not annotation:
        bad(MMPRKey.ANNOTATION, f"expected a JSON-lines file path (string), got {annotation!r}")
    else:
        written = annotation
        annotation, used[MMPRKey.ANNOTATION] = _resolve(written, bases, Path.is_file)
        if not annotation.is_file():
            where = "" if Path(written).is_absolute() else f" (relative to {tried})"
            bad(MMPRKey.ANNOTATION, f"file not found: {written}{where}")

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
    for line_no, raw in _json_lines(entry.annotation):
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


class _Malformed(NamedTuple):
    text: str
    error: str


def _json_lines(path: Path) -> Iterable[tuple[int, Any]]:
    """(1-based line number, parsed value or _Malformed) for every non-blank line; never stops at a bad line."""
    with open(path, "rb") as f:
        for line_no, data in enumerate(f, start=1):
            try:
                text = data.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                text = data.decode("utf-8", "replace").rstrip("\r\n")
                yield line_no, _Malformed(text, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as exc:
                yield line_no, _Malformed(text, f"malformed JSON: {exc.msg} (column {exc.colno})")


def _fill_mmpr(record: PreferenceRecord, raw: Any, root: Path | None) -> None:
    issues = record.read_issues
    if isinstance(raw, _Malformed):
        record.raw = raw.text
        issues.append((RECORD_FIELD, raw.error))
        return
    if not isinstance(raw, dict):
        issues.append((RECORD_FIELD, f"expected a JSON object, got {_type(raw)}"))
        return

    for name in (MMPRField.QUESTION, MMPRField.CHOSEN, MMPRField.REJECTED):
        value = raw.get(name)
        if name not in raw:
            issues.append((name, "missing; expected a string"))
        elif not isinstance(value, str):
            issues.append((name, f"expected a string, got {_type(value)}"))
        else:
            setattr(record, name, value)

    answer_gt = raw.get(MMPRField.ANSWER_GT)
    if answer_gt is None or isinstance(answer_gt, str):
        record.answer_gt = answer_gt
    elif isinstance(answer_gt, int | float) and not isinstance(answer_gt, bool):
        record.answer_gt = str(answer_gt)
    else:
        issues.append((MMPRField.ANSWER_GT, f"expected a string or number, got {_type(answer_gt)}"))
    record.meta = {k: v for k, v in raw.items() if k not in set(MMPRField)}

    value = raw.get(MMPRField.IMAGE)
    refs = [] if value == "" else _image_refs(value, MMPRField.IMAGE, issues)  # InternVL: "" is a text-only sample
    if refs and root is None:
        issues.append((MMPRField.IMAGE, f"data set {record.source!r} has no '{MMPRKey.ROOT}' in meta.json"))
        return
    record.image_paths = [str((root / ref).resolve()) for ref in refs]
    if len(refs) > 1 and IMAGE_PLACEHOLDER not in record.question:
        record.meta[PLACEHOLDERS_ADDED] = True  # reported per data set by _read_annotation
    _prepend_placeholders(record)


def _image_refs(value: Any, key: str, issues: list[tuple[str, str]]) -> list[str]:
    """Image paths from `None | str | list[str]`; a wrong type becomes a read issue."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        issues.append((key, f"expected a path or a list of paths (non-empty strings), got {value!r:.80}"))
        return []
    return values


def _prepend_placeholders(record: PreferenceRecord) -> None:
    """InternVL's rule: a question with images but no `<image>` gets `<image>\\n` in front, one per image."""
    if record.n_images and IMAGE_PLACEHOLDER not in record.question:
        record.question = f"{IMAGE_PLACEHOLDER}\n" * record.n_images + record.question


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------------------------- reading TRL preference data


def read_preference_dataset(
    source: Any, *, image_root: str | Path | None = None, name: str | None = None
) -> list[PreferenceRecord]:
    """Read TRL preference data: a `datasets.Dataset`, or a local .jsonl / .json / .parquet file.

    Columns: `prompt` (optional when chosen/rejected are conversations that include it), `chosen`, `rejected`, and
    `images` (a list) or `image` (one). Texts are plain strings or lists of `{"role", "content"}` messages, where
    content is a string or a list of `{"type": "text"|"image"}` parts (each image part becomes `<image>`). The last
    user message is the question, a system message becomes `record.system`, the last assistant message is the
    response. Images are PIL images (kept in memory), `{"bytes", "path"}` dicts, or paths; relative paths resolve
    against `image_root`, else against the file's folder. With `image_root`, every path must resolve inside it.

    JSON-lines files are read line by line here (1-based line numbers, a malformed line is a read issue); .json and
    .parquet files and Dataset objects are located by 0-based row.
    """
    root = None if image_root is None else Path(image_root).resolve()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise DataValidationError([], message=f"{path}: file not found (expected TRL preference data)")
        file, label = str(path.resolve()), name or path.stem
        base = root or path.resolve().parent
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".parquet"):
            rows, position = _file_rows(path, suffix)
        else:
            raise DataValidationError(
                [], message=f"{path}: unsupported file type {suffix!r}; expected .jsonl, .json or .parquet"
            )
    else:
        if not hasattr(source, "column_names") or not hasattr(source, "__iter__"):
            raise TypeError(f"expected a datasets.Dataset or a file path, got {type(source).__name__}")
        _check_columns(source.column_names, name or "dataset")
        label = name or getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        file, base, position = f"<{label}>", root, Position.ROW
        rows = enumerate(source)

    records = []
    for index, raw in rows:
        record = PreferenceRecord(
            source=label, line=index, question="", chosen="", rejected="", file=file, position=position,
            image_root=None if root is None else str(root), question_key=TRLField.PROMPT, raw=raw,
        )  # fmt: skip
        _fill_trl(record, raw, base)
        records.append(record)
    return records


def _file_rows(path: Path, suffix: str) -> tuple[Iterable[tuple[int, Any]], Position]:
    """(index, row) pairs of a file: JSON lines by 1-based line; a .json list/columns or .parquet by 0-based row."""
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            suffix = ".jsonl"  # datasets' to_json writes JSON lines under a .json name
        else:
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):  # columns
                data = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
            if not isinstance(data, list):
                raise DataValidationError([], message=f"{path}: expected a list of records, got {_type(data)}")
            return enumerate(data), Position.ROW
    if suffix == ".jsonl":
        return _json_lines(path), Position.LINE
    import datasets  # heavy: only when a parquet file is read

    table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    _check_columns(table.column_names, str(path))
    return enumerate(table), Position.ROW


def _check_columns(columns: Sequence[str], label: str) -> None:
    missing = ", ".join(f"'{c}'" for c in (TRLField.CHOSEN, TRLField.REJECTED) if c not in columns)
    if missing:
        raise DataValidationError(
            [], message=f"{label}: missing column {missing}; expected TRL preference columns "
            f"{', '.join(TRLField)} (prompt optional, images or image optional), got {', '.join(columns)}",
        )  # fmt: skip


def _fill_trl(record: PreferenceRecord, raw: Any, base: Path | None) -> None:
    issues = record.read_issues
    if isinstance(raw, _Malformed):
        record.raw = raw.text
        issues.append((RECORD_FIELD, raw.error))
        return
    if not isinstance(raw, Mapping):
        issues.append((RECORD_FIELD, f"expected a JSON object, got {_type(raw)}"))
        return

    prompt = raw.get(TRLField.PROMPT)
    chosen, rejected = raw.get(TRLField.CHOSEN), raw.get(TRLField.REJECTED)
    for name, value in ((TRLField.CHOSEN, chosen), (TRLField.REJECTED, rejected)):
        if value is None:
            issues.append((name, "missing; expected a string or a list of messages"))
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):  # implicit prompt
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, issues)
    elif prompt is None:
        issues.append((TRLField.PROMPT, "missing; expected a string or a list of messages"))

    if prompt is not None:
        question, system = _prompt_text(prompt, issues)
        if question is not None:
            record.question, record.system = question, system
    for name, value in ((TRLField.CHOSEN, chosen), (TRLField.REJECTED, rejected)):
        if value is not None:
            text = _response_text(name, value, issues)
            if text is not None:
                setattr(record, name, text)

    if raw.get(TRLField.IMAGES) is not None:
        key, value = TRLField.IMAGES, raw[TRLField.IMAGES]
    else:
        key, value = TRLField.IMAGE, raw.get(TRLField.IMAGE)
        value = None if value is None else [value]
    record.image_key = key
    _fill_trl_images(record, key, value, base)
    record.meta = {k: v for k, v in raw.items() if k not in set(TRLField)}
    if not {f.split("[")[0] for f, _ in issues} & {TRLField.PROMPT, key}:
        _prepend_placeholders(record)


def _split_implicit_prompt(chosen: list, rejected: list, issues: list[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """chosen = [...prompt messages, assistant]; the prompt is everything before the last message."""
    if not chosen or not rejected:
        issues.append((TRLField.PROMPT, "missing, and chosen/rejected are empty conversations"))
        return None, None, None
    if chosen[:-1] != rejected[:-1]:
        issues.append((TRLField.REJECTED, "implicit prompt (messages before the last) differs from chosen's"))
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _content_text(content: Any) -> str | None:
    """A message's content as text: a string, or parts where `{"type": "image"}` becomes `<image>`."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = []
    for part in content:
        if not isinstance(part, Mapping):
            return None
        if part.get("type") == "image":
            parts.append(IMAGE_PLACEHOLDER)
        elif part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        else:
            return None
    return "\n".join(parts)


def _messages(name: str, value: Any, issues: list[tuple[str, str]]) -> list[tuple[str, str]] | None:
    """[(role, text)] of a conversation, or None with a read issue."""
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, Mapping) else None
        text = _content_text(message.get("content")) if isinstance(message, Mapping) else None
        if not isinstance(role, str) or text is None:
            issues.append((
                f"{name}[{i}]",
                'expected {"role": str, "content": str | [{"type": "text", "text": str} | {"type": "image"}]}',
            ))  # fmt: skip
            return None
        messages.append((role, text))
    return messages


def _prompt_text(prompt: Any, issues: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(question, system) of a prompt string or conversation."""
    if isinstance(prompt, str):
        return prompt, None
    if not isinstance(prompt, list):
        issues.append((TRLField.PROMPT, f"expected a string or a list of messages, got {_type(prompt)}"))
        return None, None
    messages = _messages(TRLField.PROMPT, prompt, issues)
    if messages is None:
        return None, None
    users = [text for role, text in messages if role == "user"]
    others = [role for role, _ in messages if role not in ("user", "system")]
    if len(users) != 1 or others:
        issues.append((TRLField.PROMPT, f"expected one user message (and an optional system message), got roles "
                       f"{[role for role, _ in messages]}; multi-turn prompts are not supported"))  # fmt: skip
        return None, None
    systems = [text for role, text in messages if role == "system"]
    return users[0], "\n".join(systems) if systems else None


def _response_text(name: str, value: Any, issues: list[tuple[str, str]]) -> str | None:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        issues.append((name, f"expected a string or a list of messages, got {_type(value)}"))
        return None
    messages = _messages(name, value, issues)
    if messages is None:
        return None
    if [role for role, _ in messages] != ["assistant"]:
        issues.append((name, f"expected one assistant message, got roles {[role for role, _ in messages]}"))
        return None
    return messages[0][1]


def _fill_trl_images(record: PreferenceRecord, key: str, value: Any, base: Path | None) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        record.read_issues.append((key, f"expected a list of images or paths, got {_type(value)}"))
        return
    paths, images = [], []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(item, Mapping) and item.get("bytes") is not None:
            try:
                image = Image.open(io.BytesIO(item["bytes"]))
                image.load()
                images.append(image)
            except (OSError, ValueError, SyntaxError) as exc:
                record.read_issues.append((where, f"cannot decode image bytes: {exc}"))
            continue
        if isinstance(item, Mapping):
            item = item.get("path")
        if isinstance(item, Image.Image):
            images.append(item)
        elif isinstance(item, str) and item:
            if base is None and not Path(item).is_absolute():
                record.read_issues.append((where, f"relative path {item!r} needs image_root"))
            else:
                paths.append(str(((base or Path("/")) / item).resolve()))
        else:
            record.read_issues.append((where, f"expected a PIL image, a path or {{'bytes', 'path'}}, got {item!r:.80}"))
    if paths and images:
        record.read_issues.append((key, "mixes in-memory images and paths; use one kind per record"))
        return
    record.image_paths, record.images = paths, images


# ---------------------------------------------------------------------------------------------------- validation


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
    problems = [_problem(record, f, m) for f, m in record.read_issues]
    bad = {f.split("[")[0] for f, _ in record.read_issues}
    if RECORD_FIELD in bad:
        return problems

    texts_ok = {}
    keys = {MMPRField.QUESTION: record.question_key, MMPRField.CHOSEN: "chosen", MMPRField.REJECTED: "rejected"}
    for name, key in keys.items():
        if key in bad:
            continue
        if not getattr(record, name).strip():
            problems.append(_problem(record, key, "empty (only whitespace)"))
        else:
            texts_ok[name] = getattr(record, name)
    chosen, rejected = texts_ok.get(MMPRField.CHOSEN), texts_ok.get(MMPRField.REJECTED)
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        problems.append(_problem(record, MMPRField.REJECTED, "identical to chosen"))
    for name in (MMPRField.CHOSEN, MMPRField.REJECTED):
        if IMAGE_PLACEHOLDER in texts_ok.get(name, ""):
            problems.append(_problem(record, name, f"contains {IMAGE_PLACEHOLDER}; only the question may"))

    if record.image_key in bad:
        return problems
    question = texts_ok.get(MMPRField.QUESTION)
    n_placeholders = None if question is None else question.count(IMAGE_PLACEHOLDER)
    if n_placeholders is not None and n_placeholders != record.n_images:
        images = f"{record.n_images} image{'' if record.n_images == 1 else 's'}" if record.n_images else "no images"
        problems.append(_problem(
            record, record.question_key,
            f"has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder{'' if n_placeholders == 1 else 's'} "
            f"but the record has {images}",
        ))  # fmt: skip

    for i, path in enumerate(record.image_paths):
        single = record.image_key == MMPRField.IMAGE and len(record.image_paths) == 1
        where = record.image_key if single else f"{record.image_key}[{i}]"
        if record.image_root is not None and not Path(path).is_relative_to(record.image_root):
            problems.append(_problem(record, where, f"resolves to {path}, outside the image root {record.image_root}"))
        elif check_images:
            if path not in image_errors:
                image_errors[path] = _image_error(path)
            if image_errors[path] is not None:
                problems.append(_problem(record, where, image_errors[path]))
    for i, image in enumerate(record.images):
        if image.width < 1 or image.height < 1:
            problems.append(_problem(record, f"{record.image_key}[{i}]", f"empty image ({image.width}x{image.height})"))
    return problems


def resolve_image(root: str | Path, ref: str) -> Path:
    """The one confinement rule of every reader: `ref` resolved against `root` (symlinks and `..` followed; an
    absolute `ref` stands alone) must land inside `root`, else ValueError naming both."""
    root = Path(root).resolve()
    path = (root / ref).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image {ref!r} resolves to {path}, outside the image root {root}")
    return path


def image_problem(path: str | Path) -> str | None:
    """Why an image file cannot be used (missing, not an image, truncated, empty), or None; reads the structure
    without decoding every pixel."""
    return _image_error(str(path))


def _image_error(path: str) -> str | None:
    """Why the image file cannot be used, or None. `verify()` checks a PNG's chunks and CRCs without decoding; it
    checks nothing of a JPEG's data, so other formats are decoded too (JPEG at 1/8 scale: every byte is still read,
    so a truncated file fails here and not in the collator mid-training)."""
    try:
        with Image.open(path) as image:
            image.verify()
            if image.width < 1 or image.height < 1:
                return f"empty image ({image.width}x{image.height}): {path}"
            verified_png = image.format == "PNG"
        if not verified_png:
            with Image.open(path) as image:
                image.draft(image.mode, (1, 1))
                image.load()
    except FileNotFoundError:
        return f"file not found: {path}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"cannot read image {path}: {exc}"
    return None


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


# --------------------------------------------------------------------------------------------------- length check


class TokenCounts(NamedTuple):
    """What a token counter returns for a record: the prompt with its image tokens, each response, and optionally
    how many of the prompt tokens are image tokens (shown in overflow messages)."""

    prompt: int
    chosen: int
    rejected: int
    image: int | None = None


def check_lengths(
    records: Sequence[PreferenceRecord],
    count_tokens: Callable[[PreferenceRecord], Sequence[int]],
    max_length: int,
    *,
    on_overflow: OverflowAction | str = OverflowAction.SKIP,
    rejects_path: str | Path | None = None,
) -> tuple[list[PreferenceRecord], list[RecordProblem]]:
    """Keep records whose prompt (image tokens included) leaves room for at least one response token.

    `count_tokens(record)` returns (prompt, chosen, rejected) or (prompt, chosen, rejected, image) token counts;
    it is called once per distinct record. A prompt is never truncated through its image tokens: a record with
    `prompt + 1 > max_length` is an overflow, handled per `on_overflow` (see OverflowAction; REJECT appends to
    `rejects_path`). Responses that merely run past max_length are kept (the trainer truncates them) and counted
    in a log line. Returns (kept records, one problem per overflowing record).
    """
    try:
        action = OverflowAction(on_overflow)
    except ValueError:
        raise ValueError(f"on_overflow must be one of {', '.join(OverflowAction)}; got {on_overflow!r}") from None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if action is OverflowAction.REJECT and rejects_path is None:
        raise ValueError("on_overflow='reject' needs rejects_path")

    verdicts: dict[tuple[str, str, int], RecordProblem | None] = {}
    overflow: dict[tuple[str, str, int], PreferenceRecord] = {}
    n_truncated = 0
    kept = []
    for record in records:
        if record.key not in verdicts:
            counts = TokenCounts(*count_tokens(record))
            verdicts[record.key] = _overflow_problem(record, counts, max_length)
            if verdicts[record.key] is not None:
                overflow[record.key] = record
            elif counts.prompt + max(counts.chosen, counts.rejected) > max_length:
                n_truncated += 1
        if verdicts[record.key] is None:
            kept.append(record)
    problems = [verdicts[k] for k in overflow]

    if n_truncated:
        logger.info("%d records have a response longer than max_length %d allows; the trainer truncates it",
                    n_truncated, max_length)  # fmt: skip
    if not problems:
        return kept, problems
    if action is OverflowAction.ERROR:
        raise DataValidationError(
            problems, hint=f"prompts do not fit max_length {max_length:,}: raise max_length, lower max_dynamic_patch, "
            f"or set on_overflow to {OverflowAction.SKIP.value!r}",
        )  # fmt: skip
    for p in problems[:MAX_PRINTED_PROBLEMS]:
        logger.warning("%s", p.in_source())
    if len(problems) > MAX_PRINTED_PROBLEMS:
        logger.warning("... and %d more", len(problems) - MAX_PRINTED_PROBLEMS)
    if action is OverflowAction.REJECT:
        write_rejects(rejects_path, [(overflow[k], [verdicts[k]]) for k in overflow], append=True)
    target = f" -> {rejects_path}" if action is OverflowAction.REJECT else ""
    logger.warning("skipped %d records that do not fit max_length %d%s", len(problems), max_length, target)
    return kept, problems


def _overflow_problem(record: PreferenceRecord, counts: TokenCounts, max_length: int) -> RecordProblem | None:
    if counts.prompt + 1 <= max_length:
        return None
    image = "" if counts.image is None else f" ({counts.image:,} image)"
    return _problem(
        record,
        "length",
        f"prompt needs {counts.prompt:,} tokens{image} + chosen {counts.chosen:,} > max_length {max_length:,}",
    )


__all__ = [
    "DataValidationError",
    "ImageLoadError",
    "MMPRField",
    "MMPRKey",
    "OverflowAction",
    "Position",
    "PreferenceRecord",
    "RecordProblem",
    "TRLField",
    "TokenCounts",
    "check_lengths",
    "format_problems",
    "load_image",
    "read_mmpr",
    "read_preference_dataset",
    "repeat_records",
    "split_valid",
    "validate_records",
    "write_rejects",
]
