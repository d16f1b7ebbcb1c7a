"""Cost of Monte Carlo step labels: faithful (all continuations) vs adaptive (until the label is certain) vs search
(the first `-` step under the monotone assumption), on a weak and a competent policy in one run, and the hf backend
batched vs one request at a time.

    python benchmarks/label_steps.py [--work_dir runs/bench_label_steps] [--policies weak competent]
                                     [--sft_steps 1000] [--weak_sft_steps 600] [--policy CKPT] [--weak_policy CKPT]
                                     [--questions 8] [--solutions 2] [--continuations 16] [--first_round 2]

A random-weight policy is wrong on nearly every continuation, which makes every step `-` and adaptive look no better
than faithful. So each policy is the tiny InternVL (`rlhf.tiny`, ~1.8M parameters) fine-tuned on the tile-sum task's
gold solutions first (`data_gen.demo.sft.train_sft`, lr 2e-3 after a 5% warm-up, batches of `--sft_batch`): the competent
one `--sft_steps` steps with a cosine schedule (the demo recipe without its early stop), the weak one
`--weak_sft_steps` steps at a constant rate. Each is cached in `--work_dir` (sft{steps}x{batch}[_constant]), so only
the first run pays it (1000 x 32 takes ~12 CPU-minutes); `--policy` / `--weak_policy` give trained checkpoints
instead. For each policy, with the same seeds:

1. rollout job: `--solutions` policy solutions for each of `--questions` test items (temperature 1.0, the plain
   prompt the policy was trained with);
2. label-steps job on those solutions in faithful, adaptive and search mode, `--continuations` per step at
   temperature 1.0, early stop off (InternVL3 data), and faithful and adaptive again with early stop on (the
   VisualPRM code's default; search labels every step after its first `-` step without sampling either way):
   continuations, generated tokens and wall time, the share of hard labels identical to faithful's (early stop
   off), how many solutions are not monotone under faithful's labels (a `+` step after a `-` step: the search's
   assumption fails) and what search gets right on them, and agreement with the task's exact step truth;
3. (first policy only) hf backend throughput on 64 continuation requests: one `generate` call with `--batch_size`
   rows vs one call per request (items/s, tokens/s), and whether the texts are identical.

`--backend vllm` (a GPU machine; `benchmarks/gpu.py` runs it) labels with vLLM's offline engine instead, once per
`--prefix_caching` setting (the continuations of one solution share the image, the question and the step prefix,
so vLLM's automatic prefix caching can reuse their KV cache): the tables then carry one block per setting, and the
hf throughput part is skipped. vLLM must be able to load the policy checkpoint; `--policy` / `--weak_policy` can
point at a real InternVL3 checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

MODES = ("faithful", "adaptive", "search")


def build_policy(args, name: str) -> tuple[Path, str]:
    """The policy checkpoint of `name` (trained and cached, or the one given) and a line saying what it is."""
    from data_gen.demo.sft import train_sft

    given = args.policy if name == "competent" else args.weak_policy
    if given:
        return Path(given), f"the given checkpoint {given}"
    steps, scheduler = (args.sft_steps, "cosine") if name == "competent" else (args.weak_sft_steps, "constant")
    folder = Path(args.work_dir) / (f"sft{steps}x{args.sft_batch}_{args.layout}{args.min_tiles}-{args.max_tiles}"
                                    + ("" if scheduler == "cosine" else "_constant"))
    start = time.perf_counter()
    from data_gen.demo.task import TileSumTask

    task = TileSumTask(min_tiles=args.min_tiles, max_tiles=args.max_tiles, layout=args.layout)
    policy = train_sft(folder, steps=steps, batch_size=args.sft_batch, learning_rate=2e-3, task=task,
                       lr_scheduler_type=scheduler, eval_items=0, save_steps=200, logging_steps=100, progress=False)
    return policy, (f"tiny InternVL fine-tuned {steps} steps x {args.sft_batch} tile-sum gold solutions, lr 2e-3 "
                    f"{scheduler} ({time.perf_counter() - start:.0f} s here; cached in {folder})")


def monotone(labels: list[bool]) -> bool:
    """+ ... + - ... -: no `+` step after a `-` step."""
    return True not in labels[labels.index(False):] if False in labels else True


def backend_arguments(args, policy: Path, prefix_caching: bool | None = None):
    from data_gen.job_common import BackendArguments

    if args.backend == "vllm":
        return BackendArguments(backend="vllm", model=str(policy), backend_kwargs={
            "enable_prefix_caching": bool(prefix_caching), "gpu_memory_utilization": 0.4, "seed": 0})
    return BackendArguments(model=str(policy), backend_kwargs={"device": args.device, "batch_size": args.batch_size,
                                                               "max_patches": 1})


def bench_policy(args, name: str, throughput: bool) -> None:
    policy, trained = build_policy(args, name)
    settings = [None] if args.backend == "hf" else [s == "on" for s in args.prefix_caching]
    for prefix_caching in settings:
        bench_backend(args, name, policy, trained, throughput and args.backend == "hf", prefix_caching)


def bench_backend(args, name: str, policy: Path, trained: str, throughput: bool, prefix_caching: bool | None) -> None:
    from data_gen.label_steps import LabelStepsArguments, run
    from data_gen.job_common import JobArguments, SamplingArguments
    from data_gen.rollout import RolloutArguments
    from data_gen.rollout import run as rollout
    from data_gen.demo.task import TileSumTask, step_truth
    from reward.conversation import hard_label
    from reward.formats import read_jsonl

    work = Path(args.work_dir) / name
    shutil.rmtree(work, ignore_errors=True)  # made afresh on every run
    task = TileSumTask(min_tiles=args.min_tiles, max_tiles=args.max_tiles, layout=args.layout)
    questions = task.write_questions(work / "questions", "test", args.questions)
    backend_args = backend_arguments(args, policy, prefix_caching)
    start = time.perf_counter()
    # the rollout job builds its own hf backend from the checkpoint (and closes it)
    # no system turn: the demo's policies (and this benchmark's own) learned their format without one; the rollout's
    # default (`auto`) gives an InternVL-architecture checkpoint InternVL's message, and they answer it with noise
    rollout(RolloutArguments(questions=str(questions), num_samples=args.solutions, prompt_template="plain",
                             system_prompt=""),
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
    for mode, early_stop in [(m, False) for m in MODES] + [("faithful", True), ("adaptive", True)]:
        out = work / (mode + ("_es" if early_stop else ""))
        label_args = LabelStepsArguments(solutions=str(work / "rollouts" / "rollouts.jsonl"),
                                         solutions_per_question=args.solutions, mode=mode, early_stop=early_stop,
                                         num_continuations=args.continuations, first_round=args.first_round)
        start = time.perf_counter()
        job_summary, summary = run(label_args, backend_args, sampling, JobArguments(
            output_dir=str(out), batch_size=args.questions * args.solutions, progress=False), backend=backend)
        seconds = time.perf_counter() - start
        if job_summary.failed:
            raise SystemExit(f"{out}: {job_summary.failed} solutions failed; see {out / 'failures.jsonl'}")
        runs[mode, early_stop] = (summary, read_jsonl(out / "mc.jsonl", "mc"), seconds)

    def labels(mode, early_stop=False):
        return [[hard_label(s.score) for s in r.steps] for r in runs[mode, early_stop][1]]

    def same(a, b):
        pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
        return sum(x == y for x, y in pairs), len(pairs)

    faithful_records = runs["faithful", False][1]
    truth = [step_truth(values[r.meta["question_id"]], [s.step for s in r.steps]) for r in faithful_records]
    faithful, adaptive, search = labels("faithful"), labels("adaptive"), labels("search")

    print(f"\n### {name} policy: {trained}\n\n{args.questions} test questions x {args.solutions} policy solutions "
          f"(temperature {args.solution_temperature}, pass rate {pass_rate:.2f}, rollout {rollout_s:.0f} s); "
          f"{args.continuations} continuations per step at temperature 1.0, up to {args.max_new_tokens} new tokens; "
          f"adaptive and search first round {args.first_round}; {_where(args, prefix_caching)}, load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| early stop | | faithful | adaptive | search | faithful / search | adaptive / search |")
    print("|---|---|---:|---:|---:|---:|---:|")
    (f, _, f_s), (a, _, a_s), (s, _, s_s) = (runs[m, False] for m in MODES)
    for row, x, y, z in (("continuations sampled", f.continuations_sampled, a.continuations_sampled,
                          s.continuations_sampled),
                         ("generated tokens", f.generated_tokens, a.generated_tokens, s.generated_tokens),
                         ("wall s", round(f_s, 1), round(a_s, 1), round(s_s, 1))):
        print(f"| off | {row} | {x:,} | {y:,} | {z:,} | {_ratio(x, z)} | {_ratio(y, z)} |")
    shares = [f"{100 * r.positive_share:.1f}%" for r in (f, a, s)]
    print(f"| off | `+` steps | {' | '.join(shares)} | | |")
    agree = [same(faithful, other) for other in (faithful, adaptive, search)]
    print("| off | hard labels as faithful's | " + " | ".join(f"{100 * k / n:.1f}%" for k, n in agree) + " | | |")
    for early_stop_mode in ("faithful", "adaptive"):
        r, _, r_s = runs[early_stop_mode, True]
        k, n = same(labels(early_stop_mode, True), search)
        print(f"| on | {early_stop_mode}: continuations, tokens, wall s | {r.continuations_sampled:,}, "
              f"{r.generated_tokens:,}, {r_s:.1f} | | | | {_ratio(r.continuations_sampled, s.continuations_sampled)} "
              f"continuations; labels as search's {100 * k / n:.1f}% |")

    bad = [i for i, row in enumerate(faithful) if not monotone(row)]
    bad_steps = sum(len(faithful[i]) for i in bad)
    bad_same = sum(x == y for i in bad for x, y in zip(faithful[i], search[i]))
    wrong = sum(x != y for i in range(len(faithful)) for x, y in zip(faithful[i], search[i]))
    exact = {m: same(truth, rows) for m, rows in (("faithful", faithful), ("adaptive", adaptive), ("search", search))}
    probes = [len(r.meta["searched_steps"]) for r in runs["search", False][1]]
    print(f"\nmonotone assumption: {len(faithful) - len(bad)} of {len(faithful)} solutions are monotone under "
          f"faithful's "
          f"labels; on the {len(bad)} others ({bad_steps} steps) search gives {bad_same} of faithful's labels "
          f"({wrong} steps differ in all); search probed {sum(probes)} steps of {sum(len(r) for r in faithful)} "
          f"({sum(p == 0 for p in probes)} solutions with no probe: judged correct as they stand, or one step)")
    print("agreement with the task's exact step truth: " + ", ".join(
        f"{m} {100 * k / n:.1f}%" for m, (k, n) in exact.items()))
    if throughput:
        hf_throughput(args, backend, rollouts, faithful_records)
    backend.close()


def hf_throughput(args, backend, rollouts, records) -> None:
    """4 continuation requests per step of the first solutions, 64 in all: one batched call vs one call each."""
    from PIL import Image

    from data_gen.backends.base import GenerationRequest, SamplingParams
    from data_gen.label_steps import continuation_seed, step_prefix
    from data_gen.prompts import build_prompt
    from reward.steps import split_steps

    by_id = {q["id"]: q for q in rollouts}
    requests = []
    for r in records:
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
    print(f"\n| hf backend, {len(requests)} continuation requests | wall s | items/s | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, s in ((f"batched ({args.batch_size} rows)", batched_s), ("one request at a time", single_s)):
        print(f"| {name} | {s:.1f} | {len(requests) / s:.1f} | {tokens / s:.0f} |")
    print(f"\nbatched / one at a time: {single_s / batched_s:.1f}x; {tokens} tokens; identical texts "
          f"{same_texts}/{len(requests)}")


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "-"


def _where(args, prefix_caching: bool | None) -> str:
    import torch

    if args.backend == "vllm":
        return f"vLLM backend, prefix caching {'on' if prefix_caching else 'off'}, {torch.cuda.get_device_name()}"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    return f"hf backend on {device}, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="runs/bench_label_steps")
    parser.add_argument("--policies", nargs="+", choices=["weak", "competent"], default=["weak", "competent"])
    parser.add_argument("--policy", default=None, help="an InternVL checkpoint folder for the competent policy")
    parser.add_argument("--weak_policy", default=None, help="an InternVL checkpoint folder for the weak policy")
    parser.add_argument("--sft_steps", type=int, default=1000, help="SFT steps of the competent policy (cosine)")
    parser.add_argument("--weak_sft_steps", type=int, default=600, help="SFT steps of the weak policy (constant lr)")
    parser.add_argument("--sft_batch", type=int, default=32)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--min_tiles", type=int, default=4, help="the boards of the questions (and of the SFT policies "
                        "trained here): the demo recipe's are 4 tiles, one per row")
    parser.add_argument("--max_tiles", type=int, default=4)
    parser.add_argument("--layout", default="rows", help="cells | rows")
    parser.add_argument("--solutions", type=int, default=2, help="policy solutions per question")
    parser.add_argument("--solution_temperature", type=float, default=1.0,
                        help="temperature of the policy solutions (published: 1.0)")
    parser.add_argument("--continuations", type=int, default=16)
    parser.add_argument("--first_round", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="hf backend rows decoded together")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--prefix_caching", nargs="+", choices=["on", "off"], default=["on", "off"],
                        help="vllm: one labelling block per setting of vLLM's enable_prefix_caching")
    parser.add_argument("--device", default="cpu", help="hf backend device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"label-steps benchmark, load average {os.getloadavg()[0]:.1f} at the start")
    for k, name in enumerate(args.policies):
        bench_policy(args, name, throughput=k == 0)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
