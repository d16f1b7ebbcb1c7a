"""`mmalign demo`: the InternVL3 post-training loop in miniature on a CPU, and its pieces.

- `pipeline`: the `mmalign demo` command: every stage in its own folder, skipped on a rerun once finished, each one
  of the project's own jobs with a recipe of `data_gen/recipes/demo/` (package data);
- `sft`: stage 1, `mmalign demo-sft`: supervised warm-up of a random-init tiny InternVL on gold chains of thought;
- `task`: the synthetic tile-sum task (rendered boards, gold solutions, exact step truth);
- `accuracy`: greedy, pass@n and majority@n accuracy of a policy on task items, and where answers first go wrong;
- `evaluate`: the evaluate stage (greedy accuracy, Best-of-k with the PRM, the PRM's step judgements);
- `report`: report.md and the targets met or missed;
- `settings`: the shared constants (item index ranges, the metrics file, the SFT band, the targets).

Imports run one way: `pipeline` -> `evaluate`, `report`, `sft`; `evaluate`, `sft` -> `accuracy` -> `task`; `settings`
imports nothing, so any of them may import it. This file imports none of them.
"""
