"""The MPO forward, run from inside the model's own `forward` so DDP and DeepSpeed see a single forward.

`add_mpo_head(model)` wraps `model.forward`: `model(**batch, mpo=MPOHeadSpec(...))` runs the backbone once, gathers
the hidden states that predict completion tokens only, and either

- returns their per-sequence log-prob sums (`spec.reference`: the frozen reference pass), or
- returns the MPO loss: fused (`rlhf.fused.fused_mpo_loss`, LM head and every term in token chunks) or unfused
  (LM head on the completion rows, then `rlhf.losses.mpo_losses`). Both call the same pure term functions.

Batches come in either layout: packed pairs (`rlhf.packing.PackedPairCollator`, one [prompt|chosen|rejected] row
per pair) or TRL's two-row layout (`rlhf.collator.MPOCollator`). Without `mpo=...` the forward is the original
one, so generation and TRL's own paths are unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .fused import chunked_token_logps, fused_mpo_loss
from .losses import RewardShiftTracker, implicit_rewards, mpo_losses, shift_for
from .packing import packed_forward

DPO_KEYS = ("input_ids", "attention_mask", "pixel_values")
PACKED_KEYS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "pixel_values",
               *(f"{side}_{part}" for side in ("chosen", "rejected") for part in ("src", "targets", "mask")))


@dataclass
class MPOHeadSpec:
    """What the wrapped forward computes. `delta` is δ itself or the trainer's `RewardShiftTracker`, updated from
    the batch's rewards before use; `reference=True` returns log-probs only."""

    beta: float = 0.1
    loss_types: list[str] = field(default_factory=lambda: ["sigmoid", "bco_pair", "sft"])
    loss_weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0])
    delta: float | torch.Tensor | RewardShiftTracker = 0.0
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    fused: bool = True
    chunk_tokens: int = 1024
    vocab_tile: int | None = None  # None: rlhf.fused's default
    reference: bool = False


def completion_hidden(model: torch.nn.Module, batch: dict) -> tuple[tuple, tuple]:
    """((hidden, targets, mask) of chosen, same of rejected): hidden (B, T, H) states predicting each completion
    token, from one backbone pass over either batch layout."""
    if "segment_ids" in batch:
        chosen, rejected = packed_forward(model, batch)
        return ((chosen, batch["chosen_targets"], batch["chosen_mask"]),
                (rejected, batch["rejected_targets"], batch["rejected_mask"]))
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
    hidden = backbone(**{k: batch[k] for k in DPO_KEYS if k in batch}, use_cache=False).last_hidden_state
    src, targets, mask = dpo_completion_index(batch["input_ids"], batch["completion_mask"])
    gathered = torch.take_along_dim(hidden, src[..., None], dim=1)
    half = hidden.size(0) // 2
    return ((gathered[:half], targets[:half], mask[:half]), (gathered[half:], targets[half:], mask[half:]))


def dpo_completion_index(input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """For TRL's layout: per row, the positions whose hidden state predicts a completion token (p - 1 for every
    completion token at p), the tokens, and a mask; right-padded to the longest completion."""
    rows = [torch.nonzero(m[1:], as_tuple=True)[0] for m in completion_mask]
    width = max(1, max(len(r) for r in rows))
    src = torch.zeros((len(rows), width), dtype=torch.long, device=input_ids.device)
    mask = torch.zeros_like(src)
    for i, r in enumerate(rows):
        src[i, : len(r)] = r
        mask[i, : len(r)] = 1
    targets = torch.take_along_dim(input_ids, src + 1, dim=1) * mask
    return src, targets, mask


def mpo_head_forward(model: torch.nn.Module, batch: dict, spec: MPOHeadSpec) -> dict[str, torch.Tensor]:
    (ch, ct, cm), (rh, rt, rm) = completion_hidden(model, batch)
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    if spec.reference:
        return {"chosen_logps": chunked_token_logps(ch, weight, bias, ct, cm, spec.chunk_tokens, spec.vocab_tile).sum(-1),
                "rejected_logps": chunked_token_logps(rh, weight, bias, rt, rm, spec.chunk_tokens, spec.vocab_tile).sum(-1)}
    if spec.fused:
        loss, aux = fused_mpo_loss(ch, rh, weight, bias, ct, rt, cm, rm, spec.ref_chosen_logps, spec.ref_rejected_logps,
                                   beta=spec.beta, delta=spec.delta, loss_types=spec.loss_types,
                                   loss_weights=spec.loss_weights, chunk_tokens=spec.chunk_tokens,
                                   vocab_tile=spec.vocab_tile)
        return {"loss": loss, **aux}
    chosen_tok = _token_logps(lm_head, ch, ct) * cm
    rejected_tok = _token_logps(lm_head, rh, rt) * rm
    chosen_logps, rejected_logps = chosen_tok.sum(-1), rejected_tok.sum(-1)
    chosen_rewards = implicit_rewards(chosen_logps, spec.ref_chosen_logps, spec.beta)
    rejected_rewards = implicit_rewards(rejected_logps, spec.ref_rejected_logps, spec.beta)
    delta = shift_for(spec.delta, chosen_rewards, rejected_rewards)
    loss, terms = mpo_losses(chosen_rewards, rejected_rewards, delta, chosen_tok, cm, spec.loss_types, spec.loss_weights)
    return {"loss": loss, "chosen_logps": chosen_logps.detach(), "rejected_logps": rejected_logps.detach(),
            "chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach(),
            **{k: v.detach() for k, v in terms.items()}}


def _token_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LM head on the gathered completion rows only (B, T, V), fp32 log-softmax, gather."""
    logits = lm_head(hidden).float()
    return torch.gather(logits.log_softmax(-1), 2, targets[..., None]).squeeze(-1)


def add_mpo_head(model: torch.nn.Module) -> None:
    """Wrap `model.forward` so that `model(**batch, mpo=spec)` runs `mpo_head_forward`. Idempotent."""
    if getattr(model, "_mmalign_mpo_head", False):
        return
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, mpo: MPOHeadSpec | None = None, **kwargs):
        if mpo is None:
            return original(*args, **kwargs)
        return mpo_head_forward(self, kwargs, mpo)

    model.forward = forward.__get__(model)
    model._mmalign_mpo_head = True
