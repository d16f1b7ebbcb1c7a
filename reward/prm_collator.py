"""Step-labelled solutions -> token rows -> padded PRM batches.

A row holds one solution's whole conversation (`reward.prm_data.encode_prm`) with every `<image>` expanded to its
tiles' tokens (the tile count comes from the image size alone, so rows are built without decoding pixels), the
positions of its judgement tokens and its per-step scores. Pixels are loaded in the collator, per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from rlhf.errors import UserError
from rlhf.processing import InternVLChatProcessor, text_tokenizer

from .conversation import PRM_SYSTEM_PROMPT
from .prm_data import encode_prm

ROW_COLUMNS = ["input_ids", "judgement_positions", "scores", "image_paths", "max_patches", "source"]


def encode_row(processing_class, question: str, steps: list[str], labels: list[bool] | list[float],
               image_paths: list[str], max_patches: int, threshold: float = 0.0, source: str = "",
               system: str | None = PRM_SYSTEM_PROMPT, plus_context: bool = False) -> dict[str, Any]:
    """One training row: the conversation ids (`+` iff label > threshold; every judgement `+` with `plus_context`),
    judgement positions, scores (1/0 for hard labels, the Monte Carlo score for soft ones) and what the collator needs
    to load pixels."""
    tiles = []
    if image_paths:
        if not isinstance(processing_class, InternVLChatProcessor):
            raise UserError(f"{source}: a sample with images needs an InternVL model and processor, got a text-only "
                            "tokenizer")
        for path in image_paths:
            with Image.open(path) as img:  # the header only
                tiles.append(processing_class.image_processor.num_tiles(*img.size, max_patches))
    enc = encode_prm(processing_class, question, steps, labels, num_tiles=tiles, system=system, threshold=threshold)
    ids = enc.input_ids
    if plus_context:
        ids = encode_prm(processing_class, question, steps, None, num_tiles=tiles, system=system).input_ids
    return {"input_ids": ids, "judgement_positions": enc.judgement_positions, "scores": enc.labels,
            "image_paths": list(image_paths), "max_patches": max_patches if image_paths else 0, "source": source}



@dataclass
class PRMCollator:
    """Right-pads rows and loads their images as InternVL tiles. Per judgement (N in the batch, row-major):
    `judgement_rows`, `judgement_steps` (index within its row), `judgement_positions`, `judgement_scores`."""

    processing_class: Any

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = text_tokenizer(self.processing_class).pad_token_id
        width = max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            attention_mask[i, : len(r["input_ids"])] = 1
        per_step = [(i, s, p, float(score)) for i, r in enumerate(rows)
                    for s, (p, score) in enumerate(zip(r["judgement_positions"], r["scores"], strict=True))]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}  # input_ids first: the batch size
        for k, key in enumerate(("judgement_rows", "judgement_steps", "judgement_positions")):
            batch[key] = torch.tensor([x[k] for x in per_step], dtype=torch.long)
        batch["judgement_scores"] = torch.tensor([x[3] for x in per_step], dtype=torch.float32)
        tiles = []
        for r in rows:
            for path in r["image_paths"]:
                with Image.open(path) as img:
                    tiles.extend(self.processing_class.image_processor.tiles(img.convert("RGB"), r["max_patches"]))
        if tiles:
            batch["pixel_values"] = self.processing_class.image_processor.to_tensor(tiles)
        return batch


__all__ = ["ROW_COLUMNS", "encode_row", "PRMCollator"]
