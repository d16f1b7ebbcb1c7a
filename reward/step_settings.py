"""The step settings of a process reward model: how its solutions are cut into steps, and its system turn.

A PRM judges steps; it judges well only steps cut as it learned them. `StepSettings` holds the three values that
must be the same wherever a PRM's steps are made:

- `step_split`: the pattern that also ends a step inside a blank-line step (`reward.steps`; None: blank lines only);
- `max_steps_per_solution`: more steps are merged evenly (`reward.steps.merge_steps`; None: no limit);
- `system_prompt`: the system turn of the PRM's conversation (`reward.prm_data`; None: no system turn).

They travel with the model:

1. `mmalign label-steps` writes the segmentation (`step_split`, `max_steps_per_solution`) into every record it
   makes, as `"step_settings": {"step_split": ..., "max_steps_per_solution": ...}` (`RECORD_KEY`). The system
   prompt is not the data's: VisualPRM400K conversations always carry the published one, and the PRM job chooses
   its own (`--system_prompt`).
2. `mmalign prm` reads the segmentation from its data (`data_segmentation`): every record that carries one must
   agree with every other (train and eval data alike) and with the values given to the job (`--step_split`,
   `--max_steps_per_solution`; a value not given is taken from the data), else the job stops with one line naming
   the file, the record and the field. Records without one (VisualPRM400K's, hand-made ones) are merged at the
   job's `max_steps_per_solution`. All three settings are saved beside the weights, as `step_settings.json`
   (`SETTINGS_FILE`), in every checkpoint folder and in `final/`.
3. The scorer (`reward.scorer.PRMScorer(settings=...)`), `mmalign bon`, `mmalign eval-prm` and the demo's evaluation
   read them from the checkpoint (`scoring_settings`). Their flags (`--step_split`, `--max_steps_per_solution`,
   `--system_prompt`) may only repeat the checkpoint's values: a flag that disagrees stops the job with one line,
   as a PRM scored on steps cut otherwise gives numbers nobody measured. A checkpoint without the file (one saved
   before mmalign wrote it, the released VisualPRM, a hub name) is scored with the flags given and the defaults
   below for the rest, and a warning says so.

Defaults (`StepSettings()`): no `step_split`, no step limit, the published system prompt
(`reward.conversation.PRM_SYSTEM_PROMPT`), which the released VisualPRM checkpoint expects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rlhf.errors import UserError

from .checks import FormatError
from .conversation import PRM_SYSTEM_PROMPT
from .steps import Step, compile_step_split, segment_steps

logger = logging.getLogger("mmalign.steps")

SETTINGS_FILE = "step_settings.json"  # beside a PRM checkpoint's weights
RECORD_KEY = "step_settings"  # in a step-labelled record (top level of mc.jsonl / visualprm.jsonl lines)
SEGMENTATION = ("step_split", "max_steps_per_solution")  # what the data carry


class StepSettingsError(UserError, ValueError):
    """Step settings that disagree, or a bad step_settings value (one line)."""


def _check(name: str, value: Any) -> str:
    """'' when `value` is a valid value of the field `name`, else what was expected."""
    if value is None:
        return ""
    if name == "max_steps_per_solution":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        return "" if ok else "a positive integer or null"
    return "" if isinstance(value, str) else "a string or null"


@dataclass(frozen=True)
class StepSettings:
    """How a PRM's solutions are cut into steps and framed (see the module docstring). '' is read as None."""

    step_split: str | None = None
    max_steps_per_solution: int | None = None
    system_prompt: str | None = PRM_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _check(f.name, getattr(self, f.name))
            if problem:
                raise StepSettingsError(f"{f.name}: expected {problem}, got {getattr(self, f.name)!r}")
        object.__setattr__(self, "step_split", self.step_split or None)
        object.__setattr__(self, "system_prompt", self.system_prompt or None)
        compile_step_split(self.step_split)

    def segment(self, text: str) -> list[Step]:
        """The steps of a solution text, with their Monte Carlo prefixes (`reward.steps.segment_steps`)."""
        return segment_steps(text, self.max_steps_per_solution, self.step_split)

    def split(self, text: str) -> list[str]:
        """The steps of a solution text (`reward.steps.split_steps`)."""
        return [s.text for s in self.segment(text)]

    def describe(self) -> str:
        """One line for a log: "step_split '(?<=,)(?= )', max_steps_per_solution 12, no system prompt"."""
        system = ("the published system prompt" if self.system_prompt == PRM_SYSTEM_PROMPT else
                  "no system prompt" if self.system_prompt is None else "its own system prompt")
        return f"step_split {self.step_split!r}, max_steps_per_solution {self.max_steps_per_solution!r}, {system}"

    def segmentation(self) -> dict[str, Any]:
        """What a step-labelled record carries under `RECORD_KEY`."""
        return {name: getattr(self, name) for name in SEGMENTATION}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: str | Path) -> Path:
        """Write `folder/step_settings.json` (through a temporary file)."""
        path = Path(folder) / SETTINGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{SETTINGS_FILE}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> StepSettings | None:
        """The settings saved in `folder` (a PRM checkpoint), or None when it has no step_settings.json."""
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise StepSettingsError(f"{path}: expected a readable JSON object ({type(err).__name__}: {err})") from None
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or set(data) != set(names):
            raise StepSettingsError(str(FormatError(None, f"an object with exactly the keys {', '.join(names)}",
                                                    path=path)))
        for name in names:
            problem = _check(name, data[name])
            if problem:
                raise StepSettingsError(str(FormatError(name, f"{problem}, got {data[name]!r}", path=path)))
        return cls(**data)


def record_segmentation(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The segmentation a record carries (`meta[RECORD_KEY]`), checked; None when it carries none. Raises
    `FormatError` naming the field."""
    value = meta.get(RECORD_KEY)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(SEGMENTATION):
        raise FormatError(RECORD_KEY, f"an object with exactly the keys {', '.join(SEGMENTATION)}, got {value!r:.80}")
    for name in SEGMENTATION:
        problem = _check(name, value[name])
        if problem:
            raise FormatError(f"{RECORD_KEY}.{name}", f"{problem}, got {value[name]!r:.80}")
    return {name: value[name] or None for name in SEGMENTATION}


def data_segmentation(records: Iterable[tuple[str, Mapping[str, Any]]], given: Mapping[str, Any]) -> dict[str, Any]:
    """The segmentation of a PRM's data: `records` are (where, meta) pairs (`where`: "file:line"), `given` the values
    the job was given for `SEGMENTATION` (None: not given). Every record that carries one must agree with the first
    such record and with every given value; the first that does not raises `StepSettingsError`, one line. Returns
    the agreed values: the data's, else the given ones, else None."""
    given = {name: given.get(name) for name in SEGMENTATION}
    explicit = {name: value for name, value in StepSettings(**given).segmentation().items()
                if given[name] is not None}
    first: tuple[str, dict[str, Any]] | None = None
    for where, meta in records:
        try:
            found = record_segmentation(meta)
        except FormatError as err:
            raise StepSettingsError(f"{where}: {err}") from None
        if found is None:
            continue
        for name, value in found.items():
            if name in explicit and value != explicit[name]:
                raise StepSettingsError(
                    f"{where}: field '{RECORD_KEY}.{name}': expected {explicit[name]!r} (the {name} given to this "
                    f"job), got {value!r}: the data were labelled with other step settings; drop the setting to "
                    "train with the data's")
            if first is not None and value != first[1][name]:
                raise StepSettingsError(
                    f"{where}: field '{RECORD_KEY}.{name}': expected {first[1][name]!r} (as at {first[0]}), got "
                    f"{value!r}: every record of a PRM's data must be cut into steps the same way")
        if first is None:
            first = (where, found)
    if first is not None:
        return dict(first[1])
    return {name: explicit.get(name) for name in SEGMENTATION}


def scoring_settings(model_name_or_path: str | Path, **given: Any) -> StepSettings:
    """The step settings to score with the PRM at `model_name_or_path`: its step_settings.json. `given` holds the
    scoring job's values for the fields of `StepSettings` (None: not given); one that disagrees with the checkpoint
    raises `StepSettingsError`, one line. Without the file: the given values, the defaults for the rest, and a
    warning."""
    unknown = sorted(set(given) - {f.name for f in fields(StepSettings)})
    if unknown:
        raise TypeError(f"scoring_settings: unknown settings {unknown}")
    given = {name: value for name, value in given.items() if value is not None}
    folder = Path(model_name_or_path)
    saved = StepSettings.load(folder) if folder.is_dir() else None
    if saved is None:
        settings = StepSettings(**given)
        logger.warning("%s: no %s (a checkpoint saved before mmalign wrote its step settings, or not trained by "
                       "mmalign): scoring with the settings given, the defaults for the rest: %s",
                       model_name_or_path, SETTINGS_FILE, settings.describe())
        return settings
    wanted = StepSettings(**given)
    for name in given:
        if getattr(wanted, name) != getattr(saved, name):
            raise StepSettingsError(
                f"{name}: {given[name]!r:.80} disagrees with the PRM's own {getattr(saved, name)!r:.80} "
                f"({folder / SETTINGS_FILE}, saved when it was trained); it scores well only on steps cut and framed "
                "as it learned them: drop the setting, or give the same value")
    return saved


__all__ = ["SETTINGS_FILE", "RECORD_KEY", "SEGMENTATION", "StepSettings", "StepSettingsError",
           "record_segmentation", "data_segmentation", "scoring_settings"]
