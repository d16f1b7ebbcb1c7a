"""The fused linear MPO loss against the unfused path and against worked numbers.

Shapes follow STYLE's odd example (3, 47, 31, 123): B = 3 pairs, T_c = 47 chosen and T_r = 31 rejected completion
tokens, H = 123 hidden units, and a vocabulary of V = 1009 (prime, so no chunk divides anything). The unfused path is
what the trainer does: full logits -> log_softmax -> gather -> masked sums -> rlhf.losses.mpo_losses.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rlhf.fused as fused
from rlhf.fused import chunked_token_logps, fused_mpo_loss
from rlhf.losses import MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, RewardShiftTracker, implicit_rewards, mpo_losses

B, T_C, T_R, H, V = 3, 47, 31, 123, 1009
BETA, DELTA = 0.1, 0.3
CHOSEN_LENGTHS, REJECTED_LENGTHS = [47, 30, 12], [31, 5, 19]  # right padding; row 0 unpadded on both sides
AUX = ["chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"]


def token_logps_unfused(hidden, weight, bias, targets, mask):
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    logps = torch.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)


def unfused_mpo(batch, loss_types, loss_weights, delta=DELTA):
    chosen = token_logps_unfused(batch["chosen_hidden"], batch["lm_weight"], batch["lm_bias"],
                                 batch["chosen_targets"], batch["chosen_mask"])
    rejected = token_logps_unfused(batch["rejected_hidden"], batch["lm_weight"], batch["lm_bias"],
                                   batch["rejected_targets"], batch["rejected_mask"])
    chosen_logps, rejected_logps = chosen.sum(-1), rejected.sum(-1)
    chosen_rewards = implicit_rewards(chosen_logps, batch["ref_chosen_logps"], BETA)
    rejected_rewards = implicit_rewards(rejected_logps, batch["ref_rejected_logps"], BETA)
    total, terms = mpo_losses(chosen_rewards, rejected_rewards, delta, chosen, batch["chosen_mask"],
                              loss_types, loss_weights)
    aux = dict(zip(AUX, (chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)))
    return total, {**{k: v.detach() for k, v in aux.items()}, **{k: v.detach() for k, v in terms.items()}}


def make_batch(bias=True, seed=0, chosen_lengths=CHOSEN_LENGTHS, rejected_lengths=REJECTED_LENGTHS):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "chosen_hidden": torch.randn(B, T_C, H, generator=g),
        "rejected_hidden": torch.randn(B, T_R, H, generator=g),
        "lm_weight": torch.randn(V, H, generator=g) * 0.1,  # logits with std ~ sqrt(123) * 0.1 = 1.1
        "lm_bias": torch.randn(V, generator=g) * 0.1 if bias else None,
        "chosen_targets": torch.randint(0, V, (B, T_C), generator=g),
        "rejected_targets": torch.randint(0, V, (B, T_R), generator=g),
        "chosen_mask": torch.arange(T_C) < torch.tensor(chosen_lengths).unsqueeze(1),
        "rejected_mask": torch.arange(T_R) < torch.tensor(rejected_lengths).unsqueeze(1),
    }
    batch["chosen_targets"][~batch["chosen_mask"]] = -100  # padding ids are never read
    # references within a few nats of the policy, so that rewards are O(1) and no sigmoid saturates
    with torch.no_grad():
        _, aux = unfused_mpo({**batch, "ref_chosen_logps": torch.zeros(B), "ref_rejected_logps": torch.zeros(B)},
                             ["sigmoid"], [1.0])
    batch["ref_chosen_logps"] = aux["chosen_logps"] + 5 * torch.randn(B, generator=g)
    batch["ref_rejected_logps"] = aux["rejected_logps"] + 5 * torch.randn(B, generator=g)
    return batch


def leaves(batch, dtype=torch.float32):
    out = dict(batch)
    for key in ("chosen_hidden", "rejected_hidden", "lm_weight", "lm_bias"):
        if batch[key] is not None:
            out[key] = batch[key].detach().to(dtype).requires_grad_()
    return out


GRAD_KEYS = ["chosen_hidden", "rejected_hidden", "lm_weight", "lm_bias"]


def run_both(batch, loss_types, loss_weights, chunk_tokens, delta=DELTA, dtype=torch.float32, backend="torch",
             vocab_tile=fused.DEFAULT_VOCAB_TILE):
    ours_in, ref_in = leaves(batch, dtype), leaves(batch)
    if dtype != torch.float32:  # the reference sees the same rounded numbers, in fp32
        ref_in = leaves({k: (v.to(dtype).float() if k in GRAD_KEYS and v is not None else v)
                         for k, v in batch.items()})
    loss, aux = fused_mpo_loss(**ours_in, beta=BETA, delta=delta, loss_types=loss_types,
                               loss_weights=loss_weights, chunk_tokens=chunk_tokens, backend=backend,
                               vocab_tile=vocab_tile)
    loss.backward()
    ref_loss, ref_aux = unfused_mpo(ref_in, loss_types, loss_weights)
    ref_loss.backward()
    grads = {k: ours_in[k].grad for k in GRAD_KEYS if ours_in[k] is not None}
    # a side that no term reads gets no gradient from autograd (None): it is zero
    ref_grads = {k: torch.zeros_like(ref_in[k]) if ref_in[k].grad is None else ref_in[k].grad
                 for k in GRAD_KEYS if ref_in[k] is not None}
    return (loss, aux, grads), (ref_loss, ref_aux, ref_grads)


def assert_agree(actual, expected, tol):
    """Elementwise within tol relative to the entry and tol relative to the tensor's largest entry."""
    actual, expected = actual.detach(), expected.detach().float()
    scale = max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * scale)


def assert_all_agree(ours, ref, tol, grad_tol=None):
    (loss, aux, grads), (ref_loss, ref_aux, ref_grads) = ours, ref
    assert_agree(loss, ref_loss, tol)
    assert aux.keys() == ref_aux.keys()
    for key in ref_aux:
        assert_agree(aux[key], ref_aux[key], tol)
    assert grads.keys() == ref_grads.keys()
    for key in ref_grads:
        assert grads[key].dtype == ref_grads[key].dtype or grads[key].dtype == torch.bfloat16
        assert_agree(grads[key], ref_grads[key], grad_tol or tol)


def test_worked_example_uniform_head():
    # W = 0, b = 0, V = 4: every token has log p = -ln 4. One pair: chosen targets [0, 1], rejected [2, 3, 3];
    # references 0, beta 0.1, "sigmoid" only.
    #   chosen_logps = -2 ln 4 = -2.7726, rejected_logps = -3 ln 4 = -4.1589
    #   rewards: -0.27726, -0.41589; margin m = 0.1 ln 4 = 0.138629
    #   loss = -ln σ(m) = ln(1 + 4^-0.1) = ln(1.870551) = 0.626233
    #   dL/dlogp per chosen token = 0.1 * -σ(-m) = -0.1 * 4^-0.1 / (1 + 4^-0.1) = -0.0465397 (rejected: +)
    #   grad_b[j] = Σ_t c_t (1[y_t = j] - 1/4):  Σ_t c_t = -2c + 3c = +0.0465397 -> -0.0116349 on every j, plus
    #   j=0: -0.0465397, j=1: -0.0465397, j=2: +0.0465397, j=3: +2 * 0.0465397
    c = 0.1 * 4**-0.1 / (1 + 4**-0.1)
    weight = torch.zeros(4, 2, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)
    loss, aux = fused_mpo_loss(
        torch.randn(1, 2, 2), torch.randn(1, 3, 2), weight, bias, torch.tensor([[0, 1]]), torch.tensor([[2, 3, 3]]),
        torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1), torch.zeros(1),
        beta=0.1, delta=0.0, loss_types=["sigmoid"], loss_weights=[1.0], chunk_tokens=2, backend="torch")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(1 + 4**-0.1), abs=1e-6)
    assert loss.item() == pytest.approx(0.626233, abs=1e-6)
    assert aux["chosen_logps"].item() == pytest.approx(-2 * math.log(4), abs=1e-6)
    assert aux["rejected_rewards"].item() == pytest.approx(-0.3 * math.log(4), abs=1e-6)
    assert aux["preference_loss"].item() == pytest.approx(0.626233, abs=1e-6)
    expected = [-c - c / 4, -c - c / 4, c - c / 4, 2 * c - c / 4]
    assert bias.grad.tolist() == pytest.approx(expected, abs=1e-7)
    assert bias.grad.tolist() == pytest.approx([-0.0581746, -0.0581746, 0.0349048, 0.0814445], abs=1e-6)


@pytest.mark.parametrize("chunk_tokens, vocab_tile, bias", [
    (17, 8192, True), (64, 8192, False), (4096, 8192, True),  # one vocabulary tile (V = 1009)
    (17, 100, True), (64, 256, False), (4096, 1008, True), (33, 1, True),  # online logsumexp over tiles
])
def test_matches_unfused_fp32(chunk_tokens, vocab_tile, bias):
    # 17 and 64 divide neither side's token count (47+30+12 = 89 chosen, 31+5+19 = 55 rejected); 4096 is one chunk.
    # Tiles of 100 and 256 leave a short last tile (9 and 241 columns), 1008 a last tile of one column, 1 makes
    # every column its own tile; the block pass 1 leaves in the buffer is the last chunk's last tile.
    ours, ref = run_both(make_batch(bias=bias), MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, chunk_tokens,
                         vocab_tile=vocab_tile)
    assert_all_agree(ours, ref, tol=1e-5)
    # the test is not vacuous: the three terms and the gradients are of ordinary size
    terms = ref[1]
    assert 0.3 < terms["preference_loss"] < 3 and 0.3 < terms["quality_loss"] < 3 and terms["generation_loss"] > 5
    assert ref[2]["chosen_hidden"].abs().max() > 1e-3


@pytest.mark.parametrize("loss_types, loss_weights", [
    (["sigmoid"], [1.0]),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
    (["bco_pair"], [0.5]),
    (["sft"], [1.0]),  # the rejected side gets no gradient at all
])
def test_loss_type_subsets(loss_types, loss_weights):
    ours, ref = run_both(make_batch(seed=1), loss_types, loss_weights, chunk_tokens=40)
    assert_all_agree(ours, ref, tol=1e-5)
    if loss_types == ["sft"]:
        assert not ours[2]["rejected_hidden"].any()


def test_fully_padded_rows():
    # chosen row 1 and rejected row 2 hold no token: their log-prob sums are 0 and their hidden gradient is 0
    batch = make_batch(seed=2, chosen_lengths=[47, 0, 12], rejected_lengths=[31, 5, 0])
    ours, ref = run_both(batch, MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, chunk_tokens=33)
    assert_all_agree(ours, ref, tol=1e-5)
    assert ours[1]["chosen_logps"][1] == 0 and ours[1]["rejected_logps"][2] == 0
    assert not ours[2]["chosen_hidden"][1].any() and not ours[2]["rejected_hidden"][2].any()


@pytest.mark.parametrize("vocab_tile", [8192, 100])
def test_bf16_within_tolerance(vocab_tile):
    # bf16 inputs: the logits GEMM is rounded to bf16 (|logit| ~ 3 -> ~1e-2 per logit), as in an unfused bf16 head;
    # softmax and accumulation run in fp32. Against fp32 math on the same rounded inputs, measured over seeds 3-8:
    # loss and aux within 4e-3 and gradients (returned in bf16) within 5.5e-3 of each tensor's largest entry.
    # Asserted: 1e-2 and 1.5e-2.
    ours, ref = run_both(make_batch(seed=3), MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, chunk_tokens=29, dtype=torch.bfloat16,
                         vocab_tile=vocab_tile)
    for key, grad in ours[2].items():
        assert grad.dtype == torch.bfloat16, key
    assert_all_agree(ours, ref, tol=1e-2, grad_tol=1.5e-2)


def test_delta_tensor_gets_no_grad():
    batch = make_batch(seed=4)
    delta = torch.tensor(DELTA, requires_grad=True)
    ours, ref = run_both(batch, MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, chunk_tokens=64, delta=delta)
    assert_all_agree(ours, ref, tol=1e-5)
    assert delta.grad is None
    # a different δ changes only the quality term: -log σ(r_c - δ) - log σ(δ - r_r) is not constant in δ
    _, aux0 = fused_mpo_loss(**make_batch(seed=4), beta=BETA, delta=0.0, loss_types=MPO_LOSS_TYPES,
                             loss_weights=MPO_LOSS_WEIGHTS)
    assert aux0["preference_loss"] == pytest.approx(ours[1]["preference_loss"].item(), rel=1e-6)
    assert abs(aux0["quality_loss"] - ours[1]["quality_loss"]) > 1e-3


def test_tracker_delta_sees_this_batch_rewards():
    # δ as the trainer's tracker, updated from the detached rewards after pass 1 and before use: from a fresh
    # reward_mean tracker that is the mean of this batch's 2B rewards, so the loss equals passing that value
    batch = make_batch(seed=9)
    tracker = RewardShiftTracker("reward_mean")
    loss, aux = fused_mpo_loss(**batch, beta=BETA, delta=tracker, loss_types=MPO_LOSS_TYPES,
                               loss_weights=MPO_LOSS_WEIGHTS)
    value = torch.cat([aux["chosen_rewards"], aux["rejected_rewards"]]).mean().item()
    assert tracker.count.item() == 2 * len(aux["chosen_rewards"])
    assert tracker.mean.item() == pytest.approx(value, rel=1e-6) and not tracker.delta.requires_grad
    loss_value, _ = fused_mpo_loss(**batch, beta=BETA, delta=value, loss_types=MPO_LOSS_TYPES,
                                   loss_weights=MPO_LOSS_WEIGHTS)
    assert loss.item() == pytest.approx(loss_value.item(), rel=1e-6)


def test_upstream_gradient_scales_and_no_grad_skips_pass_two(monkeypatch):
    batch = make_batch(seed=5)
    grads = []
    for scale in (1.0, 2.5):
        inputs = leaves(batch)
        loss, _ = fused_mpo_loss(**inputs, beta=BETA, delta=DELTA, loss_types=MPO_LOSS_TYPES,
                                 loss_weights=MPO_LOSS_WEIGHTS, chunk_tokens=50)
        (scale * loss).backward()
        grads.append(inputs["lm_weight"].grad)
    assert_agree(grads[1], 2.5 * grads[0], 1e-6)

    def no_pass_two(*args, **kwargs):
        raise AssertionError("pass 2 ran under torch.no_grad")

    monkeypatch.setattr(fused, "_torch_grads", no_pass_two)
    with torch.no_grad():
        loss_eval, _ = fused_mpo_loss(**leaves(batch), beta=BETA, delta=DELTA, loss_types=MPO_LOSS_TYPES,
                                      loss_weights=MPO_LOSS_WEIGHTS, chunk_tokens=50)
    assert loss_eval.item() == pytest.approx(loss.item(), rel=1e-6)


def test_chunked_token_logps_matches_log_softmax():
    batch = make_batch(seed=6)
    args = (batch["chosen_hidden"], batch["lm_weight"], batch["lm_bias"], batch["chosen_targets"], batch["chosen_mask"])
    expected = token_logps_unfused(*args)
    actual = chunked_token_logps(*args, chunk_tokens=13)
    assert actual.shape == (B, T_C) and not actual[~batch["chosen_mask"]].any()
    assert_agree(actual, expected, 1e-6)
    assert_agree(chunked_token_logps(*args, chunk_tokens=13, vocab_tile=50), expected, 1e-6)
    _, aux = fused_mpo_loss(**batch, beta=BETA, delta=DELTA, loss_types=["sigmoid"], loss_weights=[1.0])
    assert_agree(aux["chosen_logps"], actual.sum(-1), 1e-6)


def test_bad_inputs_name_the_argument():
    batch = make_batch(seed=7)
    with pytest.raises(ValueError, match="rejected_mask"):
        fused_mpo_loss(**{**batch, "rejected_mask": batch["rejected_mask"][:, :5]}, beta=BETA, delta=DELTA,
                       loss_types=["sigmoid"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="outside"):
        fused_mpo_loss(**{**batch, "rejected_targets": batch["rejected_targets"] + V}, beta=BETA, delta=DELTA,
                       loss_types=["sigmoid"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="not MPO terms"):
        fused_mpo_loss(**batch, beta=BETA, delta=DELTA, loss_types=["ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="backend"):
        fused_mpo_loss(**batch, beta=BETA, delta=DELTA, loss_types=["sigmoid"], loss_weights=[1.0], backend="cuda")


_LIGER_SCRIPT = """
import json, torch
from tests.test_fused import make_batch, run_both, MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS
batch = make_batch(seed=8, chosen_lengths=[47, 0, 12], rejected_lengths=[31, 5, 19])
(loss, aux, grads), (ref_loss, ref_aux, ref_grads) = run_both(batch, MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, 64,
                                                               backend="liger")
err = {"loss": abs(loss - ref_loss).item()}
err.update({k: ((aux[k] - ref_aux[k]).abs().max() / ref_aux[k].abs().max()).item() for k in aux})
err.update({k: ((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item() for k in grads})
print(json.dumps(err))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or importlib.util.find_spec("liger_kernel") is None,
                    reason="needs liger-kernel and triton")
def test_liger_backend_matches_unfused_under_triton_interpreter():
    # Liger's Triton kernels run on CPU under TRITON_INTERPRET=1 (set before triton is imported: a subprocess)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", _LIGER_SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(errors) >= {"loss", "chosen_logps", "chosen_hidden", "lm_weight", "lm_bias"}
    assert max(errors.values()) < 1e-5, errors


def test_vocab_tiles_worked_example():
    # One token, V = 4, W = 0, bias b = [0, ln 2, ln 3, ln 6] (so exp(b) = [1, 2, 3, 6], sum 12), target 3,
    # vocab_tile = 3: tiles [0, 3) and [3, 4). Online logsumexp: tile 1 max m = ln 3, s = (1 + 2 + 3) / 3 = 2;
    # tile 2 max ln 6 > m: s = 2 * 3/6 + 1 = 2, m = ln 6, lse = ln 6 + ln 2 = ln 12; log p(3) = ln 6 - ln 12 = -ln 2.
    # "sft" alone, weight 1: L = -log p = ln 2 = 0.693147, c = dL/dlogp = -1, grad_b = -(onehot(3) - p)
    # = p - onehot(3) = [1/12, 2/12, 3/12, 6/12 - 1] = [0.083333, 0.166667, 0.25, -0.5].
    bias = torch.tensor([0.0, math.log(2), math.log(3), math.log(6)], requires_grad=True)
    weight = torch.zeros(4, 2, requires_grad=True)
    hidden = torch.ones(1, 1, 2, requires_grad=True)
    loss, aux = fused_mpo_loss(
        hidden, torch.zeros(1, 1, 2), weight, bias, torch.tensor([[3]]), torch.tensor([[0]]),
        torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.bool), torch.zeros(1), torch.zeros(1),
        beta=0.1, delta=0.0, loss_types=["sft"], loss_weights=[1.0], chunk_tokens=1, vocab_tile=3, backend="torch")
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert aux["chosen_logps"].item() == pytest.approx(-math.log(2), abs=1e-6)
    assert bias.grad.tolist() == pytest.approx([1 / 12, 2 / 12, 3 / 12, -0.5], abs=1e-6)
    # grad_W[v] = grad_b[v] * h = grad_b[v] * [1, 1]; grad_h = Σ_v grad_b[v] W[v] = 0 (W = 0)
    assert weight.grad[:, 0].tolist() == pytest.approx([1 / 12, 2 / 12, 3 / 12, -0.5], abs=1e-6)
    assert not hidden.grad.any()
    assert chunked_token_logps(hidden.detach(), weight.detach(), bias.detach(), torch.tensor([[3]]),
                               torch.ones(1, 1, dtype=torch.bool), vocab_tile=3).item() == pytest.approx(
        -math.log(2), abs=1e-6)


def test_buffer_is_one_block(monkeypatch):
    # the torch path's only (tokens x vocabulary)-shaped allocation is the (min(chunk, N) x min(tile, V)) block
    shapes = []
    real = fused._buffer

    def spy(*args):
        buf = real(*args)
        shapes.append(tuple(buf.shape))
        return buf

    monkeypatch.setattr(fused, "_buffer", spy)
    ours, ref = run_both(make_batch(seed=10), MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, chunk_tokens=40, vocab_tile=128)
    assert shapes == [(40, 128)]
    assert_all_agree(ours, ref, tol=1e-5)
