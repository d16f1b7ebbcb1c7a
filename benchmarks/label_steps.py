"""Cost of Monte Carlo step labels: faithful (all continuations) vs adaptive (until the label is certain), and the
hf backend batched vs one request at a time.

    python benchmarks/label_steps.py [--work_dir runs/bench_label_steps] [--policy CKPT] [--sft_steps 1000]
                                     [--questions 8] [--solutions 2] [--continuations 16] [--first_round 2]

A random-weight policy is wrong on nearly every continuation, which makes every step `-` and adaptive look no better
than faithful. So the policy is the tiny InternVL (`rlhf.tiny`, ~1.8M parameters) fine-tuned on the tile-sum task's
gold solutions first (`data_gen.sft.train_sft`: `--sft_steps` AdamW steps of `--sft_batch` items, lr 2e-3,
`--sft_scheduler` after a 5% warm-up; 1000 x 32 takes ~12 CPU-minutes once and is cached in `--work_dir`, so later runs skip it; or give
a trained checkpoint with `--policy`). Its solutions and continuations are then right about half of the time.

1. rollout job: `--solutions` policy solutions for each of `--questions` test items (temperature 1.0, the plain
   prompt the policy was trained with);
2. label-steps job on those solutions in faithful and in adaptive mode, same seeds, `--continuations` per step at
   temperature 1.0, with early stop off (InternVL3 data) and on (the VisualPRM code's default): continuations,
   generated tokens and wall time of each, the share of identical hard labels, and how often the Monte Carlo labels
   agree with the task's exact step truth;
3. hf backend throughput on 64 continuation requests: one `generate` call with `--batch_size` rows vs one call
   per request (items/s, tokens/s), and whether the texts are identical.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="runs/bench_label_steps")
    parser.add_argument("--policy", default=None, help="an InternVL checkpoint folder to use instead of training one")
    parser.add_argument("--sft_steps", type=int, default=1000)
    parser.add_argument("--sft_scheduler", default="cosine", help="transformers scheduler of that SFT run")
    parser.add_argument("--sft_batch", type=int, default=32)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--solutions", type=int, default=2, help="policy solutions per question")
    parser.add_argument("--solution_temperature", type=float, default=1.0,
                        help="temperature of the policy solutions (published: 1.0)")
    parser.add_argument("--continuations", type=int, default=16)
    parser.add_argument("--first_round", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="hf backend rows decoded together")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    from data_gen.backends.base import GenerationRequest, SamplingParams
    from data_gen.label_steps import LabelStepsArguments, continuation_seed, run, step_prefix
    from data_gen.prompts import build_prompt
    from data_gen.rollout import BackendArguments, JobArguments, RolloutArguments, SamplingArguments
    from data_gen.rollout import run as rollout
    from data_gen.sft import train_sft
    from data_gen.task import TileSumTask, step_truth
    from reward.formats import hard_label, read_jsonl, split_steps

    work = Path(args.work_dir)
    start = time.perf_counter()
    policy = Path(args.policy) if args.policy else train_sft(
        work / f"sft{args.sft_steps}x{args.sft_batch}", steps=args.sft_steps, batch_size=args.sft_batch,
        learning_rate=2e-3, lr_scheduler_type=args.sft_scheduler, eval_items=0, save_steps=200,
        logging_steps=100, progress=False)
    sft_s = time.perf_counter() - start
    for name in ("rollouts", "faithful", "adaptive", "faithful_es", "adaptive_es"):  # made afresh on every run
        shutil.rmtree(work / name, ignore_errors=True)
    questions = TileSumTask().write_questions(work / "questions", "test", args.questions)
    backend_args = BackendArguments(model=str(policy), backend_kwargs={"device": "cpu", "batch_size": args.batch_size,
                                                                       "max_patches": 1})

    start = time.perf_counter()
    # the rollout job builds its own hf backend from the checkpoint (and closes it)
    rollout(RolloutArguments(questions=str(questions), num_samples=args.solutions, prompt_template="plain"),
            backend_args,
            SamplingArguments(temperature=args.solution_temperature, top_k=None, max_new_tokens=96, seed=0),
            JobArguments(output_dir=str(work / "rollouts"), batch_size=args.questions, progress=False))
    rollout_s = time.perf_counter() - start
    rollouts = [json.loads(line) for line in (work / "rollouts" / "rollouts.jsonl").read_text().splitlines()]
    values = {r["id"]: r["meta"]["values"] for r in rollouts}
    pass_rate = sum(x["correct"] for r in rollouts for x in r["responses"]) / sum(len(r["responses"]) for r in rollouts)

    backend = backend_args.make()  # one backend for every label-steps run and the throughput test
    sampling = SamplingArguments(temperature=1.0, top_k=None, max_new_tokens=args.max_new_tokens, seed=0)
    runs = {}  # (mode, early_stop) -> (LabelSummary, records, seconds)
    for early_stop in (False, True):
        for mode in ("faithful", "adaptive"):
            out = work / (mode + ("_es" if early_stop else ""))
            label_args = LabelStepsArguments(solutions=str(work / "rollouts" / "rollouts.jsonl"),
                                             solutions_per_question=args.solutions, mode=mode, early_stop=early_stop,
                                             num_continuations=args.continuations, first_round=args.first_round)
            start = time.perf_counter()
            job_summary, summary = run(label_args, backend_args, sampling, JobArguments(
                output_dir=str(out), batch_size=args.questions * args.solutions, progress=False), backend=backend)
            seconds = time.perf_counter() - start
            if job_summary.failed:
                raise SystemExit(f"{out.name}: {job_summary.failed} solutions failed; see {out / 'failures.jsonl'}")
            runs[mode, early_stop] = (summary, read_jsonl(out / "mc.jsonl", "mc"), seconds)

    def labels(mode, early_stop):
        return [hard_label(s.score) for r in runs[mode, early_stop][1] for s in r.steps]

    faithful_records = runs["faithful", False][1]
    truth = [t for r in faithful_records
             for t in step_truth(values[r.meta["question_id"]], [s.step for s in r.steps])]
    agree = sum(t == label for t, label in zip(truth, labels("faithful", False))) / len(truth)

    # throughput: 4 continuation requests per step of the first solutions, 64 in all
    by_id = {q["id"]: q for q in rollouts}
    requests = []
    for r in faithful_records:
        q = by_id[r.meta["question_id"]]
        image = Image.open(Path(q["image_root"]) / q["image"]).convert("RGB")
        steps = split_steps(r.meta["response"], 12)
        for i in range(len(steps)):
            for j in range(4):
                if len(requests) < 64:
                    requests.append(GenerationRequest(
                        id=f"{r.id}/{i}/{j}", prompt=build_prompt(q["question"], "plain"), images=[image],
                        sampling=SamplingParams(temperature=1.0, top_k=None, max_new_tokens=args.max_new_tokens),
                        seed=continuation_seed(0, str(r.id), i, j), assistant_prefix=step_prefix(steps, i)))
    start = time.perf_counter()
    batched = backend.generate(requests)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = [backend.generate([req])[0] for req in requests]
    single_s = time.perf_counter() - start
    tokens = sum(r.num_generated_tokens for r in batched)
    same_texts = sum(a.texts == b.texts for a, b in zip(batched, single))

    trained = (f"the given checkpoint {policy}" if args.policy else
               f"tiny InternVL fine-tuned {args.sft_steps} steps x {args.sft_batch} tile-sum gold solutions "
               f"({sft_s:.0f} s here; cached in {work} after the first run)")
    print(f"\nlabel-steps: policy {trained}; {args.questions} test questions x {args.solutions} policy solutions "
          f"(temperature {args.solution_temperature}, pass rate {pass_rate:.2f}, rollout {rollout_s:.0f} s); "
          f"{args.continuations} continuations per step at temperature 1.0, up to {args.max_new_tokens} new "
          f"tokens; adaptive first round {args.first_round}; CPU, torch threads {torch.get_num_threads()}\n")
    print("| early stop | | faithful | adaptive | faithful / adaptive |")
    print("|---|---|---:|---:|---:|")
    for early_stop in (False, True):
        (f, _, f_s), (a, _, a_s) = runs["faithful", early_stop], runs["adaptive", early_stop]
        same = [x == y for x, y in zip(labels("faithful", early_stop), labels("adaptive", early_stop))]
        rows = [("continuations sampled", f.continuations_sampled, a.continuations_sampled),
                ("generated tokens", f.generated_tokens, a.generated_tokens),
                ("wall s", round(f_s, 1), round(a_s, 1))]
        for name, x, y in rows:
            print(f"| {'on' if early_stop else 'off'} | {name} | {x:,} | {y:,} | {x / y:.2f}x |")
        print(f"| {'on' if early_stop else 'off'} | `+` steps | {100 * f.positive_share:.1f}% "
              f"| {100 * a.positive_share:.1f}% | identical hard labels: {100 * sum(same) / len(same):.1f}% "
              f"of {len(same)} steps |")
    # adaptive pays num_continuations for a `-` step as faithful does, and less for a `+` step: the saving depends on
    # the share of `+` steps. Its measured cost per `+` step gives the ratio at other shares.
    adaptive = [s for r in runs["adaptive", False][1] for s in r.steps]
    plus = [s.num_mc_total for s in adaptive if hard_label(s.score)]
    per_plus = sum(plus) / max(1, len(plus))
    n = args.continuations
    at = ", ".join(f"{share:.0%} `+`: {n / (share * per_plus + (1 - share) * n):.1f}x" for share in (0.5, 0.75, 0.9))
    print(f"\nearly stop off: adaptive draws {per_plus:.2f} continuations per `+` step ({len(plus)} steps) and "
          f"{args.continuations} per `-` step; faithful / adaptive continuations at other shares of `+` steps: {at}")
    print(f"steps (early stop off): {runs['faithful', False][0].steps}; Monte Carlo labels agree with the task's "
          f"exact step truth on {100 * agree:.1f}% of them\n")
    print("| hf backend, 64 continuation requests | wall s | items/s | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, s in ((f"batched ({args.batch_size} rows)", batched_s), ("one request at a time", single_s)):
        print(f"| {name} | {s:.1f} | {len(requests) / s:.1f} | {tokens / s:.0f} |")
    print(f"\nbatched / one at a time: {single_s / batched_s:.1f}x; {tokens} tokens; identical texts "
          f"{same_texts}/{len(requests)}")


if __name__ == "__main__":
    main()
