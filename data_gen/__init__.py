"""Data generation: rollouts, preference pairs and Monte Carlo step labels as resumable jobs, and the demo.

- `rollout`, `pairs`, `label_steps`: the `mmalign rollout`, `mmalign pairs` and `mmalign label-steps` jobs;
- `job_common`: what those three share: their settings (`BackendArguments`, `SamplingArguments`, `JobArguments`),
  question reading, the worker base (`BackendWorker`) and the steps that run a job (`run_backend_job`, `job_main`);
- `backends`: the rollout backends (`hf` in process, `vllm` offline, `openai` against a server);
- the jobs run through `rlhf.jobs` (the resumable runner, its Ray executor, the shared `RunnerArguments`), the
  layer below `reward`, so that `mmalign bon` runs through it too;
- `prompts`: the prompt templates of a rollout;
- `demo`: `mmalign demo` and `mmalign demo-sft`, the loop in miniature on the synthetic tile-sum task (its stage
  recipes are package data under `recipes/demo/`).
"""
