"""A fused linear MPO loss: the LM head and every MPO term over token chunks, never holding (tokens x vocab) logits.

The caller gives the final hidden states already gathered at the completion positions (row t of a sequence is the
state whose next-token prediction is completion token t) and the LM head. Two passes over blocks of
`chunk_tokens` tokens of one stream (all sequences of both sides flattened and padding skipped, so a chunk may span
sequences, pairs and sides) by `vocab_tile` vocabulary columns:

    pass 1  per block, logits = h @ W[tile].T + b[tile] (fp32); an online logsumexp over the tiles of a chunk (running
            row max m, running sum of exp(logit - m) rescaled by exp(m_old - m_new) when m grows, as in TRL's and
            Liger's kernels) and the target's logit from its tile: each token's log-prob and its row's logsumexp
    terms   token log-probs -> per-sequence sums -> `rlhf.losses.mpo_losses`, the same pure functions the
            trainer calls, under autograd on these small (B, T) tensors: c_t = dL / d logp_t for every token
            (DPO and BCO give all tokens of a sequence the same c; the SFT term adds a token-level part)
    pass 2  per block, recompute the logits (not for pass 1's last block, still in the buffer);
            dL/dlogits = c_t * (onehot(y_t) - softmax) with softmax = exp(logits - lse); grad_h += dlogits @ W[tile],
            grad_W[tile] += dlogits.T @ h, grad_b[tile] += sum of dlogits

All gradients are made in the forward and handed out, scaled by the incoming gradient, in the backward. Extra
memory on the torch path: one (min(chunk_tokens, N) x min(vocab_tile, V)) fp32 block (1024 x 8192 by default:
34 MB, where a whole-vocabulary chunk of Qwen2.5's 151,674 columns took 0.62 GB) plus the fp32 weight gradient
(V x H), whatever the completion length; the gradient with respect to the hidden states is the size of the hidden
states. The price: with the whole vocabulary in the buffer, a stream that fits one chunk needs no recompute in
pass 2 (three LM-head GEMMs); with tiles every block but the last is recomputed (four). `vocab_tile >= V` gives the
one-tile behaviour.

What comes from Liger-Kernel (0.8.5) and what does not:
- From Liger, the design: an `autograd.Function` that computes the gradients during the forward and only scales
  them in the backward (its `LigerFusedLinearCrossEntropyFunction` and `LigerFusedLinearPreferenceBase`).
- From Liger, on CUDA only (`backend="auto"` picks it there when it is installed): its Triton fused linear
  cross-entropy, `liger_kernel.ops.fused_linear_cross_entropy.fused_linear_cross_entropy_forward` with
  `reduction="none"`, for pass 1 (per-token -log p) and for pass 2 (the per-token c_t folded into the logits
  gradient before the weight-gradient GEMM). Liger then sizes its own token chunks (transient logits of about
  tokens x hidden elements) and `chunk_tokens` is not used. Its Triton kernels need a GPU; under
  TRITON_INTERPRET=1 they also run, slowly, on CPU (that is how the tests check this path).
- Not from Liger: the chunking, the MPO terms and the torch path. Liger's preference base chunks along PAIRS
  only, so each chunk holds (pairs x seq x vocab) logits, which grow with the completion length, and it
  computes ONE preference loss per call, while MPO needs three terms over shared rewards plus the reward shift
  δ (its DPO "bco_pair" has no δ). One call per term would repeat the LM-head GEMMs and keep one weight
  gradient per call. TRL 1.16 declines Liger's DPO loss for MPO for the same reasons.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from enum import StrEnum

import torch

from .losses import TERM_METRIC, MPOTerm, RewardShiftTracker, implicit_rewards, mpo_losses, shift_for

DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_VOCAB_TILE = 8192


class FusedBackend(StrEnum):
    """Where the chunked LM-head math runs."""

    AUTO = "auto"  # LIGER on CUDA when liger-kernel is installed, TORCH otherwise
    TORCH = "torch"  # pure torch, any device
    LIGER = "liger"  # Liger-Kernel's Triton fused linear cross-entropy (CUDA; CPU only under TRITON_INTERPRET=1)


def resolve_backend(backend: FusedBackend | str, device: torch.device) -> FusedBackend:
    try:
        backend = FusedBackend(backend)
    except ValueError:
        raise ValueError(f"backend {backend!r} is not one of {[b.value for b in FusedBackend]}") from None
    if backend is FusedBackend.AUTO:
        return FusedBackend.LIGER if device.type == "cuda" and _liger_op() is not None else FusedBackend.TORCH
    if backend is FusedBackend.LIGER and _liger_op() is None:
        raise ValueError("backend='liger' needs liger-kernel >= 0.8.5 (per-token reduction='none' gradients) "
                         "and triton; use backend='torch'")
    return backend


def _liger_op():
    """Liger's chunked fused linear cross-entropy forward, or None when it lacks the per-token gradient input."""
    if importlib.util.find_spec("liger_kernel") is None or importlib.util.find_spec("triton") is None:
        return None
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    params = inspect.signature(fused_linear_cross_entropy_forward).parameters
    return fused_linear_cross_entropy_forward if "token_grad_output" in params else None


# -- the valid tokens of all sequences, as one stream ---------------------------------------------------------------
@dataclass(eq=False)
class _Side:
    hidden: torch.Tensor  # (B*T, H), a view of the caller's hidden states
    positions: torch.Tensor  # (N,) flat indices of the valid tokens, row-major
    shape: tuple[int, int]  # (B, T)

    def unflatten(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) values at the valid tokens -> (B, T) with zeros at the padding."""
        out = values.new_zeros(self.shape[0] * self.shape[1])
        return out.index_copy_(0, self.positions, values).view(self.shape)


class _Tokens:
    """The valid tokens of every sequence of every side (chosen, then rejected), flattened into one stream, so a
    chunk may span sequences, pairs and sides."""

    def __init__(self, sides: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):  # (hidden, targets, mask)
        self.sides = []
        targets = []
        for hidden, side_targets, mask in sides:
            positions = mask.reshape(-1).nonzero().squeeze(1)
            self.sides.append(_Side(hidden.reshape(-1, hidden.size(-1)), positions, tuple(mask.shape)))
            targets.append(side_targets.reshape(-1)[positions])
        self.targets = torch.cat(targets)
        self.offsets = [0]
        for side in self.sides:
            self.offsets.append(self.offsets[-1] + len(side.positions))

    def __len__(self) -> int:
        return self.offsets[-1]

    def chunks(self, size: int):
        return ((start, min(start + size, len(self))) for start in range(0, len(self), size))

    def parts(self, start: int, end: int):
        """(side number, side, its positions) of the stream slice [start, end)."""
        for i, (side, first, last) in enumerate(zip(self.sides, self.offsets, self.offsets[1:])):
            lo, hi = max(start, first), min(end, last)
            if lo < hi:
                yield i, side, side.positions[lo - first: hi - first]

    def hidden(self, start: int, end: int) -> torch.Tensor:
        return torch.cat([side.hidden[index] for _, side, index in self.parts(start, end)])

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(N,) stream values -> one (B, T) tensor per side, zero at padding."""
        return [side.unflatten(values[first:last])
                for side, first, last in zip(self.sides, self.offsets, self.offsets[1:])]


# -- the torch path: one (token chunk x vocabulary tile) block at a time, in place in one fp32 buffer ---------------
def _vocab_tiles(vocab: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, vocab)) for start in range(0, vocab, size)]


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out = h @ W.T (+ b) in fp32 (W, b: one vocabulary tile); a bf16/fp16 GEMM is rounded once, to the input
    dtype, like an unfused head."""
    if h.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())
    return out if bias is None else out.add_(bias)


def _in_tile(targets: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the tile [start, end) entries that are a row's target."""
    rows = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
    return rows, targets[rows] - start


def _torch_logps(tokens: _Tokens, weight, bias, chunk_tokens: int, vocab_tile: int, buf: torch.Tensor):
    """Pass 1: every token's log-prob and its row's logsumexp, (N,) each, fp32, and exp(m - lse) of the last
    chunk's rows, by an online logsumexp over the vocabulary tiles (running row max m, running sum s of
    exp(logit - m), rescaled by exp(m_old - m_new) when m grows). The last block stays in `buf` as exp(logits - m)
    with the row's final m, for pass 2 to start from without its GEMM."""
    logps = torch.empty(len(tokens), dtype=torch.float32, device=buf.device)
    lse = torch.empty_like(logps)
    tiles = _vocab_tiles(weight.size(0), vocab_tile)
    last_scale = logps[:0]
    for start, end in tokens.chunks(chunk_tokens):
        h, targets = tokens.hidden(start, end), tokens.targets[start:end]
        target = torch.empty(end - start, dtype=torch.float32, device=buf.device)
        top = torch.full_like(target, -torch.inf)
        total = torch.zeros_like(target)
        for v0, v1 in tiles:
            logits = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], buf[: end - start, : v1 - v0])
            rows, cols = _in_tile(targets, v0, v1)
            target[rows] = logits[rows, cols]
            new_top = torch.maximum(top, logits.amax(dim=1))
            total.mul_((top - new_top).exp_()).add_(logits.sub_(new_top.unsqueeze(1)).exp_().sum(dim=1))
            top = new_top
        last_scale = total.reciprocal()
        lse[start:end] = total.log_().add_(top)
        logps[start:end] = target - lse[start:end]
    return logps, lse, last_scale


def _torch_grads(tokens: _Tokens, weight, bias, chunk_tokens: int, vocab_tile: int, buf, lse, last_scale, coef,
                 grad_hidden, grad_weight, grad_bias):
    """Pass 2: dL/dlogits = c * (onehot(y) - softmax), accumulated into grad_hidden (one (B*T, H) per side),
    grad_weight and grad_bias (fp32) in place, one block at a time. The dense part is written as
    -sign(c) * E with E = |c| * softmax = exp(logits - (lse - log|c|)), so a block costs one subtraction and one
    exp after its GEMM: the row sign goes on the (tokens x H) side of the gradient GEMMs, and the one-hot part is
    added per token (c * W[y] to grad_hidden, c * h to row y of grad_weight). Pass 1's last block comes first:
    its exp(logits - m) is still in `buf` (that block needs no recompute); `last_scale` = exp(m - lse) of its rows."""
    chunks = list(tokens.chunks(chunk_tokens))
    tiles = _vocab_tiles(weight.size(0), vocab_tile)
    for k, (start, end) in enumerate(chunks[-1:] + chunks[:-1]):
        c = coef[start:end]
        if not bool(c.any()):  # e.g. rejected tokens when only "sft" is on
            continue
        h, targets = tokens.hidden(start, end), tokens.targets[start:end]
        sign = -c.sign()
        shift = lse[start:end] - c.abs().log()  # +inf where c = 0: those rows get E = 0
        signed_h = None if grad_weight is None else h.float().mul(sign.unsqueeze(1))
        rows_grad = None if grad_hidden is None else torch.zeros((end - start, weight.size(1)), dtype=torch.float32,
                                                                 device=buf.device)
        for j, (v0, v1) in enumerate(tiles[-1:] + tiles[:-1]):
            w, block = weight[v0:v1], buf[: end - start, : v1 - v0]
            if k == 0 and j == 0:
                e = block.mul_((c.abs() * last_scale).unsqueeze(1))
            else:
                e = _logits(h, w, None if bias is None else bias[v0:v1], block).sub_(shift.unsqueeze(1)).exp_()
            if rows_grad is not None:
                if weight.dtype == torch.float32:
                    rows_grad.addmm_(e, w)
                else:
                    rows_grad.add_(e.to(weight.dtype) @ w)
            if grad_weight is not None:
                grad_weight[v0:v1].addmm_(e.t(), signed_h)
            if grad_bias is not None:
                grad_bias[v0:v1].add_(e.t() @ sign)
        if grad_weight is not None:
            grad_weight.index_add_(0, targets, h.float() * c.unsqueeze(1))
        if grad_bias is not None:
            grad_bias.index_add_(0, targets, c)
        if rows_grad is not None:
            rows_grad.mul_(sign.unsqueeze(1)).add_(weight[targets].float() * c.unsqueeze(1))
            done = 0
            for i, _, index in tokens.parts(start, end):
                grad_hidden[i][index] = rows_grad[done: done + len(index)].to(grad_hidden[i].dtype)
                done += len(index)


# -- the Liger path -------------------------------------------------------------------------------------------------
def _liger_call(hidden, weight, bias, targets, **kwargs):
    return _liger_op()(hidden, weight, targets, bias=bias, reduction="none", **kwargs)


def _liger_logps(tokens: _Tokens, weight, bias) -> torch.Tensor:
    if len(tokens) == 0:
        return torch.zeros(0, dtype=torch.float32, device=weight.device)
    nll = _liger_call(tokens.hidden(0, len(tokens)), weight, bias, tokens.targets, compute_gradients=False)[0]
    return -nll.float()


# -- the loss ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    beta: float
    loss_types: tuple[str, ...]
    loss_weights: tuple[float, ...]
    chunk_tokens: int
    vocab_tile: int
    backend: FusedBackend
    grads: bool  # False under torch.no_grad (evaluation): pass 2 is skipped


def _coefficients(token_logps, masks, refs, delta, spec: _Spec):
    """The MPO terms on the small per-token tensors and dL/dlogp_t for every token of every sequence."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in token_logps]
        seq_logps = [t.sum(dim=-1) for t in leaves]  # padding entries are zero
        rewards = [implicit_rewards(lp, ref, spec.beta) for lp, ref in zip(seq_logps, refs)]
        delta = shift_for(delta, rewards[0], rewards[1])  # a tracker is updated from this batch's rewards first
        total, terms = mpo_losses(rewards[0], rewards[1], delta, leaves[0], masks[0],
                                  list(spec.loss_types), list(spec.loss_weights))
        coefs = [torch.zeros_like(t) for t in leaves]
        if spec.grads and total.requires_grad:
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            coefs = [c if g is None else g for c, g in zip(coefs, grads)]
    aux = [seq_logps[0], seq_logps[1], rewards[0], rewards[1], *terms.values()]
    return total.detach(), [a.detach() for a in aux], [c.detach() for c in coefs]


class _FusedMPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_hidden, rejected_hidden, weight, bias, chosen_targets, rejected_targets,
                chosen_mask, rejected_mask, ref_chosen_logps, ref_rejected_logps, delta, spec: _Spec):
        tokens = _Tokens([(chosen_hidden, chosen_targets, chosen_mask),
                          (rejected_hidden, rejected_targets, rejected_mask)])
        liger = spec.backend is FusedBackend.LIGER
        if liger:
            logps = _liger_logps(tokens, weight, bias)
        else:
            buf = _buffer(len(tokens), weight, spec.chunk_tokens, spec.vocab_tile)
            logps, lse, last_scale = _torch_logps(tokens, weight, bias, spec.chunk_tokens, spec.vocab_tile, buf)
        refs = [ref_chosen_logps.detach().float(), ref_rejected_logps.detach().float()]
        total, aux, coefs = _coefficients(tokens.split(logps), [chosen_mask, rejected_mask], refs, delta, spec)
        coef = torch.cat([c.reshape(-1)[side.positions] for c, side in zip(coefs, tokens.sides)])

        need_hidden = spec.grads and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        need_weight = spec.grads and ctx.needs_input_grad[2]
        need_bias = spec.grads and bias is not None and ctx.needs_input_grad[3]
        grad_hidden = [torch.zeros_like(side.hidden) for side in tokens.sides] if need_hidden else None
        run = need_hidden or need_weight or need_bias
        if run and liger and bool(coef.any()):
            _, _, _, _, grad_h, grad_weight, grad_bias = _liger_call(
                tokens.hidden(0, len(tokens)), weight, bias, tokens.targets, token_grad_output=-coef,
                compute_gradients=True, weight_requires_grad=need_weight, accum_dtype=torch.float32)
            grad_weight, grad_bias = (grad_weight if need_weight else None), (grad_bias if need_bias else None)
            if need_hidden:
                for g_hidden, side, first, last in zip(grad_hidden, tokens.sides, tokens.offsets, tokens.offsets[1:]):
                    g_hidden[side.positions] = grad_h[first:last]
        else:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            if run and not liger:
                _torch_grads(tokens, weight, bias, spec.chunk_tokens, spec.vocab_tile, buf, lse, last_scale, coef,
                             grad_hidden, grad_weight, grad_bias)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        grad_chosen, grad_rejected = (None, None) if not need_hidden else (
            grad_hidden[0].view_as(chosen_hidden), grad_hidden[1].view_as(rejected_hidden))
        # Held as an attribute, not saved: backward hands the tensors over and drops this reference, so autograd can
        # add the tied input embedding's gradient into the weight gradient in place and the optimizer's .grad can
        # take it over (no second or third V x H copy).
        ctx.grads = [grad_chosen, grad_rejected, grad_weight, grad_bias]
        ctx.mark_non_differentiable(*aux)
        return (total, *aux)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("fused_mpo_loss: backward ran twice through the same loss (retain_graph); "
                               "compute the loss again instead")
        if not bool((grad_loss == 1).all()):
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        needs = ctx.needs_input_grad
        grads = [g if needs[i] else None for i, g in enumerate(grads)]
        return (*grads, None, None, None, None, None, None, None, None)


def _check(chosen_hidden, rejected_hidden, lm_weight, chosen_targets, rejected_targets,
           chosen_mask, rejected_mask, ref_chosen_logps, ref_rejected_logps, loss_types, loss_weights, chunk_tokens,
           vocab_tile):
    batch = chosen_hidden.size(0)
    for name, hidden, targets, mask in (("chosen", chosen_hidden, chosen_targets, chosen_mask),
                                        ("rejected", rejected_hidden, rejected_targets, rejected_mask)):
        if hidden.dim() != 3 or hidden.size(0) != batch or hidden.size(-1) != lm_weight.size(1):
            raise ValueError(f"{name}_hidden must be (B={batch}, T, H={lm_weight.size(1)}), got {tuple(hidden.shape)}")
        if hidden.dtype != lm_weight.dtype:
            raise ValueError(f"{name}_hidden is {hidden.dtype} but lm_weight is {lm_weight.dtype}")
        if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
            raise ValueError(f"{name}_targets {tuple(targets.shape)} and {name}_mask {tuple(mask.shape)} must be "
                             f"{tuple(hidden.shape[:2])}")
        valid = targets[mask.bool()]
        if valid.numel() and not (0 <= int(valid.min()) and int(valid.max()) < lm_weight.size(0)):
            raise ValueError(f"{name}_targets hold ids outside [0, {lm_weight.size(0)}) at unmasked positions")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref.shape != (batch,):
            raise ValueError(f"{name} must be ({batch},), got {tuple(ref.shape)}")
    if len(loss_types) != len(loss_weights):
        raise ValueError(f"{len(loss_types)} loss_types but {len(loss_weights)} loss_weights")
    unknown = [t for t in loss_types if t not in {m.value for m in MPOTerm}]
    if unknown:
        raise ValueError(f"loss_types {unknown} are not MPO terms {[m.value for m in MPOTerm]}")
    _check_sizes(chunk_tokens, vocab_tile)


def _check_sizes(chunk_tokens: int, vocab_tile: int) -> None:
    for name, value in (("chunk_tokens", chunk_tokens), ("vocab_tile", vocab_tile)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _buffer(n_tokens: int, weight: torch.Tensor, chunk_tokens: int, vocab_tile: int) -> torch.Tensor:
    """The one (chunk x tile) fp32 block both passes work in."""
    return torch.empty((min(chunk_tokens, n_tokens), min(vocab_tile, weight.size(0))), dtype=torch.float32,
                       device=weight.device)


def fused_mpo_loss(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None,
    chosen_targets: torch.Tensor,
    rejected_targets: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    delta: torch.Tensor | float | RewardShiftTracker,
    loss_types: list[str],
    loss_weights: list[float],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_tile: int | None = None,
    backend: FusedBackend | str = FusedBackend.AUTO,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MPO loss of `rlhf.losses.mpo_losses` straight from completion hidden states and the LM head.

    chosen_hidden (B, T_c, H), rejected_hidden (B, T_r, H): hidden states at the completion source positions;
    chosen/rejected_targets (B, T) token ids; masks (B, T), true at real tokens (a row may be all padding);
    ref_*_logps (B,): reference sums. lm_weight (V, H) and lm_bias (V,) or None, in the hidden states' dtype;
    fp32 and bf16 both run with fp32 softmax math and fp32 gradient accumulation, and the gradients come back
    in the input dtype. `delta`, the BCO reward shift, is a float, a 0-dim tensor or the trainer's
    `RewardShiftTracker`, updated from this batch's detached rewards after pass 1, before use; no gradient.

    Returns the weighted total (fp32) and aux, detached: chosen_logps, rejected_logps (per-sequence sums),
    chosen_rewards, rejected_rewards and each term's unweighted value under its `TERM_METRIC` name."""
    vocab_tile = DEFAULT_VOCAB_TILE if vocab_tile is None else vocab_tile
    _check(chosen_hidden, rejected_hidden, lm_weight, chosen_targets, rejected_targets, chosen_mask, rejected_mask,
           ref_chosen_logps, ref_rejected_logps, loss_types, loss_weights, chunk_tokens, vocab_tile)
    if isinstance(delta, torch.Tensor):
        delta = delta.detach().float()
    spec = _Spec(float(beta), tuple(loss_types), tuple(float(w) for w in loss_weights), int(chunk_tokens),
                 int(vocab_tile), resolve_backend(backend, lm_weight.device), torch.is_grad_enabled())
    total, *aux = _FusedMPOLoss.apply(
        chosen_hidden, rejected_hidden, lm_weight, lm_bias, chosen_targets, rejected_targets,
        chosen_mask.bool(), rejected_mask.bool(), ref_chosen_logps, ref_rejected_logps, delta, spec)
    names = ["chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards",
             *(TERM_METRIC[MPOTerm(t)] for t in loss_types)]
    return total, dict(zip(names, aux))


@torch.no_grad()
def chunked_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    vocab_tile: int | None = None,
    backend: FusedBackend | str = FusedBackend.AUTO,
) -> torch.Tensor:
    """Per-token log-probs (B, T), fp32, zero at padding, without gradient and with pass 1's math and memory
    bound: for the reference model's log-probs (their sum over T is `ref_*_logps`)."""
    vocab_tile = DEFAULT_VOCAB_TILE if vocab_tile is None else vocab_tile
    _check_sizes(chunk_tokens, vocab_tile)
    tokens = _Tokens([(hidden, targets, mask.bool())])
    if resolve_backend(backend, weight.device) is FusedBackend.LIGER:
        return tokens.split(_liger_logps(tokens, weight, bias))[0]
    buf = _buffer(len(tokens), weight, chunk_tokens, vocab_tile)
    return tokens.split(_torch_logps(tokens, weight, bias, chunk_tokens, vocab_tile, buf)[0])[0]
