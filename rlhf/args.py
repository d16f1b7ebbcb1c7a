"""Reading a job's settings (a YAML recipe, then command-line flags): one line for every mistake.

`parse_job_args((ArgsA, ArgsB), argv, "mmalign bon")` is `TrlParser.parse_args_and_config` with the mistakes a
person makes caught where they are read and reported as a `UserError` that names the recipe file (or the command
line) and the setting:

- a missing recipe, YAML that does not parse, a `!!python/...` tag (recipes are plain YAML), a recipe that is not a
  mapping, an unknown recipe key (with the closest known one), an unknown or malformed flag;
- a value a dataclass refuses in `__post_init__` (`SettingError` names the field; TRL's own ValueErrors keep
  their text, with the setting they mention);
- `output_dir` that exists and is not a folder;
- training settings no run can use (`check_training_args`): batch sizes, accumulation and save/log/eval steps
  below 1, a learning rate, weight decay or epoch count that is negative or not finite;
- `resume_from_checkpoint`: `true` means the last checkpoint in `output_dir` (as `trainer.train(True)` does in
  Python), `false` none; a folder that does not exist is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any

from .errors import UserError

CONFIG_FLAG = "--config"
RESERVED_KEYS = ("env",)  # TrlParser: environment variables set from the recipe


class SettingError(UserError, ValueError):
    """A setting with a value no run can use; `parse_job_args` says where it was set (recipe or command line)."""

    def __init__(self, name: str, expected: str, got: Any):
        self.field = name
        super().__init__(f"{name}: expected {expected}, got {got!r}")


def _read_recipe(path: str) -> dict:
    import yaml

    recipe = Path(path)
    if not recipe.is_file():
        raise UserError(f"{path}: recipe file not found" if not recipe.exists() else f"{path}: not a file")
    try:
        text = recipe.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the recipe ({err})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UserError(f"{where}: {err.problem}; recipes are plain YAML (no !!python/ or other language tags)") \
            from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a YAML mapping of setting: value, got a {type(config).__name__}")
    return config


def _field_names(types: tuple) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t)]


class _Where:
    """Where a setting was given: `--name` on the command line wins over the recipe key."""

    def __init__(self, recipe: str | None, config: dict, argv: list[str]):
        self.recipe, self.config = recipe, config
        self.flags = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}

    def __call__(self, name: str) -> str:
        if name in self.flags:
            return f"command line: --{name}"
        if name in self.config:
            return f"{self.recipe}: {name}"
        return f"settings: {name} (its default)"

    def given(self) -> list[str]:
        return sorted(self.flags | set(self.config), key=len, reverse=True)


def parse_job_args(types: tuple, argv: list[str], prog: str) -> tuple:
    """The job's dataclasses from `--config RECIPE.yaml` and flags; every mistake is one `UserError` line."""
    from trl import TrlParser

    class _Parser(TrlParser):
        def error(self, message: str):  # argparse would print the usage and exit
            raise UserError(f"command line: {message} (see {prog} --help)")

    argv = list(argv)
    recipe, config = None, {}
    if CONFIG_FLAG in argv:
        i = argv.index(CONFIG_FLAG)
        if i + 1 >= len(argv):
            raise UserError(f"command line: {CONFIG_FLAG} needs a recipe file")
        recipe = argv[i + 1]
        config = _read_recipe(recipe)
    names = _field_names(types)
    unknown = [k for k in config if k not in names and k not in RESERVED_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (not a setting of {prog})"
        raise UserError(f"{recipe}: {unknown[0]}: unknown key{hint}")
    where = _Where(recipe, config, argv)
    try:
        *outputs, rest = _Parser(types, prog=prog).parse_args_and_config(args=argv, return_remaining_strings=True)
    except SettingError as err:
        raise UserError(f"{where(err.field)}: {str(err).split(': ', 1)[1]}") from None
    except (ValueError, TypeError) as err:  # a dataclass's own check (TRL, transformers): its first line
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        name = next((n for n in where.given() if n in text), None)
        raise UserError(f"{where(name) if name else recipe or 'command line'}: {text}") from None
    if rest:
        flag = next((r for r in rest if r.startswith("-")), rest[0])
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], names, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else f" (see {prog} --help)"
        raise UserError(f"command line: {flag}: unknown flag{hint}" if flag.startswith("-")
                        else f"command line: {flag!r}: unexpected value{hint}")
    for out in outputs:
        try:
            _check_output_dir(out)
            check_training_args(out)
            _resolve_resume(out)
        except SettingError as err:
            raise UserError(f"{where(err.field)}: {str(err).split(': ', 1)[1]}") from None
    return tuple(outputs)


def _check_output_dir(args: Any) -> None:
    path = getattr(args, "output_dir", None)
    if isinstance(path, str) and Path(path).exists() and not Path(path).is_dir():
        raise SettingError("output_dir", "a folder or a path to create one, not an existing file", path)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training_args(args: Any) -> None:
    """SettingError for a `TrainingArguments` value no run can use (a no-op for other dataclasses)."""
    from transformers import TrainingArguments

    if not isinstance(args, TrainingArguments):
        return
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SettingError(name, "an integer >= 1", value)
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon"):
        value = getattr(args, name, 0.0)
        if value is not None and (not _finite(value) or value < 0):
            raise SettingError(name, "a finite number >= 0", value)
    if not _finite(args.num_train_epochs) or args.num_train_epochs < 0:
        raise SettingError("num_train_epochs", "a finite number >= 0", args.num_train_epochs)
    if args.max_steps is not None and (not isinstance(args.max_steps, int) or args.max_steps == 0
                                       or args.max_steps < -1):
        raise SettingError("max_steps", "an integer >= 1 (or -1: num_train_epochs decides)", args.max_steps)
    if args.max_steps <= 0 and args.num_train_epochs == 0:
        raise SettingError("num_train_epochs", "a number > 0 when max_steps is not set", args.num_train_epochs)
    for strategy, steps in (("save_strategy", "save_steps"), ("logging_strategy", "logging_steps"),
                            ("eval_strategy", "eval_steps")):
        value = getattr(args, steps, None)
        mode = getattr(args, strategy, "")
        if str(getattr(mode, "value", mode)) == "steps" and value is not None and (
                not _finite(value) or value <= 0):
            raise SettingError(steps, f"a number > 0 with {strategy} 'steps' (an integer, or a fraction of the "
                               "total steps below 1)", value)
    max_length = getattr(args, "max_length", None)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise SettingError("max_length", "an integer >= 2 (prompt + response tokens), or null for no limit",
                           max_length)


def _resolve_resume(args: Any) -> None:
    """`resume_from_checkpoint`: true -> the last checkpoint-* folder of output_dir, false -> None; a path must
    exist."""
    value = getattr(args, "resume_from_checkpoint", None)
    if not isinstance(value, (str, bool)) or not hasattr(args, "output_dir"):
        return
    text = str(value).strip().lower()
    if text in ("false", "no", "none", ""):
        args.resume_from_checkpoint = None
        return
    if text in ("true", "yes", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if last is None:
            raise SettingError("resume_from_checkpoint", f"a checkpoint-* folder in output_dir {args.output_dir} "
                               "to resume from (there is none; drop the setting to start a new run)", value)
        args.resume_from_checkpoint = last
        return
    if not Path(value).is_dir():
        raise SettingError("resume_from_checkpoint", "true (the last checkpoint of output_dir), false, or an "
                           "existing checkpoint folder", value)
