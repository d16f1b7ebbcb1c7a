"""Preference records -> token rows (fitted to max_length) -> padded MPO batches.

A row holds the prompt already formatted as ChatML with every `<image>` expanded to its tiles' tokens (the tile
count comes from the image size alone, so rows are built without decoding pixels), and the two responses each
followed by `<|im_end|>` (reference: log-probs include it). `check_lengths` drops the rows whose prompt leaves no
room for a response. Pixels are loaded in the collator, per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .choices import ROW_OVERFLOW, OverflowAction
from .data.records import MAX_PRINTED_PROBLEMS, DataValidationError, PreferenceRecord, RecordProblem, record_problem
from .data.validate import write_rejects
from .processing import IM_END, InternVLChatProcessor, chat_prompt, text_tokenizer, with_placeholders

logger = logging.getLogger(__name__)

ROW_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "image_paths", "max_patches", "source", "line"]



def encode(processing_class, text: str) -> list[int]:
    return text_tokenizer(processing_class)(text, add_special_tokens=False)["input_ids"]


def image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:  # reads the header only
        return img.size


def prompt_text(processing_class, question: str, image_paths: list[str], max_patches: int | None,
                system: str | None = None) -> str:
    """ChatML prompt with `<image>` expanded to `<img><IMG_CONTEXT>...</img>` for each image's tiles."""
    text = chat_prompt(question, system)
    if not image_paths:
        return text
    if not isinstance(processing_class, InternVLChatProcessor):
        raise ValueError("a sample with images needs an InternVL processor, got a plain tokenizer")
    tiles = [processing_class.image_processor.num_tiles(*image_size(p), max_patches) for p in image_paths]
    return processing_class.expand_images(text, tiles)


def record_to_row(record, processing_class, default_max_patches: int = 12, system: str | None = None) -> dict[str, Any]:
    """Tokenize one `rlhf.data.records.PreferenceRecord`. The record's own system turn (a conversational TRL
    prompt) wins over `system`, the default for records without one."""
    own = getattr(record, "system", None)
    system = own if own is not None else system
    paths = list(record.image_paths)
    max_patches = record.tiles_per_image if paths else 0
    max_patches = max_patches or default_max_patches if paths else 0
    question = with_placeholders(record.question, len(paths))
    return {
        "prompt_ids": encode(processing_class, prompt_text(processing_class, question, paths, max_patches, system)),
        "chosen_ids": encode(processing_class, record.chosen + IM_END),
        "rejected_ids": encode(processing_class, record.rejected + IM_END),
        "image_paths": paths,
        "max_patches": max_patches,
        "source": record.source,
        "line": record.line,
    }


def pad_right(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class MPOCollator:
    """Batches rows as TRL's DPO layout: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded,
    with `completion_mask` marking response tokens. Images are tiled once and their pixels repeated for the
    rejected half. Completions that run past `max_length` are cut from the end (prompts were checked to fit)."""

    processing_class: Any
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = text_tokenizer(self.processing_class)
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for row in rows:
                ids = list(row["prompt_ids"]) + list(row[key])
                mask = [0] * len(row["prompt_ids"]) + [1] * len(row[key])
                if self.max_length is not None and len(ids) > self.max_length:
                    ids, mask = ids[: self.max_length], mask[: self.max_length]
                seqs.append(ids)
                masks.append(mask)
        batch = {
            "input_ids": pad_right(seqs, tok.pad_token_id),
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
            "completion_mask": pad_right(masks, 0),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32)
        pixel_values = self.pixel_values(rows)
        if pixel_values is not None:
            batch["pixel_values"] = torch.cat([pixel_values, pixel_values])
        return batch

    def pixel_values(self, rows: list[dict[str, Any]]) -> torch.Tensor | None:
        tiles = []
        for row in rows:
            for path in row["image_paths"]:
                with Image.open(path) as img:
                    tiles.extend(self.processing_class.image_processor.tiles(img.convert("RGB"), row["max_patches"]))
        return self.processing_class.image_processor.to_tensor(tiles) if tiles else None


def build_rows(records, processing_class, *, max_length: int | None, on_overflow: str, rejects_path=None,
               default_max_patches: int = 12, system: str | None = None) -> list[dict[str, Any]]:
    """Tokenize validated records (each distinct record object once: repeated copies share their row), then keep the
    rows that fit `max_length` (`check_lengths`: an overflowing prompt is skipped, rejected or fatal as
    `on_overflow` says); max_length None keeps every row, repeated copies included."""
    built: dict[int, dict[str, Any]] = {}
    for record in records:
        if id(record) not in built:
            built[id(record)] = record_to_row(record, processing_class, default_max_patches, system)
    rows = [built[id(record)] for record in records]
    if max_length is None:
        return rows
    kept, _ = check_lengths(records, rows, max_length, on_overflow=on_overflow, rejects_path=rejects_path)
    return kept


def check_lengths(
    records: Sequence[PreferenceRecord],
    rows: Sequence[dict[str, Any]],
    max_length: int,
    *,
    on_overflow: OverflowAction | str = OverflowAction.SKIP,
    rejects_path: str | Path | None = None,
) -> tuple[list[dict[str, Any]], list[RecordProblem]]:
    """Keep the token rows whose prompt (image tokens included) leaves room for at least one response token.

    `rows[i]` is the token row of `records[i]` (`record_to_row`); its `prompt_ids`, `chosen_ids` and `rejected_ids`
    are counted once per distinct record. A prompt is never truncated through its image tokens: a row with
    `len(prompt_ids) + 1 > max_length` is an overflow, handled per `on_overflow` (see OverflowAction; REJECT
    appends the record to `rejects_path`). Responses that merely run past max_length are kept (the trainer
    truncates them) and counted in a log line. Returns (kept rows, one problem per overflowing record).
    """
    if on_overflow not in ROW_OVERFLOW:
        raise ValueError(f"on_overflow must be one of {', '.join(ROW_OVERFLOW)}; got {on_overflow!r}")
    action = OverflowAction(on_overflow)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    if action is OverflowAction.REJECT and rejects_path is None:
        raise ValueError("on_overflow='reject' needs rejects_path")

    verdicts: dict[tuple[str, str, int], RecordProblem | None] = {}
    overflow: dict[tuple[str, str, int], PreferenceRecord] = {}
    n_truncated = 0
    kept = []
    for record, row in zip(records, rows, strict=True):
        if record.key not in verdicts:
            prompt, chosen, rejected = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            verdicts[record.key] = _overflow_problem(record, prompt, chosen, max_length)
            if verdicts[record.key] is not None:
                overflow[record.key] = record
            elif prompt + max(chosen, rejected) > max_length:
                n_truncated += 1
        if verdicts[record.key] is None:
            kept.append(row)
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


def _overflow_problem(record: PreferenceRecord, prompt: int, chosen: int, max_length: int) -> RecordProblem | None:
    if prompt + 1 <= max_length:
        return None
    return record_problem(
        record, "length", f"prompt needs {prompt:,} tokens + chosen {chosen:,} > max_length {max_length:,}"
    )
