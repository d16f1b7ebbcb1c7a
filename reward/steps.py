"""Steps of a solution (reference section 3): blank-line splitting, the even merge above `max_steps_per_solution`
(`merge_steps`, the one merge rule: the scorer's split and the PRM job's rows both use it), and, ours, finer step
boundaries inside a blank-line step.

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


def merge_steps(steps: Sequence[str], max_steps_per_solution: int | None,
                gaps: Sequence[str] | None = None) -> tuple[list[str], list[int]]:
    """The even merge above `max_steps_per_solution` (reference section 3), the one rule wherever steps are merged.

    With n > max steps, `k = ceil(n / max)` consecutive steps become one: 13 steps with a maximum of 12 give k=2 and
    7 steps. A merged step is its steps joined by the text between them in the solution (`gaps[i]` follows step i;
    default one blank line, what separates blank-line steps) and ends where its last step ends, so it takes that
    step's label and Monte Carlo prefix. Returns (the merged steps, the index of each one's last step); with
    n <= max (or no maximum, None) the steps come back unchanged.
    """
    limit = max_steps_per_solution
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"split_steps: max_steps_per_solution must be a positive integer or None, got {limit!r}")
    n = len(steps)
    gaps = [STEP_SEPARATOR] * max(n - 1, 0) if gaps is None else list(gaps)
    if len(gaps) != max(n - 1, 0):
        raise ValueError(f"merge_steps: {n} steps need {max(n - 1, 0)} gaps, got {len(gaps)}")
    k = 1 if limit is None or n <= limit else math.ceil(n / limit)
    merged, last = [], []
    for start in range(0, n, k):
        end = min(start + k, n) - 1
        merged.append("".join(steps[i] + gaps[i] for i in range(start, end)) + steps[end])
        last.append(end)
    return merged, last


def segment_steps(text: str, max_steps_per_solution: int | None = None,
                  step_split: str | re.Pattern | None = None) -> list[Step]:
    """The steps of a solution with their Monte Carlo prefixes.

    The solution is split on blank lines (runs of them, whitespace-only lines and `\\r\\n` endings count as one
    separator; pieces are stripped, empty ones dropped); with `step_split`, each piece is cut again at every match
    of the pattern (empty parts dropped). With more than `max_steps_per_solution` steps they are merged evenly
    (`merge_steps`): a merged step's text is the solution text its steps span (blank-line pieces joined by one blank
    line) and its prefix is the last one's: 13 steps with max_steps_per_solution=12 give k=2 and 7 steps.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_steps: text must be a string, got {type(text).__name__}")
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
    texts = [normal[a:b] for a, b, _ in spans]
    gaps = [normal[spans[i][1]:spans[i + 1][0]] for i in range(len(spans) - 1)]  # the text between two steps
    merged, last = merge_steps(texts, max_steps_per_solution, gaps)
    return [Step(t, normal[:spans[j][2]]) for t, j in zip(merged, last)]


def split_steps(text: str, max_steps_per_solution: int | None = None,
                step_split: str | re.Pattern | None = None) -> list[str]:
    """Split a solution into steps on blank lines (reference section 3), and with `step_split` also at each match of
    that pattern inside a blank-line piece (ours; see the module docstring).

    Runs of blank lines (also whitespace-only lines and `\\r\\n` endings) count as one separator; each step is
    stripped and empty pieces are dropped. With more than `max_steps_per_solution` steps, `k = ceil(n / max)`
    consecutive steps are joined into one (`merge_steps`; blank-line pieces by `"\\n\\n"`): 13 steps with
    max_steps_per_solution=12 give k=2 and 7 steps.
    """
    return [s.text for s in segment_steps(text, max_steps_per_solution, step_split)]


def join_steps(steps: Sequence[str]) -> str:
    """Blank-line steps back into solution text (InternVL's Monte Carlo prefix of steps 1..i is
    `join_steps(steps[:i])`, with no separator after the last step)."""
    return STEP_SEPARATOR.join(steps)
