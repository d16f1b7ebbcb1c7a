"""The resumable, shardable job runner behind every data job and `mmalign bon`: one input item in, one output
record out. (Why it lives in `rlhf`, below `reward` and `data_gen`: see `rlhf.jobs`.)

A job hands `run_job` its items (dicts with a unique id) and a `process_fn` that turns a batch of items into one
outcome per item: a record dict that carries the item's id, or `Failure(id, reason)`.

    summary = run_job(questions, rollout_batch, "out/rollouts", name="rollouts", batch_size=8, workers=4)
    print(summary.summary_line())

What lands in the output folder (one job per folder):

    rollouts.jsonl            one JSON record per line; in input order once a run ends
    failures.jsonl            {"id": ..., "reason": ...} for every item that still fails
    summary.json              the JobSummary of the last run
    rollouts.shard2.jsonl     written while shard 2 runs (workers > 1, or num_shards > 1 across machines),
    failures.shard2.jsonl     folded into the files above by `merge` (run_job merges by itself unless num_shards > 1)

What a kill (even SIGKILL) can and cannot cost:

- Every outcome is committed on its own: one write() of the full line and its newline, then fsync. A finished
  item is never lost; the item being written when the process dies is redone on the next run.
- A kill in the middle of a write leaves a torn last line. Whoever opens the file for writing truncates it away
  (one log line) and never reads it as a record; an unreadable line anywhere else is an error naming file:line.
- Resuming is the default: an id is done when it has a line in any result file of the job (the merged file or
  any shard file), so a rerun with another number of workers or shards never redoes finished work. Items that
  failed are retried on every run; once an id succeeds, its failure lines are superseded (dropped by `merge`).
- `merge` writes a temporary file and renames it over the old one, so a kill mid-merge loses nothing either; a
  kill between that rename and the removal of the shard files leaves duplicates that the next merge drops.
- A result file is written by one process at a time (an exclusive flock, released by the kernel when the process
  dies): a second run of the same job or shard gets a one-line error instead of interleaving lines.
- `resume=False` moves the job's old files aside to `<file>.bak` and starts over. It refuses (one line) when such
  a `.bak` already exists, so the runner never deletes finished work.

Sharding assigns an item to a shard by a stable hash of its id (`shard_of`), never by its position, so adding items
to the input does not move finished ones. `workers=N > 1` runs N local processes (multiprocessing, 'spawn'
context), process i taking shard i of N, then merges; process_fn must be picklable (a top-level function, a
functools.partial of one, or an instance of a top-level class that loads its model on first call).

`executor="ray"` runs the batches on `workers` Ray actors instead, the driver writing the job's files as a single
process does: the same files, the same guarantees, records equal to a local run's (see `rlhf.jobs.ray_executor`).

process_fn may raise: an exception marks the items of that batch that have no outcome yet as failed, with the
exception's one-line message, and the job goes on. `FatalJobError` (or a type listed in `fatal_errors`) stops the
job at once with one line; everything committed before stays.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import queue as queue_module
import re
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..choices import parse_choice
from ..errors import UserError

logger = logging.getLogger(__name__)

FAILURES_NAME = "failures"  # failures.jsonl / failures.shard{i}.jsonl
SUMMARY_NAME = "summary"  # summary.json / summary.shard{i}.json
TOKENS_KEY = "num_generated_tokens"  # a record field the progress bar and the summary add up
MAX_REASON_CHARS = 2000  # failure reasons are cut to one line of at most this many characters
_SEED_BITS = 63
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_POLL_S = 0.1  # how often the parent of worker processes looks at them when no message comes


class Executor(StrEnum):
    """Where a job's batches run: in this process or local worker processes, or on Ray actors."""

    LOCAL = "local"
    RAY = "ray"


class FatalJobError(UserError):
    """Stops a job at once, reported as one line. Raise it from process_fn for a problem no later item can escape
    (the model server is gone, the disk is full); everything committed before stays and a rerun resumes."""


class JobInputError(UserError, ValueError):
    """Bad items, arguments or job files: one line naming the file (and line) or the item, the field and the
    fix."""


class _Orphaned(Exception):
    """A worker process found its parent gone (killed): it stops quietly, its committed lines stay."""


@dataclass(frozen=True)
class Failure:
    """The outcome of an item that could not be processed; `reason` is kept as one line in failures.jsonl."""

    id: str | int
    reason: str


@dataclass(frozen=True)
class JobSummary:
    """What one run did. `total` counts the items this run covers (this shard's items for num_shards > 1);
    `processed` = `succeeded` + `failed` items handed to process_fn in this run; `generated_tokens` adds up the
    records' `num_generated_tokens`."""

    total: int
    skipped_done: int
    processed: int
    succeeded: int
    failed: int
    seconds: float
    generated_tokens: int = 0
    name: str = ""

    @property
    def items_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary_line(self) -> str:
        """E.g. `rollouts: 100 items, 40 already done, 60 processed (58 succeeded, 2 failed) in 12.0 s, 5.0 items/s`."""
        line = (f"{self.name + ': ' if self.name else ''}{self.total} items, {self.skipped_done} already done, "
                f"{self.processed} processed ({self.succeeded} succeeded, {self.failed} failed) "
                f"in {self.seconds:.1f} s, {self.items_per_s:.1f} items/s")
        if self.generated_tokens:
            line += f", {self.generated_tokens} generated tokens ({self.tokens_per_s:.0f} tokens/s)"
        if self.failed:
            line += "; failed items are retried on the next run"
        return line


# ---------------------------------------------------------------------------------------------------- ids, seeds


def _norm_id(value: Any, where: str, id_key: str) -> str:
    """Ids are compared as strings: 7 and "7" are the same item. bool and empty ids are rejected."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise JobInputError(f"{where}: {id_key!r} must be a string or an integer, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise JobInputError(f"{where}: {id_key!r} is empty; every item needs a unique non-empty id")
    return text


def _item_id(item: Any, id_key: str, where: str) -> str:
    if isinstance(item, Mapping):
        if id_key not in item:
            raise JobInputError(f"{where}: no {id_key!r} field (every item needs a unique id; id_key= names the field)")
        return _norm_id(item[id_key], where, id_key)
    value = getattr(item, id_key, None)
    if value is None:
        raise JobInputError(f"{where}: expected a dict with an {id_key!r} field, got {type(item).__name__}")
    return _norm_id(value, where, id_key)


def _item_ids(items: Sequence[Any], id_key: str) -> list[str]:
    """Every item's id, in input order; a missing, badly typed or repeated id is a one-line error."""
    ids: list[str] = []
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        item_id = _item_id(item, id_key, f"items[{index}]")
        if item_id in first:
            raise JobInputError(f"items[{index}]: duplicate {id_key} {item_id!r} (first at items[{first[item_id]}])")
        first[item_id] = index
        ids.append(item_id)
    return ids


def item_seed(base_seed: int, item_id: str, *extra: Any) -> int:
    """A deterministic seed in [0, 2**63) for one item (and e.g. a sample index in `extra`): blake2b of the JSON
    of `[base_seed, item_id, *extra]`, the same in every process and Python version (never Python's hash())."""
    if isinstance(base_seed, bool) or not isinstance(base_seed, int):
        raise JobInputError(f"item_seed: base_seed must be an integer, got {type(base_seed).__name__}")
    try:
        key = json.dumps([base_seed, _norm_id(item_id, "item_seed", "item_id"), *extra],
                         sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise JobInputError(f"item_seed: extra values must be plain JSON values (str, int, float, list, dict): {err}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=b"mmalign-seed").digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


def shard_of(item_id: str | int, num_shards: int) -> int:
    """The shard (0..num_shards-1) an id belongs to: blake2b of the id, so it depends on nothing else."""
    digest = hashlib.blake2b(str(item_id).encode("utf-8"), digest_size=8, person=b"mmalign-shard").digest()
    return int.from_bytes(digest, "big") % num_shards


def _check_shard(num_shards: int, shard_index: int) -> None:
    for label, value in (("num_shards", num_shards), ("shard_index", shard_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise JobInputError(f"{label} must be an integer, got {value!r}")
    if num_shards < 1:
        raise JobInputError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise JobInputError(f"shard_index must be in 0..{num_shards - 1} for num_shards={num_shards}, "
                            f"got {shard_index}")


# ---------------------------------------------------------------------------------------------------- files


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (FAILURES_NAME, SUMMARY_NAME):
        raise JobInputError(f"job name must be letters, digits, '_', '.' or '-' and not {FAILURES_NAME!r} or "
                            f"{SUMMARY_NAME!r}, got {name!r}")


def _jsonl_path(output_dir: Path, stem: str, shard_index: int | None) -> Path:
    return output_dir / (f"{stem}.jsonl" if shard_index is None else f"{stem}.shard{shard_index}.jsonl")


def _shard_files(output_dir: Path, stem: str) -> list[tuple[int, Path]]:
    """The `{stem}.shard{i}.jsonl` files in the folder, by shard index."""
    pattern = re.compile(re.escape(stem) + r"\.shard(\d+)\.jsonl")
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found)


def _open_locked(path: Path) -> int:
    """Open `path` for appending (creating it) and take its exclusive lock, or raise one line if someone holds it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JobInputError(f"{path}: in use by another process (a run of this job or shard is still going); "
                            "wait for it to end or stop it, then rerun") from None
    return fd


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(fd: int, data: bytes) -> None:
    """One write() of the whole line (a short write, which only a full disk causes, is continued), then fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file, fsync, rename over, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _dumps(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_REASON_CHARS else line[:MAX_REASON_CHARS - 3] + "..."


@dataclass
class _Line:
    id: str
    offset: int
    length: int
    obj: dict | None  # kept only when asked (failure files are small; result files can be large)


def _scan(path: Path, id_key: str, *, repair_fd: int | None = None, keep: bool = False) -> list[_Line]:
    """The committed lines of a JSON lines file. An unreadable last line (no newline, or not JSON: a write cut by a
    kill) is not a record: with `repair_fd` (the file's locked writer) it is truncated away and logged, otherwise
    (another process's file, maybe mid-write) it is skipped. An unreadable line before the last is an error."""
    lines: list[_Line] = []
    torn: tuple[int, int, str] | None = None  # (line number, offset, why) of an unreadable line
    offset = 0
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return lines
    with f:
        for line_no, raw in enumerate(f, 1):
            if torn is not None:
                raise JobInputError(f"{path}:{torn[0]}: {torn[2]}; only a torn last line is repaired automatically, "
                                    "so fix or delete that line")
            start, offset = offset, offset + len(raw)
            if not raw.endswith(b"\n"):
                torn = (line_no, start, "no newline")
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as err:
                torn = (line_no, start, f"not valid JSON ({err})")
                continue
            where = f"{path}:{line_no}"
            if not isinstance(obj, dict):
                raise JobInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if id_key not in obj:
                raise JobInputError(f"{where}: no {id_key!r} field")
            lines.append(_Line(_norm_id(obj[id_key], where, id_key), start, len(raw), obj if keep else None))
    if torn is not None and repair_fd is not None:
        line_no, start, why = torn
        os.ftruncate(repair_fd, start)
        os.fsync(repair_fd)
        logger.warning("%s:%d: removed a torn last line (%d bytes, %s) left by an interrupted write",
                       path, line_no, offset - start, why)
    return lines


def _ordered(present: Iterable[str], order: Iterable[Any] | None) -> list[str]:
    """`present` ids in the given order; ids the order does not name follow, sorted."""
    remaining = set(present)
    out = []
    for raw in order or ():
        item_id = str(raw)
        if item_id in remaining:
            out.append(item_id)
            remaining.discard(item_id)
    return out + sorted(remaining)


class ResultStore:
    """The committed outcomes of job `name` in `output_dir`, written by this process to its own files:
    `{name}.jsonl` and `failures.jsonl`, or `{name}.shard{i}.jsonl` and `failures.shard{i}.jsonl`.

    Opening takes an exclusive lock on the store's own two files and truncates a torn last line from them.
    `done_ids()` and `failed_ids()` look at every result and failure file of the job in the folder (merged and all
    shards), so finished work is found whoever wrote it; `records()` reads this store's own result file. Close the
    store (or use it as a context manager) to release the lock."""

    def __init__(self, output_dir: str | Path, name: str = "results", shard_index: int | None = None, *,
                 id_key: str = "id"):
        _check_name(name)
        if shard_index is not None and (isinstance(shard_index, bool) or not isinstance(shard_index, int)
                                        or shard_index < 0):
            raise JobInputError(f"shard_index must be None or an integer >= 0, got {shard_index!r}")
        self.output_dir = Path(output_dir)
        self.name = name
        self.shard_index = shard_index
        self.id_key = id_key
        self.path = _jsonl_path(self.output_dir, name, shard_index)
        self.failures_path = _jsonl_path(self.output_dir, FAILURES_NAME, shard_index)
        self._fd: int | None = None
        self._failures_fd: int | None = None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self._fd = _open_locked(self.path)
        self._failures_fd = _open_locked(self.failures_path)
        _fsync_dir(self.output_dir)  # the files' names survive a crash too
        own = {self.path: _scan(self.path, self.id_key, repair_fd=self._fd),
               self.failures_path: _scan(self.failures_path, self.id_key, repair_fd=self._failures_fd, keep=True)}
        self._done: set[str] = set()
        for path in self._job_files(self.name):
            self._done.update(line.id for line in (own[path] if path in own else _scan(path, self.id_key)))
        self._failed: dict[str, str] = {}  # id -> latest reason, for ids not done
        for path in self._job_files(FAILURES_NAME):
            for line in own[path] if path in own else _scan(path, self.id_key, keep=True):
                self._failed[line.id] = str(line.obj.get("reason", ""))
        for item_id in self._done:
            self._failed.pop(item_id, None)

    def _job_files(self, stem: str) -> list[Path]:
        """The merged file and every shard file of `stem`, merged first; this store's own file is among them."""
        paths = [_jsonl_path(self.output_dir, stem, None)] + [p for _, p in _shard_files(self.output_dir, stem)]
        return [p for p in paths if p.exists()]

    def close(self) -> None:
        for attr in ("_fd", "_failures_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)  # releases the lock
                setattr(self, attr, None)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done_ids(self) -> set[str]:
        """Ids (as strings) with a result line in any result file of this job."""
        return set(self._done)

    def failed_ids(self) -> set[str]:
        """Ids (as strings) with a failure line and no result line: a later success supersedes a failure."""
        return set(self._failed)

    def failures(self) -> dict[str, str]:
        """id -> latest failure reason, for the ids in `failed_ids()`."""
        return dict(self._failed)

    def records(self) -> Iterator[dict]:
        """The committed records of this store's own result file, in file order."""
        with self.path.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                if raw.strip():
                    yield json.loads(raw)

    def commit(self, outcome: Mapping[str, Any] | Failure) -> None:
        """Append one outcome durably (one write of the full line, then fsync). A record must carry `id_key`; an
        id that is already done is refused. Raises TypeError/ValueError for a record that is not plain JSON."""
        if self._fd is None or self._failures_fd is None:
            raise JobInputError(f"{self.path}: store is closed")
        is_failure = isinstance(outcome, Failure)
        if is_failure:
            raw_id = outcome.id
        elif isinstance(outcome, Mapping) and self.id_key in outcome:
            raw_id = outcome[self.id_key]
        else:
            raise JobInputError(f"{self.path}: an outcome must be a Failure or a dict with an {self.id_key!r} field, "
                                f"got {type(outcome).__name__}")
        item_id = _norm_id(raw_id, f"{self.path}: outcome", self.id_key)
        if item_id in self._done:
            raise JobInputError(f"{self.path}: {self.id_key} {item_id!r} is already done; it is committed once only")
        if is_failure:
            reason = _one_line(outcome.reason)
            _append(self._failures_fd, _dumps({self.id_key: raw_id, "reason": reason}))
            self._failed[item_id] = reason
        else:
            _append(self._fd, _dumps(dict(outcome)))
            self._done.add(item_id)
            self._failed.pop(item_id, None)

    def compact(self, order: Iterable[Any] | None = None, *, remove_shards: bool = True) -> int:
        """Fold every shard file into `{name}.jsonl` and `failures.jsonl` (this store must be the merged one,
        shard_index=None): each id once (the first line found, merged file first, then shards by index), in
        `order` (ids) and then sorted by id; failures keep the latest reason of ids that never succeeded.
        Files are replaced atomically; shard files are removed afterwards when `remove_shards`. No shard file may
        be in use. Returns the number of records."""
        if self.shard_index is not None:
            raise JobInputError(f"{self.path}: only the merged store (shard_index=None) merges shards")
        order = list(order) if order is not None else None
        shards = [p for _, p in _shard_files(self.output_dir, self.name)]
        failure_shards = [p for _, p in _shard_files(self.output_dir, FAILURES_NAME)]
        held: list[int] = []
        try:
            scanned: list[tuple[Path, list[_Line]]] = [(self.path, _scan(self.path, self.id_key))]
            for path in shards:
                held.append(_open_locked(path))
                scanned.append((path, _scan(path, self.id_key, repair_fd=held[-1])))
            first: dict[str, tuple[Path, _Line]] = {}
            for path, lines in scanned:
                for line in lines:
                    first.setdefault(line.id, (path, line))
            target = _ordered(first, order)
            if shards or [line.id for line in scanned[0][1]] != target:
                self._rewrite_results(target, first)

            latest: dict[str, dict] = {}
            for path in [self.failures_path, *failure_shards]:
                repair = None
                if path != self.failures_path:
                    held.append(_open_locked(path))
                    repair = held[-1]
                for line in _scan(path, self.id_key, repair_fd=repair, keep=True):
                    latest[line.id] = line.obj
            failed = _ordered((i for i in latest if i not in first), order)
            data = b"".join(_dumps(latest[i]) for i in failed)
            if data != self.failures_path.read_bytes():
                self.close()
                _replace(self.failures_path, data)
            if self._fd is None:  # a replaced file is a new file: lock it again
                self._open()
            if remove_shards:
                for path in shards + failure_shards:
                    path.unlink()
        finally:
            for fd in held:
                os.close(fd)
        return len(target)

    def _rewrite_results(self, target: list[str], first: dict[str, tuple[Path, _Line]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        handles: dict[Path, Any] = {}
        try:
            with tmp.open("wb") as out:
                for item_id in target:
                    path, line = first[item_id]
                    if path not in handles:
                        handles[path] = path.open("rb")
                    handles[path].seek(line.offset)
                    out.write(handles[path].read(line.length))
                out.flush()
                os.fsync(out.fileno())
        finally:
            for handle in handles.values():
                handle.close()
        self.close()
        os.replace(tmp, self.path)
        _fsync_dir(self.output_dir)


def merge(output_dir: str | Path, name: str = "results", *, order: Iterable[Any] | None = None, id_key: str = "id",
          remove_shards: bool = True) -> int:
    """Fold the shard files of job `name` into `{name}.jsonl` (and `failures.jsonl`): each id once, in `order`
    (e.g. the input ids) and then sorted by id, deterministic whatever the shard layout. Run it after every shard
    of a `num_shards > 1` job has ended; `run_job` merges by itself otherwise. Returns the number of records."""
    with ResultStore(output_dir, name, id_key=id_key) as store:
        return store.compact(order, remove_shards=remove_shards)


def _move_aside(output_dir: Path, name: str) -> None:
    """resume=False: rename every file of the job to `<file>.bak`; refuse if one of those `.bak` files exists."""
    paths = [_jsonl_path(output_dir, stem, None) for stem in (name, FAILURES_NAME)]
    paths += [p for stem in (name, FAILURES_NAME) for _, p in _shard_files(output_dir, stem)]
    paths += [output_dir / f"{SUMMARY_NAME}.json"]
    paths = [p for p in paths if p.exists()]
    for path in paths:
        backup = path.with_name(path.name + ".bak")
        if backup.exists():
            raise JobInputError(f"{backup}: resume=False moves old files aside to *.bak, but this one exists; "
                                "delete it (or resume instead)")
    held: list[int] = []
    try:
        for path in paths:  # none may be in use
            if path.suffix == ".jsonl":
                held.append(_open_locked(path))
        for path in paths:
            os.rename(path, path.with_name(path.name + ".bak"))
    finally:
        for fd in held:
            os.close(fd)
    if paths:
        _fsync_dir(output_dir)
        logger.info("%s: resume=False: moved %d old files aside to *.bak", output_dir, len(paths))


# ---------------------------------------------------------------------------------------------------- running


@dataclass
class _Counts:
    total: int = 0
    skipped_done: int = 0
    succeeded: int = 0
    failed: int = 0
    generated_tokens: int = 0


class _Progress:
    """One tqdm bar: items done (those finished in earlier runs count from the start), items/s, and in the postfix
    failures and generated tokens/s."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        off = {} if enabled else {"disable": True}  # when enabled, TQDM_DISABLE=1 in the environment still wins
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="item", dynamic_ncols=True, **off)
        self.start = time.monotonic()
        self.failed = 0
        self.tokens = 0

    def advance(self, succeeded: int, failed: int, tokens: int) -> None:
        self.failed += failed
        self.tokens += tokens
        postfix = []
        if self.failed:
            postfix.append(f"failed={self.failed}")
        if self.tokens:
            postfix.append(f"{self.tokens / max(time.monotonic() - self.start, 1e-9):.0f} tok/s")
        if postfix:
            self.bar.set_postfix_str(", ".join(postfix), refresh=False)
        self.bar.update(succeeded + failed)

    def close(self) -> None:
        self.bar.close()


def _pending(store: ResultStore, mine: list[tuple[str, Any]]) -> tuple[list[tuple[str, Any]], _Counts]:
    done = store.done_ids()
    pending = [(item_id, item) for item_id, item in mine if item_id not in done]
    return pending, _Counts(total=len(mine), skipped_done=len(mine) - len(pending))


def _run_pending(store: ResultStore, pending: list[tuple[str, Any]], counts: _Counts, process_fn: Callable,
                 *, batch_size: int, fatal: tuple[type[BaseException], ...], report: Callable[[int, int, int], None],
                 parent_pid: int | None = None) -> None:
    for start in range(0, len(pending), batch_size):
        if parent_pid is not None and os.getppid() != parent_pid:
            raise _Orphaned
        _run_batch(store, pending[start:start + batch_size], counts, process_fn, fatal=fatal, report=report)


def _run_batch(store: ResultStore, batch: list[tuple[str, Any]], counts: _Counts, process_fn: Callable, *,
               fatal: tuple[type[BaseException], ...], report: Callable[[int, int, int], None]) -> None:
    """Hand one batch to process_fn and commit each outcome as it comes; items left without one fail."""
    waiting = dict(batch)  # id -> item, not answered yet
    key = store.id_key

    def stop(message: str) -> FatalJobError:
        first = next(iter(waiting), batch[0][0])
        return FatalJobError(_one_line(f"{store.name}: stopped at {key} {first!r}: {message}"))

    def fatal_message(err: BaseException) -> str:
        return str(err) if isinstance(err, FatalJobError) else f"{type(err).__name__}: {err}"

    def commit(outcome: Mapping[str, Any] | Failure, item_id: str) -> None:
        try:
            store.commit(outcome)
        except JobInputError as err:
            raise stop(str(err)) from err
        except (TypeError, ValueError) as err:
            raise stop(f"the record for {item_id!r} is not plain JSON ({err})") from err
        del waiting[item_id]
        if isinstance(outcome, Failure):
            counts.failed += 1
            report(0, 1, 0)
        else:
            tokens = outcome.get(TOKENS_KEY, 0)
            tokens = int(tokens) if isinstance(tokens, (int, float)) and not isinstance(tokens, bool) else 0
            counts.succeeded += 1
            counts.generated_tokens += tokens
            report(1, 0, tokens)

    error: Exception | None = None
    try:
        result = process_fn([item for _, item in batch])
    except fatal as err:
        raise stop(fatal_message(err)) from err
    except Exception as err:
        error, result = err, ()
    if isinstance(result, (Mapping, Failure, str, bytes)) or not isinstance(result, Iterable):
        raise stop(f"process_fn must return a list of outcomes (a record dict or Failure per item), "
                   f"got {type(result).__name__}")
    outcomes = iter(result)
    while error is None:
        try:
            outcome = next(outcomes)
        except StopIteration:
            break
        except fatal as err:
            raise stop(fatal_message(err)) from err
        except Exception as err:
            error = err
            break
        if isinstance(outcome, Failure):
            raw_id = outcome.id
        elif isinstance(outcome, Mapping) and key in outcome:
            raw_id = outcome[key]
        elif isinstance(outcome, Mapping):
            raise stop(f"process_fn returned a record without {key!r}; every record must carry its item's id")
        else:
            raise stop(f"process_fn returned a {type(outcome).__name__}; every outcome must be a record dict "
                       "or a Failure")
        item_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
        if item_id not in waiting:
            raise stop(f"process_fn returned an outcome for {key} {raw_id!r}, which is not an unanswered item "
                       "of its batch")
        commit(outcome, item_id)
    if error is not None:
        logger.debug("%s: process_fn raised for the batch starting at %r", store.name, batch[0][0], exc_info=error)
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        reason = "process_fn returned no outcome for this item"
    for item_id in list(waiting):
        commit(Failure(item_id, reason), item_id)


def _worker_main(shard_index: int, items: list[Any], process_fn: Callable, output_dir: str,
                 name: str, id_key: str, batch_size: int, fatal: tuple[type[BaseException], ...],
                 messages: Any, parent_pid: int) -> None:
    """One worker process: run its shard's items into the shard's files, telling the parent about
    every outcome ("progress") and how it ended ("done" with its counts, or "error" with kind and one line)."""
    def report(succeeded: int, failed: int, tokens: int) -> None:
        messages.put(("progress", shard_index, succeeded, failed, tokens))

    try:
        mine = list(zip(_item_ids(items, id_key), items))
        with ResultStore(output_dir, name, shard_index, id_key=id_key) as store:
            pending, counts = _pending(store, mine)
            _run_pending(store, pending, counts, process_fn, batch_size=batch_size, fatal=fatal, report=report,
                         parent_pid=parent_pid)
        messages.put(("done", shard_index, asdict(counts)))
    except (_Orphaned, KeyboardInterrupt):
        return
    except FatalJobError as err:
        messages.put(("error", shard_index, "fatal", str(err)))
    except UserError as err:
        messages.put(("error", shard_index, "user", str(err)))
    except BaseException as err:  # a bug: the traceback goes to this process's stderr, one line to the parent
        traceback.print_exc()
        messages.put(("error", shard_index, "crash", _one_line(f"{type(err).__name__}: {err}")))


def _run_workers(ids: list[str], items: list[Any], process_fn: Callable, output_dir: Path, *, name: str,
                 id_key: str, workers: int, batch_size: int, fatal: tuple[type[BaseException], ...], desc: str,
                 progress: bool) -> _Counts:
    with ResultStore(output_dir, name, id_key=id_key) as merged:  # held for the whole run: one run at a time
        done = merged.done_ids()
        counts = _Counts(total=len(ids), skipped_done=sum(item_id in done for item_id in ids))
        shards: list[list[Any]] = [[] for _ in range(workers)]
        for item_id, item in zip(ids, items):
            if item_id not in done:
                shards[shard_of(item_id, workers)].append(item)
        ctx = multiprocessing.get_context("spawn")
        messages = ctx.Queue()
        procs = {k: ctx.Process(target=_worker_main, name=f"{name}-shard{k}",
                                args=(k, shards[k], process_fn, str(output_dir), name, id_key, batch_size,
                                      fatal, messages, os.getpid()))
                 for k in range(workers) if shards[k]}
        ended: set[int] = set()
        bar = _Progress(counts.total, counts.skipped_done, desc, progress)
        try:
            for proc in procs.values():
                proc.start()
            while len(ended) < len(procs):
                try:
                    message = messages.get(timeout=_POLL_S)
                except queue_module.Empty:
                    gone = [k for k, p in procs.items() if k not in ended and p.exitcode is not None]
                    if gone:  # its last messages may still be in the pipe: read them before blaming it
                        try:
                            message = messages.get(timeout=1.0)
                        except queue_module.Empty:
                            k = gone[0]
                            raise FatalJobError(f"{name}: worker for shard {k}/{workers} exited with code "
                                                f"{procs[k].exitcode}; finished items are kept, rerun to resume")
                    else:
                        continue
                kind, k, *rest = message
                if kind == "progress":
                    bar.advance(*rest)
                elif kind == "done":
                    ended.add(k)
                    child = _Counts(**rest[0])
                    counts.succeeded += child.succeeded
                    counts.failed += child.failed
                    counts.generated_tokens += child.generated_tokens
                else:
                    error_kind, text = rest
                    if error_kind == "fatal":
                        raise FatalJobError(text)
                    if error_kind == "user":
                        raise JobInputError(text)
                    raise RuntimeError(f"{name}: worker for shard {k}/{workers} crashed: {text} (traceback above)")
        finally:
            bar.close()
            for proc in procs.values():
                if proc.is_alive():
                    proc.terminate()  # committed lines stay; a torn one is repaired on the next open
            for proc in procs.values():
                proc.join()
            messages.close()
        merged.compact(ids)
    return counts


def run_job(items: Iterable[Any], process_fn: Callable[[list[Any]], Iterable[Mapping[str, Any] | Failure]],
            output_dir: str | Path, *, name: str, id_key: str = "id", num_shards: int = 1, shard_index: int = 0,
            resume: bool = True, workers: int = 1, batch_size: int = 1, desc: str | None = None,
            progress: bool = True, fatal_errors: Sequence[type[BaseException]] = (), executor: str = "local",
            ray_options: Any = None) -> JobSummary:
    """Run `process_fn` over the items not done yet, in input order, `batch_size` at a time, committing each
    outcome as it comes; see the module docstring for the files and the guarantees.

    process_fn gets a list of items and returns (or yields) one outcome per item: a record dict with the item's
    `id_key`, or `Failure(id, reason)`. num_shards/shard_index run one shard of a job split across machines (merge
    with `merge` once all have ended); workers > 1 splits this run over local processes and merges by itself.
    resume=False moves the old files aside to *.bak first (refused if a .bak exists, and with num_shards > 1).
    `fatal_errors` adds exception types that stop the job like FatalJobError. executor="ray" runs the batches on
    `workers` Ray actors placed by `ray_options` (a `rlhf.jobs.ray_executor.RayOptions`) with the same files and
    guarantees (see that module). Writes summary.json (summary.shard{i}.json for one shard) and returns the
    JobSummary."""
    _check_name(name)
    _check_shard(num_shards, shard_index)
    parse_choice(Executor, executor, "executor", JobInputError)
    on_ray = executor == Executor.RAY
    if on_ray:
        from .ray_executor import import_ray, run_pending as run_on_ray

        import_ray()  # one line when Ray is not installed, before any work
    for label, value in (("workers", workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JobInputError(f"{label} must be an integer >= 1, got {value!r}")
    if not callable(process_fn):
        raise JobInputError(f"process_fn must be callable, got {type(process_fn).__name__}")
    if workers > 1 and num_shards > 1 and not on_ray:
        raise JobInputError(f"workers={workers} needs num_shards=1: split the job either over machines (num_shards) "
                            "or over local processes (workers)")
    if not resume and num_shards > 1:
        raise JobInputError("resume=False is refused for one shard of a split job (num_shards > 1), since the "
                            "other shards share the folder: move the old files aside yourself")
    fatal = (FatalJobError, *fatal_errors)
    if workers > 1 and not on_ray:  # Ray pickles with cloudpickle, which also takes closures
        try:
            pickle.dumps((process_fn, fatal))
        except Exception as err:
            raise JobInputError(f"workers={workers}: process_fn must be picklable (a top-level function or a "
                                f"functools.partial of one): {_one_line(str(err))}") from None
    items = list(items)
    ids = _item_ids(items, id_key)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    desc = desc or name
    started = time.monotonic()
    if not resume:
        _move_aside(output_dir, name)
    if workers > 1 and not on_ray:
        counts = _run_workers(ids, items, process_fn, output_dir, name=name, id_key=id_key, workers=workers,
                              batch_size=batch_size, fatal=fatal, desc=desc, progress=progress)
    else:
        sharded = num_shards > 1
        mine = [(item_id, item) for item_id, item in zip(ids, items)
                if not sharded or shard_of(item_id, num_shards) == shard_index]
        with ResultStore(output_dir, name, shard_index if sharded else None, id_key=id_key) as store:
            pending, counts = _pending(store, mine)
            bar = _Progress(counts.total, counts.skipped_done, desc, progress)
            try:
                if on_ray:
                    run_on_ray(store, pending, counts, process_fn, workers=workers, batch_size=batch_size,
                               fatal=fatal, report=bar.advance, options=ray_options)
                else:
                    _run_pending(store, pending, counts, process_fn, batch_size=batch_size, fatal=fatal,
                                 report=bar.advance)
            finally:
                bar.close()
            if not sharded:
                store.compact(ids)
    summary = JobSummary(total=counts.total, skipped_done=counts.skipped_done,
                         processed=counts.succeeded + counts.failed, succeeded=counts.succeeded,
                         failed=counts.failed, seconds=time.monotonic() - started,
                         generated_tokens=counts.generated_tokens, name=name)
    summary_file = f"{SUMMARY_NAME}.json" if num_shards == 1 else f"{SUMMARY_NAME}.shard{shard_index}.json"
    _replace(output_dir / summary_file, (json.dumps(asdict(summary), indent=2) + "\n").encode("utf-8"))
    logger.info("%s", summary.summary_line())
    return summary
