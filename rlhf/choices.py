"""Choice lists that several jobs share, and the one subset each job accepts.

`OverflowAction` names every answer to "a sample does not fit `max_length`"; a job takes only the members it can
carry out (`ROW_OVERFLOW` for MPO rows: a preference prompt is never cut; `PRM_OVERFLOW` for PRM solutions, which
can lose their last steps but have no rejects file) and lists those members, in that order, in its help and errors.
`parse_choice` turns a string into a member of a choice list, or raises one line that lists the choices.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

E = TypeVar("E", bound=StrEnum)


class OverflowAction(StrEnum):
    """What happens to a sample longer than `max_length` tokens."""

    SKIP = "skip"  # leave it out, reported
    ERROR = "error"  # stop before training, listing every such sample
    REJECT = "reject"  # leave it out, reported, and append it to the rejects file
    TRUNCATE = "truncate"  # keep the steps that fit (a solution whose first step does not fit is skipped, reported)


ROW_OVERFLOW = (OverflowAction.SKIP, OverflowAction.ERROR, OverflowAction.REJECT)  # MPO rows (rlhf.collator)
PRM_OVERFLOW = (OverflowAction.TRUNCATE, OverflowAction.SKIP, OverflowAction.ERROR)  # PRM solutions (reward.prm_job)


def parse_choice(enum: type[E], value: Any, name: str, error: type[Exception] = ValueError) -> E:
    """`value` as a member of `enum`; otherwise `error("{name} must be one of a, b, c, got 'value'")`."""
    try:
        return enum(value)
    except ValueError:
        raise error(f"{name} must be one of {', '.join(enum)}, got {value!r}") from None


__all__ = ["OverflowAction", "PRM_OVERFLOW", "ROW_OVERFLOW", "parse_choice"]
