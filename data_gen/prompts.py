"""Prompt templates for rollouts (defined in `reward.prompts`) and the system prompt of a rollout."""

from __future__ import annotations

from reward.prompts import (BOXED_TEMPLATES, TEMPLATES, PromptTemplate, build_prompt,  # noqa: F401 (public names)
                            is_boxed_template)


AUTO_SYSTEM = "auto"  # a rollout's system_prompt: the model family's default system message


def family_system_prompt(model: str | None) -> str | None:
    """The default system message of the policy's model family: InternVL's (`rlhf.processing.INTERNVL_SYSTEM_PROMPT`,
    which InternVL's own rollouts, lmdeploy with the `internvl2_5` template, put before every request) for a
    checkpoint folder whose config.json has model_type `internvl` / `internvl_chat`, or a hub id or served model
    name containing "InternVL"; None for any other model and for the embedded tiny models."""
    import json
    from pathlib import Path

    from rlhf.models import EMBEDDED
    from rlhf.processing import INTERNVL_SYSTEM_PROMPT

    if not model or model in EMBEDDED:
        return None
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        try:
            kind = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
        return INTERNVL_SYSTEM_PROMPT if kind in ("internvl", "internvl_chat") else None
    return INTERNVL_SYSTEM_PROMPT if "internvl" in model.casefold() and not Path(model).exists() else None


def rollout_system_prompt(value: str | None, model: str | None) -> str | None:
    """A data job's `system_prompt` setting: 'auto' gives `family_system_prompt(model)`, a name of
    `rlhf.processing.SYSTEM_PROMPTS` its text, '' or None no system turn, anything else the text as written."""
    from rlhf.processing import resolve_system_prompt

    if value == AUTO_SYSTEM:
        return family_system_prompt(model)
    return resolve_system_prompt(value)
