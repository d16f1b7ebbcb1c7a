"""mmalign's process reward model: formats, answer verification, PRM training and scoring.

- `verify`: answer extraction and judging; `formats`: the PRM record kinds (their conversions, JSON lines), `checks`:
  `FormatError` and the field checks the kinds share, `conversation`: the VisualPRM conversation, its system prompt
  and `+`/`-` judgements; `prompts`: question templates;
- `steps`: a solution's steps (blank lines, `step_split` cuts, the even merge `merge_steps`); `step_settings`: the
  `StepSettings` (step split, step limit, system prompt) that label-steps records, PRM training checks and saves
  beside the weights, and scoring reads from the checkpoint;
- the PRM, split by concept as the MPO side is: `prm_data` (token layout), `prm_config` (`VisualPRMConfig`),
  `prm_losses` (P(+) and the token losses, pure), `prm_head` (the position-only LM head), `prm_collator` (rows and
  batches), `prm_metrics` (step metrics, pure), `prm_trainer` (`VisualPRMTrainer`), `prm_job` (`mmalign prm`);
- `scorer` (`PRMScorer`, the GRPO reward), `bon` / `bon_job` (`mmalign bon`), `eval_job` (`mmalign eval-prm`).

`import reward` stays light: the public names below are imported from their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module (relative to this package) that defines it
_LAZY: dict[str, str] = {
    "VisualPRMConfig": ".prm_config",
    "VisualPRMTrainer": ".prm_trainer",
    "PRMScorer": ".scorer",
    "StepSettings": ".step_settings",
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
