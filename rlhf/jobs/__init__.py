"""The shared layer of mmalign's resumable jobs: what the data jobs (`rollout`, `pairs`, `label-steps`) and the
PRM's `bon` scoring job run through.

- `runner`: `run_job`, the resumable, shardable runner (append-only JSON lines with fsync, resume by id,
  failures.jsonl, per-item seeds, local worker processes);
- `ray_executor`: its `executor="ray"`, the same files and records from Ray actors;
- `settings`: `RunnerArguments` (`--workers`, `--executor`, `--ray_address`, `--cpus_per_worker`,
  `--gpus_per_worker`, `--resume`, `--progress`: one class, one meaning and one validation for every job that runs
  through the runner) and the checks that make resuming safe (`check_settings`, `refuse_changed`).

Why here and not in `data_gen`. The packages import downwards only: `data_gen` -> `reward` -> `rlhf` (a rollout
judges answers with `reward.verify`; the PRM never needs a rollout backend). The runner was written for the data
jobs and lived in `data_gen`, but nothing in it is about data generation: it imports only the standard library,
tqdm, `rlhf.errors` and (with Ray) itself. Once `reward.bon_job` scores through it, it has to sit below `reward`;
`rlhf` is that layer (it already holds what every job shares: `rlhf.args`, `rlhf.errors`, `rlhf.cli`). Keeping the
runner in `data_gen` would have meant either `reward` importing `data_gen` (a cycle: `data_gen` imports `reward`)
or the scoring job moving out of `reward` into `data_gen`, beside the backends it does not use. A new top-level
package would have been a fourth package to install and document for three modules. This package imports nothing
heavy: `rlhf/__init__` loads torch and TRL lazily, and Ray is imported only when a job runs with executor="ray".
"""
