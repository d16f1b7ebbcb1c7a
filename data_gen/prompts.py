"""Prompt templates for rollouts. A template is a format string with a `{question}` field."""

from __future__ import annotations

from enum import StrEnum

from rlhf.errors import UserError


class PromptTemplate(StrEnum):
    """Named templates; a recipe may also give its own format string."""

    BOXED = "boxed"  # InternVL3: reason step by step, last line `Answer: \boxed{...}`
    FINAL_ANSWER = "final_answer"  # the older MMPR prompt: `Final answer: ..`
    PLAIN = "plain"  # the question alone (a policy fine-tuned to answer in the boxed format already)


TEMPLATES: dict[str, str] = {
    PromptTemplate.BOXED: (
        "{question}\n\nAnswer the question above. Think step by step, separating the steps with blank lines. "
        "The last line of your response must be of the form 'Answer: \\boxed{ANSWER}' (without quotes), where "
        "ANSWER is your final answer. If unsure, give your best guess."
    ),
    PromptTemplate.FINAL_ANSWER: (
        "{question}\n\nAnswer the question above step by step, and end with a line 'Final answer: ..'."
    ),
    PromptTemplate.PLAIN: "{question}",
}


def build_prompt(question: str, template: str = PromptTemplate.BOXED) -> str:
    """`template` is a name from `PromptTemplate` or a format string containing `{question}`."""
    text = TEMPLATES.get(template, template)
    if "{question}" not in text:
        names = ", ".join(t.value for t in PromptTemplate)
        raise UserError(f"prompt template {template!r} is neither one of {names} nor a string with {{question}}")
    return text.replace("{question}", question)
