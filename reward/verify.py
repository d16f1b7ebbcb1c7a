"""Answer verification: extract a response's final answer and judge it against `answer_gt`.

Used by the rollout/pairs jobs (correct vs wrong vs unparseable), the PRM Monte Carlo step labels and
Best-of-N evaluation. Reference section 2, "Extract the answer" and "Judge against answer_gt":

- Extract: the content of the last balanced `\\boxed{...}` (or `\\fbox{...}`), else the text after the
  last "Answer:" / "Final answer:".
- Rewrite (`fix_answer`, the pairs job's `answer_fix`): the final answer replaced by the ground truth, found by
  the same box scanner.
- Judge: exact (case-insensitive) match, else the best of the matchers of the data set's MODE
  (`AnswerMode`, chosen by name as InternVL does: `mode_for_source`): chart-style sets relaxed numeric (5%)
  only; docvqa / infographics ANLS (1 - normalised edit distance: the similarity, not the distance the public
  code returns); SROIE / CLEVR-math / geos / geometry relaxed numeric + VQA + multiple choice + symbolic;
  every other set, and the default (`math`), VQA + multiple choice + relative numeric (1e-3, InternVL's math
  score: 19 is not 20) + symbolic. Correct iff score > 0.9. `AnswerMode.ALL` (ours, the judge before the
  modes) is the best of every matcher, with 5% tolerance on every number.

Every matcher is one entry of `MATCHERS` (name -> function), so a `Verdict` names the matcher that
decided. All matchers but ANLS score 0 or 1; ANLS gives the graded values in between.

Decisions worth knowing (each has a test):

- A truncated response is a format negative: when the last `\\boxed{` never closes, or the last box is
  empty, `extract_answer` returns None; it does not fall back to an earlier box or to "Answer:".
- Percentages: "50%" (or "50\\%") equals both 50 and 0.5. Ground truths write a percentage either way
  ("what percent ..." -> "50", "what fraction ..." -> "0.5"), and a wrong answer that happens to be
  off by exactly a factor of 100 is rare. Two percentages compare as they are.
- Numbers with a unit ("5 cm", "25 km/h", "30^\\circ", "$12") equal the bare number; two different units do not
  match.
- Relaxed numeric is the ChartQA rule, |pred - gt| <= 0.05 |gt| (so 4.75 vs 5 is correct, 4.7 is not);
  gt = 0 needs pred = 0; a year ("2019") needs the exact answer. It applies to integers too, as published, but
  only in the modes that include it (relaxed, geometry, all).
- ANLS applies to text answers only (a letter in the ground truth, no math operators, not an option
  letter) and only when both sides hold the same numbers: "Route 66" vs "Route 67" is a different
  answer, not a typo. Scores with a normalised distance of 0.5 or more are 0 (the usual ANLS tau = 0.5).
- The VQA matcher covers short word answers; it stays out of pure numbers and math (brackets and signs
  matter there), which the numeric and symbolic matchers judge.

Symbolic equivalence uses math-verify's LaTeX parser only; its expression parser (sympy's `parse_expr`,
which calls `eval`) is never used, and no model text is ever evaluated as code. Time is bounded twice,
the same way in every thread (rollout and scoring jobs call this from worker threads):

1. A screen, before parsing: strings over `MAX_SYMBOLIC_CHARS`, nesting deeper than
   `MAX_SYMBOLIC_NESTING`, and constructs whose evaluation explodes inside single C calls (factorials
   of large numbers, binomials, sums, products, integrals, limits, power towers, big exponents) are
   not given to math-verify. Deterministic, so a verdict does not depend on machine speed here.
2. A deadline, `SYMBOLIC_TIME_LIMIT_S`, on parse + verify together, enforced by a per-thread trace
   function (`_with_deadline`). math-verify's own timeouts are turned off (`parsing_timeout=None`,
   `timeout_seconds=None`): they use SIGALRM, which works in the main thread only ("signal only works
   in main thread"), counts whole seconds and cancels any alarm the caller has set.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

from rlhf.choices import parse_choice

DEFAULT_THRESHOLD = 0.9  # correct iff score > threshold (published)
RELAXED_TOLERANCE = 0.05  # relaxed numeric: relative error <= 5% (ChartQA)
RELATIVE_TOLERANCE = 1e-3  # relative numeric
ANLS_TAU = 0.5  # ANLS: a normalised edit distance >= tau scores 0
MAX_MATCH_CHARS = 1_000  # answers or ground truths longer than this get the exact matcher only
MAX_SYMBOLIC_CHARS = 300  # a 600-char nested expression takes math-verify ~4 s to parse
MAX_SYMBOLIC_NESTING = 12  # bracket depth refused for symbolic parsing
SYMBOLIC_TIME_LIMIT_S = 5.0  # wall-clock limit of one symbolic check (parse both + verify), as math-verify

logger = logging.getLogger(__name__)

NO_ANSWER = "no_answer"  # Verdict.matcher when no answer could be extracted
NO_MATCH = "no_match"  # Verdict.matcher when every matcher scored 0

# ---------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(r"(?:answer|答案)\s*[:：]", re.IGNORECASE)  # also "Final answer:" and InternVL's Chinese "答案:"
_UNBALANCED = object()
_BRACE_RE = re.compile(r"\\.|[{}]", re.DOTALL)


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the group whose content starts at `start` (just after `{`), or -1.

    `\\{` and `\\}` are escaped braces and do not count; `\\\\` is a line break, not an escape.
    """
    depth = 1
    for m in _BRACE_RE.finditer(text, start):
        c = m.group(0)
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _boxes(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of the content of each top-level box in order, `text[start:end]`; a box that never closes
    comes last, with end -1."""
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        end = _closing_brace(text, m.end())
        yield m.end(), end
        if end < 0:
            return
        pos = end + 1  # boxes nested in this one are part of its content


def _last_box(text: str) -> str | None | object:
    """Content of the last top-level box, None when there is no box, `_UNBALANCED` when it never closes."""
    last: str | None | object = None
    for start, end in _boxes(text):
        if end < 0:
            return _UNBALANCED
        last = text[start:end]
    return last


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it has none.

    The content of the last balanced `\\boxed{...}` / `\\fbox{...}` (nested braces kept:
    `\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`; a box holding only a box is unwrapped). Without a box,
    the first non-blank line after the last "Answer:" / "Final answer:" (any case) / "答案:" (InternVL's Chinese
    prompts, half- or full-width colon), with markdown
    bold and trailing periods and whitespace stripped. None when there is neither, when the last box is empty,
    or when it never closes (a truncated response: no fallback to an earlier box or to "Answer:").
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    box = _last_box(text)
    if box is _UNBALANCED:
        return None
    if box is not None:
        content = box.strip()
        m = _BOX_RE.match(content)
        if m is not None and _closing_brace(content, m.end()) == len(content) - 1:
            return extract_answer(content)  # `\boxed{\boxed{x}}`: the inner box spans the whole content
        return content or None
    last = None
    for last in _ANSWER_RE.finditer(text):
        pass
    if last is None:
        return None
    line = text[last.end() :].lstrip().split("\n", 1)[0]
    line = line.strip().lstrip("*").lstrip().rstrip(" \t\r*.。")  # "**Answer:** B." -> "B"; "答案: 7。" -> "7"
    return line or None


def boxed_answer(text: str) -> str | None:
    """The content of the last balanced, non-empty `\\boxed{...}` (as `extract_answer` reads it), or None when the
    text has no box or its last box never closes. No fallback to "Answer:" lines."""
    box = _last_box(text)
    if box is None or box is _UNBALANCED:
        return None
    return extract_answer(text)


_ANSWER_LINE_RE = re.compile(r"answer\s*:", re.IGNORECASE)  # what `fix_answer` rewrites without a box


def fix_answer(text: str, answer: str) -> str:
    """`text` with its final answer replaced by `answer` (the pairs job's `answer_fix`): the content of the last
    balanced `\\boxed{}` / `\\fbox{}` (a box that never closes is passed over), else the rest of the line after the
    last "Answer:" (any case); unchanged when it has neither."""
    span = None
    for start, end in _boxes(text):
        if end >= 0:
            span = (start, end)
    if span is not None:
        return text[:span[0]] + answer + text[span[1]:]
    last = None
    for last in _ANSWER_LINE_RE.finditer(text):
        pass
    if last is None:
        return text
    line_end = text.find("\n", last.end())
    line_end = len(text) if line_end < 0 else line_end
    return text[:last.end()] + " " + answer + text[line_end:]


# ---------------------------------------------------------------------------------------------------
# Shared normalisation

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_ANSWER_PHRASE_RE = re.compile(
    r"^(?:the\s+)?(?:correct\s+|final\s+|right\s+)?(?:answer|option|choice)\s+is\s*:?\s*", re.IGNORECASE
)
_MATH_CHARS = set("\\^_=+*/<>{}")
_LETTER_RE = re.compile(r"[^\W\d_]")


def _squash(s: str) -> str:
    """Case-folded, whitespace runs collapsed to one space."""
    return " ".join(s.split()).casefold()


def _unwrap(s: str) -> str:
    """Strip math delimiters, markdown bold and `\\text{...}`-like wrappers; drop a trailing period."""
    s = s.strip().rstrip(".").rstrip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = _TEXT_CMD_RE.sub(r"\1", s)
    return s.rstrip(".").strip()


def _has_math(s: str) -> bool:
    return any(c in _MATH_CHARS for c in s)


# ---------------------------------------------------------------------------------------------------
# Multiple choice

_OPTION_PREFIX = r"(?:(?:option|choice)\s*)?"
_MC_BARE_RE = re.compile(rf"^{_OPTION_PREFIX}\(?([A-Za-z])\)?[.:)]?$", re.IGNORECASE)
_MC_WITH_TEXT_RE = re.compile(r"^(?:(?i:option|choice)\s*)?(?:\(([A-Z])\)[.:]?|([A-Z])[.:)])\s+\S")
_OPTION_KEY_RE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")


def _mc_letter(s: str) -> str | None:
    """The option letter `s` names: `B`, `(B)`, `B.`, `B)`, `option B`, `The answer is B`, `(B) text`, `B. text`."""
    s = _ANSWER_PHRASE_RE.sub("", _unwrap(s), count=1)
    if m := _MC_BARE_RE.match(s):
        return m.group(1).upper()
    if m := _MC_WITH_TEXT_RE.match(s):
        return m.group(1) or m.group(2)
    return None


def _check_options(options: Mapping[str, str] | None) -> dict[str, str] | None:
    """Options keyed by upper-case letter; a key that is not one letter is a ValueError."""
    if options is None:
        return None
    out: dict[str, str] = {}
    for key, text in options.items():
        m = _OPTION_KEY_RE.match(str(key).strip())
        if m is None:
            raise ValueError(f"options: key {key!r} is not an option letter; expected keys such as 'A', 'B', ...")
        if not isinstance(text, str):
            raise TypeError(f"options[{key!r}]: expected the option text as a str, got {type(text).__name__}")
        out[m.group(1).upper()] = text
    return out


def _same_text(a: str, b: str) -> bool:
    a, b = _squash(_unwrap(a)), _squash(_unwrap(b))
    if a and a == b:
        return True
    if _numbers_close(a, b, RELATIVE_TOLERANCE):
        return True
    va, vb = _vqa_tokens(a), _vqa_tokens(b)
    return bool(va) and va == vb and not _has_math(a) and not _has_math(b)


def _option_by_text(s: str, options: dict[str, str]) -> str | None:
    """The one letter whose option text `s` is (after stripping "The answer is"), else None."""
    s = _ANSWER_PHRASE_RE.sub("", _unwrap(s), count=1)
    hits = [letter for letter, text in options.items() if _same_text(s, text)]
    return hits[0] if len(hits) == 1 else None


def _match_multiple_choice(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 when prediction and ground truth name the same option (by letter or, given `options`, by text)."""
    gt_letter = _mc_letter(gt)
    if gt_letter is None and options:
        gt_letter = _option_by_text(gt, options)
    if gt_letter is None:
        return 0.0
    pred_letter = _mc_letter(pred)
    if pred_letter is None and options:
        pred_letter = _option_by_text(pred, options)
    return 1.0 if pred_letter == gt_letter else 0.0


# ---------------------------------------------------------------------------------------------------
# Exact and VQA-normalised

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update(
    {w: str(10 * i) for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)}
)
_TENS = {str(10 * i) for i in range(2, 10)}
_ARTICLES = {"a", "an", "the"}
_VQA_TOKEN_RE = re.compile(r"-?\d+(?:[.,]\d+)*|[^\W\d_]+(?:'[^\W\d_]+)*")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _vqa_tokens(s: str) -> tuple[str, ...]:
    """VQA normalisation: lower case, punctuation dropped, articles dropped, number words to digits
    ("twenty one" / "twenty-one" -> "21"), thousands separators dropped, apostrophes inside words dropped
    ("don't" / "don’t" / "dont" alike)."""
    out: list[str] = []
    for tok in _VQA_TOKEN_RE.findall(s.casefold().replace("\u2019", "'")):
        if tok in _ARTICLES:
            continue
        tok = tok.replace("'", "")  # "don't" == "dont", as InternVL's VQA contractions map "dont" to "don't"
        tok = _NUMBER_WORDS.get(tok, tok)
        if _THOUSANDS_RE.match(tok):
            tok = tok.replace(",", "")
        if out and tok.isdigit() and len(tok) == 1 and tok != "0" and out[-1] in _TENS:
            out[-1] = str(int(out[-1]) + int(tok))
            continue
        out.append(tok)
    return tuple(out)


def _match_exact(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 on a case-insensitive, whitespace-normalised exact match."""
    return 1.0 if _squash(pred) == _squash(gt) else 0.0


def _match_vqa(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 when the VQA-normalised answers agree ("Two." vs "2", "the cat" vs "cat"). Word answers only:
    when neither side has a letter, or either side has math operators, the numeric and symbolic
    matchers judge instead."""
    if _has_math(pred) or _has_math(gt):
        return 0.0
    if not (_LETTER_RE.search(pred) or _LETTER_RE.search(gt)):
        return 0.0
    p, g = _vqa_tokens(pred), _vqa_tokens(gt)
    return 1.0 if p and p == g else 0.0


# ---------------------------------------------------------------------------------------------------
# Numeric

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(
    r"^(?P<sign>[-+\u2212]?)\s*(?:\\\$|[$\u20ac\u00a3\u00a5])?\s*"
    rf"(?:\\[dt]?frac\{{(?P<fn>{_NUM})\}}\{{(?P<fd>{_NUM})\}}|(?P<n>{_NUM})(?:\s*/\s*(?P<d>{_NUM}))?)"
    r"\s*(?P<pct>\\?%|percent\b|per\s*cent\b)?"
    r"\s*(?P<unit>\^\s*\{?\s*\\circ\s*\}?|\u00b0|[A-Za-z]{1,12}(?:\^?\{?[23]\}?)?"
    r"(?:\s*/\s*[A-Za-z]{1,12}(?:\^?\{?[23]\}?)?)?)?$",  # "5 cm", "25 km/h", "3 m/s^2"
    re.IGNORECASE,
)
_DEGREE_UNITS = {"deg", "degree", "degrees"}
_ONE_LETTER_UNITS = {"m", "g", "s", "l", "h", "v", "w", "j", "n", "a"}  # "5 m" is a unit, "2x" is algebra
_NOT_UNITS = {"pi", "sqrt", "sin", "cos", "tan", "log", "ln", "exp", "inf", "infty"}  # "2pi" is not 2


@dataclass(frozen=True)
class _Number:
    values: tuple[float, ...]  # a percentage has two readings: (50.0, 0.5)
    unit: str | None


def _parse_number(s: str) -> _Number | None:
    """A number in the usual spellings: `-1,234.5`, `1/2`, `\\frac{1}{2}`, `2e-3`, `50%`, `50\\%`, `$12`,
    `5 cm`, `30^\\circ`; None for anything else (`2x`, `2pi`, `\\sqrt{2}`)."""
    s = _unwrap(s).replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("~", " ")
    m = _NUMBER_RE.match(s.strip())
    if m is None:
        return None

    def num(t: str) -> float:
        return float(t.replace(",", ""))

    try:
        if m["fn"] is not None:
            value = num(m["fn"]) / num(m["fd"])
        elif m["d"] is not None:
            value = num(m["n"]) / num(m["d"])
        else:
            value = num(m["n"])
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    if m["sign"] in ("-", "\u2212"):
        value = -value
    unit = m["unit"]
    if unit is not None:
        unit = unit.casefold().replace(" ", "").replace("{", "").replace("}", "").replace("^", "")
        if unit in _DEGREE_UNITS or unit in ("\\circ", "\u00b0"):
            unit = "deg"
        elif "/" in unit:
            unit = "/".join(part.strip() for part in unit.split("/"))
        elif unit in _NOT_UNITS or (len(unit) == 1 and unit not in _ONE_LETTER_UNITS):
            return None
    values = (value, value / 100.0) if m["pct"] else (value,)
    return _Number(values, unit)


def _numbers_close(pred: str, gt: str, tolerance: float) -> float:
    p, g = _parse_number(pred), _parse_number(gt)
    if p is None or g is None:
        return 0.0
    if p.unit is not None and g.unit is not None and p.unit != g.unit:
        return 0.0
    for gv in g.values:
        for pv in p.values:
            if (pv == 0.0) if gv == 0.0 else abs(pv - gv) <= tolerance * abs(gv):
                return 1.0
    return 0.0


def _match_relative_numeric(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 when both are numbers within relative error 1e-3 (`1/2` vs `0.5`, `1,000` vs `1000.4`)."""
    return _numbers_close(pred, gt, RELATIVE_TOLERANCE)


def _match_relaxed_numeric(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 when both are numbers within relative error 5% (ChartQA's relaxed accuracy). A ground truth that is a
    year of this century (four characters starting "20") needs the exact answer, as in InternVL's rule."""
    if len(gt.strip()) == 4 and gt.strip().startswith("20"):
        return 0.0
    return _numbers_close(pred, gt, RELAXED_TOLERANCE)


# ---------------------------------------------------------------------------------------------------
# Symbolic (math-verify)

_EXPLOSIVE_RE = re.compile(r"\\(?:binom|dbinom|tbinom|choose|sum|prod|int|iint|iiint|oint|lim)(?![A-Za-z])")
_SMALL_FACTORIAL_RE = re.compile(r"(?<![\d.])\d{1,3}!(?!!)")
_DIGITS_RE = re.compile(r"\d+")
_LETTER_RUN_RE = re.compile(r"[A-Za-z]{3,}")
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_MATH_WORDS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "exp", "sqrt", "frac", "dfrac", "tfrac", "infty", "inf", "max", "min", "mod", "gcd", "lcm",
    "deg", "circ", "cdot", "times", "div", "left", "right", "and",
}  # fmt: skip


def _exponent_refusal(s: str) -> str | None:
    """Why the exponents in `s` could make sympy's evaluation explode, or None.

    Allowed: an integer base up to exponent 999 (`9^{999}` has ~950 digits); a single symbol
    (`x`, `\\pi`, `e`) up to 99; anything else (`(x+y+1)^{n}`, whose expansion grows fast) up to 9.
    Power towers (`a^{b^{c}}`) are refused outright.
    """
    i = s.find("^")
    while i >= 0:
        j = i + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] in "{(":
            close = "}" if s[j] == "{" else ")"
            depth, k = 0, j
            while k < len(s):
                if s[k] == s[j]:
                    depth += 1
                elif s[k] == close:
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            exponent = s[j + 1 : k]
        else:
            m = re.match(r"\d+|\\[A-Za-z]+|.", s[j:])
            exponent = m.group(0) if m else ""
        if "^" in exponent or "!" in exponent:
            return "power tower"
        big = max((len(d.lstrip("0")) for d in _DIGITS_RE.findall(exponent)), default=0)
        k = i - 1
        while k >= 0 and s[k] == " ":
            k -= 1
        before = s[: k + 1]
        if re.search(r"(?<![\w.)}\]])\d+$", before):
            limit = 3  # integer base
        elif re.search(r"(?:^|[^\\A-Za-z])[A-Za-z]$|\\[A-Za-z]+$", before):
            limit = 2  # a single symbol
        else:
            limit = 1
        if big > limit:
            return f"exponent too large for its base ({big} digits)"
        i = s.find("^", i + 1)
    return None


def _symbolic_refusal(s: str) -> str | None:
    """Why `s` is not given to math-verify (too long, too deep, could explode, plain words), or None."""
    if len(s) > MAX_SYMBOLIC_CHARS:
        return "too long"
    depth = deepest = 0
    for c in s:
        if c in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]}":
            depth -= 1
    if deepest > MAX_SYMBOLIC_NESTING:
        return "nested too deeply"
    if _EXPLOSIVE_RE.search(s):
        return "sum, product, integral, limit or binomial"
    if s.count("!") != len(_SMALL_FACTORIAL_RE.findall(s)):
        return "factorial"
    if (why := _exponent_refusal(s)) is not None:
        return why
    words = _LETTER_RUN_RE.findall(_LATEX_CMD_RE.sub(" ", _TEXT_CMD_RE.sub(" ", s)))
    if any(w.casefold() not in _MATH_WORDS for w in words):
        return "words"  # "cat" vs "act" would otherwise be the same product of symbols
    return None


class _OutOfTime(BaseException):
    """Raised inside math-verify when a symbolic check passes its deadline. A BaseException, so that the
    `except Exception` handlers of math-verify and sympy let it through."""


def _with_deadline(fn: Callable[[], float], seconds: float) -> float:
    """Run `fn` in this thread, raising `_OutOfTime` at the first Python call after `seconds`.

    A trace function (`sys.settrace`, per thread) checks the clock on every Python function call, so it
    works in any thread, unlike math-verify's SIGALRM timeout (main thread only, whole seconds, and it
    cancels any alarm the caller has set). A tracer already installed (debugger, coverage) keeps running.
    Long single C calls (a huge integer power) cannot be interrupted: `_symbolic_refusal` keeps them out.
    """
    deadline = time.monotonic() + seconds
    previous = sys.gettrace()

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _OutOfTime
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


def _match_symbolic(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """1 when math-verify finds the two answers equivalent (fractions, LaTeX, decimals, percentages,
    intervals, sets, equations, expressions). Refused inputs (see `_symbolic_refusal`) and checks that
    run past `SYMBOLIC_TIME_LIMIT_S` score 0 (logged)."""
    pred, gt = _unwrap(pred), _unwrap(gt)
    if not pred or not gt or _mc_letter(gt) is not None:
        return 0.0
    if _parse_number(pred) is not None and _parse_number(gt) is not None:
        return 0.0  # plain numbers: the numeric matchers judged them (math-verify ignores units)
    for side, text in (("answer", pred), ("ground truth", gt)):
        if (why := _symbolic_refusal(text)) is not None:
            logger.debug("symbolic check refused (%s: %s): %.80r", side, why, text)
            return 0.0
    from math_verify import LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0)]

    def check() -> float:
        # Timeouts off: math-verify's are SIGALRM-based; `_with_deadline` bounds the time instead.
        gold = parse("\\boxed{" + gt + "}", extraction_config=config, parsing_timeout=None)
        target = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
        if not gold or not target:
            return 0.0
        return 1.0 if verify(gold, target, timeout_seconds=None) else 0.0

    try:
        return _with_deadline(check, SYMBOLIC_TIME_LIMIT_S)
    except _OutOfTime:
        logger.warning(
            "symbolic check passed its %.1f s limit and scored 0: %.80r vs %.80r", SYMBOLIC_TIME_LIMIT_S, pred, gt
        )
        return 0.0


# ---------------------------------------------------------------------------------------------------
# ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(pred: str, gt: str, tau: float = ANLS_TAU) -> float:
    """Average Normalised Levenshtein Similarity of one pair: `1 - d / max(len)` after lower-casing and
    collapsing whitespace, and 0 when the normalised distance `d / max(len)` is `tau` or more.

    "kitten" vs "sitting": d = 3, max length 7, similarity 1 - 3/7 = 0.571.
    """
    p, g = _squash(pred), _squash(gt)
    longest = max(len(p), len(g))
    if longest == 0:
        return 1.0
    if abs(len(p) - len(g)) / longest >= tau:  # the distance is at least the length difference
        return 0.0
    distance = levenshtein(p, g) / longest
    return 1.0 - distance if distance < tau else 0.0


def _match_anls(pred: str, gt: str, options: dict[str, str] | None) -> float:
    """ANLS for text answers: a letter in the ground truth, no math, not an option letter nor a number
    with a unit, and the same numbers on both sides."""
    if not _LETTER_RE.search(gt) or _has_math(gt) or _has_math(pred) or _mc_letter(gt) is not None:
        return 0.0
    if _parse_number(gt) is not None:
        return 0.0  # a number with a unit ("5 m"): the numeric matchers judge it
    if options and _option_by_text(gt, options) is not None:
        return 0.0  # an option's text: the multiple-choice matcher judges it
    if _DIGITS_RE.findall(pred) != _DIGITS_RE.findall(gt):
        return 0.0
    return anls(pred, gt)


# ---------------------------------------------------------------------------------------------------
# Judge

MatcherFn = Callable[[str, str, dict[str, str] | None], float]

# The matchers, tried in this order (cheap first); the first to reach the best score is the one a
# Verdict names. Each takes (predicted answer, ground truth, options) and returns a score in [0, 1].
MATCHERS: dict[str, MatcherFn] = {
    "exact": _match_exact,
    "multiple_choice": _match_multiple_choice,
    "vqa": _match_vqa,
    "relative_numeric": _match_relative_numeric,
    "relaxed_numeric": _match_relaxed_numeric,
    "symbolic": _match_symbolic,
    "anls": _match_anls,
}


class AnswerMode(StrEnum):
    """Which matchers judge an answer; InternVL picks one per data set by its name (`mode_for_source`). Every mode
    tries the exact (case-insensitive) match first."""

    MATH = "math"  # the default, InternVL's mode for every set not named below: VQA-normalised match, multiple
    #                choice, its math score (numbers within 1e-3 relative: 19 is not 20) and math-verify
    EXACT = "exact"  # exact match only
    RELAXED = "relaxed"  # chart-style sets (chartqa): relaxed numeric accuracy (5% relative) only
    ANLS = "anls"  # docvqa, infographics: ANLS (the similarity, not the distance InternVL's code returns)
    GEOMETRY = "geometry"  # SROIE, CLEVR-math, geos, geometry sets: relaxed numeric + VQA + multiple choice + math-verify
    MULTIPLE_CHOICE = "multiple_choice"  # option letters (and option texts, given `options`) only
    ALL = "all"  # ours: the best of every matcher (5% numeric tolerance on every number); mmalign's judge before
    #              the per-set modes, kept for comparison


MODE_MATCHERS: dict[AnswerMode, tuple[str, ...]] = {
    AnswerMode.MATH: ("exact", "multiple_choice", "vqa", "relative_numeric", "symbolic"),
    AnswerMode.EXACT: ("exact",),
    AnswerMode.RELAXED: ("exact", "relaxed_numeric"),
    AnswerMode.ANLS: ("exact", "anls"),
    AnswerMode.GEOMETRY: ("exact", "multiple_choice", "vqa", "relaxed_numeric", "symbolic"),
    AnswerMode.MULTIPLE_CHOICE: ("exact", "multiple_choice"),
    AnswerMode.ALL: tuple(MATCHERS),
}
# InternVL's choice by data-set name (its file name): the first row whose keyword is in the name wins; matched
# case-insensitively here (InternVL matches case-sensitively, so "ChartQA" would fall through to the default there).
SOURCE_MODES: tuple[tuple[tuple[str, ...], AnswerMode], ...] = (
    (("chartqa",), AnswerMode.RELAXED),
    (("docvqa", "infographics"), AnswerMode.ANLS),
    (("sroie", "clevr_math", "geos", "geometry"), AnswerMode.GEOMETRY),
)


def mode_for_source(name: str | None) -> AnswerMode:
    """The judging mode InternVL uses for a data set named `name` (e.g. `chartqa_train.jsonl` -> relaxed,
    `geoqa_plus` -> math); `AnswerMode.MATH` for every other name and for None."""
    folded = (name or "").casefold()
    for keywords, mode in SOURCE_MODES:
        if any(k in folded for k in keywords):
            return mode
    return AnswerMode.MATH


def answer_mode(value: AnswerMode | str) -> AnswerMode:
    """`value` as an AnswerMode; ValueError listing the modes otherwise."""
    return parse_choice(AnswerMode, value, "answer mode")


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response, as stored in rollout records.

    `matcher` is the `MATCHERS` key that gave the score, `NO_ANSWER` when no answer could be
    extracted, or `NO_MATCH` when every matcher scored 0.
    """

    answer: str | None
    score: float
    correct: bool
    matcher: str


def _check_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__} ({value!r:.60})")
    return value


def _ground_truth(gt: str) -> str:
    gt = _check_str("ground_truth", gt)
    boxed = _last_box(gt)
    cleaned = boxed.strip() if isinstance(boxed, str) else gt.strip()
    if not cleaned:
        raise ValueError(f"ground_truth {gt!r} is empty; every verified sample needs an answer_gt")
    return cleaned


def judge(
    response: str,
    ground_truth: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    options: Mapping[str, str] | None = None,
    extracted: bool = False,
    mode: AnswerMode | str = AnswerMode.MATH,
) -> Verdict:
    """Extract the answer of `response` (unless `extracted`: then `response` is the answer) and score it
    against `ground_truth` with the best of the `mode`'s matchers (`MODE_MATCHERS`); correct iff score >
    `threshold`. The default mode, `math`, has no numeric tolerance beyond 1e-3 relative (19 is not 20), as
    InternVL judges every set that is not chart-, document- or geometry-style; `mode_for_source` picks by name.

    `options` maps option letters to option texts when the question is multiple choice. A ground truth
    holding a `\\boxed{}` is compared by the box's content. Raises ValueError for an empty ground truth,
    a threshold outside [0, 1), an option key that is not a letter or a ground-truth letter missing
    from `options`.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1) (scores are at most 1), got {threshold}")
    matchers = MODE_MATCHERS[answer_mode(mode)]
    gt = _ground_truth(ground_truth)
    opts = _check_options(options)
    if opts and (letter := _mc_letter(gt)) is not None and letter not in opts:
        raise ValueError(
            f"ground_truth {ground_truth!r} names option {letter}, which is not among the options "
            f"{', '.join(sorted(opts))}"
        )
    _check_str("response", response)
    answer = response.strip() if extracted else extract_answer(response)
    if not answer:
        return Verdict(answer=None, score=0.0, correct=False, matcher=NO_ANSWER)
    best, best_name = 0.0, NO_MATCH
    long_input = len(answer) > MAX_MATCH_CHARS or len(gt) > MAX_MATCH_CHARS
    for name in matchers:
        fn = MATCHERS[name]
        if long_input and name != "exact":
            break  # bounded time: only exact comparison for huge strings
        score = fn(answer, gt, opts)
        if score > best:
            best, best_name = score, name
        if best >= 1.0:
            break
    return Verdict(answer=answer, score=best, correct=best > threshold, matcher=best_name)


def answer_score(
    response_or_answer: str,
    ground_truth: str,
    *,
    extracted: bool = False,
    options: Mapping[str, str] | None = None,
    mode: AnswerMode | str = AnswerMode.MATH,
) -> float:
    """Score in [0, 1] of a response (or, with `extracted=True`, of an answer) against the ground truth:
    the best of the `mode`'s matchers; 0 when no answer can be extracted."""
    return judge(response_or_answer, ground_truth, extracted=extracted, options=options, mode=mode).score


def is_correct(
    response: str,
    ground_truth: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    options: Mapping[str, str] | None = None,
    mode: AnswerMode | str = AnswerMode.MATH,
) -> bool:
    """Whether the answer extracted from `response` is correct under `mode`: score > `threshold` (0.9 as
    published); False when the response has no extractable answer."""
    return judge(response, ground_truth, threshold=threshold, options=options, mode=mode).correct
