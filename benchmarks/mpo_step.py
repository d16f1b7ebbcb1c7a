"""Time and peak memory of one MPO training step (forward + backward + optimizer step): TRL 1.16's `DPOTrainer` with
`loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]` against `rlhf.mpo_trainer.MPOTrainer` with
each memory/compute option alone, all of them, and none, on the same model, pair and batch, fp32.

    python benchmarks/mpo_step.py                 # the MMPR/InternVL3 shape below, every configuration, CPU
    python benchmarks/mpo_step.py --small         # a smaller pair (3 tiles, 100-token responses)
    python benchmarks/mpo_step.py --configs trl all --device cuda
    python benchmarks/mpo_step.py --from-log run.txt   # the table again, from an earlier run's output

Shape (default): one image at 13 tiles of 448 px (12 + thumbnail) = 3,328 image tokens + ~100 prompt text tokens,
chosen and rejected 400 tokens each (random ids, <|im_end|> last), batch 1 pair. Model: a reduced-depth
transformers `InternVLForConditionalGeneration` with random weights: 1 vision layer (hidden 256, 448 px tiles,
patch 14, 256 tokens per tile after pixel-unshuffle), 2 Qwen2 text layers (hidden 512, GQA 8/2 heads, MLP 2,816)
and the real Qwen2.5 vocabulary (151,674 rows, tied embeddings). AdamW (the Trainer's default optimizer).

Configurations: trl (TRL's two-row layout: each pair is [prompt|chosen] and [prompt|rejected], 2P+C+R tokens and
the tiles twice); trl-compact (the same, but its fused LM head scores completion positions only, as TRL does on a
Triton device; on CPU TRL scores every position); none (MPOTrainer with every option off: TRL's layout, LM head on
completion positions, the running-mean δ); pack (one [prompt|chosen|rejected] row per pair: P+C+R tokens, tiles
once); fused (chunked fused LM head + MPO terms); precompute (reference log-probs cached at set-up, no reference
model); all (the three together).

Each configuration runs in a fresh subprocess: set-up (model, trainer, optimizer; the precompute pass where on), then
`--warmup` steps and `--steps` timed steps (median reported), with one torch thread by default (on a shared machine
the step's process CPU time then measures the work; wall time swings with the load). Peak memory per step: on CPU the resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs right before the step) in total and over the resident
set just before the step (weights, optimizer state, reference model and batch are in that baseline; gradients are
freed between steps); on CUDA torch.cuda.max_memory_allocated, total and over memory_allocated before the step.
The loss of the first step is printed for every configuration: policy = reference there, so every reward and δ
is 0 and all configurations must give the same loss.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VOCAB = 151_674  # Qwen2.5 (InternVL3) vocabulary
LOSS_TYPES, LOSS_WEIGHTS = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]


@dataclass(frozen=True)
class Shape:
    grid: tuple[int, int]  # tiles (columns, rows) of the image; a thumbnail is added when there is more than one
    prompt_text: int  # prompt tokens besides the image block (ChatML, question)
    chosen: int
    rejected: int
    vocab: int = 151_674  # Qwen2.5 (InternVL3) vocabulary


SHAPES = {"mmpr": Shape(grid=(4, 3), prompt_text=100, chosen=400, rejected=400),
          "small": Shape(grid=(2, 1), prompt_text=60, chosen=100, rejected=100),
          "tiny": Shape(grid=(1, 1), prompt_text=20, chosen=16, rejected=16, vocab=2_048)}  # a dry run


@dataclass(frozen=True)
class Option:
    trainer: str  # "trl" or "mpo"
    pack_pairs: bool = False
    fused_loss: bool = False
    precompute: bool = False
    trl_compact: bool = False


CONFIGS = {
    "trl": Option("trl"),
    "trl-compact": Option("trl", trl_compact=True),
    "none": Option("mpo"),
    "pack": Option("mpo", pack_pairs=True),
    "fused": Option("mpo", fused_loss=True),
    "precompute": Option("mpo", precompute=True),
    "all": Option("mpo", pack_pairs=True, fused_loss=True, precompute=True),
}


# -- model, processor, pair ------------------------------------------------------------------------------------------
def build_processor():
    from rlhf.processing import InternVLChatProcessor, InternVLTileProcessor
    from rlhf.tiny import build_tokenizer

    tiles = InternVLTileProcessor(tile_size=448, max_patches=12)
    return InternVLChatProcessor(image_processor=tiles, tokenizer=build_tokenizer(), image_seq_length=256)


def build_model(processor, seed: int = 0, vocab: int = VOCAB):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from rlhf.processing import IM_END

    tok = processor.tokenizer
    config = InternVLConfig(
        vision_config=dict(hidden_size=256, num_hidden_layers=1, num_attention_heads=4, intermediate_size=1024,
                           image_size=[448, 448], patch_size=[14, 14]),
        text_config=dict(model_type="qwen2", vocab_size=vocab, hidden_size=512, intermediate_size=2816,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.convert_tokens_to_ids(IM_END), bos_token_id=None),
        image_token_id=processor.image_token_id, image_seq_length=processor.image_seq_length,
        downsample_ratio=0.5, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).float()


def build_row(processor, shape: Shape, folder: Path, seed: int = 0) -> dict:
    """One token row as `rlhf.collator.record_to_row` makes it, with random ids for the text (drawn above the tiny
    tokenizer's ids, so none is an image or ChatML token) and a noise image of the grid's size."""
    import numpy as np
    from PIL import Image

    from rlhf.collator import prompt_text
    from rlhf.processing import IMG_END

    cols, rows = shape.grid
    rng = np.random.default_rng(seed)
    path = folder / "image.png"
    Image.fromarray(rng.integers(0, 256, (rows * 448, cols * 448, 3), dtype=np.uint8)).save(path)
    max_patches = cols * rows
    prompt = processor.encode(prompt_text(processor, "<image>\n", [str(path)], max_patches))
    g = torch.Generator().manual_seed(seed)
    low = len(processor.tokenizer)

    def random_ids(n: int) -> list[int]:
        return torch.randint(low, shape.vocab, (n,), generator=g).tolist()

    image_end = len(prompt) - prompt[::-1].index(processor.tokenizer.convert_tokens_to_ids(IMG_END))
    filler = random_ids(max(0, shape.prompt_text - (len(prompt) - count_image_tokens(prompt, processor))))
    prompt = prompt[:image_end] + filler + prompt[image_end:]  # the question text, after the image block
    return {"prompt_ids": prompt,
            "chosen_ids": random_ids(shape.chosen - 1) + [processor.im_end_id],
            "rejected_ids": random_ids(shape.rejected - 1) + [processor.im_end_id],
            "image_paths": [str(path)], "max_patches": max_patches, "source": "benchmark", "line": 1}


def count_image_tokens(ids: list[int], processor) -> int:
    return sum(1 for i in ids if i == processor.image_token_id)


# -- memory probes ------------------------------------------------------------------------------------------------------
def _status_gb(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1e6


def _release() -> None:
    """Free what Python and the allocator hold, so the baseline is the live set only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Probe:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self) -> float:
        _release()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 1e9
        base = _status_gb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
        return base

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        return _status_gb("VmHWM")


# -- one configuration, in a fresh process --------------------------------------------------------------------------
def build_trainer(name: str, model, processor, row: dict, folder: Path, max_length: int, device: str,
                  chunk_tokens: int | None = None, liger_kernels: bool = False, vocab_tile: int | None = None):
    from datasets import Dataset

    opt = CONFIGS[name]
    common = dict(per_device_train_batch_size=1, report_to=[], save_strategy="no", bf16=False,
                  gradient_checkpointing=False, learning_rate=1e-6, seed=0, dataloader_num_workers=0,
                  use_cpu=device == "cpu", beta=0.1, loss_type=list(LOSS_TYPES), loss_weights=list(LOSS_WEIGHTS))
    if opt.trainer == "trl":
        from trl import DPOConfig, DPOTrainer

        if opt.trl_compact:  # score completion positions only, as TRL's fused head does on a Triton device
            import trl.trainer.utils

            trl.trainer.utils._use_triton = lambda device: True  # the kernel module keeps its own (torch fold)
        # TRL 1.16 wants a dataset it can tokenize; the batch is built by MPOCollator (its layout) and fed directly.
        dummy = Dataset.from_list([{"images": [], "prompt": "p", "chosen": "c", "rejected": "r"}])
        trainer = DPOTrainer(model, ref_model=copy.deepcopy(model).eval().requires_grad_(False),
                             args=DPOConfig(output_dir=str(folder / "trl"), **common), train_dataset=dummy,
                             processing_class=processor)
        from rlhf.collator import MPOCollator

        return trainer, MPOCollator(processor, max_length)([row])
    from rlhf.mpo_config import MPOConfig
    from rlhf.mpo_trainer import MPOTrainer

    args = MPOConfig(output_dir=str(folder / "mpo"), max_length=max_length, pack_pairs=opt.pack_pairs,
                     fused_loss=opt.fused_loss, precompute_ref_log_probs=opt.precompute, **common,
                     **({"loss_chunk_tokens": chunk_tokens} if chunk_tokens else {}),
                     **({"loss_vocab_tile": vocab_tile} if vocab_tile else {}),
                     **({"use_liger_kernels": True} if liger_kernels else {}))
    trainer = MPOTrainer(model, args=args, train_dataset=Dataset.from_list([row]), processing_class=processor)
    return trainer, trainer.data_collator([trainer.train_dataset[0]])  # precomputed reference log-probs ride along


def measure(name: str, shape: Shape, device: str, warmup: int, steps: int, threads: int | None,
            chunk_tokens: int | None = None, attn: str | None = None, liger_kernels: bool = False,
            vocab_tile: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    probe = Probe(device)
    with tempfile.TemporaryDirectory(prefix="mpo_step_") as tmp:
        folder = Path(tmp)
        processor = build_processor()
        row = build_row(processor, shape, folder)
        n_prompt, n_chosen, n_rejected = len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])
        max_length = n_prompt + max(n_chosen, n_rejected)
        start = time.perf_counter()
        model = build_model(processor, vocab=shape.vocab)
        if attn:  # e.g. flex_attention: packed pairs then take a BlockMask (rlhf.packing.block_mask_for_pairs)
            model.set_attn_implementation(attn)
        trainer, batch = build_trainer(name, model, processor, row, folder, max_length, device, chunk_tokens,
                                       liger_kernels and CONFIGS[name].trainer == "mpo", vocab_tile)
        optimizer = trainer.create_optimizer()
        if not hasattr(trainer, "current_gradient_accumulation_steps"):
            trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train
        setup = time.perf_counter() - start
        tiles = batch["pixel_values"].shape[0]
        times, cpu_times, peaks, extras, losses = [], [], [], [], []
        for step in range(warmup + steps):
            base = probe.start()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = trainer.training_step(trainer.model, dict(batch))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if probe.cuda:
                torch.cuda.synchronize()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            peak = probe.peak()
            losses.append(loss.item())
            if step >= warmup:
                times.append(seconds)
                cpu_times.append(cpu_seconds)
                peaks.append(peak)
                extras.append(peak - base)
    return {"config": name, "prompt": n_prompt, "chosen": n_chosen, "rejected": n_rejected,
            "image_tokens": count_image_tokens(row["prompt_ids"], processor), "tiles_in_batch": tiles,
            "lm_tokens": int(batch["input_ids"].numel()), "setup_s": setup, "step_s": statistics.median(times),
            "step_times": times,
            "cpu_s": statistics.median(cpu_times), "cpu_times": cpu_times, "peak_gb": max(peaks), "extra_gb": max(extras), "first_loss": losses[0],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "threads": torch.get_num_threads(),
            "attn": model.config._attn_implementation,
            "liger_kernels": liger_kernels and CONFIGS[name].trainer == "mpo"}


def run_config(name: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--small"] if args.small else []
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--attn", args.attn] if args.attn else []
    cmd += ["--liger-kernels"] if args.liger_kernels else []
    cmd += ["--threads", str(args.threads)]
    cmd += ["--chunk-tokens", str(args.chunk_tokens)] if args.chunk_tokens else []
    cmd += ["--vocab-tile", str(args.vocab_tile)] if args.vocab_tile else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        return {"config": name, "skip": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"config": name, "skip": f"failed: {last[:160]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------------------------
def lm_head_rows(r: dict) -> int:
    """Positions the policy's LM head scores per pair: TRL on a non-Triton device scores every position of both
    rows (the last excepted); the others score the completion positions only."""
    if r["config"] == "trl" and not r["compact"]:
        return 2 * (r["prompt"] + max(r["chosen"], r["rejected"]) - 1)
    return r["chosen"] + r["rejected"]


def table(results: list[dict], device: str) -> str:
    """Markdown table; ratios are to `trl`. On CPU the step's process CPU time (all threads) is the robust measure on a
    shared machine, wall time the one a user waits; on CUDA only wall time is shown."""
    cuda = device == "cuda"
    ref = next((r for r in results if r["config"] == "trl" and "skip" not in r), None)
    columns = [("step CPU (s)", "cpu_s", ".1f")] * (not cuda) + [
        ("step wall (s)", "step_s", ".1f"), ("peak total (GB)", "peak_gb", ".2f"),
        ("extra over baseline (GB)", "extra_gb", ".2f")]
    head = ["config", "LM tokens / pair", "tiles / pair", "LM-head rows"]
    for title, _, _ in columns:
        head += [title, "vs trl"]
    head += ["set-up (s)", "step-1 loss"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        if "skip" in r:
            lines.append(f"| {r['config']} | {r['skip']} |" + " |" * (len(head) - 2))
            continue
        r = {**r, "compact": cuda}  # TRL's head scores valid positions only on a Triton device
        cells = [r["config"], f"{r['lm_tokens']:,}", str(r["tiles_in_batch"]), f"{lm_head_rows(r):,}"]
        for _, key, fmt in columns:
            cells += [format(r[key], fmt), f"{r[key] / ref[key]:.2f}x" if ref else ""]
        cells += [f"{r['setup_s']:.1f}", f"{r['first_loss']:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TARGET = 0.6  # step time and peak memory of `all` relative to TRL's (0.55x is the token floor of the MMPR shape)


def summary(results: list[dict], device: str) -> str:
    """`all` against each TRL row, with the target."""
    by = {r["config"]: r for r in results if "skip" not in r}
    keys = [("step CPU", "cpu_s")] * (device == "cpu") + [
        ("step wall", "step_s"), ("peak total", "peak_gb"), ("extra peak", "extra_gb")]
    lines = []
    for base in ("trl", "trl-compact"):
        if "all" in by and base in by:
            parts = []
            for title, key in keys:
                ratio = by["all"][key] / by[base][key]
                parts.append(f"{title} {ratio:.2f}x ({'met' if ratio <= TARGET else f'missed by {ratio - TARGET:.2f}'})")
            lines.append(f"all vs {base} (target <= {TARGET}x): " + ", ".join(parts))
    return "\n".join(lines)


def report(results: list[dict], device: str) -> None:
    print()
    print(table(results, device))
    done = [r for r in results if "skip" not in r]
    if done:
        r = done[0]
        print(f"\nper pair: P = {r['prompt']:,} prompt tokens ({r['image_tokens']:,} image), C = {r['chosen']}, "
              f"R = {r['rejected']}: TRL's layout 2P+C+R = {2 * r['prompt'] + r['chosen'] + r['rejected']:,} tokens, "
              f"packed P+C+R = {r['prompt'] + r['chosen'] + r['rejected']:,} "
              f"({(r['prompt'] + r['chosen'] + r['rejected']) / (2 * r['prompt'] + r['chosen'] + r['rejected']):.2f}x); "
              f"model {r['params_m']:.1f}M parameters, {r['threads']} torch threads")
    print(summary(results, device))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--small", action="store_true", help=f"the small shape {SHAPES['small']}")
    parser.add_argument("--tiny", action="store_true", help=f"a dry run of the script: {SHAPES['tiny']}")
    parser.add_argument("--attn", default=None, help="attention implementation of the model (sdpa by default; "
                        "flex_attention: packed pairs take a BlockMask)")
    parser.add_argument("--liger-kernels", action="store_true",
                        help="MPOConfig.use_liger_kernels for the MPOTrainer configurations (Triton, CUDA only)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); one keeps CPU timings steady on a shared machine")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="MPOConfig.loss_chunk_tokens of the fused loss (default: MPOConfig's)")
    parser.add_argument("--vocab-tile", type=int, default=None,
                        help="MPOConfig.loss_vocab_tile of the fused loss (default: MPOConfig's; "
                             "a value >= the vocabulary holds whole rows, the fused loss before vocabulary tiles)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    parser.add_argument("--from-log", type=Path, metavar="FILE",
                        help="print the table of an earlier run from its output (its JSON lines) and exit")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_log:
        lines = args.from_log.read_text().splitlines()
        report([json.loads(line) for line in lines if line.startswith("{")], args.device)
        return
    shape = SHAPES["tiny" if args.tiny else "small" if args.small else "mmpr"]
    if args.one:
        print(json.dumps(measure(args.one, shape, args.device, args.warmup, args.steps, args.threads,
                                 args.chunk_tokens, args.attn, args.liger_kernels, args.vocab_tile)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    configs = [c for c in args.configs if not (args.device == "cuda" and c == "trl-compact")]  # same as trl there
    print(f"One MPO training step, {'tiny' if args.tiny else 'small' if args.small else 'MMPR/InternVL3'} shape "
          f"{asdict(shape)}, fp32, attention {args.attn or 'sdpa'}{', Liger kernels' if args.liger_kernels else ''}, "
          f"{args.device if args.device == 'cpu' else torch.cuda.get_device_name()}, torch {torch.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps (median); "
          f"load average {os.getloadavg()[0]:.1f}")
    results = []
    for name in configs:
        results.append(run_config(name, args))
        print(json.dumps(results[-1]), flush=True)
    report(results, args.device)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
