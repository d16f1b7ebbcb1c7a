"""Prompt templates of the data jobs: InternVL's rollout instructions (interface constants, verbatim) and ours.

A template is a format string with a `{question}` field. They live here, below `data_gen`, because a PRM's first
turn carries the instruction-wrapped prompt the policy saw (InternVL's VisualPRM rows), so `reward` needs them too.
"""

from __future__ import annotations

from enum import StrEnum

from rlhf.errors import UserError


class PromptTemplate(StrEnum):
    """Named templates; a recipe may also give its own format string."""

    BOXED = "boxed"  # InternVL3's prompt (InternVL's INSTRUCTION_BOXED_EN), verbatim: last line `Answer: \boxed{..}`
    BOXED_ZH = "boxed_zh"  # its Chinese version (INSTRUCTION_BOXED_ZH), verbatim
    FINAL_ANSWER = "final_answer"  # the older MMPR prompt (INSTRUCTION_EN), verbatim: `Final answer: ..`
    FINAL_ANSWER_ZH = "final_answer_zh"  # its Chinese version (INSTRUCTION_ZH), verbatim: `答案: ...`
    BOXED_STEPS = "boxed_steps"  # ours: the boxed prompt plus an instruction to separate steps with blank lines
    FINAL_ANSWER_SHORT = "final_answer_short"  # ours: a shorter `Final answer: ..` prompt
    PLAIN = "plain"  # the question alone (a policy fine-tuned to answer in the boxed format already)


# InternVL's rollout prompts (tools/reasoning_data_pipeline/utils/constants.py of the InternVL repository):
# interface constants, reproduced verbatim, so rollouts ask exactly what InternVL's pipeline asks.
TEMPLATES: dict[str, str] = {
    PromptTemplate.BOXED: (
        "{question}\n"
        "Answer the preceding question. The last line of your response should follow this format: "
        "'Answer: \\boxed{$FINAL_ANSWER}' (without quotes), where 'FINAL_ANSWER' is your conclusion "
        "based on the reasoning provided. If you are uncertain or the problem is too complex, make "
        "a reasoned guess based on the information provided. Avoid repeating steps indefinitely\u2014"
        "provide your best guess even if unsure. Think step by step logically, considering all "
        "relevant information before answering."
    ),
    PromptTemplate.BOXED_ZH: (
        "{question}\n"
        "请回答上述问题。你的回答最后一行应遵循以下格式："
        "“答案：\\boxed{$FINAL_ANSWER}”（不包含引号），其中“FINAL_ANSWER”是你根据推理得出的最终结论。"
        "如果你不确定答案或问题过于复杂，请基于已有信息做出有理有据的猜测。"
        "避免无限重复推理步骤——即使不完全确定，也请给出你认为最合理的答案。"
        "请一步一步进行逻辑思考，充分考虑所有相关信息后再作答。"
    ),
    PromptTemplate.FINAL_ANSWER: (
        "Your task is to answer the question below. "
        "Give step by step reasoning before you answer, and when you're ready to answer, "
        "please use the format \"Final answer: ..\""
        "\n\nQuestion:\n\n{question}"
    ),
    PromptTemplate.FINAL_ANSWER_ZH: (
        "你的任务是回答以下问题。在回答之前，请逐步推理说明您的思路。当你准备好给出答案时，请使用以下格式：\"答案: ...\""
        "\n\n问题:\n\n{question}"
    ),
    PromptTemplate.BOXED_STEPS: (
        "{question}\n\nAnswer the question above. Think step by step, separating the steps with blank lines. "
        "The last line of your response must be of the form 'Answer: \\boxed{ANSWER}' (without quotes), where "
        "ANSWER is your final answer. If unsure, give your best guess."
    ),
    PromptTemplate.FINAL_ANSWER_SHORT: (
        "{question}\n\nAnswer the question above step by step, and end with a line 'Final answer: ..'."
    ),
    PromptTemplate.PLAIN: "{question}",
}
BOXED_TEMPLATES = (PromptTemplate.BOXED, PromptTemplate.BOXED_ZH, PromptTemplate.BOXED_STEPS)


def is_boxed_template(template: str) -> bool:
    """Whether `template` (a name or a format string) asks for the answer in `\\boxed{}`."""
    return template in BOXED_TEMPLATES or (template not in TEMPLATES and "\\boxed" in template)


def build_prompt(question: str, template: str = PromptTemplate.BOXED) -> str:
    """`template` is a name from `PromptTemplate` or a format string containing `{question}`."""
    text = TEMPLATES.get(template, template)
    if "{question}" not in text:
        names = ", ".join(t.value for t in PromptTemplate)
        raise UserError(f"prompt template {template!r} is neither one of {names} nor a string with {{question}}")
    return text.replace("{question}", question)


def prm_question(question: str, meta: dict, template: str = "auto", n_images: int = 0) -> str:
    """The question of a PRM row's first turn. InternVL's VisualPRM pipeline writes the prompt the policy saw (its
    instruction around the question, with a single `<image>` moved to the front) and keeps the raw question as
    `question_orig`. `template`: 'auto' takes a record with `question_orig` as written (already the prompt), wraps
    one whose meta names its `prompt_template`, and leaves any other as written; 'none' leaves every question as
    written; a template name or format string wraps every question with it."""
    if template == "none":
        return question
    if template == "auto":
        if "question_orig" in meta:
            return question
        template = meta.get("prompt_template")
        if not isinstance(template, str) or not template:
            return question
    text = build_prompt(question, template)
    if n_images == 1 and text.count("<image>") == 1:  # InternVL: one image goes in front of the whole prompt
        text = "<image>\n" + text.replace("<image>\n", "", 1).replace("<image>", "", 1)
    return text
