"""The VisualPRM conversation: the PRM's system prompt, its turns, the `+`/`-` judgements and their tokens.

`to_visualprm_conversation` writes a labelled solution as the VisualPRM400K multi-turn conversation (system prompt,
then per step a human turn and a gpt turn `+`/`-`); `from_visualprm_conversation` parses one back;
`check_judgement_tokens` proves a tokenizer gives each judgement one token. Bad input raises
`reward.checks.FormatError` naming the turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from rlhf.errors import UserError
from rlhf.processing import IM_END, IM_START

from . import checks
from .steps import join_steps

# The system prompt the released VisualPRM checkpoint expects; an interface constant, reproduced verbatim.
PRM_SYSTEM_PROMPT = """\
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide \
a problem statement followed by the first step of the solution process. For each subsequent turn, I will give you \
a new step in the solution. Your role is to assess whether the solution process is correct up to the current step.

- In the **first round**, I will input the problem and the first step of the solution process.
- In **each subsequent round**, I will provide the next step in the solution.

For each step, you should:

- Respond with **"+"** if you believe the solution process is correct up to this step.
- Respond with **"-"** if you detect any issues or errors in the process up to this step.

Please note:
- Only respond with **"+"** or **"-"**. Do not provide any additional explanations, comments, or justifications.

Your task is to verify the accuracy and correctness of each step in the given solution process."""

QUESTION_HEADER = "### Question:\n"
SOLUTION_HEADER = "\n\n### Solution Process:\n"


class Judgement(StrEnum):
    """The PRM's answer to one step."""

    PLUS = "+"  # the solution is correct up to this step
    MINUS = "-"


class Role(StrEnum):
    """`from` of a VisualPRM400K conversation turn."""

    SYSTEM = "system"
    HUMAN = "human"
    GPT = "gpt"


class JudgementTokenError(UserError, ValueError):
    """A tokenizer cannot give the `+`/`-` judgements one token each."""


def hard_label(score: float, threshold: float = 0.0) -> bool:
    """`+` iff score > threshold; the published labelling uses threshold 0 (any correct continuation)."""
    return bool(score > threshold)


def to_visualprm_conversation(question: str, steps: Sequence[str], labels: Sequence[bool | float],
                              threshold: float = 0.0, *, system: str = PRM_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The VisualPRM400K multi-turn conversation: system prompt, then per step a human turn (the first one carries
    the question, `<image>` placeholder included) and a gpt turn `+`/`-`. Soft labels give `+` iff > threshold."""
    question = checks.text(question, "question")
    if SOLUTION_HEADER in question:
        raise checks.fail("question", f"no {SOLUTION_HEADER!r} inside the question (it would not parse back)")
    steps = checks.steps(list(steps) if isinstance(steps, (list, tuple)) else steps)
    labels = checks.labels(list(labels) if isinstance(labels, (list, tuple)) else labels, len(steps))
    conversation = [{"from": Role.SYSTEM.value, "value": system}]
    for i, (step, label) in enumerate(zip(steps, labels)):
        user = f"{QUESTION_HEADER}{question}{SOLUTION_HEADER}{step}" if i == 0 else step
        judgement = Judgement.PLUS if hard_label(label, threshold) else Judgement.MINUS
        conversation += [{"from": Role.HUMAN.value, "value": user}, {"from": Role.GPT.value, "value": judgement.value}]
    return conversation


def outcome_example(steps: Sequence[str], labels: Sequence[bool | float], response: str | None = None
                    ) -> tuple[list[str], list[bool | float]]:
    """The outcome-reward (ORM) variant of one labelled solution, as InternVL's VisualPRM pipeline writes it: the
    whole solution in one turn (`response` when given, else the steps joined by blank lines, stripped), judged by
    its LAST step's label. `to_visualprm_conversation` of the result is InternVL's ORM conversation."""
    if not steps:
        raise checks.fail("steps", "a non-empty list of steps", list(steps))
    whole = response.strip() if isinstance(response, str) and response.strip() else join_steps(steps).strip()
    return [whole], [labels[-1]]


def from_visualprm_conversation(conversations: Any, *, system: str = PRM_SYSTEM_PROMPT
                                ) -> tuple[str, list[str], list[bool]]:
    """Parse a VisualPRM400K conversation back into (question, steps, labels). Raises `FormatError` naming the
    turn (`[3].from`, ...) when the structure differs from what `to_visualprm_conversation` writes."""
    layout = "a list of turns: system, then (human, gpt) pairs, one pair per step"
    if not isinstance(conversations, list):
        raise checks.fail(None, layout, conversations)
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            raise checks.fail(f"[{i}]", 'a turn {"from": ..., "value": ...} with exactly these keys', turn)
        want = Role.SYSTEM if i == 0 else Role.HUMAN if i % 2 else Role.GPT
        if turn["from"] != want:
            raise checks.fail(f"[{i}].from", repr(want.value), turn["from"])
        checks.text(turn["value"], f"[{i}].value", blank_ok=True)
    if len(conversations) < 3 or len(conversations) % 2 == 0:
        raise checks.fail(None, f"{layout} (ending with a gpt judgement), got {len(conversations)} turns")
    if conversations[0]["value"] != system:
        expected = "the PRM system prompt (reward.conversation.PRM_SYSTEM_PROMPT)" if system == PRM_SYSTEM_PROMPT \
            else "the given system prompt"
        raise checks.fail("[0].value", expected, conversations[0]["value"])
    first = conversations[1]["value"]
    if not first.startswith(QUESTION_HEADER) or SOLUTION_HEADER not in first:
        raise checks.fail("[1].value", f"{QUESTION_HEADER!r} + question + {SOLUTION_HEADER!r} + first step", first)
    question, step_1 = first[len(QUESTION_HEADER):].split(SOLUTION_HEADER, 1)
    question = checks.text(question, "[1].value (question)")
    steps = [step_1] + [turn["value"] for turn in conversations[3::2]]
    for i, step in enumerate(steps):
        checks.step_text(step, f"[{2 * i + 1}].value")
    labels = []
    for i, turn in enumerate(conversations[2::2]):
        if turn["value"] not in tuple(Judgement):
            raise checks.fail(f"[{2 * i + 2}].value", " or ".join(repr(j.value) for j in Judgement), turn["value"])
        labels.append(turn["value"] == Judgement.PLUS)
    return question, steps, labels



def check_judgement_tokens(tokenizer: Any, plus: str = Judgement.PLUS.value, minus: str = Judgement.MINUS.value,
                           *, before: str = f"{IM_START}assistant\n", after: str = IM_END) -> tuple[int, int]:
    """Token ids of the `+` and `-` judgements, checked to be usable by the PRM.

    Each must encode (without special tokens) to exactly one token that is not the unknown token, and keep that
    single token inside an assistant turn (`before + judgement + after` must encode as
    `encode(before) + [id] + encode(after)`, so it merges with neither side); the two ids must differ.
    Raises `JudgementTokenError` naming the tokenizer and the pieces it produced.
    """
    name = f"tokenizer {getattr(tokenizer, 'name_or_path', '') or '<built in-process>'!r} " \
           f"({type(tokenizer).__name__})"

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    def pieces(ids: list[int]) -> list[str]:
        return list(tokenizer.convert_ids_to_tokens(ids))

    ids = []
    for piece in (plus, minus):
        alone = encode(piece)
        if len(alone) != 1:
            raise JudgementTokenError(f"{name} encodes the judgement {piece!r} as {len(alone)} tokens {pieces(alone)}; "
                                      "the PRM needs exactly one: pick judgement strings that are single tokens")
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and alone[0] == unk:
            raise JudgementTokenError(f"{name} encodes the judgement {piece!r} as the unknown token "
                                      f"{pieces(alone)}; it is not in the vocabulary")
        in_turn, expected = encode(before + piece + after), encode(before) + alone + encode(after)
        if in_turn != expected:
            raise JudgementTokenError(f"{name} merges the judgement {piece!r} with the assistant turn around it: "
                                      f"{pieces(in_turn)} instead of {pieces(expected)}")
        ids.append(alone[0])
    if ids[0] == ids[1]:
        raise JudgementTokenError(f"{name} gives {plus!r} and {minus!r} the same token id {ids[0]}")
    return ids[0], ids[1]
