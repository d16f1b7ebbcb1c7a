"""One prompt pass per preference pair: pack [prompt | chosen | rejected] into one sequence.

The DPO layout (`rlhf.collator.MPOCollator`) runs each pair as two rows, [prompt | chosen] and [prompt | rejected],
so the prompt (image tokens included) and the vision tower run twice. Here each pair is one row

    index:     0 .. P-1 | P .. P+C-1 | P+C .. P+C+R-1
    segment:   prompt   | chosen     | rejected
    position:  0 .. P-1 | P .. P+C-1 | P .. P+R-1        (the rejected response restarts after the prompt)

with a 4-D attention mask in which every token sees the tokens of its own view only: prompt and chosen tokens are
causal as usual; a rejected token sees the prompt and the earlier rejected tokens, never a chosen one. Since
positions restart too, each response sees exactly the keys, values and rotary positions it would see alone, so its
log-probs are those of the two-sequence layout (up to float rounding) at P+C+R tokens per pair instead of 2P+C+R.

The LM head runs on completion positions only: `*_src[b, j]` is the index whose hidden state predicts completion
token j (chosen: P+j-1; rejected: P-1 for j = 0, the last prompt position, else P+C+j-1); `packed_forward` gathers
those rows and the MPO head (`rlhf.mpo_head`) applies the LM head to them.

How the mask reaches attention (transformers 5.23): `masking_utils.create_causal_mask` returns any 4-D tensor (or
`BlockMask`) as it is, and InternVLModel hands `attention_mask` and `position_ids` unchanged to its Qwen2 language
model, so the mask must already be in the form the attention function wants: "sdpa" takes a bool mask
(True = attend); "eager" ADDS the mask to the scores, so it needs 0 / dtype-min floats (a bool mask would add 1);
"flex_attention" takes a `BlockMask` (`block_mask_for_pairs`); flash-attention kernels take no 4-D mask.
`packed_forward` converts the collator's bool mask for the model's implementation (`PACKED_ATTENTION`).

Memory: the dense mask is B x L x L (bool: L = 12288 is 151 MB per row; eager needs it in the model dtype). With
flex attention only `segment_ids` is needed and the dense mask can be dropped from the batch.
`packed_forward` calls the backbone (`model.model`) directly, which skips a DistributedDataParallel wrapper's
forward: under DDP, run it from inside a forward that DDP calls (DeepSpeed ZeRO hooks submodules and is unaffected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import torch

from .collator import MPOCollator, pad_right
from .processing import text_tokenizer


class Segment(IntEnum):
    """What each index of a packed row holds."""

    PAD = -1
    PROMPT = 0
    CHOSEN = 1
    REJECTED = 2


def pair_visibility(seg_q: torch.Tensor, seg_kv: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:
    """The one attention rule (True = query may attend to key), elementwise over broadcastable tensors:
    a real query sees earlier-or-same real keys, except a rejected query never sees a chosen key; every index
    (padding included) sees itself, so no row of the mask is empty (SDPA returns NaN for an empty row)."""
    # plain ints: dynamo (which traces flex mask_mods) folds `tensor != IntEnum member` to a Python bool (torch 2.13)
    pad, chosen, rejected = int(Segment.PAD), int(Segment.CHOSEN), int(Segment.REJECTED)
    real = (seg_q != pad) & (seg_kv != pad)
    cross = (seg_q == rejected) & (seg_kv == chosen)
    return (q_idx == kv_idx) | (real & (kv_idx <= q_idx) & ~cross)


def pair_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Dense (B, 1, L, L) bool mask of `pair_visibility` for (B, L) segment ids."""
    idx = torch.arange(segment_ids.size(1), device=segment_ids.device)
    allowed = pair_visibility(segment_ids[:, :, None], segment_ids[:, None, :], idx[:, None], idx[None, :])
    return allowed[:, None]


def pair_mask_mod(segment_ids: torch.Tensor) -> Callable:
    """`mask_mod(b, h, q_idx, kv_idx)` for flex attention: `pair_visibility` read from `segment_ids` (B, L)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return pair_visibility(segment_ids[b, q_idx], segment_ids[b, kv_idx], q_idx, kv_idx)

    return mask_mod


def block_mask_for_pairs(segment_ids: torch.Tensor, block_size: int = 128):
    """Flex-attention `BlockMask` of the packed pairs (one mask for all heads).

    Pass it as `attention_mask=` to a model loaded with `attn_implementation="flex_attention"` (transformers returns a
    4-D `BlockMask` unchanged and `flex_attention_forward` uses it as `block_mask`), together with the packed
    `position_ids`; `packed_forward` does this. Build it on the device the model runs on: blocks entirely masked
    (rejected queries x chosen keys, padding) are skipped by the GPU kernels. On CPU, torch 2.13 runs flex attention
    forward only (no backward): the tiny InternVL's packed hidden states there match SDPA's to 2e-6.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = segment_ids.shape
    return create_block_mask(pair_mask_mod(segment_ids), batch, None, length, length,
                             device=segment_ids.device, BLOCK_SIZE=block_size)


def _additive(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    mask = batch["attention_mask"]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# attention implementation -> how the packed mask is handed to it (batch, model dtype) -> attention_mask
PACKED_ATTENTION: dict[str, Callable[[dict[str, torch.Tensor], torch.dtype], Any]] = {
    "sdpa": lambda batch, dtype: batch["attention_mask"],
    "eager": _additive,
    "flex_attention": lambda batch, dtype: block_mask_for_pairs(batch["segment_ids"]),
}


@dataclass
class PackedPairCollator:
    """Batches rows (`rlhf.collator.record_to_row`) as one packed [prompt | chosen | rejected] row per pair.

    `max_length` bounds each response's own view as in `MPOCollator` (prompt + response cut to `max_length`), so the
    packed log-probs equal the two-sequence ones; a packed row is at most 2 * max_length - P long. Returns
    input_ids, position_ids, segment_ids (B, L); attention_mask (B, 1, L, L) bool; pixel_values (each pair's tiles
    once, absent when no pair has an image); and chosen_/rejected_ src, targets, mask (B, T) per response.
    """

    processing_class: Any
    max_length: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, segments, positions = [], [], []
        src = {"chosen": [], "rejected": []}
        targets = {"chosen": [], "rejected": []}
        for row in rows:
            prompt = list(row["prompt_ids"])
            n_prompt = len(prompt)
            room = None if self.max_length is None else self.max_length - n_prompt
            if n_prompt == 0 or (room is not None and room < 1):
                raise ValueError(f"{row.get('source', '?')}:{row.get('line', '?')}: prompt of {n_prompt} tokens leaves "
                                 f"no room for a response within max_length={self.max_length}")
            chosen, rejected = list(row["chosen_ids"])[:room], list(row["rejected_ids"])[:room]
            n_chosen, n_rejected = len(chosen), len(rejected)
            ids.append(prompt + chosen + rejected)
            segments.append([Segment.PROMPT] * n_prompt + [Segment.CHOSEN] * n_chosen + [Segment.REJECTED] * n_rejected)
            positions.append(list(range(n_prompt + n_chosen)) + list(range(n_prompt, n_prompt + n_rejected)))
            src["chosen"].append([n_prompt + j - 1 for j in range(n_chosen)])
            src["rejected"].append([n_prompt - 1 if j == 0 else n_prompt + n_chosen + j - 1 for j in range(n_rejected)])
            targets["chosen"].append(chosen)
            targets["rejected"].append(rejected)

        segment_ids = pad_right(segments, Segment.PAD)
        batch = {
            "input_ids": pad_right(ids, text_tokenizer(self.processing_class).pad_token_id),
            "position_ids": pad_right(positions, 0),
            "segment_ids": segment_ids,
            "attention_mask": pair_attention_mask(segment_ids),
        }
        for key in ("chosen", "rejected"):
            batch[f"{key}_src"] = pad_right(src[key], 0)
            batch[f"{key}_targets"] = pad_right(targets[key], 0)
            batch[f"{key}_mask"] = pad_right([[1] * len(t) for t in targets[key]], 0)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # precomputed reference log-probs ride along
            if key in rows[0]:
                batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32)
        pixel_values = MPOCollator(self.processing_class).pixel_values(rows)
        if pixel_values is not None:
            batch["pixel_values"] = pixel_values
        return batch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model -> the HF model


def packed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone once over a `PackedPairCollator` batch and return the hidden states that predict each
    completion token: (chosen (B, Tc, H), rejected (B, Tr, H)). `model` is an InternVLForConditionalGeneration or a
    causal LM (its `.model` is the backbone); the mask is converted for the model's attention implementation."""
    backbone = _unwrap(model).model
    implementation = backbone.config._attn_implementation
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"packed pairs need a 4-D attention mask; attn_implementation {implementation!r} takes none "
                         f"(use one of {', '.join(PACKED_ATTENTION)})")
    kwargs = {
        "input_ids": batch["input_ids"],
        "attention_mask": PACKED_ATTENTION[implementation](batch, backbone.dtype),
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"]
    hidden = backbone(**kwargs).last_hidden_state
    return (torch.take_along_dim(hidden, batch["chosen_src"][..., None], dim=1),
            torch.take_along_dim(hidden, batch["rejected_src"][..., None], dim=1))
