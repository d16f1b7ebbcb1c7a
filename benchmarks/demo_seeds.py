"""`mmalign demo` over several seeds, one after another: every metric per seed with min / median / max.

    python benchmarks/demo_seeds.py --seeds 0 1 2 3 4 --output_dir runs/demo_seeds [--quick] [-- --field value ...]
    python benchmarks/demo_seeds.py --runs runs/demo_a runs/demo_b --output_dir runs/demo_seeds   # tabulate only

Each seed runs the whole demo (`mmalign demo --seed S --output_dir OUTPUT_DIR/seed_S`, every stage seeded from S)
in its own folder, so an interrupted sweep resumes where it stopped (finished stages are skipped). Then
`OUTPUT_DIR/seeds.md` gets one row per seed and the min / median / max of each metric, the targets each seed met,
and the load average at the start and end of each run; `OUTPUT_DIR/seeds.json` the same numbers. `--runs` tabulates
finished demo folders instead (each one's seed and the load at its first stage's start and last stage's end come from
its metrics.json), for runs made elsewhere or one at a time. A claim about the
demo quotes the worst seed of this table, not the best. Run it on an idle machine: the time target is for one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.demo import pipeline  # noqa: E402
from data_gen.demo.report import targets  # noqa: E402
from data_gen.demo.settings import METRICS_FILE  # noqa: E402

# (metric, how to read it from metrics.json, format)
COLUMNS = [
    ("sft_greedy_acc", lambda m: m.get("sft_greedy_acc"), "pct"),
    ("mpo_greedy_acc", lambda m: m.get("mpo_greedy_acc"), "pct"),
    ("bon_prm_acc@8", lambda m: m.get("bon_prm_acc@8"), "pct"),
    ("majority_acc@8", lambda m: m.get("majority_acc@8"), "pct"),
    ("random_acc@8", lambda m: m.get("random_acc@8"), "pct"),
    ("pass@8", lambda m: m.get("pass@8"), "pct"),
    ("bon_prm_ablated_acc@8", lambda m: m.get("bon_prm_ablated_acc@8"), "pct"),
    ("prm_step_f1_exact", lambda m: m.get("prm_step_f1_exact"), "num"),
    ("auc_reading", lambda m: (m.get("prm_step_auc") or {}).get("reading"), "num"),
    ("auc_sum", lambda m: (m.get("prm_step_auc") or {}).get("sum"), "num"),
    ("auc_reading_ablated", lambda m: (m.get("prm_step_auc_image_ablated") or {}).get("reading"), "num"),
    ("auc_reading_within_question", lambda m: (m.get("prm_step_auc_within_question") or {}).get("reading"), "num"),
    ("auc_sum_within_question", lambda m: (m.get("prm_step_auc_within_question") or {}).get("sum"), "num"),
    ("mc_labels_vs_exact_f1", lambda m: m.get("mc_labels_vs_exact_f1"), "num"),
    ("total_minutes", lambda m: m.get("total_minutes"), "min"),
]


def _fmt(value, kind: str) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if kind == "pct" else f"{value:.1f}" if kind == "min" else f"{value:.3f}"


def run_seed(seed: int, out: Path, quick: bool, extra: list[str]) -> dict:
    folder = out / f"seed_{seed}"
    load_start, start = os.getloadavg()[0], time.perf_counter()
    argv = ["--seed", str(seed), "--output_dir", str(folder), *(["--quick"] if quick else []), *extra]
    code = pipeline.main(argv)
    if code:
        raise SystemExit(f"demo_seeds: seed {seed} failed with exit status {code}")
    metrics = json.loads((folder / METRICS_FILE).read_text())
    metrics["sweep"] = {"load_start": round(load_start, 2), "load_end": round(os.getloadavg()[0], 2),
                        "wall_seconds": round(time.perf_counter() - start, 1)}
    return metrics


def finished_run(folder: Path) -> dict:
    """The metrics of a finished demo folder, with the sweep fields read from its own stage records."""
    path = folder / METRICS_FILE
    if not path.is_file():
        raise SystemExit(f"demo_seeds: {path} not found: --runs takes finished `mmalign demo` output folders")
    metrics = json.loads(path.read_text())
    usage = list((metrics.get("stage_usage") or {}).values())
    metrics["sweep"] = {"load_start": usage[0].get("load_start") if usage else None,
                        "load_end": usage[-1].get("load_end") if usage else None,
                        "wall_seconds": round(60 * metrics.get("total_minutes", 0.0), 1), "folder": str(folder)}
    return metrics


def table(per_seed: dict[int, dict], quick: bool) -> str:
    names = [c[0] for c in COLUMNS]
    lines = ["| seed | " + " | ".join(names) + " | targets met | load start -> end |",
             "|---:|" + "---:|" * len(names) + "---:|---|"]
    for seed, m in per_seed.items():
        rows = targets(m, quick)
        met = sum(ok is True for _, _, ok in rows)
        load = m.get("sweep", {})
        lines.append(f"| {seed} | " + " | ".join(_fmt(get(m), kind) for _, get, kind in COLUMNS)
                     + f" | {met} / {len(rows)} | {load.get('load_start', 'n/a')} -> {load.get('load_end', 'n/a')} |")
    for label, fn in (("min", min), ("median", statistics.median), ("max", max)):
        cells = []
        for _, get, kind in COLUMNS:
            values = [v for m in per_seed.values() if (v := get(m)) is not None]
            cells.append(_fmt(fn(values), kind) if values else "n/a")
        lines.append(f"| **{label}** | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def missed(per_seed: dict[int, dict], quick: bool) -> list[str]:
    """'seed S: target' for every target a seed missed."""
    return [f"seed {seed}: {name} ({measured})" for seed, m in per_seed.items()
            for name, measured, ok in targets(m, quick) if ok is False]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output_dir", default="runs/demo_seeds")
    parser.add_argument("--quick", action="store_true", help="the demo's CI-sized run for each seed (wiring only)")
    parser.add_argument("--runs", nargs="+", type=Path, help="finished demo folders to tabulate (runs nothing)")
    args, extra = parser.parse_known_args(argv)
    extra = [x for x in extra if x != "--"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.runs:
        per_seed = {}
        for folder in args.runs:
            m = finished_run(folder)
            if m["seed"] in per_seed:
                raise SystemExit(f"demo_seeds: two runs of seed {m['seed']} ({folder})")
            per_seed[m["seed"]] = m
        args.seeds, args.quick = list(per_seed), any(m.get("quick") for m in per_seed.values())
    else:
        per_seed = {seed: run_seed(seed, out, args.quick, extra) for seed in args.seeds}
    text = table(per_seed, args.quick)
    misses = missed(per_seed, args.quick)
    doc = [f"# mmalign demo over seeds {', '.join(map(str, args.seeds))}{' (quick)' if args.quick else ''}", "",
           f"Each row is a whole `mmalign demo --seed S` run; CPU kernels {demo_cpu()}.", "", text, "",
           "Targets missed: " + ("none" if not misses else "; ".join(misses)) + "."]
    (out / "seeds.md").write_text("\n".join(doc) + "\n", encoding="utf-8")
    (out / "seeds.json").write_text(json.dumps({str(s): {c[0]: c[1](m) for c in COLUMNS} | {"sweep": m["sweep"]}
                                                for s, m in per_seed.items()}, indent=2) + "\n")
    print(text)
    print(f"table: {out / 'seeds.md'}")
    return 0


def demo_cpu() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


if __name__ == "__main__":
    sys.exit(main())
