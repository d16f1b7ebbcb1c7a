"""Regenerate recipes/mpo/tiny_data: a tiny MMPR-format preference set built from the tile-sum task.

Three data sets in one meta.json: single-image pairs (gold chain of thought vs one with a misread or a wrong
partial sum), two-image pairs (`max_dynamic_patch` 2 -> 1 tile per image) and text-only arithmetic pairs.
Run: python recipes/mpo/make_tiny_data.py
"""

import json
import random
from pathlib import Path

from data_gen.demo.task import TileSumTask, gold_solution

OUT = Path(__file__).resolve().parent / "tiny_data"


def corrupt(values: list[int], rng: random.Random) -> str:
    """A plausible wrong solution: misread one tile, or make one partial sum wrong."""
    if rng.random() < 0.5:
        wrong = list(values)
        i = rng.randrange(len(wrong))
        wrong[i] = wrong[i] % 9 + 1
        return gold_solution(wrong)
    steps = gold_solution(values).split("\n\n")
    j = rng.randrange(1, len(steps) - 1)
    a, rest = steps[j].split(" + ")
    b, c = rest.rstrip(".").split(" = ")
    steps[j] = f"{a} + {b} = {int(c) + rng.choice([-1, 1])}."
    return "\n\n".join(steps)


def main() -> None:
    rng = random.Random(0)
    task = TileSumTask()
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    single, double, text = [], [], []
    for i in range(24):
        item = task.item("train", i)
        name = f"images/{item.id}.png"
        item.image.save(OUT / name)
        single.append({"image": name.split("/", 1)[1], "question": item.question, "chosen": item.solution,
                       "rejected": corrupt(item.values, rng), "answer_gt": item.answer})
    for i in range(0, 8, 2):
        a, b = task.item("train", i), task.item("train", i + 1)
        total = int(a.answer) + int(b.answer)
        chosen = f"The first image sums to {a.answer}.\n\nThe second image sums to {b.answer}.\n\n" \
                 f"{a.answer} + {b.answer} = {total}.\n\nAnswer: \\boxed{{{total}}}"
        double.append({"image": [f"{a.id}.png", f"{b.id}.png"],
                       "question": "<image>\n<image>\nAdd the totals of the two images.",
                       "chosen": chosen, "rejected": chosen.replace(f"= {total}.", f"= {total + 1}.")
                       .replace(f"{{{total}}}", f"{{{total + 1}}}"), "answer_gt": str(total)})
    for i in range(8):
        x, y = rng.randint(2, 40), rng.randint(2, 40)
        text.append({"question": f"What is {x} + {y}?", "chosen": f"{x} + {y} = {x + y}.\n\nAnswer: \\boxed{{{x + y}}}",
                     "rejected": f"{x} + {y} = {x + y + 2}.\n\nAnswer: \\boxed{{{x + y + 2}}}", "answer_gt": str(x + y)})
    meta = {}
    for name, rows, patches in (("tiles_single", single, 1), ("tiles_double", double, 2), ("text_sums", text, None)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta[name] = {"root": "images", "annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1,
                      "length": len(rows)}
        if patches:
            meta[name]["max_dynamic_patch"] = patches
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
