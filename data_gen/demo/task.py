"""The synthetic visual reasoning task of the end-to-end demo: add the values of coloured tiles.

A tiny InternVL-architecture model (patch 14, one image token per 28 px cell after pixel-unshuffle) has to learn
this from scratch on a CPU in minutes. Rendered digits were never learned there; solid colour tiles are. So:

- the image is a `grid` x `grid` board of square cells (112 px, 4 x 4 cells of 28 px by default) on a neutral
  dark or light grey background;
- `min_tiles`..`max_tiles` cells (distinct, random) hold one square tile each, 12-28 px wide, centred in its cell
  with a small random offset that keeps it inside; the tile's colour encodes a value 1-9 through `COLOR_KEY`;
- every tile colour is jittered by up to +-`jitter` per channel, then Gaussian noise (sigma `noise` * 255) is
  added to every pixel of the image.

`COLOR_KEY` uses the channel levels 0, 128 and 255 only. With the default jitter of 55 the jittered ranges of
the three levels, [0, 55], [73, 183] and [200, 255], never overlap, so a jittered tile still decodes exactly
(channel by channel) to its key colour; a neutral grey background decodes to no key colour at all.

Reading order is row-major over cells (left to right, top to bottom). The gold solution has one step per
claim, steps separated by a blank line, and the answer as its own last step (`reading="list"`, the default):

    The tiles show 3, 7, 5 and 9.

    3 + 7 = 10.

    10 + 5 = 15.

    15 + 9 = 24.

    Answer: \\boxed{24}

With `reading="per_tile"` the reading takes one step per tile ("Tile 1 shows 3.", "Tile 2 shows 7.", ...), which
puts every misread at its own step, the granularity a process reward model judges at. Measured on the demo's tiny
InternVL (1,000 cosine SFT steps, seed 0): a PRM learns per-tile steps (step macro-F1 0.76 against exact labels on
the list policy's solutions rewritten per tile, where on the list steps it learned only the share of `+` steps),
but the policy learns per-tile readings far slower (greedy 28% vs 98% with the list), so the demo keeps the list.

`step_truth` judges any solution in either grammar exactly, with PRM semantics: a step is correct iff it and
every step before it is correct ("correct up to this step"). Items are deterministic in (split, index, task
settings): the seed is a SHA-256 of the split and index, and "train" and "test" never share a seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from rlhf.errors import UserError

COLOR_KEY: dict[int, tuple[int, int, int]] = {
    1: (255, 0, 0),  # red
    2: (0, 255, 0),  # green
    3: (0, 0, 255),  # blue
    4: (255, 255, 0),  # yellow
    5: (255, 0, 255),  # magenta
    6: (0, 255, 255),  # cyan
    7: (128, 128, 0),  # olive
    8: (128, 0, 128),  # purple
    9: (0, 128, 128),  # teal
}
SPLITS = ("train", "test")
READING_STYLES = ("list", "per_tile")
LAYOUTS = ("cells", "rows")
LAYOUT_HELP = "Where the tiles go: cells (any distinct cells) | rows (distinct rows, one tile each)."
QUESTION = "<image>\nAdd the numbers shown by the coloured tiles, left to right, top to bottom."
BACKGROUND_LEVELS = (40, 200)  # dark and light neutral grey, each jittered by up to +-BACKGROUND_JITTER
BACKGROUND_JITTER = 10
_SEED_NAMESPACE = "mmalign/data_gen/task/tile-sum"  # fixed for good: every item (image, values) derives from it

_VALUE_LIST = r"\d+(?:\s*(?:,\s*and|,|and)\s*\d+)*"
_READING = re.compile(rf"the tiles? shows?\s+({_VALUE_LIST})\s*([.,]?)", re.IGNORECASE)
_NOTHING = re.compile(r"(?!)")
_READING_MORE = re.compile(rf"((?:and\s+)?{_VALUE_LIST})\s*([.,]?)", re.IGNORECASE)  # a reading's next values
_TILE_READING = re.compile(r"tile\s+(\d+)\s+shows?\s+(\d+)\s*\.?", re.IGNORECASE)
_PARTIAL_SUM = re.compile(r"(\d+)\s*\+\s*(\d+)\s*=\s*(\d+)\s*\.?")
_ANSWER = re.compile(r"(?:(?:final\s+)?answer\s*:\s*)?\\boxed\{\s*(\d+)\s*\}\s*\.?", re.IGNORECASE)


@dataclass(frozen=True)
class Tile:
    """One painted tile: its cell (row-major index), value, box (left, top, right, bottom; right/bottom
    exclusive) and the jittered colour painted before noise."""

    cell: int
    value: int
    box: tuple[int, int, int, int]
    color: tuple[int, int, int]


@dataclass
class TaskItem:
    id: str
    image: Image.Image
    question: str
    answer: str
    values: list[int]
    solution: str
    tiles: list[Tile] = field(default_factory=list, repr=False)  # ground-truth geometry, for tests and debugging


def format_values(values: list[int]) -> str:
    """'3', '3 and 7', '3, 7, 5 and 9'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def gold_solution(values: list[int], reading: str = "list") -> str:
    """The reference chain of thought: the reading (one step per tile, or one step listing every value with
    `reading="list"`), one partial sum per step, then 'Answer: \\boxed{sum}'."""
    _check_values(values)
    if reading == "list":
        verb = "tile shows" if len(values) == 1 else "tiles show"
        steps = [f"The {verb} {format_values(values)}."]
    elif reading == "per_tile":
        steps = [f"Tile {k} shows {v}." for k, v in enumerate(values, 1)]
    else:
        raise ValueError(f"gold_solution: reading must be one of {', '.join(READING_STYLES)}, got {reading!r}")
    total = values[0]
    for v in values[1:]:
        steps.append(f"{total} + {v} = {total + v}.")
        total += v
    steps.append(f"Answer: \\boxed{{{total}}}")
    return "\n\n".join(steps)


ClaimKind = Literal["reading", "sum", "answer"]


def claim_kind(claim: str) -> ClaimKind | None:
    """What one claim (a line of a step) states: "reading" (a list of values or one tile's value), "sum" (a partial
    sum), "answer", or None when it parses as none of them."""
    claim = claim.strip()
    if _READING.fullmatch(claim) or _READING_MORE.fullmatch(claim) or _TILE_READING.fullmatch(claim):
        return "reading"
    if _PARTIAL_SUM.fullmatch(claim):
        return "sum"
    if _ANSWER.fullmatch(claim):
        return "answer"
    return None


def step_truth(item_values: list[int], steps: list[str]) -> list[bool]:
    """Judge each step of a solution (already split on blank lines) knowing the true values.

    Each non-blank line of a step is one claim and must be one of:
    - a reading of values, only as the very first claim: "The tiles show a, b, c and d." -- correct iff the listed
      numbers are the first values in reading order, and, when it ends the list ("and" or a final period), all of
      them. A list that has not ended may go on in the next claims, as cut by a `step_split` pattern ("The tiles
      show a," / "b," / "c" / "and d."), each judged the same way against the values that follow;
    - a reading of one tile, before any partial sum or answer: "Tile k shows v." -- correct iff k tiles have now
      been read in order (k = 1, 2, ...; never more than there are) and v is the k-th value;
    - the j-th partial sum (j = 0, 1, ...): "a + b = c." -- correct iff a = values[0] + ... + values[j],
      b = values[j + 1] and c = a + b;
    - the answer: "Answer: \\boxed{n}" -- correct iff n is the true sum; nothing may follow it.
    Anything else (including an empty step) is unparseable, hence wrong. A step is correct iff all of its claims
    and all earlier steps are correct, which is what a PRM "+" label means, so once a step is wrong every later
    step is wrong too, even when the final answer happens to be right.
    """
    _check_values(item_values)
    prefix = list(accumulate(item_values, initial=0))  # prefix[k] = sum of the first k values
    n_claims, n_read, n_sums, answered, ok, out = 0, 0, 0, False, True, []
    listing = False  # a list of values is open (begun, not yet ended)
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise ValueError(f"step_truth: step {i} is {type(step).__name__}, expected str")
        claims = [line.strip() for line in step.splitlines() if line.strip()]
        ok = ok and bool(claims)
        for claim in claims:
            if not ok:
                break
            was_listing, listing = listing, False
            if answered:  # a claim after the answer
                ok = False
            elif m := (_READING if n_claims == 0 else _READING_MORE if was_listing else _NOTHING).fullmatch(claim):
                read = [int(x) for x in re.findall(r"\d+", m.group(1))]
                ok = read == list(item_values[n_read:n_read + len(read)]) and n_read + len(read) <= len(item_values)
                n_read += len(read)
                listing = not (m.group(2) == "." or re.search(r"\band\b", m.group(1), re.IGNORECASE))
                ok = ok and (listing or n_read == len(item_values))
            elif m := _TILE_READING.fullmatch(claim):
                k, v = int(m.group(1)), int(m.group(2))
                ok = (n_sums == 0 and k == n_read + 1 and n_read < len(item_values) and v == item_values[n_read])
                n_read += 1
            elif m := _PARTIAL_SUM.fullmatch(claim):
                a, b, c = (int(x) for x in m.groups())
                j = n_sums
                ok = j + 1 < len(item_values) and (a, b, c) == (prefix[j + 1], item_values[j + 1], prefix[j + 2])
                n_sums += 1
            elif m := _ANSWER.fullmatch(claim):
                ok, answered = int(m.group(1)) == prefix[-1], True
            else:
                ok = False
            n_claims += 1
        out.append(ok)
    return out


def _check_values(values: list[int]) -> None:
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"tile-sum task: values must be a non-empty list of non-negative ints, got {values!r}")


def _seed(split: str, index: int) -> int:
    digest = hashlib.sha256(f"{_SEED_NAMESPACE}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class TileSumTask:
    """Generator of tile-sum items; every setting is part of what makes an item (see the module docstring)."""

    min_tiles: int = 4
    max_tiles: int = 5
    image_size: int = 112
    grid: int = 4
    jitter: int = 55  # max per-channel colour jitter of a tile, uniform in [-jitter, +jitter], then clipped
    noise: float = 0.06  # per-pixel Gaussian noise sigma as a fraction of 255
    min_tile_px: int = 12
    max_tile_px: int = 28
    max_offset_px: int = 3  # max shift of a tile from its cell's centre, per axis (always kept inside the cell)
    reading: str = "list"  # gold reading steps: one listing every value ("list") or one per tile ("per_tile")
    layout: str = "cells"  # where tiles go: any distinct cells ("cells"), or distinct rows, one tile each ("rows")

    def __post_init__(self) -> None:
        cell = self.image_size // self.grid if self.grid > 0 else 0
        problems = [
            (self.grid < 1 or self.image_size % self.grid, f"image_size ({self.image_size}) must be a multiple "
             f"of grid ({self.grid}) and grid >= 1"),
            (not 1 <= self.min_tiles <= self.max_tiles <= self.grid**2, f"need 1 <= min_tiles ({self.min_tiles}) "
             f"<= max_tiles ({self.max_tiles}) <= grid**2 ({self.grid**2})"),
            (not 1 <= self.min_tile_px <= self.max_tile_px <= cell, f"need 1 <= min_tile_px ({self.min_tile_px}) "
             f"<= max_tile_px ({self.max_tile_px}) <= cell size ({cell})"),
            (not 0 <= self.jitter <= 255, f"jitter must be in [0, 255], got {self.jitter}"),
            (not 0 <= self.noise, f"noise must be >= 0, got {self.noise}"),
            (self.max_offset_px < 0, f"max_offset_px must be >= 0, got {self.max_offset_px}"),
            (self.reading not in READING_STYLES, f"reading must be one of {', '.join(READING_STYLES)}, got "
             f"{self.reading!r}"),
            (self.layout not in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"),
            (self.layout == "rows" and self.max_tiles > self.grid, f"layout rows puts one tile in a row: need "
             f"max_tiles ({self.max_tiles}) <= grid ({self.grid})"),
        ]
        messages = [message for bad, message in problems if bad]
        if messages:
            raise UserError(f"TileSumTask: {'; '.join(messages)}")

    @property
    def cell_px(self) -> int:
        return self.image_size // self.grid

    def item(self, split: str, index: int) -> TaskItem:
        if split not in SPLITS:
            raise UserError(f"TileSumTask: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f"TileSumTask: index must be a non-negative int, got {index!r}")
        rng = np.random.default_rng(_seed(split, index))
        n = int(rng.integers(self.min_tiles, self.max_tiles + 1))
        if self.layout == "rows":
            rows = sorted(int(r) for r in rng.choice(self.grid, size=n, replace=False))
            cells = [r * self.grid + int(rng.integers(self.grid)) for r in rows]
        else:
            cells = sorted(int(c) for c in rng.choice(self.grid**2, size=n, replace=False))
        values = [int(v) for v in rng.integers(1, 10, size=n)]
        image, tiles = self.render(cells, values, rng)
        return TaskItem(
            id=f"tilesum-{split}-{index:07d}",
            image=image,
            question=QUESTION,
            answer=str(sum(values)),
            values=values,
            solution=gold_solution(values, self.reading),
            tiles=tiles,
        )

    def render(self, cells: list[int], values: list[int], rng: np.random.Generator) -> tuple[Image.Image, list[Tile]]:
        """Paint `values` (1-9) into `cells` (row-major indices) on a jittered grey board, then add noise."""
        if len(cells) != len(values) or len(set(cells)) != len(cells):
            raise ValueError(f"TileSumTask.render: need one distinct cell per value, got {cells} for {values}")
        if any(v not in COLOR_KEY for v in values) or any(not 0 <= c < self.grid**2 for c in cells):
            raise ValueError(f"TileSumTask.render: values must be 1-9 and cells in [0, {self.grid**2}), "
                             f"got {values} in {cells}")
        size, cell = self.image_size, self.cell_px
        grey = BACKGROUND_LEVELS[int(rng.integers(2))] + int(rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1))
        canvas = np.full((size, size, 3), float(grey))
        tiles = []
        for c, v in zip(cells, values):
            side = int(rng.integers(self.min_tile_px, self.max_tile_px + 1))
            lo = (cell - side) // 2  # free pixels before the centred tile; cell - side - lo after it
            dx, dy = (int(rng.integers(-min(self.max_offset_px, lo), min(self.max_offset_px, cell - side - lo) + 1))
                      for _ in range(2))
            left, top = (c % self.grid) * cell + lo + dx, (c // self.grid) * cell + lo + dy
            jitter = rng.integers(-self.jitter, self.jitter + 1, size=3)
            color = tuple(int(x) for x in np.clip(np.array(COLOR_KEY[v]) + jitter, 0, 255))
            canvas[top : top + side, left : left + side] = color
            tiles.append(Tile(cell=c, value=v, box=(left, top, left + side, top + side), color=color))
        canvas += rng.normal(0.0, self.noise * 255.0, size=canvas.shape)
        pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, mode="RGB"), tiles

    def items(self, split: str, n: int, start: int = 0) -> list[TaskItem]:
        """Items start, start + 1, ..., start + n - 1 of `split`."""
        if n < 0:
            raise UserError(f"TileSumTask.items: n must be >= 0, got {n}")
        return [self.item(split, i) for i in range(start, start + n)]

    def write_questions(self, out_dir: str | Path, split: str, n: int, start: int = 0) -> Path:
        """Write items as a question file: PNGs under out_dir/images/ and out_dir/{split}.jsonl with one
        {"id", "image", "question", "answer", "solution", "values"} record per line; "image" is relative to
        out_dir. Returns the JSON lines path."""
        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for it in self.items(split, n, start):
                rel = f"images/{it.id}.png"
                it.image.save(out_dir / rel, format="PNG")
                record = {"id": it.id, "image": rel, "question": it.question, "answer": it.answer,
                          "solution": it.solution, "values": it.values}
                f.write(json.dumps(record) + "\n")
        tmp.replace(path)
        return path
