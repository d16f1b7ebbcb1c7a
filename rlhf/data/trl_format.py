"""The TRL-format reader: preference data as TRL's DPOTrainer takes it, from a `datasets.Dataset` or a file.

    records = read_preference_dataset("pairs.jsonl")          # or a Dataset, a .json or a .parquet file

Texts are strings or conversations (`{"role", "content"}` messages, with image parts); the prompt is explicit or
implicit (the messages before the last of chosen/rejected). Every bad row becomes a record with read issues, which
`rlhf.data.validate.validate_records` reports with everything else.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

from PIL import Image

from ..processing import IMAGE_PLACEHOLDER, with_placeholders
from .jsonl import json_lines, record_object
from .records import DataValidationError, Position, PreferenceRecord, type_name


class TRLField(StrEnum):
    """Columns of TRL's preference format (explicit prompt, or implicit prompt inside chosen/rejected)."""

    PROMPT = "prompt"
    CHOSEN = "chosen"
    REJECTED = "rejected"
    IMAGES = "images"
    IMAGE = "image"


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
                raise DataValidationError([], message=f"{path}: expected a list of records, got {type_name(data)}")
            return enumerate(data), Position.ROW
    if suffix == ".jsonl":
        return json_lines(path), Position.LINE
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
    raw = record_object(record, raw)
    if raw is None:
        return
    issues = record.read_issues

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
        record.question = with_placeholders(record.question, record.n_images)


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
        issues.append((TRLField.PROMPT, f"expected a string or a list of messages, got {type_name(prompt)}"))
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
        issues.append((name, f"expected a string or a list of messages, got {type_name(value)}"))
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
        record.read_issues.append((key, f"expected a list of images or paths, got {type_name(value)}"))
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
