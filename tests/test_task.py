"""Tests of the tile-sum task (data_gen/demo/task.py): determinism, gold solutions, exact step truth, rendering."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_gen.demo.task import (
    BACKGROUND_JITTER,
    BACKGROUND_LEVELS,
    COLOR_KEY,
    QUESTION,
    TileSumTask,
    claim_kind,
    format_values,
    gold_solution,
    step_truth,
)
from rlhf.errors import UserError

TASK = TileSumTask()
VALUES = [3, 7, 5, 9]  # 3 + 7 = 10, 10 + 5 = 15, 15 + 9 = 24


def last_boxed(text: str) -> str | None:
    found = re.findall(r"\\boxed\{([^{}]*)\}", text)
    return found[-1] if found else None


def pixel_digest(split: str, index: int) -> str:
    return hashlib.sha256(np.asarray(TASK.item(split, index).image).tobytes()).hexdigest()


# ---------------------------------------------------------------- determinism


def test_same_item_twice_is_identical_and_splits_differ():
    a, b = TASK.item("train", 5), TileSumTask().item("train", 5)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.id, a.question, a.answer, a.values, a.solution, a.tiles) == (
        b.id, b.question, b.answer, b.values, b.solution, b.tiles)
    test = TASK.item("test", 5)
    assert test.id == "tilesum-test-0000005" and a.id == "tilesum-train-0000005"
    assert not np.array_equal(np.asarray(a.image), np.asarray(test.image))
    # Over 20 indices the two splits never produce the same layout (cells and values).
    layouts = {split: {tuple((t.cell, t.value) for t in it.tiles) for it in TASK.items(split, 20)} for split in
               ("train", "test")}
    assert len(layouts["train"]) == 20 and not layouts["train"] & layouts["test"]
    assert [it.id for it in TASK.items("train", 2, start=7)] == ["tilesum-train-0000007", "tilesum-train-0000008"]


def test_items_do_not_depend_on_python_hash_seed():
    code = ("import hashlib, numpy as np; from data_gen.demo.task import TileSumTask; "
            "print(hashlib.sha256(np.asarray(TileSumTask().item('test', 3).image).tobytes()).hexdigest())")
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == pixel_digest("test", 3)


# ---------------------------------------------------------------- gold solutions


def test_gold_solution_worked_example():
    assert format_values(VALUES) == "3, 7, 5 and 9"
    assert format_values([4, 2]) == "4 and 2" and format_values([8]) == "8"
    assert gold_solution(VALUES, "per_tile") == (
        "Tile 1 shows 3.\n\nTile 2 shows 7.\n\nTile 3 shows 5.\n\nTile 4 shows 9.\n\n"
        "3 + 7 = 10.\n\n10 + 5 = 15.\n\n15 + 9 = 24.\n\nAnswer: \\boxed{24}")
    assert gold_solution(VALUES) == gold_solution(VALUES, "list") == (
        "The tiles show 3, 7, 5 and 9.\n\n3 + 7 = 10.\n\n10 + 5 = 15.\n\n15 + 9 = 24.\n\nAnswer: \\boxed{24}")
    assert gold_solution([8]) == "The tile shows 8.\n\nAnswer: \\boxed{8}"
    assert gold_solution([8], "per_tile") == "Tile 1 shows 8.\n\nAnswer: \\boxed{8}"
    for reading in ("per_tile", "list"):
        assert step_truth([8], gold_solution([8], reading).split("\n\n")) == [True, True]
        assert step_truth(VALUES, gold_solution(VALUES, reading).split("\n\n")) == [True] * len(
            gold_solution(VALUES, reading).split("\n\n"))
    with pytest.raises(ValueError, match="reading must be one of list, per_tile"):
        gold_solution(VALUES, "words")
    with pytest.raises(UserError, match="reading must be one of"):
        TileSumTask(reading="words")
    # The list style is a task setting: same values and image, the solution written the other way.
    a, b = TASK.item("train", 3), TileSumTask(reading="per_tile").item("train", 3)
    assert a.values == b.values and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert b.solution == gold_solution(a.values, "per_tile") and a.solution != b.solution


def test_gold_items_are_all_correct_and_consistent():
    for split, index in itertools.product(("train", "test"), range(15)):
        it = TASK.item(split, index)
        steps = it.solution.split("\n\n")
        assert it.question == QUESTION and it.question.startswith("<image>\n")
        assert 4 <= len(it.values) <= 5 and all(1 <= v <= 9 for v in it.values)
        assert it.answer == str(sum(it.values)) == last_boxed(it.solution)
        assert len(steps) == len(it.values) + 1  # reading, len - 1 partial sums, answer
        assert [claim_kind(st) for st in steps] == ["reading"] + ["sum"] * (len(it.values) - 1) + ["answer"]
        per_tile = TileSumTask(reading="per_tile").item(split, index)
        tile_steps = per_tile.solution.split("\n\n")
        assert len(tile_steps) == 2 * len(it.values)  # one reading per tile, len - 1 partial sums, answer
        assert [claim_kind(st) for st in tile_steps] == (["reading"] * len(it.values) + ["sum"] * (len(it.values) - 1)
                                                         + ["answer"])
        assert step_truth(it.values, tile_steps) == [True] * len(tile_steps)
        assert step_truth(it.values, steps) == [True] * len(steps)
        # Reading order is row-major over cells, and the values are the painted tiles' values.
        assert [t.cell for t in it.tiles] == sorted({t.cell for t in it.tiles})
        assert [t.value for t in it.tiles] == it.values


# ---------------------------------------------------------------- step truth, worked examples


def test_per_tile_misread_is_wrong_at_its_own_step():
    # Reads tile 3 (a 5) as 6: tiles 1-2 right, everything from tile 3 on wrong, the sums included even though
    # they are right for the values as read.
    steps = ["Tile 1 shows 3.", "Tile 2 shows 7.", "Tile 3 shows 6.", "Tile 4 shows 9.", "3 + 7 = 10.",
             "10 + 6 = 16.", "16 + 9 = 25.", "Answer: \\boxed{25}"]
    assert step_truth(VALUES, steps) == [True, True] + [False] * 6


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # A tile skipped (numbered 3 after 1), one repeated, numbering from 0: wrong at that step.
        (["Tile 1 shows 3.", "Tile 3 shows 5."], [True, False]),
        (["Tile 1 shows 3.", "Tile 1 shows 3."], [True, False]),
        (["Tile 0 shows 3."], [False]),
        # A fifth tile where there are four.
        (["Tile 1 shows 3.", "Tile 2 shows 7.", "Tile 3 shows 5.", "Tile 4 shows 9.", "Tile 5 shows 1."],
         [True] * 4 + [False]),
        # Readings after a partial sum, or after a reading of every value, are out of place.
        (["Tile 1 shows 3.", "Tile 2 shows 7.", "3 + 7 = 10.", "Tile 3 shows 5."], [True, True, True, False]),
        (["The tiles show 3, 7, 5 and 9.", "Tile 1 shows 3."], [True, False]),
        (["Tile 1 shows 3.", "The tiles show 3, 7, 5 and 9."], [True, False]),
        # Two readings on one step (two claims), case and spacing, singular verb.
        (["Tile 1 shows 3.\nTile 2 shows 7.", "tile 3  show 5", "Tile 4 shows 9.", "3 + 7 = 10."], [True] * 4),
        # Stopping early and answering: the answer is judged against the true sum only.
        (["Tile 1 shows 3.", "Answer: \\boxed{24}"], [True, True]),
        (["Tile 1 shows 3.", "Answer: \\boxed{3}"], [True, False]),
    ],
)
def test_per_tile_step_truth_cases(steps, expected):
    assert step_truth(VALUES, steps) == expected


def test_claim_kinds():
    assert [claim_kind(c) for c in ("Tile 2 shows 7.", "The tiles show 3 and 7.", " 3 + 7 = 10. ",
                                    "Answer: \\boxed{10}", "So the sum is 10.", "")] == [
        "reading", "reading", "sum", "answer", None, None]


def test_misread_at_step_one_makes_every_step_wrong():
    # Reads 7 as 1; the arithmetic after it is internally consistent (3+1=4, 4+5=9, 9+9=18) but judged
    # against the truth: "3 + 1 = 4." is not "3 + 7 = 10.", and 18 is not 24.
    steps = ["The tiles show 3, 1, 5 and 9.", "3 + 1 = 4.", "4 + 5 = 9.", "9 + 9 = 18.", "Answer: \\boxed{18}"]
    assert step_truth(VALUES, steps) == [False] * 5


def test_wrong_partial_sum_at_step_three():
    # Steps 1-2 right; 10 + 5 = 16 is wrong, everything after is wrong ("correct up to this step").
    steps = ["The tiles show 3, 7, 5 and 9.", "3 + 7 = 10.", "10 + 5 = 16.", "16 + 9 = 25.", "Answer: \\boxed{25}"]
    assert step_truth(VALUES, steps) == [True, True, False, False, False]
    # Even a step that would be right on its own ("15 + 9 = 24.") stays wrong after an error.
    steps = ["The tiles show 3, 7, 5 and 9.", "3 + 7 = 10.", "10 + 5 = 16.", "15 + 9 = 24.", "Answer: \\boxed{24}"]
    assert step_truth(VALUES, steps) == [True, True, False, False, False]


def test_right_answer_by_luck_after_misread():
    # Reads 3, 8, 5, 8 (sum 24 as well): the boxed answer equals the truth, yet the first step is wrong.
    steps = ["The tiles show 3, 8, 5 and 8.", "3 + 8 = 11.", "11 + 5 = 16.", "16 + 8 = 24.", "Answer: \\boxed{24}"]
    assert last_boxed("\n\n".join(steps)) == "24"
    assert step_truth(VALUES, steps) == [False] * 5


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # Answer on the last partial-sum step instead of its own step: both claims right.
        (["The tiles show 3, 7, 5 and 9.", "3 + 7 = 10.", "10 + 5 = 15.", "15 + 9 = 24.\nAnswer: \\boxed{24}"],
         [True] * 4),
        # Oxford comma, no spaces, no final period: same claims.
        (["The tiles show 3, 7, 5, and 9", "3+7=10", "10 + 5 = 15."], [True] * 3),
        # Order matters: 7, 3, ... is a misread.
        (["The tiles show 7, 3, 5 and 9."], [False]),
        # Missing a value.
        (["The tiles show 3, 7 and 5."], [False]),
        # Skipped partial sum: the second sum must be 10 + 5 = 15.
        (["The tiles show 3, 7, 5 and 9.", "3 + 7 = 10.", "15 + 9 = 24."], [True, True, False]),
        # Right total but wrong operand (a + b = c with b not the next value).
        (["The tiles show 3, 7, 5 and 9.", "3 + 7 = 10.", "11 + 4 = 15."], [True, True, False]),
        # One partial sum too many.
        (["3 + 7 = 10.", "10 + 5 = 15.", "15 + 9 = 24.", "24 + 0 = 24."], [True, True, True, False]),
        # Answer directly after the reading is allowed; wrong answer is not.
        (["The tiles show 3, 7, 5 and 9.", "Answer: \\boxed{24}"], [True, True]),
        (["The tiles show 3, 7, 5 and 9.", "Answer: \\boxed{23}"], [True, False]),
        # Anything after the answer, a second reading, prose, an empty step: unparseable or out of place.
        (["Answer: \\boxed{24}", "15 + 9 = 24."], [True, False]),
        (["3 + 7 = 10.", "The tiles show 3, 7, 5 and 9."], [True, False]),
        (["The tiles show 3, 7, 5 and 9.", "So the sum is 24."], [True, False]),
        (["The tiles show 3, 7, 5 and 9.", "", "3 + 7 = 10."], [True, False, False]),
        (["3 + 7 = 10 + 0."], [False]),
        # The list cut into one step per value (a `step_split` of the demo): each judged on the values so far.
        (["The tiles show 3,", "7,", "5", "and 9.", "3 + 7 = 10."], [True] * 5),
        (["The tiles show 3,", "7,", "6", "and 9.", "3 + 7 = 10."], [True, True, False, False, False]),
        (["The tiles show 3,", "7", "and 5."], [True, True, False]),  # the list ends a value short
        (["The tiles show 3,", "7,", "5,", "9", "and 9."], [True] * 4 + [False]),  # one value too many
        (["The tiles show 3, 7, 5 and 9.", "9."], [True, False]),  # no more values once the list has ended
        (["3,", "7,"], [False, False]),  # values without the opening words
        ([], []),
    ],
)
def test_step_truth_cases(steps, expected):
    assert step_truth(VALUES, steps) == expected


def test_step_truth_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty list"):
        step_truth([], ["The tiles show 3."])
    with pytest.raises(ValueError, match="step 1 is int"):
        step_truth(VALUES, ["The tiles show 3, 7, 5 and 9.", 10])


# ---------------------------------------------------------------- colours and pixels


def test_color_key_is_well_separated():
    assert sorted(COLOR_KEY) == list(range(1, 10))
    keys = np.array(list(COLOR_KEY.values()), dtype=float)
    pairwise = [np.linalg.norm(a - b) for a, b in itertools.combinations(keys, 2)]
    assert min(pairwise) > 150  # sqrt(127^2 + 127^2) = 179.6, e.g. yellow (255,255,0) vs olive (128,128,0)
    assert min(pairwise) == pytest.approx(math.hypot(127, 127))
    # Far from every possible background grey (dark 30-50, light 190-210): the closest pair is
    # teal (0,128,128) vs grey 50: sqrt(50^2 + 78^2 + 78^2) = 121.1.
    greys = [g for base in BACKGROUND_LEVELS for g in range(base - BACKGROUND_JITTER, base + BACKGROUND_JITTER + 1)]
    assert min(np.linalg.norm(keys - g, axis=1).min() for g in greys) > 120
    # Levels 0/128/255 jittered by +-55 give disjoint bands [0,55], [73,183], [200,255]: exact channel decoding.
    assert set(keys.ravel()) == {0, 128, 255}
    assert 0 + TASK.jitter < 128 - TASK.jitter and 128 + TASK.jitter < 255 - TASK.jitter


def nearest_key(rgb: np.ndarray) -> int:
    return min(COLOR_KEY, key=lambda v: np.linalg.norm(np.array(COLOR_KEY[v]) - rgb))


def test_tile_centre_pixels_match_key_colour_within_jitter():
    sigma = TASK.noise * 255  # 15.3
    for index in range(25):
        it = TASK.item("train", index)
        px = np.asarray(it.image).astype(float)
        assert px.shape == (112, 112, 3)
        for tile in it.tiles:
            left, top, right, bottom = tile.box
            side = right - left
            assert bottom - top == side and 12 <= side <= 28
            # The tile lies inside its 28 px cell.
            cx, cy = (tile.cell % 4) * 28, (tile.cell // 4) * 28
            assert cx <= left and right <= cx + 28 and cy <= top and bottom <= cy + 28
            # The centre 8x8 (64 pixels) averages the noise down to sigma / 8 = 1.9.
            mx, my = (left + right) // 2, (top + bottom) // 2
            mean = px[my - 4 : my + 4, mx - 4 : mx + 4].reshape(-1, 3).mean(0)
            key = np.array(COLOR_KEY[tile.value])
            assert np.all(np.abs(np.array(tile.color) - key) <= TASK.jitter)
            # Noise tolerance 4 * sigma / 8 = 7.7, plus up to sigma / sqrt(2 pi) = 6.1 of bias where clipping
            # at 0 or 255 cuts one tail of the noise.
            assert np.all(np.abs(mean - np.array(tile.color)) <= 4 * sigma / 8 + sigma / math.sqrt(2 * math.pi))
            assert np.all(np.abs(mean - key) <= TASK.jitter + 14)
            assert nearest_key(mean) == tile.value


def test_background_is_neutral_grey_with_noise():
    it = TASK.item("test", 0)
    px = np.asarray(it.image).astype(float)
    empty = sorted(set(range(16)) - {t.cell for t in it.tiles})
    cells = np.concatenate([px[(c // 4) * 28 : (c // 4 + 1) * 28, (c % 4) * 28 : (c % 4 + 1) * 28].reshape(-1, 3)
                            for c in empty])
    means = cells.mean(0)
    assert np.ptp(means) < 2  # neutral: the three channels agree
    assert any(abs(means.mean() - base) <= BACKGROUND_JITTER + 1.5 for base in BACKGROUND_LEVELS)
    assert cells.std(0) == pytest.approx(np.full(3, TASK.noise * 255), rel=0.1)


def test_settings_change_the_items_and_are_validated():
    two = TileSumTask(min_tiles=2, max_tiles=2, image_size=56, grid=2, max_tile_px=20)
    for it in two.items("train", 5):
        assert len(it.values) == 2 and it.image.size == (56, 56)
        assert all(t.box[2] - t.box[0] <= 20 for t in it.tiles)
        assert step_truth(it.values, it.solution.split("\n\n")) == [True, True, True]
    for kwargs, fragment in [
        ({"min_tiles": 6, "max_tiles": 5}, "min_tiles"),
        ({"max_tiles": 17}, "grid\\*\\*2"),
        ({"image_size": 110}, "multiple of grid"),
        ({"image_size": 100}, "cell size \\(25\\)"),
        ({"max_tile_px": 29}, "cell size \\(28\\)"),
        ({"noise": -0.1}, "noise"),
        ({"layout": "diagonal"}, "layout must be one of cells, rows"),
        ({"layout": "rows", "max_tiles": 5}, "max_tiles \\(5\\) <= grid \\(4\\)"),
    ]:
        with pytest.raises(UserError, match=fragment):
            TileSumTask(**kwargs)
    with pytest.raises(UserError, match="unknown split 'val'"):
        TASK.item("val", 0)
    with pytest.raises(UserError, match="non-negative int"):
        TASK.item("train", -1)
    with pytest.raises(UserError, match="n must be >= 0"):
        TASK.items("train", -1)


def test_rows_layout_puts_one_tile_in_each_of_distinct_rows():
    """layout="rows": n distinct rows, one tile each, so the reading order (row-major) is top to bottom; the same
    item index gives the same board, and the default layout's items are unchanged by the option's existence."""
    rows = TileSumTask(min_tiles=4, max_tiles=4, layout="rows")
    for it in rows.items("train", 20):
        cells = [t.cell for t in it.tiles]
        assert sorted(c // 4 for c in cells) == [0, 1, 2, 3]  # 4 tiles on a 4 x 4 grid: every row once
        assert cells == sorted(cells)  # in reading order
        assert step_truth(it.values, it.solution.split("\n\n")) == [True] * 5
    three = TileSumTask(min_tiles=3, max_tiles=3, layout="rows").items("test", 20)
    assert all(len({t.cell // 4 for t in it.tiles}) == 3 for it in three)
    assert rows.item("test", 7).values == rows.item("test", 7).values
    assert TileSumTask(layout="cells").item("train", 0) == TileSumTask().item("train", 0)


# ---------------------------------------------------------------- question files


def test_write_questions_roundtrip(tmp_path):
    path = TASK.write_questions(tmp_path / "q", "test", 3, start=2)
    assert path == tmp_path / "q" / "test.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 3
    for record, it in zip(records, TASK.items("test", 3, start=2)):
        assert set(record) == {"id", "image", "question", "answer", "solution", "values"}
        assert record == {"id": it.id, "image": f"images/{it.id}.png", "question": QUESTION, "answer": it.answer,
                          "solution": it.solution, "values": it.values}
        with Image.open(tmp_path / "q" / record["image"]) as png:
            assert png.mode == "RGB" and np.array_equal(np.asarray(png), np.asarray(it.image))
        assert step_truth(record["values"], record["solution"].split("\n\n")) == [True] * (len(it.values) + 1)
    assert not list((tmp_path / "q").glob("*.tmp"))
