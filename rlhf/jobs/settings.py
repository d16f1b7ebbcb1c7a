"""What every job that runs through `rlhf.jobs.runner` shares beyond the runner: its settings and the checks that
make resuming safe.

- `RunnerArguments`: where a job's items run and whether it resumes (`--workers`, `--executor`, `--ray_address`,
  `--cpus_per_worker`, `--gpus_per_worker`, `--resume`, `--progress`). The data jobs' `JobArguments` extends it
  with their output folder, sharding and batch size; `mmalign bon` parses it beside its `ScorerArguments`. One
  class, so a flag means the same and is checked the same in every job; `run_kwargs()` hands it to `run_job`.
- `check_settings`: a resumed job refuses (one line) a folder whose records were made with other settings, and
  records the settings of a new one.
- `refuse_changed` (with `content_sha`): a resumed job refuses (one line) a finished record whose input item
  changed under the same id, since the record was made for other content.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..args import SettingError
from .runner import Executor, JobInputError, ResultStore


@dataclass
class RunnerArguments:
    """How a job's items are run: local processes or Ray actors, each holding its own model, and resuming."""

    workers: int = field(default=1, metadata={
        "help": "Workers, each loading its own model (a rollout backend, a PRM): local processes, or Ray actors "
                "with --executor ray."})
    resume: bool = field(default=True, metadata={"help": "Skip finished items (false: move old files to *.bak)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    executor: str = field(default=Executor.LOCAL.value, metadata={
        "help": "Where the workers run: local (this machine's processes) or ray (Ray actors; pip install -e "
                "'.[ray]'). Same files, same records."})
    ray_address: str | None = field(default=None, metadata={
        "help": "With --executor ray: none for a local Ray started by the job, 'auto' for the running cluster, or "
                "an address (ray://host:10001)."})
    cpus_per_worker: float = field(default=1.0, metadata={"help": "With --executor ray: CPUs of each actor."})
    gpus_per_worker: float = field(default=0.0, metadata={
        "help": "With --executor ray: GPUs of each actor (a vLLM engine's tensor_parallel_size)."})

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise SettingError("workers", "an integer >= 1", self.workers)

    @property
    def backend_in_driver(self) -> bool:
        """True when the job's one model (backend, scorer) runs in this process (a single local worker); else each
        worker builds its own and this process only checks or needs none."""
        return self.executor == Executor.LOCAL and self.workers == 1

    def ray_options(self):
        """The executor's placement settings, or None for the local executor."""
        if self.executor != Executor.RAY:
            return None
        from .ray_executor import RayOptions

        return RayOptions(address=self.ray_address, cpus_per_worker=self.cpus_per_worker,
                          gpus_per_worker=self.gpus_per_worker)

    def run_kwargs(self) -> dict[str, Any]:
        """These settings as `run_job` keywords."""
        return {"resume": self.resume, "workers": self.workers, "progress": self.progress,
                "executor": self.executor, "ray_options": self.ray_options()}


def check_settings(output_dir: str | Path, file_name: str, settings: dict[str, Any], resume: bool) -> None:
    """Refuse (one line) to resume a job folder whose records were made with other settings; else record them."""
    path = Path(output_dir) / file_name
    if resume and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as err:
            raise JobInputError(f"{path}: the settings of the earlier run are not readable JSON ({err}); restore the "
                                "file, or use a new output_dir, or --resume false to move the old records aside") \
                from None
        if not isinstance(old, dict):
            raise JobInputError(f"{path}: expected a JSON object of settings (an earlier run's), got "
                                f"{type(old).__name__}; use a new output_dir, or --resume false")
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise JobInputError(f"{path}: this folder holds records made with other settings ({', '.join(changed)}); "
                                "use a new output_dir, or --resume false to move the old records aside")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def content_sha(value: Any) -> str:
    """A short fingerprint of an input item's content (its JSON, keys sorted)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def refuse_changed(output_dir: str | Path, name: str, current: dict[str, Any],
                   recorded: Callable[[dict, str], dict | None], *, shard_index: int | None = None) -> None:
    """One JobInputError when a finished record of job `name` no longer matches its input item: `current` maps
    ids to what the input holds now, `recorded(record, id)` gives the same from a record (None: cannot tell, e.g.
    a record made before fingerprints). `shard_index`: the shard file this run writes (None: the merged file). The
    error names the first changed id, its changed fields and the count."""
    if not (Path(output_dir) / f"{name}.jsonl").is_file() and shard_index is None:
        return
    changed = []
    with ResultStore(output_dir, name, shard_index) as store:
        for record in store.records():
            item_id = str(record.get("id"))
            if item_id not in current:
                continue
            old, new = recorded(record, item_id), current[item_id]
            if old is None or old == new:
                continue
            fields = sorted(k for k in new if old.get(k) != new[k]) if isinstance(new, dict) else ["content"]
            changed.append((item_id, fields))
    if changed:
        item_id, fields = changed[0]
        raise JobInputError(f"{store.path}: id {item_id!r}: the input item changed since its record was made "
                            f"({', '.join(fields)}; {len(changed)} changed item(s) in all); use a new output_dir, "
                            "or --resume false to move the old records aside")
