"""Cost of PRM scoring: per-step forwards vs one pass per solution vs one pass with the shared prefix.

    python benchmarks/prm_scoring.py [--solutions 8] [--steps 8] [--tiles 42] [--repeats 2] [--threads 1] [--device cpu]

Scores N solutions of S steps each to one question with the tiny InternVL (random weights, fp32). The prompt is the
VisualPRM system prompt + question + one image cut into `--tiles` tiles (+ a thumbnail) at 16 tokens per tile:
42 tiles give a ~1,000-token prompt, the size of a real InternVL prompt with a few 256-token tiles. The same
`PRMScorer` runs in its three modes; the table gives, side by side, language-model tokens, tiles through the vision
encoder, forward calls, sequences (rows) and wall time (best of `--repeats` interleaved rounds after a warm-up),
with ratios to the shared-prefix mode, and checks that all three give the same step scores. One torch thread by
default: on a shared 2-core machine more threads make the timings swing by 10x.
"""

from __future__ import annotations

import argparse
import time


def make_solutions(n: int, steps: int) -> list[list[str]]:
    """n tile-sum solutions of `steps` steps each (different numbers, so different lengths)."""
    out = []
    for i in range(n):
        values = [(3 * i + 5 * j) % 10 + 1 for j in range(steps - 1)]
        body, total = [f"The tiles show {', '.join(map(str, values))}."], values[0]
        for v in values[1:-1]:
            body.append(f"{total} + {v} = {total + v}.")
            total += v
        body.append(f"So the total is {total + values[-1]}.")
        body.append(f"Answer: \\boxed{{{total + values[-1]}}}")
        out.append(body[:steps])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solutions", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiles", type=int, default=42, help="tile budget of the image (6 x 7 grid + thumbnail)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady timings on a shared machine; 0: torch's default)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    from reward.prm_data import encode_prefix
    from reward.scorer import PRMScorer, ScoringMethod
    from rlhf.tiny import TinySizes, build_internvl, build_processor

    sizes = TinySizes()
    processor = build_processor(sizes, max_patches=args.tiles)
    model = build_internvl(processor, sizes, seed=0).to(args.device).eval()
    image = Image.new("RGB", (6 * sizes.tile_size, 7 * sizes.tile_size), (40, 40, 40))
    question = "<image>\nAdd the numbers shown by the coloured tiles, left to right, top to bottom."
    tiles = processor.image_processor.num_tiles(*image.size, args.tiles)
    prompt_tokens = len(encode_prefix(processor, question, [tiles]))
    solutions = make_solutions(args.solutions, args.steps)

    methods = (ScoringMethod.PER_STEP, ScoringMethod.PER_SOLUTION, ScoringMethod.SHARED_PREFIX)
    scorers = {m: PRMScorer(model, processor, method=m, batch_size=args.batch_size) for m in methods}
    for scorer in scorers.values():  # warm-up: first-call allocations, on a small input
        scorer.score_many(question, [image], [s[:2] for s in solutions[:2]])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    best = dict.fromkeys(methods, float("inf"))
    scores, stats = {}, {}
    for _ in range(args.repeats):  # rounds interleave the methods, so a busy machine slows all of them alike
        for method, scorer in scorers.items():
            scorer.stats.reset()
            sync()
            start = time.perf_counter()
            result = scorer.score_many(question, [image], solutions)
            sync()
            best[method] = min(best[method], time.perf_counter() - start)
            scores[method], stats[method] = [p for r in result for p in r.step_scores], scorer.stats
    rows = {m: (stats[m], best[m]) for m in methods}

    ref = scores[ScoringMethod.SHARED_PREFIX]
    diff = max(abs(a - b) for m in scores for a, b in zip(scores[m], ref))
    base_stats, base_time = rows[ScoringMethod.SHARED_PREFIX]
    print(f"PRM scoring: {args.solutions} solutions x {args.steps} steps, prompt {prompt_tokens} tokens "
          f"({tiles} tiles x {processor.image_seq_length} image tokens + system prompt + question), tiny InternVL "
          f"fp32 on {args.device}, torch threads {torch.get_num_threads()}, best of {args.repeats}\n")
    print("| method | forward calls | sequences | LM tokens | padded tokens | vision tiles | wall ms "
          "| tokens / shared | time / shared |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, (st, seconds) in rows.items():
        print(f"| {method} | {st.forwards} | {st.sequences} | {st.tokens:,} | {st.padded_tokens:,} | {st.image_tiles} "
              f"| {1000 * seconds:.1f} | {st.tokens / base_stats.tokens:.1f}x | {seconds / base_time:.1f}x |")
    print(f"\nmax |step score difference| between methods: {diff:.2e}")


if __name__ == "__main__":
    main()
