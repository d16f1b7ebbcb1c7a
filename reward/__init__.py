"""mmalign's process reward model: formats, answer verification, PRM training and scoring.

The PRM's data: `formats` (the four record kinds, their conversions, JSON lines), `checks` (`FormatError` and the
field checks the kinds share), `conversation` (the VisualPRM conversation, its system prompt and `+`/`-`
judgements), `steps` (splitting a solution into steps). Answers: `verify`. Model: `prm_data`, `prm_trainer`,
`scorer`; jobs: `prm_job`, `bon_job` (with `bon`), `eval_job`.

`import reward` stays light: the public names below are imported from their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "VisualPRMConfig": ".prm_trainer",
    "VisualPRMTrainer": ".prm_trainer",
    "PRMScorer": ".scorer",
    "as_grpo_reward": ".scorer",
    "split_steps": ".steps",
    "to_visualprm_conversation": ".conversation",
    "extract_answer": ".verify",
    "is_correct": ".verify",
    "answer_score": ".verify",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
