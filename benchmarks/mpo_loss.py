"""Peak extra memory and time of the MPO loss alone (LM head + preference, quality and generation terms, forward and
backward), four ways, for one pair with L completion tokens per side, V = 151,674, H = 896 (InternVL3-1B's LM head),
fp32:

    naive  full (2, L, V) logits -> log_softmax -> gather -> sums -> rlhf.losses.mpo_losses
    liger  Liger-Kernel's LigerFusedLinearDPOLoss twice: "sigmoid" with its NLL term (the SFT term), then
           "bco_pair" (Liger's has no reward shift δ and here no reference log-probs: same cost, other values)
    trl    TRL 1.16's fused-LM-head kernel (_ChunkedLogProbFunction) on the completion hidden states + mpo_losses
           (its best case: in the trainer on CPU it scores every position, prompt and image tokens included)
    ours   rlhf.fused.fused_mpo_loss

Each case runs in a fresh subprocess. It first warms up on 16 tokens per side with the full head (lazy init, Liger's
torch.compile), frees everything, and then measures one forward + backward. Extra memory: on CPU the resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs after the warm-up) minus the resident set before the
run; on CUDA torch.cuda.max_memory_allocated minus the allocated memory before the run. Both include the weight
gradient (V x H fp32 = 0.54 GB) that every method returns.

    python benchmarks/mpo_loss.py                       # CPU, the default lengths and caps
    python benchmarks/mpo_loss.py --device cuda --lengths 512 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

V, H = 151_674, 896
BETA, DELTA = 0.1, 0.1
LOSS_TYPES, LOSS_WEIGHTS = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
METHODS = ["naive", "liger", "trl", "ours"]
# Longest completion (tokens per side) each method runs at by default on CPU, to keep one run to ~15 minutes on a
# shared 2-core machine (~30 GFLOP/s): each LM-head GEMM over 2 x 8192 tokens is 4.5 TFLOP, and the full-logits
# methods hold several (2L x V) fp32 tensors (~10 GB at L = 2048). Ours runs everywhere: its memory is the point.
CPU_CAPS = {"naive": 512, "liger": 512, "trl": 2048, "ours": 8192}
CUDA_CAPS = {method: 1 << 20 for method in METHODS}
WARMUP_TOKENS = 16


# -- the four methods: each returns the scalar loss; the caller runs backward ----------------------------------------
def loss_naive(hc, hr, weight, ct, rt, ref_c, ref_r):
    from rlhf.losses import implicit_rewards, mpo_losses

    logps = torch.log_softmax(torch.cat([hc, hr]) @ weight.t(), dim=-1)
    token_logps = logps.gather(-1, torch.cat([ct, rt]).unsqueeze(-1)).squeeze(-1)
    chosen, rejected = token_logps.chunk(2)
    mask = torch.ones_like(chosen, dtype=torch.bool)
    return mpo_losses(implicit_rewards(chosen.sum(-1), ref_c, BETA), implicit_rewards(rejected.sum(-1), ref_r, BETA),
                      DELTA, chosen, mask, LOSS_TYPES, LOSS_WEIGHTS)[0]


def loss_liger(hc, hr, weight, ct, rt, ref_c, ref_r):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    w_pref, w_qual, w_gen = LOSS_WEIGHTS
    pref = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=True, alpha=w_gen / w_pref, use_ref_model=False,
                                   loss_type="sigmoid")
    qual = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=False, loss_type="bco_pair")
    x, y = torch.cat([hc, hr]), torch.cat([ct, rt])
    return w_pref * pref(weight, x, y)[0] + w_qual * qual(weight, x, y)[0]


def loss_trl(hc, hr, weight, ct, rt, ref_c, ref_r):
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    from rlhf.losses import implicit_rewards, mpo_losses

    x = torch.cat([hc, hr]).reshape(-1, H)
    token_logps = _ChunkedLogProbFunction.apply(x, weight, None, torch.cat([ct, rt]).reshape(-1), 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",))[0]
    chosen, rejected = token_logps.view(2, -1).chunk(2)
    mask = torch.ones_like(chosen, dtype=torch.bool)
    return mpo_losses(implicit_rewards(chosen.sum(-1), ref_c, BETA), implicit_rewards(rejected.sum(-1), ref_r, BETA),
                      DELTA, chosen, mask, LOSS_TYPES, LOSS_WEIGHTS)[0]


def loss_ours(hc, hr, weight, ct, rt, ref_c, ref_r, chunk_tokens=1024):
    from rlhf.fused import fused_mpo_loss

    mask = torch.ones_like(ct, dtype=torch.bool)
    return fused_mpo_loss(hc, hr, weight, None, ct, rt, mask, mask, ref_c, ref_r, beta=BETA, delta=DELTA,
                          loss_types=LOSS_TYPES, loss_weights=LOSS_WEIGHTS, chunk_tokens=chunk_tokens)[0]


LOSSES = {"naive": loss_naive, "liger": loss_liger, "trl": loss_trl, "ours": loss_ours}


# -- one measurement, in a fresh process -------------------------------------------------------------------------------
def _status_gb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1e6


def inputs(length: int, weight: torch.Tensor, device: str, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    hc, hr = (torch.randn(1, length, H, generator=g, device=device).requires_grad_() for _ in range(2))
    ct, rt = (torch.randint(0, V, (1, length), generator=g, device=device) for _ in range(2))
    ref = torch.full((1,), -11.9 * length, device=device)  # ~ length * ln V: a uniform reference
    return hc, hr, weight, ct, rt, ref, ref + 0.5


def measure(method: str, length: int, device: str, chunk_tokens: int) -> dict:
    fn = LOSSES[method]
    if method == "ours":
        fn = lambda *a: loss_ours(*a, chunk_tokens=chunk_tokens)  # noqa: E731
    weight = (torch.randn(V, H, generator=torch.Generator().manual_seed(0)) * 0.02).to(device).requires_grad_()
    fn(*inputs(WARMUP_TOKENS, weight, device, seed=1)).backward()
    weight.grad = None
    args = inputs(length, weight, device, seed=2)
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 1e9
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _status_gb("VmRSS")
    start = time.perf_counter()
    loss = fn(*args)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else _status_gb("VmHWM")
    return {"method": method, "length": length, "seconds": seconds, "extra_gb": peak - base, "loss": loss.item(),
            "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_case(method: str, length: int, device: str, chunk_tokens: int, timeout: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", method, "--length", str(length), "--device", device,
           "--chunk-tokens", str(chunk_tokens), *(["--tiny"] if V != 151_674 else [])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"method": method, "length": length, "skip": f"timed out after {timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "length": length, "skip": f"failed: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table ---------------------------------------------------------------------------------------------------
def table(results: list[dict], lengths: list[int], methods: list[str]) -> str:
    by = {(r["method"], r["length"]): r for r in results}
    lines = ["| tokens per side | method | extra peak (GB) | vs ours | time (s) | vs ours | loss |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for length in lengths:
        ours = by.get(("ours", length), {})
        for method in methods:
            r = by.get((method, length))
            if r is None:
                continue
            if "skip" in r:
                lines.append(f"| {length} | {method} | {r['skip']} | | | | |")
                continue
            mem_ratio = f"{r['extra_gb'] / ours['extra_gb']:.2f}x" if ours.get("extra_gb") else ""
            time_ratio = f"{r['seconds'] / ours['seconds']:.2f}x" if ours.get("seconds") else ""
            lines.append(f"| {length} | {method} | {r['extra_gb']:.2f} | {mem_ratio} | {r['seconds']:.1f} | "
                         f"{time_ratio} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192],
                        help="completion tokens per side (one pair)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--cap", nargs="*", default=[], metavar="METHOD=TOKENS",
                        help="longest length a method runs at (defaults: CPU %s; CUDA none)" % CPU_CAPS)
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="chunk_tokens of ours")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--tiny", action="store_true", help="a dry run: V = 4,099, H = 64")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:  # a dry run of the script (benchmarks/gpu.py --tiny): a small head, this process and its cases
        global V, H
        V, H = 4_099, 64
    if args.one:
        print(json.dumps(measure(args.one, args.length, args.device, args.chunk_tokens)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    caps = dict(CPU_CAPS if args.device == "cpu" else CUDA_CAPS)
    for item in args.cap:
        method, tokens = item.split("=")
        caps[method] = int(tokens)
    print(f"MPO loss forward + backward, one pair, V = {V:,}, H = {H}, fp32, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"ours with chunk_tokens = {args.chunk_tokens}; load average {os.getloadavg()[0]:.1f}")
    results = []
    for length in args.lengths:
        for method in args.methods:
            if length > caps[method]:
                result = {"method": method, "length": length,
                          "skip": f"capped at {caps[method]} tokens per side on {args.device}"}
            else:
                result = run_case(method, length, args.device, args.chunk_tokens, args.timeout)
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print(table(results, args.lengths, args.methods))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (other work on the machine slows every time column)")
    print("liger's loss differs by design: no reference log-probs and no δ (same GEMMs and memory).")


if __name__ == "__main__":
    main()
