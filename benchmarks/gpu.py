"""The CUDA columns of every benchmark in one run, sized for under 8 minutes on one H100-class GPU.

    python benchmarks/gpu.py                          # on a GPU machine: the four sections below, tables printed
    python benchmarks/gpu.py --sections mpo_step      # some of them
    python benchmarks/gpu.py --device cpu --tiny      # a dry run of the same commands at toy sizes (CI)

Sections, each the benchmark script itself in a subprocess with a time budget (a section that fails or runs out of
time is reported in one line and the next one runs; the exit status is 1 when any section did not finish):

- mpo_loss     the loss alone (`benchmarks/mpo_loss.py --device cuda`): naive, Liger, TRL and ours at 1,024 and
               4,096 tokens per side;
- mpo_step     one MPO training step (`benchmarks/mpo_step.py --device cuda`): TRL and MPOTrainer's options with
               Liger's Triton layer kernels (`use_liger_kernels`, the MPOTrainer rows) and flex attention, so packed
               pairs take the BlockMask of `rlhf.packing.block_mask_for_pairs`;
- prm_scoring  PRM scoring per step vs per solution vs shared prefix (`benchmarks/prm_scoring.py --device cuda`);
- label_steps  faithful vs adaptive vs search labels with the vLLM backend, prefix caching on and off
               (`benchmarks/label_steps.py --backend vllm`), on the competent tiny policy trained first (on the GPU)
               or on `--vllm_policy`, a checkpoint vLLM can load (e.g. an InternVL3-1B folder).

With `--device cpu --tiny` every section runs on the CPU at toy sizes (hf backend for label-steps, no Liger or flex
attention): it checks that the commands and their tables work, not the numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = ("mpo_loss", "mpo_step", "prm_scoring", "label_steps")


def commands(device: str, tiny: bool, work_dir: str, vllm_policy: str | None) -> dict[str, tuple[list[str], int]]:
    """Section -> (the benchmark's arguments, seconds allowed). The GPU budgets add up to 450 s."""
    if tiny:
        return {
            "mpo_loss": (["mpo_loss.py", "--device", device, "--tiny", "--lengths", "16", "--methods", "naive", "ours",
                          "--timeout", "120"], 240),
            "mpo_step": (["mpo_step.py", "--device", device, "--tiny", "--configs", "trl", "all", "--warmup", "0",
                          "--steps", "1", "--timeout", "150"], 300),
            "prm_scoring": (["prm_scoring.py", "--device", device, "--solutions", "2", "--steps", "2", "--tiles", "2",
                             "--repeats", "1"], 120),
            "label_steps": (["label_steps.py", "--device", device, "--work_dir", work_dir, "--policies", "competent",
                             "--sft_steps", "2", "--sft_batch", "2", "--questions", "1", "--solutions", "1",
                             "--continuations", "2", "--max_new_tokens", "4", "--batch_size", "4"], 240),
        }
    policy = ["--policy", vllm_policy] if vllm_policy else ["--sft_steps", "300"]
    return {
        "mpo_loss": (["mpo_loss.py", "--device", device, "--lengths", "1024", "4096", "--timeout", "60"], 100),
        "mpo_step": (["mpo_step.py", "--device", device, "--configs", "trl", "none", "fused", "all",
                      "--attn", "flex_attention", "--liger-kernels", "--timeout", "60"], 120),
        "prm_scoring": (["prm_scoring.py", "--device", device], 30),
        "label_steps": (["label_steps.py", "--backend", "vllm", "--prefix_caching", "on", "off", "--work_dir", work_dir,
                         "--policies", "competent", *policy], 200),
    }


def run_section(name: str, argv: list[str], budget: int) -> tuple[bool, float]:
    """Run one benchmark script, its output streamed through; (finished, seconds)."""
    print(f"\n## {name}: python benchmarks/{' '.join(argv)}  (budget {budget} s)\n", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=HERE.parent, timeout=budget,
                              stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        print(f"\n{name}: ran past its {budget} s budget", flush=True)
        return False, time.perf_counter() - start
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"\n{name}: failed (exit {done.returncode}): {last[:300]}", flush=True)
        return False, seconds
    return True, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: a dry run of the commands")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--work_dir", default=None, help="label-steps work folder (default: a temporary one)")
    parser.add_argument("--vllm_policy", default=None, help="a checkpoint vLLM can load, for label-steps")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here (use --device cpu --tiny for a dry run)")
        print(f"GPU benchmarks on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"Benchmark dry run on the CPU{' (toy sizes)' if args.tiny else ''}, load average "
              f"{os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        plan = commands(args.device, args.tiny, args.work_dir or tmp, args.vllm_policy)
        start, failed = time.perf_counter(), []
        for name in args.sections:
            ok, seconds = run_section(name, *plan[name])
            print(f"\n{name}: {seconds:.0f} s", flush=True)
            if not ok:
                failed.append(name)
    total = time.perf_counter() - start
    print(f"\nall sections: {total:.0f} s" + (f"; not finished: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
