"""rlhf.data: MMPR and TRL readers, whole-data-set validation, rejects; rlhf.collator's max_length check on token
rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from rlhf.choices import OverflowAction
from rlhf.collator import check_lengths
from rlhf.data.images import ImageLoadError, load_image
from rlhf.data.mmpr import read_mmpr, repeat_records
from rlhf.data.records import DataValidationError, Position, PreferenceRecord, RecordProblem, format_problems
from rlhf.data.trl_format import read_preference_dataset
from rlhf.data.validate import split_valid, validate_records


def png(path: Path, color=(200, 30, 30), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a dict (dumped as JSON) or a str (written verbatim, for malformed or blank lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def pair(i: int, **extra) -> dict:
    return {"question": f"Question {i}?", "chosen": f"right {i}", "rejected": f"wrong {i}", **extra}


@pytest.fixture
def mmpr(tmp_path):
    """data/meta.json with `multi` (images, 2.0x, max_dynamic_patch 6) and `text` (text-only, 0.5x)."""
    data = tmp_path / "data"
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        png(data / "images" / name)
    write_jsonl(data / "ann" / "multi.jsonl", [
        pair(1, image=["a.png", "b.png"], question="<image>\n<image>\nWhich is larger?"),
        pair(2, image="c.png", question="What color?"),
        pair(3, image=["sub/d.png", "a.png"], question="Compare."),
        pair(4, image=["a.png", "b.png"], question="Image-1: <image>\nImage-2: <image>\nSame?", answer_gt="no",
             chosen_meta={"score": 1.0}),
    ])  # fmt: skip
    write_jsonl(data / "ann" / "text.jsonl", [pair(i, image=None) if i == 2 else pair(i) for i in range(1, 5)])
    meta = {
        "multi": {"root": "images", "annotation": "ann/multi.jsonl", "data_augment": False, "repeat_time": 2.0,
                  "length": 4, "max_dynamic_patch": 6},
        "text": {"annotation": "ann/text.jsonl", "data_augment": False, "repeat_time": 0.5, "length": 4},
    }  # fmt: skip
    (data / "meta.json").write_text(json.dumps(meta))
    return data


# ------------------------------------------------------------------------------------------------------- MMPR


def test_read_mmpr_resolves_paths_prepends_placeholders_and_budgets_tiles(mmpr):
    records = read_mmpr(mmpr / "meta.json")
    multi = {r.line: r for r in records if r.source == "multi"}
    images = (mmpr / "images").resolve()

    assert multi[1].image_paths == [str(images / "a.png"), str(images / "b.png")]
    assert multi[1].question == "<image>\n<image>\nWhich is larger?"  # already has placeholders: untouched
    assert multi[2].image_paths == [str(images / "c.png")]
    assert multi[2].question == "<image>\nWhat color?"  # reference section 2: `<image>\n` prepended
    assert multi[3].image_paths == [str(images / "sub" / "d.png"), str(images / "a.png")]
    assert multi[3].question == "<image>\n<image>\nCompare."  # one placeholder per image
    # max_dynamic_patch 6 over 2 images -> 6 // 2 = 3 tiles each; one image keeps all 6
    assert (multi[1].max_dynamic_patch, multi[1].tiles_per_image) == (6, 3)
    assert (multi[2].max_dynamic_patch, multi[2].tiles_per_image) == (6, 6)
    assert multi[4].answer_gt == "no" and multi[4].meta == {"chosen_meta": {"score": 1.0}}
    assert multi[4].chosen == "right 4" and multi[4].rejected == "wrong 4"
    assert multi[1].file == str((mmpr / "ann" / "multi.jsonl").resolve())
    assert multi[1].position is Position.LINE

    text = [r for r in records if r.source == "text"]
    assert all(r.image_paths == [] and r.images == [] for r in text)
    assert all(r.max_dynamic_patch == 12 and r.data_augment is False for r in text)  # the default budget
    assert all("<image>" not in r.question for r in text)
    assert validate_records(records) == []


def test_repeat_time_counts_are_exact_and_seeded(mmpr):
    records = read_mmpr(mmpr / "meta.json")
    multi = [r.line for r in records if r.source == "multi"]
    text = [r.line for r in records if r.source == "text"]
    assert multi == [1, 2, 3, 4, 1, 2, 3, 4]  # 2.0: every record twice
    assert len(text) == 2 and len(set(text)) == 2 and text == sorted(text)  # 0.5 of 4: two distinct, file order
    assert [r.line for r in read_mmpr(mmpr / "meta.json") if r.source == "text"] == text  # same seed, same pick

    hundred = [PreferenceRecord("s", i, "q", "c", "r") for i in range(1, 101)]
    # InternVL: repeat_time > 1 -> int(repeat_time) copies (2.5 -> 200 records for 100, 1.5 -> 100);
    # below 1 -> a sample of int(n * repeat_time): 0.25 -> 25, 0.999 -> 99
    assert len(repeat_records(hundred, 2.5, seed=0)) == 200
    assert [r.line for r in repeat_records(hundred, 1.5, seed=0)] == list(range(1, 101))
    quarter = [r.line for r in repeat_records(hundred, 0.25, seed=0)]
    assert len(quarter) == 25 and len(set(quarter)) == 25
    assert quarter == [r.line for r in repeat_records(hundred, 0.25, seed=0)]
    assert quarter != [r.line for r in repeat_records(hundred, 0.25, seed=1)]
    assert len(repeat_records(hundred, 0.999, seed=0)) == 99
    assert len(repeat_records(hundred, 0.3, seed=0)) == 30  # 100 * 0.3 = 30.000000000000004 in floats


def _internvl_layout(parent: Path) -> Path:
    """InternVL's own MMPR layout: parent/MMPR-v1.2/{meta.json, images/, annotations/} with paths in meta.json
    written relative to `parent` (InternVL's training is launched from there)."""
    Image.new("RGB", (28, 28), (9, 9, 9)).save(write_jsonl(parent / "MMPR-v1.2" / "images" / "x.txt", []).parent / "a.png")
    write_jsonl(parent / "MMPR-v1.2" / "annotations" / "geo.jsonl", [pair(1, image="a.png", question="<image>\nQ?")])
    meta = {"geo": {"root": "MMPR-v1.2/images", "annotation": "MMPR-v1.2/annotations/geo.jsonl",
                    "data_augment": False, "repeat_time": 1, "length": 1}}
    (parent / "MMPR-v1.2" / "meta.json").write_text(json.dumps(meta))
    return parent / "MMPR-v1.2" / "meta.json"


def test_meta_paths_resolve_against_the_working_directory_as_internvl(tmp_path, monkeypatch, caplog):
    # InternVL opens meta.json's root and annotation as written, i.e. relative to the working directory; mmalign
    # tries that first, then meta.json's folder (its own meta files), or an explicit data_root; one line says which.
    meta = _internvl_layout(tmp_path)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="rlhf.data"):
        (record,) = read_mmpr(meta)
    assert record.image_paths == [str((tmp_path / "MMPR-v1.2" / "images" / "a.png").resolve())]
    assert f"geo: root and annotation resolved against the working directory, as InternVL ({tmp_path.resolve()})" \
        in caplog.text
    (again,) = read_mmpr(meta, data_root=tmp_path, cwd=tmp_path / "MMPR-v1.2")  # explicit root wins
    assert again.image_paths == record.image_paths
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DataValidationError, match=r"geo.root: folder not found: MMPR-v1.2/images \(relative to "
                                                  rf"{elsewhere.resolve()} or {(tmp_path / 'MMPR-v1.2').resolve()}\)"):
        read_mmpr(meta, cwd=elsewhere)


def test_meta_paths_fall_back_to_the_meta_folder(mmpr, caplog):
    # mmalign's own layout (paths relative to meta.json, e.g. `mmalign pairs` output) still reads from anywhere
    with caplog.at_level(logging.INFO, logger="rlhf.data"):
        records = read_mmpr(mmpr / "meta.json", cwd=mmpr.parent)
    assert records[0].image_paths[0] == str((mmpr / "images" / "a.png").resolve())
    assert "multi: root and annotation resolved against meta.json's folder" in caplog.text


def test_empty_image_is_text_only_and_multi_image_without_placeholders_is_reported(tmp_path, caplog):
    # InternVL: `"image": ""` (or []) is a pure-text sample; a multi-image question without <image> placeholders is
    # dropped by its training. mmalign trains the first as text, and gives the second its placeholders with a
    # warning that names the lines.
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (28, 28)).save(tmp_path / "images" / name)
    write_jsonl(tmp_path / "t.jsonl", [pair(1, image=""), pair(2, image=[]), pair(3, image=["a.png", "b.png"]),
                                       pair(4, image=["a.png", "b.png"], question="<image>\n<image>\nQ?")])
    (tmp_path / "meta.json").write_text(json.dumps({"t": {"root": "images", "annotation": "t.jsonl"}}))
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        records = read_mmpr(tmp_path / "meta.json", cwd=tmp_path)
    assert [(r.n_images, r.question) for r in records] == [
        (0, "Question 1?"), (0, "Question 2?"), (2, "<image>\n<image>\nQuestion 3?"), (2, "<image>\n<image>\nQ?")]
    assert validate_records(records) == []
    assert "t: 1 multi-image question without <image> placeholders (line 3)" in caplog.text
    assert all("_placeholders_added" not in r.meta for r in records)


def test_data_augment_true_is_refused_with_the_reason(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [pair(1)])
    (tmp_path / "meta.json").write_text(json.dumps({"t": {"annotation": "t.jsonl", "data_augment": True}}))
    with pytest.raises(DataValidationError, match=r"t.data_augment: true is not supported \(InternVL re-compresses "
                                                  r"training images as JPEG at a random quality; mmalign does not\): "
                                                  r"set it to false"):
        read_mmpr(tmp_path / "meta.json")


def test_meta_json_errors_are_all_reported_at_once(tmp_path):
    meta = {
        "a": {"root": "nope", "annotation": "missing.jsonl", "repeat_time": 0},
        "b": {"annotation": 3, "max_dynamic_patch": "12"},
        "c": [],
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataValidationError) as info:
        read_mmpr(tmp_path / "meta.json")
    m = str(tmp_path / "meta.json")
    assert str(info.value).splitlines()[0] == f"6 problems in 3 data sets (fix {m}):"
    assert [str(p) for p in info.value.problems] == [
        f"{m}: a.root: folder not found: nope (relative to {Path.cwd()} or {tmp_path})",
        f"{m}: a.annotation: file not found: missing.jsonl (relative to {Path.cwd()} or {tmp_path})",
        f"{m}: a.repeat_time: expected a number > 0 (2.0 repeats twice, 0.5 takes half), got 0",
        f"{m}: b.annotation: expected a JSON-lines file path (string), got 3",
        f"{m}: b.max_dynamic_patch: expected an integer >= 1, got '12'",
        f"{m}: c: expected an object with 'annotation' and 'root', got list",
    ]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataValidationError, match=r"bad\.json: not valid JSON: "):
        read_mmpr(tmp_path / "bad.json")


@pytest.fixture
def broken(tmp_path):
    """One annotation file with one problem per line (line 11 is blank: not a record)."""
    root = tmp_path / "ds" / "images"
    png(root / "ok.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    outside = png(tmp_path / "ds" / "outside.png")
    (root / "link.png").symlink_to(outside)
    write_jsonl(tmp_path / "ds" / "broken.jsonl", [
        pair(1, image="ok.png"),  # 1: fine
        '{"question": "q", "chosen": ',  # 2: malformed JSON
        {"image": "ok.png", "question": "q", "chosen": "c"},  # 3: no rejected
        pair(4, chosen="  \n "),  # 4: empty chosen
        pair(5, chosen="same", rejected=" same\n"),  # 5: identical
        pair(6, image="missing.png"),  # 6: missing image
        pair(7, image="corrupt.png"),  # 7: corrupt image bytes
        pair(8, image="../outside.png"),  # 8: escapes with ..
        pair(9, image=str(outside)),  # 9: absolute path outside root
        pair(10, image="ok.png", question="<image>\n<image>\nq"),  # 10: 2 placeholders, 1 image
        "   ",  # 11: blank
        pair(12, image="link.png"),  # 12: symlink pointing outside root
        pair(13, chosen=5),  # 13: wrong type
        pair(14, question="<image>\ntext only?"),  # 14: placeholder without images
        "[1, 2]",  # 15: not an object
        pair(16, image=["ok.png", 7]),  # 16: bad image list
    ])  # fmt: skip
    meta = {"broken": {"root": "ds/images", "annotation": "ds/broken.jsonl", "repeat_time": 2.0, "length": 15}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_validate_reports_every_problem_with_line_and_field(broken):
    records = read_mmpr(broken / "meta.json")
    assert len(records) == 30  # 15 non-blank lines, twice: bad lines are records too, reading did not stop
    problems = validate_records(records)
    assert [(p.line, p.field) for p in problems] == [  # each distinct record once, despite repeat_time 2
        (2, "record"),
        (3, "rejected"),
        (4, "chosen"),
        (5, "rejected"),
        (6, "image"),
        (7, "image"),
        (8, "image"),
        (9, "image"),
        (10, "question"),
        (12, "image"),
        (13, "chosen"),
        (14, "question"),
        (15, "record"),
        (16, "image"),
    ]
    ann, root = str((broken / "ds" / "broken.jsonl").resolve()), (broken / "ds" / "images").resolve()
    outside = (broken / "ds" / "outside.png").resolve()
    text = [str(p) for p in problems]
    # line 2 is 28 characters long and stops where a value should start: column 29
    assert text[0] == f"{ann}:2: record: malformed JSON: Expecting value (column 29)"
    assert text[1:5] == [
        f"{ann}:3: rejected: missing; expected a string",
        f"{ann}:4: chosen: empty (only whitespace)",
        f"{ann}:5: rejected: identical to chosen",
        f"{ann}:6: image: file not found: {root / 'missing.png'}",
    ]
    assert text[5].startswith(f"{ann}:7: image: cannot read image {root / 'corrupt.png'}: ")
    assert text[6:10] == [
        f"{ann}:8: image: resolves to {outside}, outside the image root {root}",
        f"{ann}:9: image: resolves to {outside}, outside the image root {root}",
        f"{ann}:10: question: has 2 <image> placeholders but the record has 1 image",
        f"{ann}:12: image: resolves to {outside}, outside the image root {root}",
    ]
    assert text[10:] == [
        f"{ann}:13: chosen: expected a string, got int",
        f"{ann}:14: question: has 1 <image> placeholder but the record has no images",
        f"{ann}:15: record: expected a JSON object, got list",
        f"{ann}:16: image: expected a path or a list of paths (non-empty strings), got ['ok.png', 7]",
    ]
    # without image checks the cheap path checks still run; missing/corrupt files are not opened
    lines = [p.line for p in validate_records(records, check_images=False)]
    assert 6 not in lines and 7 not in lines and {8, 9, 12} <= set(lines)


def test_split_valid_raises_with_all_problems_or_writes_rejects(broken, tmp_path, caplog):
    records = read_mmpr(broken / "meta.json")
    problems = validate_records(records)

    with pytest.raises(DataValidationError) as info:
        split_valid(records, problems, skip_invalid=False, rejects_path=None)
    message = str(info.value).splitlines()
    hint = "fix them, or set skip_invalid to skip them and write a rejects file"
    assert message[0] == f"14 problems in 14 records ({hint}):"
    assert message[1:] == [f"  {p}" for p in problems]
    assert info.value.problems == problems

    rejects = tmp_path / "rejects.jsonl"
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        kept = split_valid(records, problems, skip_invalid=True, rejects_path=rejects)
    assert [r.line for r in kept] == [1, 1]  # only line 1 is valid; both of its repeats stay
    assert f"skipped 14 invalid records -> {rejects}" in caplog.messages
    entries = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert [e["line"] for e in entries] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]  # each once
    assert entries[0]["record"] == '{"question": "q", "chosen": '  # the raw text of the malformed line
    assert entries[1]["record"] == {"image": "ok.png", "question": "q", "chosen": "c"}
    assert entries[1]["problems"] == [str(problems[1])] and entries[1]["source"] == "broken"

    split_valid(kept, validate_records(kept), skip_invalid=True, rejects_path=rejects)
    assert rejects.read_text() == ""  # rewritten: no stale rejects from an earlier run


def test_bad_bytes_and_images_without_root_are_reported(tmp_path, caplog):
    ann = tmp_path / "t.jsonl"
    ann.write_bytes(
        json.dumps(pair(1)).encode() + b"\n"
        + b'{"question": "caf\xe9", "chosen": "a", "rejected": "b"}\n'  # latin-1, not UTF-8
        + json.dumps(pair(3, image="x.png")).encode() + b"\n"
    )  # fmt: skip
    meta = {"t": {"annotation": "t.jsonl", "repeat_time": 1, "min_dynamic_patch": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        records = read_mmpr(tmp_path / "meta.json")
    assert any("ignoring unknown keys ['min_dynamic_patch']" in m for m in caplog.messages)  # not silent
    assert [str(p) for p in validate_records(records)] == [
        f"{ann}:2: record: not valid UTF-8 (invalid continuation byte at byte 17)",
        f"{ann}:3: image: data set 't' has no 'root' in meta.json",
    ]


def test_read_trl_json_list_file(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "id": 7}, {"prompt": "p", "chosen": "c", "rejected": "c"}]
    (tmp_path / "prefs.json").write_text(json.dumps(rows))
    records = read_preference_dataset(tmp_path / "prefs.json", name="mine")
    assert [(r.source, r.line, r.position) for r in records] == [("mine", 0, Position.ROW), ("mine", 1, Position.ROW)]
    assert records[0].meta == {"id": 7}
    file = str((tmp_path / "prefs.json").resolve())
    assert [str(p) for p in validate_records(records)] == [f"{file}[1]: rejected: identical to chosen"]


def test_problem_listing_is_capped():
    problems = [RecordProblem("s", "f.jsonl", i, "chosen", "empty (only whitespace)") for i in range(1, 61)]
    lines = format_problems(problems).splitlines()
    assert lines[0] == "60 problems in 60 records:"
    assert len(lines) == 1 + 50 + 1
    assert lines[1] == "  f.jsonl:1: chosen: empty (only whitespace)"
    assert lines[-1] == "  ... and 10 more"
    assert str(RecordProblem("s", "<ds>", 3, "prompt", "empty", Position.ROW)) == "<ds>[3]: prompt: empty"


# ------------------------------------------------------------------------------------------------ max_length


def _records(source="mmpr_demo", lines=(16, 17, 18)):
    return [PreferenceRecord(source, i, f"<image>\nq{i}", f"c{i}", f"r{i}", ["/x.png"]) for i in lines]


# line -> token row lengths (prompt incl. image tokens, chosen, rejected); max_length 2,048
COUNTS = {16: (2047, 900, 10), 17: (3402, 410, 380), 18: (2048, 1, 1)}


def _rows(records, counts=COUNTS):
    """Token rows of the given lengths, as `record_to_row` makes them (the ids themselves do not matter)."""
    return [{"prompt_ids": [7] * counts[r.line][0], "chosen_ids": [8] * counts[r.line][1],
             "rejected_ids": [9] * counts[r.line][2], "line": r.line} for r in records]


def test_check_lengths_skips_overflow_with_exact_messages(caplog):
    records = _records()
    rows = _rows(records)
    with caplog.at_level(logging.INFO, logger="rlhf.collator"):
        kept, problems = check_lengths(records + records, rows + rows, 2048, on_overflow="skip")
    # 16: 2,047 + 1 response token = 2,048 fits (its responses get truncated by the trainer);
    # 17: 3,402 > 2,048; 18: 2,048 + 1 = 2,049 > 2,048
    assert kept == [rows[0], rows[0]]  # the rows themselves, once per copy of the record
    assert [p.in_source() for p in problems] == [  # one problem per distinct record
        "mmpr_demo line 17: prompt needs 3,402 tokens + chosen 410 > max_length 2,048",
        "mmpr_demo line 18: prompt needs 2,048 tokens + chosen 1 > max_length 2,048",
    ]
    assert str(problems[0]) == ":17: length: prompt needs 3,402 tokens + chosen 410 > max_length 2,048"
    assert problems[0].in_source() in caplog.messages
    assert "skipped 2 records that do not fit max_length 2048" in caplog.messages
    assert "1 records have a response longer than max_length 2048 allows; the trainer truncates it" in caplog.messages


def test_check_lengths_error_and_reject(tmp_path):
    records = _records()
    rows = _rows(records)
    with pytest.raises(DataValidationError) as info:
        check_lengths(records, rows, 2048, on_overflow=OverflowAction.ERROR)
    assert str(info.value).splitlines()[0] == (
        "2 problems in 2 records (prompts do not fit max_length 2,048: raise max_length, lower max_dynamic_patch, "
        "or set on_overflow to 'skip'):"
    )
    assert len(info.value.problems) == 2

    rejects = tmp_path / "rejects.jsonl"
    rejects.write_text('{"earlier": "validation reject"}\n')
    kept, problems = check_lengths(records, rows, 2048, on_overflow="reject", rejects_path=rejects)
    assert [row["line"] for row in kept] == [16]
    lines = rejects.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == {"earlier": "validation reject"}  # appended, not replaced
    assert json.loads(lines[1])["problems"] == [str(problems[0])]

    with pytest.raises(ValueError, match="on_overflow must be one of skip, error, reject; got 'truncate'"):
        check_lengths(records, rows, 2048, on_overflow="truncate")
    with pytest.raises(ValueError, match="needs rejects_path"):
        check_lengths(records, rows, 2048, on_overflow="reject")
    short = _rows(records, dict.fromkeys(COUNTS, (10, 5, 5)))
    assert check_lengths(records, short, 2048) == (short, [])


def test_build_rows_tokenizes_each_record_once_and_fits_the_rows(tiny_processor, caplog):
    from rlhf.collator import build_rows, record_to_row

    short = PreferenceRecord("demo", 1, "What is 2 + 3?", "5", "6")
    long = PreferenceRecord("demo", 2, "What is 2 + 3? " * 40, "5", "6")
    row_short, row_long = record_to_row(short, tiny_processor), record_to_row(long, tiny_processor)
    max_length = len(row_long["prompt_ids"])  # the long prompt leaves no room for a response token; the short one does
    assert len(row_short["prompt_ids"]) + 1 <= max_length

    with caplog.at_level(logging.WARNING, logger="rlhf.collator"):
        rows = build_rows([short, long, short], tiny_processor, max_length=max_length, on_overflow="skip")
    assert rows == [row_short, row_short]
    assert rows[0] is rows[1]  # a repeated record is tokenized once; its copies share the row
    assert caplog.messages == [
        f"demo line 2: prompt needs {max_length:,} tokens + chosen {len(row_long['chosen_ids']):,} > max_length "
        f"{max_length:,}",
        f"skipped 1 records that do not fit max_length {max_length}",
    ]


def test_record_to_row_puts_one_placeholder_per_image_in_front(tiny_processor, tmp_path):
    """A record built in code with two images and no `<image>` gets `<image>\\n<image>\\n` in front, as the readers
    give it (rlhf.processing.with_placeholders). The old rule put one in front and failed: 1 placeholder, 2 images."""
    from rlhf.collator import record_to_row

    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(paths[-1])
    bare = PreferenceRecord("demo", 1, "Sum?", "5", "6", image_paths=paths)
    written = PreferenceRecord("demo", 1, "<image>\n<image>\nSum?", "5", "6", image_paths=paths)
    assert record_to_row(bare, tiny_processor)["prompt_ids"] == record_to_row(written, tiny_processor)["prompt_ids"]


def test_build_rows_without_max_length_keeps_repeated_copies(tiny_processor):
    """max_length null (no limit): a record that repeat_time repeats stays repeated, as it is with a limit."""
    from rlhf.collator import build_rows, record_to_row

    record = PreferenceRecord("demo", 1, "What is 2 + 3?", "5", "6")
    rows = build_rows([record, record], tiny_processor, max_length=None, on_overflow="skip")
    assert rows == [record_to_row(record, tiny_processor)] * 2


# --------------------------------------------------------------------------------------------------- TRL format


def test_read_trl_dataset_with_pil_images():
    datasets = pytest.importorskip("datasets")
    red, blue = Image.new("RGB", (8, 6), (200, 0, 0)), Image.new("RGB", (5, 7), (0, 0, 200))
    user = {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}
    rows = [
        {  # conversational, explicit prompt, two images, a system message
            "prompt": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user],
            "chosen": [{"role": "assistant", "content": "No."}],
            "rejected": [{"role": "assistant", "content": "Yes."}],
            "images": [red, blue],
        },
        {  # conversational, no images, text-only parts
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
            "images": [],
        },
    ]
    ds = datasets.Dataset.from_list(rows)
    records = read_preference_dataset(ds, name="vqa")
    first, second = records
    assert (first.source, first.line, first.position, first.file) == ("vqa", 0, Position.ROW, "<vqa>")
    assert first.question == "<image>\n<image>\nSame?"
    assert (first.system, first.chosen, first.rejected) == ("Be brief.", "No.", "Yes.")
    assert first.image_paths == [] and [im.size for im in first.images] == [(8, 6), (5, 7)]
    assert first.images[0].getpixel((0, 0)) == (200, 0, 0)
    assert first.max_dynamic_patch is None and first.tiles_per_image is None
    assert (second.question, second.chosen, second.rejected, second.n_images) == ("2+2?", "4", "5", 0)
    assert validate_records(records) == []

    implicit = datasets.Dataset.from_list([{  # implicit prompt: chosen/rejected hold the whole conversation
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
    }])  # fmt: skip
    (record,) = read_preference_dataset(implicit)
    assert (record.question, record.chosen, record.rejected) == ("Hi?", "Hello.", "Go away.")

    with pytest.raises(DataValidationError, match=r"^vqa: missing column 'rejected'; expected TRL preference"):
        read_preference_dataset(datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}]), name="vqa")


def test_read_trl_jsonl_file_with_image_paths(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", mode="RGBA", color=(1, 2, 3, 4))
    png(tmp_path / "elsewhere.png")
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Describe.", "chosen": "A red box.", "rejected": "A cat.", "images": ["imgs/a.png"]},
        {"prompt": "<image> vs <image>", "chosen": "x", "rejected": "y", "images": ["imgs/a.png", "imgs/b.png"]},
        {"prompt": "Text only", "chosen": "yes", "rejected": "no"},
        "{oops",
        {"prompt": "Far", "chosen": "x", "rejected": "y", "image": str(tmp_path / "elsewhere.png")},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}], "chosen": "x", "rejected": "y"},
    ])  # fmt: skip
    records = read_preference_dataset(path)
    imgs = (tmp_path / "imgs").resolve()
    assert [r.line for r in records] == [1, 2, 3, 4, 5, 6] and records[0].source == "prefs"
    assert records[0].question == "<image>\nDescribe." and records[0].image_paths == [str(imgs / "a.png")]
    assert records[1].question == "<image> vs <image>"
    assert records[1].image_paths == [str(imgs / "a.png"), str(imgs / "b.png")]
    assert records[2].image_paths == [] and records[2].question == "Text only"
    # without image_root, relative paths resolve against the file's folder and nothing is contained
    assert records[4].image_paths == [str((tmp_path / "elsewhere.png").resolve())]
    file = str(path.resolve())
    assert [str(p) for p in validate_records(records)] == [
        f"{file}:4: record: malformed JSON: Expecting property name enclosed in double quotes (column 2)",
        f"{file}:6: prompt: expected one user message (and an optional system message), got roles "
        "['user', 'assistant', 'user']; multi-turn prompts are not supported",
    ]

    # with image_root every path must stay inside it
    contained = read_preference_dataset(path, image_root=tmp_path / "imgs")
    problems = [p for p in validate_records(contained) if p.line == 5]
    assert [str(p) for p in problems] == [
        f"{file}:5: image: resolves to {(tmp_path / 'elsewhere.png').resolve()}, outside the image root {imgs}"
    ]


def test_read_trl_parquet_round_trip(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    ds = datasets.Dataset.from_list([
        {"prompt": "Color?", "chosen": "red", "rejected": "blue", "images": [Image.new("RGB", (4, 4), (255, 0, 0))]},
        {"prompt": "Color?", "chosen": "", "rejected": "blue", "images": [Image.new("RGB", (4, 4), (0, 0, 255))]},
    ])  # fmt: skip
    ds.to_parquet(tmp_path / "prefs.parquet")
    records = read_preference_dataset(tmp_path / "prefs.parquet")
    assert records[0].question == "<image>\nColor?" and records[0].images[0].getpixel((0, 0)) == (255, 0, 0)
    file = str((tmp_path / "prefs.parquet").resolve())
    assert [str(p) for p in validate_records(records)] == [f"{file}[1]: chosen: empty (only whitespace)"]


# ------------------------------------------------------------------------------------------------------ images


def test_load_image(tmp_path):
    image = load_image(png(tmp_path / "rgba.png", mode="RGBA", color=(10, 20, 30, 40)))
    assert image.mode == "RGB" and image.size == (8, 6) and image.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ImageLoadError, match=f"^image not found: {tmp_path / 'none.png'}$"):
        load_image(tmp_path / "none.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match=r"^cannot read image .*bad\.png: cannot identify image file"):
        load_image(tmp_path / "bad.png")


def test_is_mmpr_meta_knows_a_meta_json_by_its_entries(tmp_path):
    from rlhf.data.mmpr import is_mmpr_meta

    def write(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    assert is_mmpr_meta(write("m.json", '{"a": {"annotation": "a.jsonl", "root": "img"}}'))
    assert not is_mmpr_meta(write("pairs.json", '[{"prompt": "p", "chosen": "c", "rejected": "r"}]'))  # TRL data
    assert not is_mmpr_meta(write("n.json", '{"a": {"root": "img"}}'))  # an entry without its annotation
    assert not is_mmpr_meta(write("m.jsonl", '{"a": {"annotation": "a.jsonl"}}'))  # not a .json file
    assert not is_mmpr_meta(write("bad.json", "{"))
    assert not is_mmpr_meta(tmp_path / "missing.json")
