"""The resumable job runner: seeds, sharding, commits, torn lines, resume, failures, fatal stops, worker processes,
and SIGKILL at random moments followed by resumes, which must end with exactly the output of an uninterrupted run."""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.jobs.runner import (
    Failure,
    FatalJobError,
    JobInputError,
    JobSummary,
    ResultStore,
    item_seed,
    merge,
    run_job,
    shard_of,
)


def make_items(n: int) -> list[dict]:
    return [{"id": f"q{i:03d}", "x": i} for i in range(n)]


def square(batch: list[dict], *, fail_every: int = 0, boom: tuple[str, ...] = ()) -> list:
    """x -> {"y": x * x, "num_generated_tokens": x % 5}; x % fail_every == 0 -> Failure; a batch holding an id
    in `boom` raises. Top-level, so functools.partial(square, ...) pickles for worker processes."""
    if any(item["id"] in boom for item in batch):
        raise ValueError("boom\n  in the second line")
    out = []
    for item in batch:
        if fail_every and item["x"] % fail_every == 0:
            out.append(Failure(item["id"], f"x={item['x']} is unlucky"))
        else:
            out.append({"id": item["id"], "y": item["x"] ** 2, "num_generated_tokens": item["x"] % 5})
    return out


class Counting:
    """Wraps a process_fn and records the ids it was handed, batch by batch."""

    def __init__(self, fn=square, **kwargs):
        self.fn = functools.partial(fn, **kwargs)
        self.batches: list[list[str]] = []

    def __call__(self, batch):
        self.batches.append([item["id"] for item in batch])
        return self.fn(batch)

    @property
    def ids(self) -> list[str]:
        return [i for batch in self.batches for i in batch]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_record(x: int) -> dict:
    return {"id": f"q{x:03d}", "y": x * x, "num_generated_tokens": x % 5}


# ---------------------------------------------------------------------------------------------------- seeds, shards


def test_item_seed_is_a_fixed_63_bit_value_in_every_process():
    # Computed once with blake2b and hard-coded: any change to the hashing breaks reproducibility of old jobs.
    assert item_seed(1234, "q-0001") == 1605966503328896867
    assert item_seed(0, "a", 3) == 3344397807412153911
    assert item_seed(0, "a", 3) != item_seed(0, "a", 4) != item_seed(0, "a") != item_seed(1, "a")
    assert item_seed(5, 7) == item_seed(5, "7")  # ids compare as strings everywhere
    assert all(0 <= item_seed(s, f"id{s}") < 2**63 for s in range(200))
    # Another interpreter with another str hash seed gives the same value (Python's hash() would not).
    code = "from rlhf.jobs.runner import item_seed; print(item_seed(1234, 'q-0001'))"
    env = {**os.environ, "PYTHONHASHSEED": "987"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1605966503328896867"
    with pytest.raises(JobInputError, match="item_seed: extra values must be plain JSON values"):
        item_seed(0, "a", object())


def shard_ids(items: list[dict], num_shards: int, shard_index: int, folder: Path) -> list[str]:
    """The ids `run_job` processes as shard `shard_index` of `num_shards`, in the order it commits them."""
    run_job(items, square, folder, name="squares", num_shards=num_shards, shard_index=shard_index, progress=False)
    path = folder / ("squares.jsonl" if num_shards == 1 else f"squares.shard{shard_index}.jsonl")
    return [r["id"] for r in lines(path)]


def test_shards_are_disjoint_covering_and_do_not_move_when_items_are_added(tmp_path):
    items = make_items(200)
    by_id = {item["id"]: item for item in make_items(300)}
    shards = [[by_id[i] for i in shard_ids(items, 4, k, tmp_path / "200")] for k in range(4)]
    ids = [{item["id"] for item in shard} for shard in shards]
    assert sum(len(s) for s in ids) == 200 and set().union(*ids) == {item["id"] for item in items}
    assert all(len(s) >= 30 for s in ids)  # blake2b spreads 200 ids over 4 shards: 50 expected each
    for shard in shards:  # input order is kept inside a shard
        assert [item["x"] for item in shard] == sorted(item["x"] for item in shard)
    # Assignment by a hash of the id, hard-coded once: not by position, so growing the input moves nothing.
    assert [shard_of(f"q{i:03d}", 4) for i in range(8)] == [shard_of(item["id"], 4) for item in items[:8]]
    grown = make_items(300)
    for k in range(4):
        assert [by_id[i] for i in shard_ids(grown, 4, k, tmp_path / "300") if by_id[i]["x"] < 200] == shards[k]
    assert shard_ids(items, 1, 0, tmp_path / "one") == [item["id"] for item in items]


@pytest.mark.parametrize(("num_shards", "shard_index", "message"), [
    (4, 4, "shard_index must be in 0..3 for num_shards=4, got 4"),
    (4, -1, "shard_index must be in 0..3 for num_shards=4, got -1"),
    (0, 0, "num_shards must be >= 1, got 0"),
])
def test_shard_arguments_are_checked(tmp_path, num_shards, shard_index, message):
    with pytest.raises(JobInputError) as err:
        run_job(make_items(3), square, tmp_path, name="squares", num_shards=num_shards, shard_index=shard_index,
                progress=False)
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------------- resume, failures


def test_resume_skips_done_items(tmp_path):
    items = make_items(10)
    first = Counting()
    summary = run_job(items[:6], first, tmp_path, name="squares", batch_size=4, progress=False)
    assert first.batches == [["q000", "q001", "q002", "q003"], ["q004", "q005"]]
    assert (summary.total, summary.skipped_done, summary.processed, summary.failed) == (6, 0, 6, 0)

    second = Counting()
    summary = run_job(items, second, tmp_path, name="squares", batch_size=4, progress=False)
    assert second.ids == ["q006", "q007", "q008", "q009"]  # only the new items
    assert (summary.total, summary.skipped_done, summary.processed, summary.failed) == (10, 6, 4, 0)
    assert summary.generated_tokens == 6 % 5 + 7 % 5 + 8 % 5 + 9 % 5 == 10
    assert lines(tmp_path / "squares.jsonl") == [expected_record(x) for x in range(10)]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert {k: written[k] for k in ("total", "skipped_done", "processed", "generated_tokens", "name")} == {
        "total": 10, "skipped_done": 6, "processed": 4, "generated_tokens": 10, "name": "squares"}

    third = Counting()
    summary = run_job(items, third, tmp_path, name="squares", progress=False)
    assert third.ids == [] and (summary.skipped_done, summary.processed) == (10, 0)
    assert (tmp_path / "failures.jsonl").read_text() == ""


def test_failed_items_are_retried_and_a_success_supersedes_the_failure(tmp_path):
    items = make_items(9)
    # Run 1, batches of 3: [0 1 2] [3 4 5] [6 7 8]. The batch holding q005 raises, so q003-q005 fail with the
    # exception's message on one line; x = 0 and 8 (x % 4 == 0 outside that batch) come back as Failure.
    summary = run_job(items, functools.partial(square, fail_every=4, boom=("q005",)), tmp_path, name="squares",
                      batch_size=3, progress=False)
    assert (summary.processed, summary.succeeded, summary.failed) == (9, 4, 5)
    boom = "ValueError: boom in the second line"
    assert lines(tmp_path / "failures.jsonl") == [
        {"id": "q000", "reason": "x=0 is unlucky"}, {"id": "q003", "reason": boom}, {"id": "q004", "reason": boom},
        {"id": "q005", "reason": boom}, {"id": "q008", "reason": "x=8 is unlucky"}]
    assert [r["id"] for r in lines(tmp_path / "squares.jsonl")] == ["q001", "q002", "q006", "q007"]

    # Run 2 retries exactly the failed ids, in input order; q000 and q008 (x % 8 == 0) fail again.
    second = Counting(fail_every=8)
    summary = run_job(items, second, tmp_path, name="squares", batch_size=3, progress=False)
    assert second.batches == [["q000", "q003", "q004"], ["q005", "q008"]]
    assert (summary.skipped_done, summary.succeeded, summary.failed) == (4, 3, 2)
    assert lines(tmp_path / "failures.jsonl") == [
        {"id": "q000", "reason": "x=0 is unlucky"}, {"id": "q008", "reason": "x=8 is unlucky"}]
    with ResultStore(tmp_path, "squares") as store:
        assert store.failed_ids() == {"q000", "q008"}
        assert store.failures() == {"q000": "x=0 is unlucky", "q008": "x=8 is unlucky"}

    # Run 3: everything succeeds; the output is in input order and no failure is left.
    third = Counting()
    run_job(items, third, tmp_path, name="squares", batch_size=3, progress=False)
    assert third.ids == ["q000", "q008"]
    assert lines(tmp_path / "squares.jsonl") == [expected_record(x) for x in range(9)]
    assert (tmp_path / "failures.jsonl").read_text() == ""
    with ResultStore(tmp_path, "squares") as store:
        assert store.failed_ids() == set() and len(store.done_ids()) == 9
        assert list(store.records()) == [expected_record(x) for x in range(9)]


def test_outcomes_are_committed_as_they_come_and_missing_ones_fail(tmp_path):
    def two_then_raise(batch):  # a generator: the first two outcomes are committed before the error
        for item in batch[:2]:
            yield {"id": item["id"], "y": 0}
        raise RuntimeError("backend hung up")

    run_job(make_items(4), two_then_raise, tmp_path / "gen", name="squares", batch_size=4, progress=False)
    assert [r["id"] for r in lines(tmp_path / "gen" / "squares.jsonl")] == ["q000", "q001"]
    assert lines(tmp_path / "gen" / "failures.jsonl") == [
        {"id": "q002", "reason": "RuntimeError: backend hung up"},
        {"id": "q003", "reason": "RuntimeError: backend hung up"}]

    def first_only(batch):
        return [{"id": batch[0]["id"], "y": 0}]

    summary = run_job(make_items(3), first_only, tmp_path / "short", name="squares", batch_size=3, progress=False)
    assert (summary.succeeded, summary.failed) == (1, 2)
    assert [f["reason"] for f in lines(tmp_path / "short" / "failures.jsonl")] == [
        "process_fn returned no outcome for this item"] * 2


def test_torn_last_line_is_truncated_logged_and_redone(tmp_path, caplog):
    good = b'{"id": "q000", "y": 0, "num_generated_tokens": 0}\n{"id": "q001", "y": 1, "num_generated_tokens": 1}\n'
    path = tmp_path / "squares.jsonl"
    path.write_bytes(good + b'{"id": "q002", "y": 4, "num_gen')  # a kill in the middle of the third write
    with caplog.at_level(logging.WARNING, logger="rlhf.jobs.runner"):
        with ResultStore(tmp_path, "squares") as store:
            assert store.done_ids() == {"q000", "q001"}
            assert [r["id"] for r in store.records()] == ["q000", "q001"]
    assert path.read_bytes() == good
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:3: removed a torn last line (31 bytes, no newline) left by an interrupted write"]

    counting = Counting()
    run_job(make_items(3), counting, tmp_path, name="squares", progress=False)
    assert counting.ids == ["q002"]
    assert lines(path) == [expected_record(x) for x in range(3)]


def test_unreadable_last_line_with_newline_is_torn_but_one_in_the_middle_is_an_error(tmp_path):
    good = b'{"id": "q000", "y": 0}\n'
    path = tmp_path / "squares.jsonl"
    path.write_bytes(good + b"\x00" * 20 + b"\n")  # a file system that kept the size but not the data
    with ResultStore(tmp_path, "squares") as store:
        assert store.done_ids() == {"q000"}
    assert path.read_bytes() == good

    path.write_bytes(good + b'{"id": "q001", "y"\n' + good.replace(b"q000", b"q002"))
    with pytest.raises(JobInputError, match=r"squares\.jsonl:2: not valid JSON .*fix or delete that line"):
        ResultStore(tmp_path, "squares")
    path.write_bytes(good + b'{"y": 1}\n')
    with pytest.raises(JobInputError, match=r"squares\.jsonl:2: no 'id' field"):
        ResultStore(tmp_path, "squares")


# ---------------------------------------------------------------------------------------------------- fatal errors


def test_fatal_job_error_stops_at_once_and_a_rerun_resumes(tmp_path):
    def dies_at_3(batch):
        calls.append(batch[0]["id"])
        if batch[0]["x"] == 3:
            raise FatalJobError("model server is gone")
        return square(batch)

    calls: list[str] = []
    with pytest.raises(FatalJobError) as err:
        run_job(make_items(8), dies_at_3, tmp_path, name="squares", progress=False)
    assert str(err.value) == "squares: stopped at id 'q003': model server is gone"
    assert calls == ["q000", "q001", "q002", "q003"]  # nothing after the fatal item
    assert lines(tmp_path / "squares.jsonl") == [expected_record(x) for x in range(3)]
    assert (tmp_path / "failures.jsonl").read_text() == "" and not (tmp_path / "summary.json").exists()

    calls.clear()
    summary = run_job(make_items(8), Counting(), tmp_path, name="squares", progress=False)
    assert (summary.skipped_done, summary.succeeded) == (3, 5)

    def key_error(batch):
        raise KeyError("image")

    with pytest.raises(FatalJobError, match=r"^other: stopped at id 'q000': KeyError: 'image'$"):
        run_job(make_items(2), key_error, tmp_path, name="other", fatal_errors=(KeyError,), progress=False)


@pytest.mark.parametrize(("process_fn", "message"), [
    (lambda batch: [{"id": "zzz"}], "process_fn returned an outcome for id 'zzz', which is not an unanswered item"),
    (lambda batch: [{"y": 1}], "process_fn returned a record without 'id'"),
    (lambda batch: None, "process_fn must return a list of outcomes"),
    (lambda batch: [{"id": "q000", "y": {1, 2}}], "the record for 'q000' is not plain JSON"),
    (lambda batch: [{"id": "q000", "y": float("nan")}], "the record for 'q000' is not plain JSON"),
    (lambda batch: [{"id": "q000"}, {"id": "q000"}], "which is not an unanswered item"),
])
def test_a_broken_outcome_stops_the_job(tmp_path, process_fn, message):
    with pytest.raises(FatalJobError, match=r"^squares: stopped at id 'q00\d': ") as err:
        run_job(make_items(2), process_fn, tmp_path, name="squares", batch_size=2, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_items_and_arguments_get_one_line(tmp_path):
    cases = [
        (dict(items=[{"id": "a"}, {"id": "b"}, {"id": "a"}]), "items[2]: duplicate id 'a' (first at items[0])"),
        (dict(items=[{"id": "a"}, {"x": 1}]), "items[1]: no 'id' field (every item needs a unique id; "
                                             "id_key= names the field)"),
        (dict(items=[{"id": 1.5}]), "items[0]: 'id' must be a string or an integer, got float"),
        (dict(workers=0), "workers must be an integer >= 1, got 0"),
        (dict(workers=2, num_shards=2), "workers=2 needs num_shards=1"),
        (dict(resume=False, num_shards=2), "resume=False is refused for one shard of a split job"),
        (dict(workers=2, process_fn=lambda batch: []), "workers=2: process_fn must be picklable"),
        (dict(name="failures"), "job name must be letters, digits"),
    ]
    for overrides, message in cases:
        kwargs = dict(items=make_items(2), process_fn=square, output_dir=tmp_path, name="squares", progress=False)
        kwargs.update(overrides)
        with pytest.raises(JobInputError) as err:
            run_job(**kwargs)
        assert str(err.value).startswith(message), (overrides, str(err.value))


def test_a_store_is_written_by_one_process_at_a_time(tmp_path):
    with ResultStore(tmp_path, "squares"):
        with pytest.raises(JobInputError, match=r"squares\.jsonl: in use by another process"):
            run_job(make_items(2), square, tmp_path, name="squares", progress=False)
    run_job(make_items(2), square, tmp_path, name="squares", progress=False)  # released on close


def test_resume_false_moves_old_files_aside(tmp_path):
    run_job(make_items(3), functools.partial(square, fail_every=2), tmp_path, name="squares", progress=False)
    old = (tmp_path / "squares.jsonl").read_bytes()
    counting = Counting()
    run_job(make_items(3), counting, tmp_path, name="squares", resume=False, progress=False)
    assert counting.ids == ["q000", "q001", "q002"]  # started over
    assert (tmp_path / "squares.jsonl.bak").read_bytes() == old
    assert [f["id"] for f in lines(tmp_path / "failures.jsonl.bak")] == ["q000", "q002"]
    with pytest.raises(JobInputError, match=r"squares\.jsonl\.bak: resume=False moves old files aside"):
        run_job(make_items(3), square, tmp_path, name="squares", resume=False, progress=False)


# ---------------------------------------------------------------------------------------------------- shards, workers


def test_shards_run_apart_then_merge_equal_one_run(tmp_path):
    items = make_items(20)
    fn = functools.partial(square, fail_every=6)
    run_job(items, fn, tmp_path / "one", name="squares", progress=False)
    split = tmp_path / "split"
    totals = [run_job(items, fn, split, name="squares", num_shards=3, shard_index=k, progress=False).total
              for k in range(3)]
    assert sum(totals) == 20 and sorted(p.name for p in split.glob("summary*")) == [
        "summary.shard0.json", "summary.shard1.json", "summary.shard2.json"]
    # A line repeated in another shard file (e.g. a rerun with another shard layout) is merged once.
    shard0 = split / "squares.shard0.jsonl"
    (split / "squares.shard1.jsonl").open("ab").write(shard0.read_bytes().splitlines(keepends=True)[0])

    assert merge(split, "squares", order=[item["id"] for item in items]) == 16  # 20 less x = 0, 6, 12, 18
    for stem in ("squares", "failures"):
        assert (split / f"{stem}.jsonl").read_bytes() == (tmp_path / "one" / f"{stem}.jsonl").read_bytes()
    assert not list(split.glob("*.shard*.jsonl"))
    # Without an order, ids sort; with one, it is followed.
    merge(split, "squares", order=[f"q{x:03d}" for x in reversed(range(20))])
    assert [r["id"] for r in lines(split / "squares.jsonl")][:3] == ["q019", "q017", "q016"]
    merge(split, "squares")
    assert [r["id"] for r in lines(split / "squares.jsonl")][:3] == ["q001", "q002", "q003"]


@pytest.mark.slow
def test_two_worker_processes_give_the_output_of_one(tmp_path):
    items = make_items(30)
    # Per-item outcomes only: a batch that raises fails its batch-mates too, and batches differ between layouts.
    fn = functools.partial(square, fail_every=7)
    one = run_job(items, fn, tmp_path / "one", name="squares", batch_size=2, progress=False)
    two = run_job(items, fn, tmp_path / "two", name="squares", batch_size=2, workers=2, progress=False)
    for stem in ("squares", "failures"):
        assert (tmp_path / "two" / f"{stem}.jsonl").read_bytes() == (tmp_path / "one" / f"{stem}.jsonl").read_bytes()
    assert not list((tmp_path / "two").glob("*.shard*"))
    assert len(lines(tmp_path / "two" / "failures.jsonl")) == 5  # x = 0, 7, 14, 21, 28
    assert (two.total, two.processed, two.succeeded, two.failed, two.generated_tokens) == (
        one.total, one.processed, one.succeeded, one.failed, one.generated_tokens) == (30, 30, 25, 5, 50)
    # x % 5 summed over x = 0..29 is 6 * (0+1+2+3+4) = 60, less the failed x: 0, 7 (2), 14 (4), 21 (1), 28 (3) -> 50


def test_summary_line():
    summary = JobSummary(total=100, skipped_done=40, processed=60, succeeded=58, failed=2, seconds=12.0,
                         generated_tokens=24000, name="rollouts")
    assert summary.summary_line() == (
        "rollouts: 100 items, 40 already done, 60 processed (58 succeeded, 2 failed) in 12.0 s, 5.0 items/s, "
        "24000 generated tokens (2000 tokens/s); failed items are retried on the next run")


# ---------------------------------------------------------------------------------------------------- SIGKILL

KILLED_JOB = '''
import sys
import time

from rlhf.jobs.runner import Failure, item_seed, run_job


def slow(batch):
    out = []
    for item in batch:
        time.sleep(0.005)
        seed = item_seed(7, item["id"])
        if seed % 11 == 0:
            out.append(Failure(item["id"], f"seed {seed} is unlucky"))
        else:
            out.append({"id": item["id"], "value": seed % 1000, "num_generated_tokens": seed % 50})
    return out


if __name__ == "__main__":
    out_dir, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    items = [{"id": f"item-{i:04d}"} for i in range(n)]
    print(run_job(items, slow, out_dir, name="kills", workers=workers, batch_size=4, progress=False).summary_line())
'''


def _committed_lines(folder: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in folder.glob("*.jsonl")) if folder.exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    """Five SIGKILLs of the whole process group, each a seeded random 0-150 ms after the run's first new commit
    (rounds alternate 1 and 2 worker processes, so shard files and the merged file mix), then a run to the end:
    the output equals an uninterrupted run byte for byte, and no round lost an id an earlier one had finished.
    An item takes at least 5 ms, so five rounds finish at most 30 + 60 + 30 + 60 + 30 < 300 items: every kill
    lands mid-job."""
    script = tmp_path / "killed_job.py"
    script.write_text(KILLED_JOB)
    n = 300
    env = {**os.environ, "TQDM_DISABLE": "1"}

    def start(folder: Path, workers: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(folder), str(n), str(workers)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    reference = tmp_path / "reference"
    proc = start(reference, 1)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()

    killed = tmp_path / "killed"
    rng = random.Random(20240605)
    done: set[str] = set()
    for round_ in range(5):
        before = _committed_lines(killed)
        proc = start(killed, 1 + round_ % 2)
        deadline = time.monotonic() + 30
        while _committed_lines(killed) <= before:  # wait for the job to commit something, then a random moment
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL  # killed mid-job, not finished
        with ResultStore(killed, "kills") as store:  # repairs a torn tail of the merged file, if any
            now = store.done_ids()
        assert done <= now and len(now) < n, f"round {round_}: lost {sorted(done - now)[:5]}"
        done = now

    proc = start(killed, 1)
    assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
    for stem in ("kills", "failures"):
        assert (killed / f"{stem}.jsonl").read_bytes() == (reference / f"{stem}.jsonl").read_bytes()
    assert not list(killed.glob("*.shard*"))
    records = lines(killed / "kills.jsonl")
    failures = lines(killed / "failures.jsonl")
    # Every id exactly once, in input order, with the values item_seed gives in this process too.
    seeds = {f"item-{i:04d}": item_seed(7, f"item-{i:04d}") for i in range(n)}
    assert sorted([r["id"] for r in records] + [f["id"] for f in failures]) == list(seeds)
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)
    assert all(r["value"] == seeds[r["id"]] % 1000 for r in records)
    assert {f["id"] for f in failures} == {i for i, s in seeds.items() if s % 11 == 0}
