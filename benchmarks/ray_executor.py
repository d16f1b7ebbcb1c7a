"""Throughput of the rollout job on the local runner vs 1 and 2 Ray workers, same items, and the Ray overhead.

    python benchmarks/ray_executor.py [--questions 32] [--samples 2] [--max_new_tokens 16] [--batch_size 2]

1. The rollout job (`data_gen.rollout.run`) on the tiny InternVL (`tiny-internvl`, random weights, hf backend on
   CPU), the first `--questions` tile-sum questions, `--samples` samples each, `--max_new_tokens` per sample:
   the local runner in this process with torch's default threads (2 here) and with 1 thread, then `--executor ray`
   with 1 and with 2 actors (1 CPU each, so Ray gives each 1 torch thread). Every run writes a fresh folder; the
   records of all four are compared. A job's seconds include starting its actors, their imports and building the
   model (the local runner imports and builds once in this process, so it gets a warm-up run first, not timed).
   "to 1st record" is the time until the job's first committed record (for Ray: starting the actors, their
   imports, the model); "items/s after" is the rate from then on.
2. 1 and 64 items through a process_fn that does nothing (returns a record per item): what the executor itself
   costs, fixed (the 1-item job: connecting, starting actors) and marginal per item (a remote call per batch and
   the driver's fsynced commit per item).

The Ray session (2 CPUs, no dashboard, 80 MB object store) is started once before the runs; `ray.init` is timed
on its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "recipes" / "data" / "tiny_questions"


def noop(items):
    return [{"id": item["id"]} for item in items]


def rollout(questions: Path, out: Path, executor: str, workers: int, a) -> tuple[float, float]:
    """(seconds of the job, seconds until its first record was committed)."""
    from data_gen.job_common import BackendArguments, JobArguments, SamplingArguments
    from data_gen.rollout import RolloutArguments, run

    first: list[float] = []
    done = threading.Event()

    def watch() -> None:  # the first committed line of the job's result file
        path = out / "rollouts.jsonl"
        while not done.is_set() and not first:
            if path.exists() and path.stat().st_size:
                first.append(time.monotonic())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    started = time.monotonic()
    watcher.start()
    summary = run(RolloutArguments(questions=str(questions), image_root=str(QUESTIONS), num_samples=a.samples),
                  BackendArguments(model="tiny-internvl", backend_kwargs={"device": "cpu", "max_patches": 1}),
                  SamplingArguments(max_new_tokens=a.max_new_tokens, seed=0),
                  JobArguments(output_dir=str(out), batch_size=a.batch_size, progress=False, executor=executor,
                               workers=workers))
    ended = time.monotonic()
    done.set()
    watcher.join()
    assert summary.failed == 0, summary.summary_line()
    return ended - started, (first[0] if first else ended) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=2)
    a = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import ray

    from rlhf.jobs.runner import run_job

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    questions = work / "train.jsonl"
    questions.write_text("\n".join((QUESTIONS / "train.jsonl").read_text().splitlines()[:a.questions]) + "\n")
    print(f"load average at start: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}})
    print(f"ray {ray.__version__}: ray.init {time.monotonic() - started:.1f} s")

    rollout(questions, work / "warmup", "local", 1, a)  # imports and the first model build, not timed
    import torch

    rows = []
    default_threads = torch.get_num_threads()
    for label, executor, workers, threads in (
            (f"local, {default_threads} thr", "local", 1, default_threads), ("local, 1 thread", "local", 1, 1),
            ("ray, 1 worker", "ray", 1, None), ("ray, 2 workers", "ray", 2, None)):
        if threads:
            torch.set_num_threads(threads)
        out = work / label.replace(" ", "").replace(",", "_")
        rows.append((label, *rollout(questions, out, executor, workers, a), out / "rollouts.jsonl"))
    torch.set_num_threads(default_threads)
    same = len({path.read_bytes() for *_, path in rows}) == 1

    n = a.questions
    print(f"\nrollout, tiny model: {n} questions x {a.samples} samples x {a.max_new_tokens} new tokens, batch "
          f"{a.batch_size}; records identical in all four: {same}")
    print(f"{'executor':<16}{'job s':>7}{'items/s':>9}{'vs local':>10}{'s/item over local':>19}"
          f"{'to 1st record s':>17}{'items/s after':>15}")
    base = rows[0][1]
    for label, seconds, first, _ in rows:
        after = (n - 1) / (seconds - first) if seconds > first else float("nan")
        print(f"{label:<16}{seconds:>7.1f}{n / seconds:>9.2f}{base / seconds:>9.2f}x{(seconds - base) / n:>19.3f}"
              f"{first:>17.1f}{after:>15.2f}")

    print(f"\nno-op process_fn (the executor's own cost), batch {a.batch_size}: fixed = the 1-item job, "
          "marginal = (64-item job - 1-item job) / 63")
    print(f"{'executor':<16}{'1 item s':>10}{'64 items s':>12}{'marginal s/item':>17}")
    for label, executor, workers in (("local runner", "local", 1), ("ray, 1 worker", "ray", 1),
                                     ("ray, 2 workers", "ray", 2)):
        times = []
        for count in (1, 64):
            t = time.monotonic()
            run_job([{"id": i} for i in range(count)], noop, work / f"noop{count}_{executor}{workers}", name="noop",
                    executor=executor, workers=workers, batch_size=a.batch_size, progress=False)
            times.append(time.monotonic() - t)
        print(f"{label:<16}{times[0]:>10.3f}{times[1]:>12.3f}{(times[1] - times[0]) / 63:>17.4f}")
    ray.shutdown()
    print(f"\nload average at end: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
