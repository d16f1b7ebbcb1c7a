"""Regenerate recipes/prm/tiny_data: a small step-labelled PRM set built from the tile-sum task.

Per task item, five solutions: the gold one and four corrupted ones (a misread tile, an arithmetic slip in one
partial sum that the later steps carry on, a wrong tile added in one partial sum, a wrong final answer). Labels are
exact: `data_gen.demo.task.step_truth` ("correct up to this step"). 40 train items (200 solutions, "train" split) and 10
eval items (50 solutions, "test" split); images are 112 px PNGs with noise 0.02 (the task default 0.06 compresses
about a third worse), so the folder stays near 1.2 MB. Records are `reward.formats.StepwiseRecord` JSON lines with
image paths relative to the folder.

Run: python recipes/prm/make_tiny_data.py [OUT_DIR]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from data_gen.demo.task import TileSumTask, format_values, gold_solution, step_truth
from reward.formats import StepwiseRecord, write_jsonl

OUT = Path(__file__).resolve().parent / "tiny_data"
TASK = TileSumTask(noise=0.02)
SPLITS = {"train": ("train", 40), "eval": ("test", 10)}  # file name -> (task split, number of items)
CORRUPTIONS = ("misread", "sum_slip", "addend_slip", "answer_slip")


def solution_steps(reading: list[int], addends: list[int], slip_at: int | None = None, slip: int = 0,
                   answer_slip: int = 0) -> list[str]:
    """Steps in the gold grammar: read `reading`, add up `addends` (partial sum `slip_at` off by `slip`, carried
    on), then the boxed total (off by `answer_slip`)."""
    verb = "tile shows" if len(reading) == 1 else "tiles show"
    steps, total = [f"The {verb} {format_values(reading)}."], addends[0]
    for j, v in enumerate(addends[1:]):
        c = total + v + (slip if j == slip_at else 0)
        steps.append(f"{total} + {v} = {c}.")
        total = c
    return steps + [f"Answer: \\boxed{{{total + answer_slip}}}"]


def other_value(v: int, rng: random.Random) -> int:
    return rng.choice([x for x in range(1, 10) if x != v])


def corrupted(values: list[int], kind: str, rng: random.Random) -> list[str]:
    if kind == "misread":
        wrong = list(values)
        i = rng.randrange(len(wrong))
        wrong[i] = other_value(wrong[i], rng)
        return solution_steps(wrong, wrong)
    if kind == "sum_slip":
        return solution_steps(values, values, slip_at=rng.randrange(len(values) - 1), slip=rng.choice([-2, -1, 1, 2]))
    if kind == "addend_slip":
        wrong = list(values)
        i = rng.randrange(1, len(wrong))
        wrong[i] = other_value(wrong[i], rng)
        return solution_steps(values, wrong)
    if kind == "answer_slip":
        return solution_steps(values, values, answer_slip=rng.choice([-3, -2, -1, 1, 2, 3]))
    raise ValueError(f"unknown corruption {kind!r}")


def make(out_dir: Path = OUT, seed: int = 0) -> dict[str, int]:
    """Write images/, train.jsonl and eval.jsonl under `out_dir`; returns the solution count per file."""
    rng = random.Random(seed)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (split, n_items) in SPLITS.items():
        records = []
        for item in TASK.items(split, n_items):
            image = f"images/{item.id}.png"
            item.image.save(out_dir / image, format="PNG", optimize=True)
            gold = solution_steps(item.values, item.values)
            assert "\n\n".join(gold) == gold_solution(item.values)
            for kind, steps in [("gold", gold), *((k, corrupted(item.values, k, rng)) for k in CORRUPTIONS)]:
                records.append(StepwiseRecord(
                    id=f"{item.id}-{kind}", images=[image], question=item.question, steps=steps,
                    labels=step_truth(item.values, steps), answer=item.answer, source="tilesum",
                    meta={"corruption": kind}))
        counts[name] = write_jsonl(out_dir / f"{name}.jsonl", records)
    return counts


if __name__ == "__main__":
    print(make(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
