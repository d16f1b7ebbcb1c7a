"""Learning curves of the demo's SFT stage: what the policy reads, step by step, for several seeds.

    python benchmarks/sft_curve.py --seeds 0 1 2 --steps 800 --every 100 --output_dir runs/sft_curve \
        [--threads 1] [-- --field value ...]

Each seed trains the demo SFT recipe (data_gen/recipes/demo/sft.yaml, with the `--field value` overrides after
`--`; its stop-at-accuracy is switched off so that the curve runs every step) in OUTPUT_DIR/seed_S. Every `--every`
steps the policy answers `--items` validation items greedily (the items the stop-at-accuracy check uses) and the
curve gets, per check:

- `acc`: the answer is right;
- `first`: the first value of the reading is right (the onset of reading the colours);
- `values`: every value read is a true value in order (the reading is right as far as it goes);
- `count`: the reading lists as many values as there are tiles;
- the training loss (and the auxiliary reading loss, when the recipe has one) logged last before the check.

A table per seed goes to stdout and OUTPUT_DIR/curves.md, the numbers to OUTPUT_DIR/curves.json. The reading and
the count are learned as separate, abrupt events, at steps that depend on the seed and on the CPU's floating-point
numerics (`ATEN_CPU_CAPABILITY=avx2` or `default` gives another trajectory on the same machine), so a recipe is
judged on several seeds here before a whole demo runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import TrainerCallback  # noqa: E402

from data_gen.demo.pipeline import RECIPES  # noqa: E402
from data_gen.demo.settings import VALIDATION_START  # noqa: E402
from data_gen.demo.sft import parse, train_sft  # noqa: E402

_VALUES = re.compile(r"the tiles? shows?\s+([\d\s,and]+)", re.IGNORECASE)


def reading_of(response: str) -> list[int]:
    """The values a response's first step lists ('The tiles show 3, 7 and 5.' -> [3, 7, 5]); [] when none."""
    m = _VALUES.match(response.strip())
    return [int(x) for x in re.findall(r"\d+", m.group(1))] if m else []


def judge(values: list[int], response: str) -> dict[str, bool]:
    read = reading_of(response)
    return {"first": bool(read) and read[0] == values[0], "values": bool(read) and read == values[: len(read)],
            "count": len(read) == len(values)}


class Curve(TrainerCallback):
    """Every `every` steps: greedy answers on `items` validation items, judged as the module docstring says."""

    def __init__(self, processor, items, every: int):
        self.processor, self.items, self.every = processor, items, every
        self.rows: list[dict] = []
        self._start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if "loss" not in (logs or {}) or state.global_step % self.every:
            return control
        from data_gen.demo.accuracy import greedy_accuracy

        acc, responses = greedy_accuracy(model, self.processor, self.items)
        verdicts = [judge(it.values, r) for it, r in zip(self.items, responses)]
        row = {"step": state.global_step, "acc": round(acc, 3),
               **{k: round(sum(v[k] for v in verdicts) / len(verdicts), 3) for k in ("first", "values", "count")},
               "loss": round(logs["loss"], 4), "reading_loss": logs.get("reading_loss"),
               "minutes": round((time.perf_counter() - self._start) / 60, 1)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return control


def table(seed: int, rows: list[dict]) -> str:
    head = "| step | acc | first | values | count | loss | reading loss | minutes |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    body = [f"| {r['step']} | {r['acc']:.2f} | {r['first']:.2f} | {r['values']:.2f} | {r['count']:.2f} | "
            f"{r['loss'] if r['loss'] is not None else 'n/a'} | "
            f"{r['reading_loss'] if r['reading_loss'] is not None else '-'} | {r['minutes']} |" for r in rows]
    return f"seed {seed}\n\n{head}\n" + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output_dir", default="runs/sft_curve")
    parser.add_argument("overrides", nargs="*", help="after --: `--field value` pairs for the SFT recipe")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from rlhf.tiny import build_processor

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for seed in args.seeds:
        recipe = parse(["--config", str(RECIPES / "sft.yaml"), "--steps", str(args.steps), *args.overrides])
        kwargs = recipe.train_kwargs() | {"seed": seed, "stop_at_accuracy": None, "eval_items": 0,
                                          "save_steps": args.steps, "progress": False,
                                          "logging_steps": args.every}
        items = kwargs["task"].items("train", args.items, start=VALIDATION_START)
        curve = Curve(build_processor(kwargs["sizes"], max_patches=1), items, args.every)
        load = os.getloadavg()[0]
        train_sft(out / f"seed_{seed}", **kwargs, callbacks=[curve])
        results[seed] = {"rows": curve.rows, "load_start": round(load, 2), "load_end": round(os.getloadavg()[0], 2),
                         "capability": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
                         "overrides": args.overrides}
        print(table(seed, curve.rows))
    (out / "curves.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "curves.md").write_text("\n".join(table(s, r["rows"]) for s, r in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
