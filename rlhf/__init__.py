"""mmalign core: InternVL loading and processing, preference data, and Mixed Preference Optimization on TRL.

`rlhf.data` reads and validates preference records (MMPR folders, TRL preference data); `rlhf.collator` turns them
into token rows fitted to max_length, and batches; the MPO loss, config and trainer build on those; `rlhf.jobs`
runs the resumable data jobs. `rlhf.choices` holds the choice lists and the choice parser that every package uses.
"""

from importlib import import_module

_EXPORTS = {
    "MPOConfig": "rlhf.mpo_config",
    "MPOTrainer": "rlhf.mpo_trainer",
    "InternVLChatProcessor": "rlhf.processing",
    "load_model_and_processor": "rlhf.models",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    """Heavy modules (torch, transformers, trl) load on first use, so `import rlhf` and `mmalign --help` stay fast."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
