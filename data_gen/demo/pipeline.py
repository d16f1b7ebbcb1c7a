"""`mmalign demo`: the InternVL3 post-training loop in miniature, end to end on a CPU.

Stages (each one of the project's own jobs with a recipe of `data_gen/recipes/demo/`, shipped inside the package,
each in its own folder under
`output_dir`, each skipped on a rerun once finished; an interrupted stage resumes as its job does):

    questions        tile-sum questions written as JSON lines + PNGs (train and held-out test splits)
    sft              supervised warm-up of a random-init tiny InternVL on gold chains of thought (data_gen.demo.sft)
    rollout          K samples per training question from the SFT policy (`mmalign rollout`)
    pairs            correctness + DropoutNTP pairs in MMPR format (`mmalign pairs`), each rejected response cut
                     after its first step that differs from the chosen one (`truncate_rejected`, ours)
    mpo              MPO with the published objective on those pairs (`mmalign mpo`)
    test_rollout     N samples per test question from the Best-of-N policy (`mmalign rollout`)
    label_steps      Monte Carlo step labels of SFT solutions to training questions (`mmalign label-steps`)
    heldout_labels   Monte Carlo step labels of test responses (`mmalign label-steps`), the PRM's held-out set
    prm              VisualPRM training, initialised from the `prm_init` policy (the recipe: MPO) (`mmalign prm`)
    evaluate         greedy accuracy of SFT and MPO; Best-of-k with the PRM vs majority, pass@k and random;
                     PRM step macro-F1 against the held-out Monte Carlo labels and the task's exact step labels

Output: `report.md`, `metrics.json`, `bon_curve.png`, `mpo_training.png` and the stage folders.

    mmalign demo [--quick] [--seed S] [--output_dir runs/demo] [--config RECIPE.yaml] [--field value ...]

`--seed S` seeds every stage: the SFT initialisation and data order, the rollouts, the DropoutNTP continuations,
MPO, both label stages, the PRM and the evaluation samples (each job gets `--seed S`; per-item seeds derive from it
and the item ids). The questions themselves stay the same for every seed, so seeds compare on one test set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from importlib.resources import files
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from reward.conversation import PRM_SYSTEM_PROMPT
from reward.step_settings import StepSettings
from rlhf.errors import UserError

from .settings import METRICS_FILE, ROLLOUT_START, SFT_BAND, TEST_START
from .task import LAYOUT_HELP

logger = logging.getLogger("mmalign.demo")

RECIPES = Path(str(files("data_gen") / "recipes" / "demo"))  # package data: present in a wheel install too
STAGE_FILE = "stage_done.json"
REPORT_FILE = "report.md"

# `--quick`: the same stages, CI-sized (a couple of minutes on 2 CPU cores); these replace the recipes' values
QUICK_SIZES = {"train_questions": 12, "label_questions": 4, "test_questions": 8, "bon_samples": 8,
               "heldout_label_questions": 3, "max_steps_per_solution": 4}
QUICK_ARGS: dict[str, list[str]] = {
    # the quick policy is barely trained: each question's gold solution joins its samples so that pairs exist
    "rollout": ["--num_samples", "4", "--max_new_tokens", "48", "--reference_key", "solution"],
    "pairs": ["--max_new_tokens", "24"],
    "mpo": ["--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1"],
    "test_rollout": ["--max_new_tokens", "48"],
    "label_steps": ["--num_continuations", "4", "--max_new_tokens", "24"],
    "heldout_labels": ["--num_continuations", "4", "--max_new_tokens", "24"],
    "prm": ["--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1"],
}


@dataclass
class DemoArguments:
    output_dir: str = field(default="runs/demo", metadata={"help": "Where every stage writes."})
    quick: bool = field(default=False, metadata={"help": "CI-sized run: fewer items and steps, same stages."})
    recipes: str = field(default=str(RECIPES), metadata={"help": "Folder of the stage recipes."})
    train_questions: int = field(default=512, metadata={"help": "Training questions rolled out for pairs."})
    label_questions: int = field(default=500, metadata={"help": "Training questions whose SFT solutions get Monte "
                                                                "Carlo step labels (the PRM's training set)."})
    test_questions: int = field(default=300, metadata={"help": "Held-out questions."})
    min_tiles: int = field(default=4, metadata={"help": "Fewest tiles on a board (questions, SFT and evaluation)."})
    max_tiles: int = field(default=5, metadata={"help": "Most tiles on a board (questions, SFT and evaluation)."})
    layout: str = field(default="cells", metadata={
        "help": LAYOUT_HELP})
    bon_samples: int = field(default=16, metadata={"help": "Responses per test question for Best-of-k."})
    bon_policy: str = field(default="mpo", metadata={"help": "Policy sampled for Best-of-k: mpo | sft."})
    prm_init: str = field(default="sft", metadata={"help": "Policy the VisualPRM is initialised from: sft | mpo."})
    prm_system_prompt: str = field(default=PRM_SYSTEM_PROMPT, metadata={
        "help": "The VisualPRM's system turn in training and scoring (default: the published one); '' for none."})
    heldout_label_questions: int = field(default=40, metadata={
        "help": "Test questions whose responses get Monte Carlo labels (PRM step F1)."})
    step_split: str | None = field(default=None, metadata={
        "help": "Ours: a pattern that also ends a step inside a blank-line step, in both label stages (reward.steps); "
                "the PRM learns it from their records and scores with it. The recipe cuts the reading into one step "
                "per value."})
    max_steps_per_solution: int = field(default=12, metadata={
        "help": "More steps are merged evenly, in both label stages; the PRM learns it from their records and scores "
                "with it (reward.step_settings)."})
    aggregation: str = field(default="mean", metadata={"help": "Solution score: mean | min | product | last."})
    step_threshold: float = field(default=0.5, metadata={"help": "A step is predicted '+' iff its score > this."})
    step_scores: str = field(default="raw", metadata={
        "help": "The step score judged against step labels: raw (the step's P(+)), running_min (the lowest P(+) up "
                "to that step) or running_product (their product: with teacher forcing each P(+) assumes the steps "
                "before it right, and a label means 'correct up to here')."})
    eval_batch_size: int = field(default=128, metadata={"help": "Sequences decoded together in evaluation."})
    seed: int = field(default=0, metadata={"help": "Seed of every stage (SFT init and data order, rollouts, pairs, "
                                                    "MPO, label-steps, PRM, evaluation samples)."})

    def task(self):
        """The tile-sum task of every stage (questions, SFT training and validation, evaluation)."""
        from .task import TileSumTask

        try:
            return TileSumTask(min_tiles=self.min_tiles, max_tiles=self.max_tiles, layout=self.layout)
        except UserError as err:
            raise UserError(f"demo: {err}") from None

    def __post_init__(self) -> None:
        if self.quick:
            for key, value in QUICK_SIZES.items():
                setattr(self, key, value)
        counts = ("train_questions", "label_questions", "test_questions", "bon_samples", "heldout_label_questions")
        bad = [f"{k}={getattr(self, k)}" for k in counts if getattr(self, k) < 1]
        if bad:
            raise UserError(f"demo: {', '.join(bad)}: counts must be >= 1")
        self.task()  # the board settings are checked once, up front
        if self.label_questions > self.train_questions or self.heldout_label_questions > self.test_questions:
            raise UserError("demo: label_questions must be <= train_questions and heldout_label_questions <= "
                            "test_questions")
        for name in ("bon_policy", "prm_init"):
            if getattr(self, name) not in ("mpo", "sft"):
                raise UserError(f"demo: {name} must be mpo or sft, got {getattr(self, name)!r}")
        if self.step_scores not in ("raw", "running_min", "running_product"):
            raise UserError(f"demo: step_scores must be raw, running_min or running_product, got {self.step_scores!r}")
        self.step_settings()  # step_split, max_steps_per_solution and prm_system_prompt checked, one line
        if not 0.0 <= self.step_threshold < 1.0:
            raise UserError(f"demo: step_threshold must be in [0, 1), got {self.step_threshold}")


    def step_settings(self) -> StepSettings:
        """The PRM's step settings (`reward.step_settings`): the label stages cut the solutions with them and record
        them, the PRM stage reads them from those records and saves them, the evaluate stage reads them from the
        PRM."""
        return StepSettings(self.step_split, self.max_steps_per_solution, self.prm_system_prompt)


USAGE_KEYS = ("cpu_seconds", "load_start", "load_end")


def _load() -> float:
    """The 1-minute load average (0.0 where the system has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return 0.0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _recipe_digest(path: str) -> str:
    """A recipe named by its content, so that a stage marker does not depend on where the package is installed."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# -- stage bookkeeping -----------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, args: DemoArguments):
        self.args = args
        self.out = Path(args.output_dir)
        self.recipes = Path(args.recipes)
        self.timings: dict[str, float] = {}
        self.usage: dict[str, dict[str, float | None]] = {}
        self.skipped: list[str] = []
        self.warnings: list[str] = []  # one plain line each: a stage whose result leaves the next ones little room

    def recipe(self, name: str) -> str:
        path = self.recipes / f"{name}.yaml"
        if not path.is_file():
            raise UserError(f"demo: recipe {path} not found (--recipes points at the folder of stage recipes)")
        return str(path)

    def dir(self, stage: str) -> Path:
        return self.out / stage

    def stage(self, name: str, settings: dict[str, Any], fn: Callable[[Path], None], index: int, total: int):
        """Run `fn(stage folder)` unless a finished marker with the same settings is there. The marker keeps the
        stage's wall and CPU seconds (this process and its children) and the 1-minute load average at its start and
        end: a slow stage on a busy machine shows a load above the core count and CPU seconds below the wall's."""
        folder = self.dir(name)
        marker = folder / STAGE_FILE
        settings = json.loads(json.dumps(settings))
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("settings") == settings:
                logger.info("[demo %d/%d] %s: done earlier (%.0f s), skipped", index, total, name, done["seconds"])
                self.timings[name] = done["seconds"]
                self.usage[name] = {k: done.get(k) for k in USAGE_KEYS}
                self.skipped.append(name)
                return
            raise UserError(f"demo: {folder} was made with other settings; use another --output_dir or delete it")
        logger.info("[demo %d/%d] %s ...", index, total, name)
        folder.mkdir(parents=True, exist_ok=True)
        load_start, cpu_start, start = _load(), _cpu_seconds(), time.perf_counter()
        fn(folder)
        seconds = round(time.perf_counter() - start, 1)
        usage = {"cpu_seconds": round(_cpu_seconds() - cpu_start, 1), "load_start": load_start, "load_end": _load()}
        marker.write_text(json.dumps({"seconds": seconds, **usage, "settings": settings}, indent=2) + "\n")
        self.timings[name] = seconds
        self.usage[name] = usage
        logger.info("[demo %d/%d] %s: %.0f s (CPU %.0f s; load %.2f -> %.2f)", index, total, name, seconds,
                    usage["cpu_seconds"], load_start, usage["load_end"])

    def job_argv(self, stage: str, recipe: str, argv: list[str]) -> list[str]:
        return ["--config", self.recipe(recipe), *argv, *(QUICK_ARGS.get(stage, []) if self.args.quick else [])]

    # -- the stages ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        from rlhf.mpo_job import main as mpo_main
        from reward.prm_job import main as prm_main

        from .. import label_steps, pairs, rollout

        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        q = self.dir("questions")
        sft_final = self.dir("sft") / "final"
        mpo_final = self.dir("mpo") / "final"
        bon_model = mpo_final if a.bon_policy == "mpo" else sft_final
        stages: list[tuple[str, dict, Callable[[Path], None]]] = []

        def add_job(name: str, main: Callable[[list[str]], int], argv: list[str], recipe: str | None = None):
            argv = self.job_argv(name, recipe or name, [*argv, "--seed", str(a.seed)])
            settings = {"argv": [_recipe_digest(x) if i and argv[i - 1] == "--config" else x
                                 for i, x in enumerate(argv)]}

            def go(folder: Path) -> None:
                code = main(argv)
                if code:
                    raise UserError(f"demo: stage {name} failed with exit status {code}")
            stages.append((name, settings, go))

        tiles = {"min_tiles": a.min_tiles, "max_tiles": a.max_tiles, "layout": a.layout}
        stages.append(("questions", {k: getattr(a, k) for k in ("train_questions", "test_questions")} | tiles,
                       self.write_questions))
        stages.append(("sft", {"quick": a.quick, "seed": a.seed, "recipe": _recipe_digest(self.recipe("sft"))}
                       | tiles, self.train_sft))
        add_job("rollout", rollout.main, ["--questions", str(q / "train.jsonl"), "--model", str(sft_final),
                                          "--output_dir", str(self.dir("rollout"))])
        add_job("pairs", pairs.main, ["--rollouts", str(self.dir("rollout") / "rollouts.jsonl"),
                                      "--model", str(sft_final), "--output_dir", str(self.dir("pairs"))])
        add_job("mpo", mpo_main, ["--model_name_or_path", str(sft_final), "--data",
                                  str(self.dir("pairs") / "meta.json"), "--output_dir", str(self.dir("mpo"))])
        add_job("test_rollout", rollout.main, [
            "--questions", str(q / "test.jsonl"), "--model", str(bon_model), "--output_dir",
            str(self.dir("test_rollout")), "--num_samples", str(a.bon_samples)], recipe="rollout")
        stages.append(("label_subsets", {"label": a.label_questions, "heldout": a.heldout_label_questions},
                       self.write_label_subsets))
        steps = a.step_settings()  # the label stages record them; the PRM takes them from their records
        split = ["--max_steps_per_solution", str(steps.max_steps_per_solution)]
        split += ["--step_split", steps.step_split] if steps.step_split else []
        add_job("label_steps", label_steps.main, [
            "--solutions", str(self.dir("label_subsets") / "train_rollouts.jsonl"), "--model", str(sft_final),
            "--output_dir", str(self.dir("label_steps")), *split])
        add_job("heldout_labels", label_steps.main, [
            "--solutions", str(self.dir("label_subsets") / "test_rollouts.jsonl"), "--model", str(bon_model),
            "--output_dir", str(self.dir("heldout_labels")), *split], recipe="label_steps")
        add_job("prm", prm_main, [
            "--model_name_or_path", str(mpo_final if a.prm_init == "mpo" else sft_final),
            "--data", str(self.dir("label_steps") / label_steps.META_FILE),
            "--eval_data", str(self.dir("heldout_labels") / label_steps.META_FILE), "--output_dir",
            str(self.dir("prm")), "--system_prompt", a.prm_system_prompt])
        stages.append(("evaluate", {k: v for k, v in asdict(a).items() if k != "recipes"}, self.evaluate))

        start = time.perf_counter()
        for i, (name, settings, fn) in enumerate(stages, 1):
            self.stage(name, settings, fn, i, len(stages))
        metrics = json.loads((self.dir("evaluate") / METRICS_FILE).read_text())
        metrics["warnings"] = [*sft_warnings(self.dir("sft"), a.quick), *metrics.get("warnings", [])]
        for line in metrics["warnings"]:
            logger.warning("demo: WARNING: %s", line)
        metrics["stage_seconds"] = self.timings
        metrics["stage_usage"] = self.usage
        metrics["seed"] = a.seed
        metrics["total_minutes"] = round(sum(self.timings.values()) / 60, 2)
        metrics["this_run_seconds"] = round(time.perf_counter() - start, 1)
        metrics["quick"] = a.quick
        (self.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        for png in ("bon_curve.png", "prm_calibration.png"):
            if (self.dir("evaluate") / png).is_file():
                shutil.copyfile(self.dir("evaluate") / png, self.out / png)
        if (self.dir("mpo") / "mpo_training.png").is_file():
            shutil.copyfile(self.dir("mpo") / "mpo_training.png", self.out / "mpo_training.png")
        from .report import write_report

        write_report(self.out / REPORT_FILE, metrics, a, self.skipped)
        return metrics

    def write_questions(self, folder: Path) -> None:
        task = self.args.task()
        task.write_questions(folder, "train", self.args.train_questions, start=ROLLOUT_START)
        task.write_questions(folder, "test", self.args.test_questions, start=TEST_START)

    def train_sft(self, folder: Path) -> None:
        from . import sft

        argv = ["--config", self.recipe("sft"), "--output_dir", str(folder), "--seed", str(self.args.seed),
                "--min_tiles", str(self.args.min_tiles), "--max_tiles", str(self.args.max_tiles), "--layout",
                self.args.layout]
        argv += ["--quick"] if self.args.quick else []
        args = sft.parse(argv)
        kwargs = args.train_kwargs() | {"eval_items": 0}  # the evaluate stage measures every policy
        sft.train_sft(args.output_dir, **kwargs)

    def write_label_subsets(self, folder: Path) -> None:
        """The rollout records of the first `label_questions` training and `heldout_label_questions` test questions
        (label-steps labels every record it is given)."""
        for src, dst, n in ((self.dir("rollout"), "train_rollouts.jsonl", self.args.label_questions),
                            (self.dir("test_rollout"), "test_rollouts.jsonl", self.args.heldout_label_questions)):
            lines = (src / "rollouts.jsonl").read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
            records.sort(key=lambda r: r["id"])
            with (folder / dst).open("w", encoding="utf-8") as f:
                for r in records[:n]:
                    r["image_root"] = str(Path(r["image_root"]).resolve()) if r.get("image_root") else r.get(
                        "image_root")
                    f.write(json.dumps(r) + "\n")

    def evaluate(self, folder: Path) -> None:
        from .evaluate import EvalInputs, EvalSettings, evaluate

        inputs = EvalInputs(**{f.name: self.dir(f.name) for f in fields(EvalInputs)})
        evaluate(folder, inputs, EvalSettings.of(self.args))


def sft_warnings(folder: Path, quick: bool) -> list[str]:
    """One plain line when the SFT policy ended outside `SFT_BAND` on its validation checks (none for --quick,
    whose policy is barely trained by design)."""
    from .sft import DONE_FILE

    path = folder / DONE_FILE
    if quick or not path.is_file():
        return []
    m = json.loads(path.read_text())["metrics"]
    history = m.get("validation_history") or []
    if not history:
        return []
    step, acc = history[-1]
    if m.get("policy_step") is not None:  # the weights kept (put back after an overshoot, else the last check's)
        step, acc = m["policy_step"], m["policy_validation_accuracy"]
    lo, hi = SFT_BAND
    if acc < lo:
        return [f"the SFT policy did not reach the band where MPO and Best-of-N have room: greedy validation accuracy "
                f"{100 * acc:.0f}% at step {step} (its step budget; band {100 * lo:.0f}-{100 * hi:.0f}%): the "
                "targets below are unlikely to be met"]
    if acc > hi:
        return [f"the SFT policy overshot the band: greedy validation accuracy {100 * acc:.0f}% at step {step} (band "
                f"{100 * lo:.0f}-{100 * hi:.0f}%): MPO and Best-of-N have little room"]
    return []


# -- command line ----------------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> DemoArguments:
    from trl import TrlParser

    if "--config" not in argv and not any(a.startswith("--config=") for a in argv):
        argv = ["--config", str(RECIPES / "demo.yaml"), *argv]
    try:
        (args,) = TrlParser((DemoArguments,), prog="mmalign demo").parse_args_and_config(args=argv)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err).splitlines()[0]) from None
    return args


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    logger.info("mmalign demo%s on %s, output in %s", " (quick)" if args.quick else "", platform.processor() or
                platform.machine(), args.output_dir)
    metrics = Demo(args).run()
    keys = ("sft_greedy_acc", "mpo_greedy_acc", "bon_prm_acc@8", "majority_acc@8", "random_acc@8", "pass@8",
            "prm_step_f1", "prm_step_f1_exact", "total_minutes")
    print(json.dumps({k: metrics.get(k) for k in keys}, indent=2))
    print(f"report: {Path(args.output_dir) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
