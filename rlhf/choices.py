"""Choice lists that several jobs share, and the one subset each job accepts.

`OverflowAction` names every answer to "a sample does not fit `max_length`"; a job takes only the members it can
carry out (`ROW_OVERFLOW` for MPO rows: a preference prompt is never cut; `PRM_OVERFLOW` for PRM solutions, which
can lose their last steps but have no rejects file) and lists those members, in that order, in its help and errors.
"""

from __future__ import annotations

from enum import StrEnum


class OverflowAction(StrEnum):
    """What happens to a sample longer than `max_length` tokens."""

    SKIP = "skip"  # leave it out, reported
    ERROR = "error"  # stop before training, listing every such sample
    REJECT = "reject"  # leave it out, reported, and append it to the rejects file
    TRUNCATE = "truncate"  # keep the steps that fit (a solution whose first step does not fit is skipped, reported)


ROW_OVERFLOW = (OverflowAction.SKIP, OverflowAction.ERROR, OverflowAction.REJECT)  # MPO rows (rlhf.collator)
PRM_OVERFLOW = (OverflowAction.TRUNCATE, OverflowAction.SKIP, OverflowAction.ERROR)  # PRM solutions (reward.prm_job)


__all__ = ["OverflowAction", "PRM_OVERFLOW", "ROW_OVERFLOW"]
