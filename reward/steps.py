"""Steps of a solution (reference section 3): blank-line splitting, the even merge above `max_steps`, and, ours, finer
step boundaries inside a blank-line step.

The published steps are the blank-line separated pieces of a solution. Some solutions state several checkable facts
in one such piece ("The tiles show 3, 7, 5 and 9."), and a process reward model learns far more from one judgement
per fact. A `step_split` pattern (a regular expression, best made of zero-width look-arounds) also ends a step at
each of its matches inside a blank-line step: with `(?<=,)(?= )|(?= and )` that step becomes "The tiles show 3,",
"7,", "5" and "and 9.". Every step keeps the solution text the policy continues after it (its Monte Carlo prefix):
the solution up to and including the match, so the policy writes the rest of the line itself, or, after the last
step of a blank-line piece, up to that piece and one blank line. (InternVL's pipeline continues right after the
piece, with no blank line: `data_gen.label_steps` drops it by default, `mc_prefix: internvl`, and keeps it with
`mc_prefix: blank_line`.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.errors import UserError

STEP_SEPARATOR = "\n\n"
STEP_BREAK = re.compile(r"\n[^\S\n]*(?:\n[^\S\n]*)+")


@dataclass(frozen=True)
class Step:
    """One step: its text (stripped) and the solution text up to where the policy continues after it."""

    text: str
    prefix: str


def compile_step_split(pattern: str | re.Pattern | None, name: str = "step_split") -> re.Pattern | None:
    """`pattern` compiled and checked: it must not match the empty string on its own (which would cut a step at
    every character)."""
    if pattern is None or isinstance(pattern, re.Pattern) and not pattern.pattern:
        return None
    if isinstance(pattern, str):
        if not pattern:
            return None
        try:
            pattern = re.compile(pattern)
        except re.error as err:
            raise UserError(f"{name}: not a regular expression ({err}): {pattern!r}") from None
    if not isinstance(pattern, re.Pattern):
        raise UserError(f"{name}: expected a regular expression, got {type(pattern).__name__}")
    if pattern.fullmatch("") is not None:
        raise UserError(f"{name}: {pattern.pattern!r} matches the empty string, so it would cut a step at every "
                        "character; use look-arounds that need text, e.g. '(?<=,)(?= )'")
    return pattern


def segment_steps(text: str, max_steps: int | None = None,
                  step_split: str | re.Pattern | None = None) -> list[Step]:
    """The steps of a solution with their Monte Carlo prefixes.

    The solution is split on blank lines (runs of them, whitespace-only lines and `\\r\\n` endings count as one
    separator; pieces are stripped, empty ones dropped); with `step_split`, each piece is cut again at every match
    of the pattern (empty parts dropped). With more than `max_steps` steps, `k = ceil(n / max_steps)` consecutive
    steps become one, whose text is the solution text they span (blank-line pieces joined by one blank line) and
    whose prefix is the last one's: 13 steps with max_steps=12 give k=2 and 7 steps.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_steps: text must be a string, got {type(text).__name__}")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"split_steps: max_steps must be a positive integer or None, got {max_steps!r}")
    pattern = compile_step_split(step_split)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = [piece.strip() for piece in STEP_BREAK.split(text)]
    normal = join_steps([b for b in blocks if b]) + STEP_SEPARATOR  # the solution as the policy continues it
    spans: list[tuple[int, int, int]] = []  # start, end (stripped) and continuation offset in `normal`
    offset = 0
    for block in (b for b in blocks if b):
        cuts = [(m.start(), m.end()) for m in pattern.finditer(block)] if pattern else []
        start, first = 0, len(spans)
        for cut_start, cut_end in [*cuts, (len(block), len(block) + len(STEP_SEPARATOR))]:
            part = block[start:cut_start]
            if part.strip():
                lead = len(part) - len(part.lstrip())
                spans.append((offset + start + lead, offset + start + len(part.rstrip()), offset + cut_end))
            elif len(spans) > first and cut_start == len(block):  # an empty tail: the previous step ends the block
                spans[-1] = (*spans[-1][:2], offset + cut_end)
            start = max(start, cut_end)
        offset += len(block) + len(STEP_SEPARATOR)
    k = 1 if max_steps is None or len(spans) <= max_steps else math.ceil(len(spans) / max_steps)
    groups = [spans[i:i + k] for i in range(0, len(spans), k)]
    return [Step(normal[g[0][0]:g[-1][1]], normal[:g[-1][2]]) for g in groups]


def split_steps(text: str, max_steps: int | None = None, step_split: str | re.Pattern | None = None) -> list[str]:
    """Split a solution into steps on blank lines (reference section 3), and with `step_split` also at each match of
    that pattern inside a blank-line piece (ours; see the module docstring).

    Runs of blank lines (also whitespace-only lines and `\\r\\n` endings) count as one separator; each step is
    stripped and empty pieces are dropped. With more than `max_steps` steps, `k = ceil(n / max_steps)` consecutive
    steps are joined into one (blank-line pieces by `"\\n\\n"`): 13 steps with max_steps=12 give k=2 and 7 steps.
    """
    return [s.text for s in segment_steps(text, max_steps, step_split)]


def join_steps(steps: Sequence[str]) -> str:
    """Blank-line steps back into solution text (InternVL's Monte Carlo prefix of steps 1..i is
    `join_steps(steps[:i])`, with no separator after the last step)."""
    return STEP_SEPARATOR.join(steps)
