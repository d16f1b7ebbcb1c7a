"""`mmalign prm --config RECIPE.yaml`: train a VisualPRM-style process reward model from step-labelled data.

Input: JSON lines of any trainable record kind of `reward.formats`, told apart per line by their keys (`steps` ->
stepwise, `steps_with_score` -> raw Monte Carlo, `conversations` -> VisualPRM400K conversation) or by a
`"data_format"` field, or forced for the whole file with `--data_format`. Relative image paths resolve against
`--image_root` (default: the data file's folder) and must stay inside it. A `.json` data path is an InternVL-style meta file instead, as
VisualPRM400K ships: `{name: {"annotation": jsonl, "root": image folder, "repeat_time": 1.0,
"max_dynamic_patch": int}}`, relative paths resolving against its folder (label-steps writes one beside its
visualprm.jsonl). Every bad record is reported, all at
once, before training.

Step settings (`reward.step_settings`): records made by label-steps say how their solutions were cut into steps
(`"step_settings"`). Every record of the train and eval data that says so must agree with the others and with
`--step_split` / `--max_steps_per_solution` when given (not given: the data's), else the job stops with one line
naming the file, the line and the field, before the model loads. The settings, with `--system_prompt`, are saved
beside the weights (step_settings.json) of every checkpoint and of `final/`, where scoring reads them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterator

from rlhf.choices import OverflowAction
from rlhf.errors import UserError

from .checks import EmptyStepError, FormatError
from .conversation import outcome_example
from .formats import (
    ConversationRecord,
    MCRecord,
    RecordKind,
    StepwiseRecord,
    mc_to_stepwise,
    parse_jsonl_line,
)
from .prm_config import VisualPRMConfig
from .prompts import prm_question
from .step_settings import SEGMENTATION, StepSettings, data_segmentation
from .steps import merge_steps

logger = logging.getLogger("mmalign.prm")
FORMAT_FIELD = "data_format"
MAX_PRINTED_PROBLEMS = 50


class DataFormat(StrEnum):
    """`--data_format`: the record kind of every line, or `auto` to tell each line by its keys."""

    AUTO = "auto"
    STEPWISE = RecordKind.STEPWISE.value
    MC = RecordKind.MC.value
    CONVERSATION = RecordKind.CONVERSATION.value


# record kind -> (the key that identifies it, its class)
TRAINABLE: dict[RecordKind, tuple[str, type]] = {
    RecordKind.STEPWISE: ("steps", StepwiseRecord),
    RecordKind.MC: ("steps_with_score", MCRecord),
    RecordKind.CONVERSATION: ("conversations", ConversationRecord),
}


@dataclass
class PRMScriptArguments:
    data: str = field(metadata={"help": "Training records, JSON lines (stepwise, raw Monte Carlo or conversation)."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out records in the same formats."})
    image_root: str | None = field(default=None, metadata={
        "help": "Folder that relative image paths resolve against (default: each data file's folder)."})
    data_format: str = field(default=DataFormat.AUTO.value, metadata={
        "help": "Record kind of every line: " + ", ".join(f"'{f.value}'" for f in DataFormat)
                + "; 'auto' tells each line by its keys or its 'data_format' field.",
        "choices": [f.value for f in DataFormat]})
    repeat_seed: int = field(default=0, metadata={"help": "Seed of the fractional `repeat_time` subsampling."})
    eval_before_training: bool = field(default=False, metadata={
        "help": "Also evaluate the initial model (written as 'initial' in eval_metrics.json)."})


class PRMDataError(UserError, ValueError):
    """Bad PRM training data: every problem found, one per line."""

    def __init__(self, problems: list[str], what: str = "problem"):
        self.problems = list(problems)
        head = f"{len(problems)} {what}{'' if len(problems) == 1 else 's'} in the PRM data:"
        lines = [head, *(f"  {p}" for p in problems[:MAX_PRINTED_PROBLEMS])]
        if len(problems) > MAX_PRINTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_PRINTED_PROBLEMS} more")
        super().__init__(self.problems[0] if len(self.problems) == 1 else "\n".join(lines))  # one: one line


# -- reading ---------------------------------------------------------------------------------------------------------


def detect_kind(obj: Any, data_format: DataFormat | str = DataFormat.AUTO) -> RecordKind:
    """The record kind of one parsed line (raises `FormatError`)."""
    if not isinstance(obj, dict):
        raise FormatError(None, f"a JSON object per line, got {type(obj).__name__}")
    kinds = ", ".join(k.value for k in TRAINABLE)
    declared = obj.get(FORMAT_FIELD)
    if declared is not None and declared not in {k.value for k in TRAINABLE}:
        raise FormatError(FORMAT_FIELD, f"one of {kinds}, got {declared!r}")
    if data_format != DataFormat.AUTO:
        if declared is not None and declared != data_format:
            raise FormatError(FORMAT_FIELD, f"{DataFormat(data_format).value!r} (the --data_format of the whole "
                              f"file), got {declared!r}")
        return RecordKind(data_format)
    if declared is not None:
        return RecordKind(declared)
    found = [kind for kind, (key, _) in TRAINABLE.items() if key in obj]
    if len(found) != 1:
        keys = ", ".join(f"'{key}' ({kind.value})" for kind, (key, _) in TRAINABLE.items())
        got = "none of them" if not found else "several: " + ", ".join(TRAINABLE[k][0] for k in found)
        raise FormatError(None, f"exactly one of the keys {keys}, or a '{FORMAT_FIELD}' field; got {got}")
    return found[0]


def read_prm_records(path: str | Path, data_format: DataFormat | str = DataFormat.AUTO,
                     rejects: list[str] | None = None) -> list[tuple[int, Any]]:
    """(line number, record) for every non-blank line; raises `PRMDataError` listing every bad line. A record with
    an empty step (VisualPRM400K's raw files hold some) is skipped as a counted reject: logged, and appended to
    `rejects` when given, instead of stopping the file."""
    records, problems, first, empty = [], [], {}, []
    try:
        raw_lines = Path(path).read_bytes().splitlines()
    except OSError:
        raise PRMDataError([f"{path}: expected an existing JSON-lines file (not found or unreadable)"]) from None
    for line_no, raw in enumerate(raw_lines, start=1):
        try:
            obj = parse_jsonl_line(raw, line_no)
            if obj is None:
                continue
            kind = detect_kind(obj, data_format)
            if isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
                if str(obj["id"]) in first:
                    raise FormatError("id", f"a unique id, got {obj['id']!r} again (first at line "
                                      f"{first[str(obj['id'])]})")
                first[str(obj["id"])] = line_no
            obj = {k: v for k, v in obj.items() if k != FORMAT_FIELD}
            records.append((line_no, TRAINABLE[kind][1].from_json(obj)))
        except EmptyStepError as err:
            empty.append(str(err.at(path, line_no)))
        except FormatError as err:
            problems.append(str(err.at(path, line_no)))
    if problems:
        raise PRMDataError(problems)
    if empty:
        logger.warning("%s: %d record%s with an empty step skipped (rejects), e.g. %s", path, len(empty),
                       "" if len(empty) == 1 else "s", empty[0])
        if rejects is not None:
            rejects += empty
    if not records:
        raise PRMDataError([f"{path}: expected at least one record, the file is empty"])
    return records


def record_example(record) -> tuple[str, list[str], list[bool] | list[float], list[str]]:
    """(question, steps, labels, image paths) of any trainable record; Monte Carlo labels are the scores."""
    if isinstance(record, MCRecord):
        record = mc_to_stepwise(record)
    return record.question, list(record.steps), list(record.labels), list(record.images)


@dataclass
class PRMSource:
    """One annotation file and how to use it (a meta.json entry, or the data file itself)."""

    name: str
    annotation: Path
    image_root: Path | None  # None: paths resolve against the annotation's folder and stay inside it
    repeat_time: float = 1.0
    max_dynamic_patch: int | None = None  # None: the config's


META_KEYS = ("annotation", "root", "repeat_time", "max_dynamic_patch")


def read_sources(path: str | Path, image_root: str | Path | None = None) -> list[PRMSource]:
    """The annotation files behind a data path: a meta.json (see the module docstring), or one JSON-lines file
    whose relative image paths resolve against `image_root` (default: its folder)."""
    path = Path(path)
    if path.suffix != ".json":
        return [PRMSource(path.name, path, Path(image_root) if image_root is not None else None)]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PRMDataError([f"{path}: expected a readable meta.json ({type(err).__name__}: {err})"]) from None
    if not isinstance(meta, dict) or not meta:
        raise PRMDataError([f"{path}: expected an object mapping data-set names to entries"])
    base, sources, problems = path.resolve().parent, [], []
    for name, entry in meta.items():
        def bad(key: str, expected: str, value: Any) -> None:
            problems.append(str(FormatError(f"{name}.{key}", f"{expected}, got {value!r}", path=path)))

        if not isinstance(entry, dict):
            bad("annotation", "an entry object with 'annotation' and 'root'", entry)
            continue
        unknown = sorted(set(entry) - set(META_KEYS))
        if unknown:  # InternVL meta files carry more keys (data_augment, length): not fatal, not silent
            logger.warning("%s: %s: ignoring keys %s (used: %s)", path, name, unknown, ", ".join(META_KEYS))
        annotation, root = entry.get("annotation"), entry.get("root", ".")
        repeat, mdp = entry.get("repeat_time", 1.0), entry.get("max_dynamic_patch")
        if not isinstance(annotation, str) or not (base / annotation).is_file():
            bad("annotation", "an existing JSON-lines file", annotation)
        if not isinstance(root, str) or not (base / root).is_dir():
            bad("root", "an existing image folder", root)
        if isinstance(repeat, bool) or not isinstance(repeat, (int, float)) or not repeat > 0:
            bad("repeat_time", "a number > 0 (2.0 repeats twice, 0.5 takes a seeded half)", repeat)
        if mdp is not None and (isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1):
            bad("max_dynamic_patch", "an integer >= 1", mdp)
        if not problems:
            sources.append(PRMSource(name, base / annotation, base / root, float(repeat), mdp))
    if problems:
        raise PRMDataError(problems)
    return sources


# -- rows ------------------------------------------------------------------------------------------------------------


def build_rows(path: str | Path, records: list[tuple[int, Any]], processing_class, args: VisualPRMConfig,
               image_root: str | Path | None = None, max_dynamic_patch: int | None = None) -> list[dict[str, Any]]:
    """Token rows for `VisualPRMTrainer`. Missing images and unencodable records raise `PRMDataError` (all of them);
    solutions over `args.max_length` are handled as `args.on_overflow` says, and reported."""
    from rlhf.data.images import image_problem, resolve_image

    from .prm_collator import encode_row

    confined = image_root is not None  # a folder given (--image_root, a meta.json root)
    root = Path(image_root) if image_root is not None else Path(path).parent
    rows, problems, overflow, truncated = [], [], [], 0
    for line_no, record in records:
        where = f"{path}:{line_no}"
        question, steps, labels, images = record_example(record)
        try:
            question = prm_question(question, getattr(record, "meta", None) or {}, args.question_template,
                                    len(images))
        except UserError as err:
            problems.append(f"{where}: question_template: {err}")
            continue
        if args.reward_level == "outcome":  # InternVL's ORM rows: the whole solution, judged by its last step
            response = getattr(record, "meta", {}).get("response")
            steps, labels = outcome_example(steps, labels, response if isinstance(response, str) else None)
        limit = args.max_steps_per_solution
        if args.step_split and limit is not None and len(steps) > limit:
            problems.append(f"{where}: {len(steps)} steps > max_steps_per_solution {limit}, cut with step_split "
                            f"{args.step_split!r}: merged here they would be joined by blank lines, not by the "
                            f"solution text between them as scoring joins them; label with max_steps_per_solution "
                            f"<= {limit}")
            continue
        steps, last = merge_steps(steps, limit)  # a merged step: its last step's label
        labels = [labels[i] for i in last]
        try:  # one rule for every reader: inside the image root (default: the data file's folder)
            resolved = [str(resolve_image(root, p)) for p in images]
        except ValueError as err:
            hint = "" if confined else (" (the data file's folder; label-steps output: pass its meta.json as --data,"
                                        " or set --image_root to the images' folder)")
            problems.append(f"{where}: field 'images': expected paths inside the image root{hint} ({err})")
            continue
        missing = [p for p in resolved if not Path(p).is_file()]
        if missing:
            problems.append(f"{where}: field 'image': expected an existing image file, got {missing[0]!r}")
            continue
        unreadable = next((e for e in map(image_problem, resolved) if e is not None), None)
        if unreadable:
            problems.append(f"{where}: field 'images': expected a readable image file ({unreadable})")
            continue
        budget = max(1, (max_dynamic_patch or args.max_dynamic_patch) // len(images)) if images else 0
        try:
            row = encode_row(processing_class, question, steps, labels, resolved, budget, args.label_threshold, where,
                             system=args.system_prompt or None, plus_context=args.judgement_context == "plus")
        except (ValueError, UserError, OSError) as err:
            problems.append(f"{where}: {err}")
            continue
        if args.max_length is not None and len(row["input_ids"]) > args.max_length:
            fit = sum(p + 2 <= args.max_length for p in row["judgement_positions"])
            if args.on_overflow != OverflowAction.TRUNCATE or fit == 0:
                overflow.append(f"{where}: {len(row['input_ids'])} tokens > max_length {args.max_length}"
                                + (" (its first step does not fit)" if fit == 0 else ""))
                continue
            end = row["judgement_positions"][fit - 1] + 2  # through the last fitting step's <|im_end|>
            row.update(input_ids=row["input_ids"][:end], judgement_positions=row["judgement_positions"][:fit],
                       scores=row["scores"][:fit])
            truncated += 1
        rows.append(row)
    if problems:
        raise PRMDataError(problems)
    if overflow and args.on_overflow == OverflowAction.ERROR:
        raise PRMDataError(overflow, "solution over max_length")
    if overflow:
        logger.warning("%s: %d solution(s) left out, longer than max_length %d:\n  %s", path, len(overflow),
                       args.max_length, "\n  ".join(overflow[:20]) + ("\n  ..." if len(overflow) > 20 else ""))
    if truncated:
        logger.warning("%s: %d solution(s) cut after the last step that fits max_length %d", path, truncated,
                       args.max_length)
    return rows


@dataclass
class PRMData:
    """One data path, read: the records of every source that read cleanly, and the problems found so far."""

    path: str
    sources: list[tuple[PRMSource, list[tuple[int, Any]]]]
    problems: list[str]

    def located_meta(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """("file:line", meta) of every record."""
        for source, records in self.sources:
            for line_no, record in records:
                yield f"{source.annotation}:{line_no}", getattr(record, "meta", None) or {}


def read_dataset(path: str | Path, script: PRMScriptArguments) -> PRMData:
    """Every record of every source of one data path (a bad meta.json raises `PRMDataError` at once; bad records
    are kept as problems, reported with the rows' by `prepare_dataset`)."""
    sources, problems = [], []
    for source in read_sources(path, script.image_root):
        try:
            sources.append((source, read_prm_records(source.annotation, script.data_format)))
        except PRMDataError as err:
            problems += err.problems
    return PRMData(str(path), sources, problems)


def resolve_step_settings(datasets: list[PRMData], args: VisualPRMConfig) -> StepSettings:
    """The step settings of the data (`reward.step_settings.data_segmentation`: the records' and the given ones
    must agree, else one line), written into `args` (`step_split`, `max_steps_per_solution`) for the rows and the
    checkpoint."""
    found = data_segmentation((x for data in datasets for x in data.located_meta()),
                              {name: getattr(args, name) for name in SEGMENTATION})
    args.step_split, args.max_steps_per_solution = found["step_split"], found["max_steps_per_solution"]
    return args.step_settings


def prepare_dataset(data: PRMData, processing_class, args: VisualPRMConfig, script: PRMScriptArguments, split: str):
    """Check (every record of every source, before the first step), tokenize and repeat one data set."""
    from datasets import Dataset

    from rlhf.data.mmpr import repeat_records

    rows, problems = [], list(data.problems)
    for source, records in data.sources:
        try:
            built = build_rows(source.annotation, records, processing_class, args, source.image_root,
                               source.max_dynamic_patch)
        except PRMDataError as err:
            problems += err.problems
            continue
        rows += repeat_records(built, source.repeat_time, seed=script.repeat_seed, salt=source.name)
    if problems:
        raise PRMDataError(problems)
    if not rows:
        raise UserError(f"{data.path}: no trainable solutions left (all longer than max_length {args.max_length})")
    logger.info("%s: %d solutions, %d steps from %s", split, len(rows),
                sum(len(r["judgement_positions"]) for r in rows), data.path)
    return Dataset.from_list(rows)


# -- the job ---------------------------------------------------------------------------------------------------------


def parse(argv: list[str]):
    from trl import ModelConfig

    from rlhf.args import parse_job_args

    return parse_job_args((PRMScriptArguments, VisualPRMConfig, ModelConfig), argv, "mmalign prm")


def save_final(trainer, processing_class, path: Path) -> None:
    """Model (safetensors) + processor + the step settings (step_settings.json), from the main process; under
    DeepSpeed ZeRO-3 the full state dict is gathered first (a collective call: every rank takes part)."""
    from rlhf.models import save_model_and_processor

    state_dict = trainer.accelerator.get_state_dict(trainer.deepspeed) if trainer.is_deepspeed_enabled else None
    if not trainer.is_world_process_zero():
        return
    if state_dict is None:
        save_model_and_processor(trainer.model, processing_class, path)
    else:
        trainer.model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        processing_class.save_pretrained(path)
    trainer.args.step_settings.save(path)


def main(argv: list[str]) -> int:
    from rlhf.models import load_model_and_processor

    from .prm_data import judgement_ids
    from .prm_trainer import VisualPRMTrainer

    script, args, model_args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if model_args.use_peft:
        raise UserError("LoRA/PEFT is not supported by the PRM job yet; train the full model (drop --use_peft)")
    train_data = read_dataset(script.data, script)
    eval_data = read_dataset(script.eval_data, script) if script.eval_data else None
    settings = resolve_step_settings([train_data, *([eval_data] if eval_data else [])], args)
    logger.info("step settings: %s", settings.describe())
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, processing_class = load_model_and_processor(
        model_args.model_name_or_path, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation,
        seed=args.seed)
    plus, minus = judgement_ids(processing_class)  # JudgementTokenError (one line) when not single tokens
    logger.info("judgement tokens: '+' = %d, '-' = %d", plus, minus)
    train = prepare_dataset(train_data, processing_class, args, script, "train")
    evaluation = prepare_dataset(eval_data, processing_class, args, script, "eval") if eval_data else None
    trainer = VisualPRMTrainer(model, args=args, train_dataset=train, eval_dataset=evaluation,
                               processing_class=processing_class)
    metrics: dict[str, dict[str, float]] = {}
    if evaluation is not None and script.eval_before_training:
        metrics["initial"] = trainer.evaluate(metric_key_prefix="eval_initial")
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if evaluation is not None:
        metrics["final"] = trainer.evaluate()
    final = output_dir / "final"
    save_final(trainer, processing_class, final)
    if metrics and trainer.is_world_process_zero():
        (output_dir / "eval_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("saved %s", final)
    return 0
