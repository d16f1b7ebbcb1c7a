"""`mmalign <job> --config RECIPE.yaml [--field value ...]`: one entry point for every job.

A job's module is imported only when that job runs, so `mmalign --help` stays fast. YAML values are defaults and
command-line flags override them, as with `trl dpo`; every job also runs under `accelerate launch -m rlhf.cli`.
"""

from __future__ import annotations

import importlib
import sys

from .errors import UserError

# job name -> (module:function taking argv, one-line help)
JOBS: dict[str, tuple[str, str]] = {
    "mpo": ("rlhf.mpo_job:main", "train a policy with Mixed Preference Optimization"),
    "prm": ("reward.prm_job:main", "train a VisualPRM-style generative process reward model"),
    "bon": ("reward.bon_job:main", "score N responses per question with a PRM and evaluate Best-of-N"),
    "eval-prm": ("reward.eval_job:main", "step-level macro-F1 of a PRM on VisualProcessBench-format data"),
    "rollout": ("data_gen.rollout:main", "sample chain-of-thought responses and judge their answers"),
    "pairs": ("data_gen.pairs:main", "build MMPR preference pairs from rollouts"),
    "label-steps": ("data_gen.label_steps:main", "Monte Carlo step labels in VisualPRM400K format"),
    "demo": ("data_gen.demo.pipeline:main", "the whole InternVL3 post-training loop in miniature, on a CPU"),
    "demo-sft": ("data_gen.demo.sft:main", "the demo's supervised warm-up of a tiny InternVL on the tile-sum task"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    lines = ["usage: mmalign <job> --config RECIPE.yaml [--field value ...]", "", "jobs:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in JOBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"mmalign: unknown job {job!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = JOBS[job][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return func(rest) or 0
    except UserError as err:  # a user mistake: one line, no traceback
        print(f"mmalign {job}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
