"""Token layout of a VisualPRM conversation, shared by PRM training and scoring.

One solution is one multi-turn ChatML conversation (reference section 3):

    <|im_start|>system\n{PRM_SYSTEM_PROMPT}<|im_end|>\n
    <|im_start|>user\n### Question:\n{question}\n\n### Solution Process:\n      <- shared prefix (N solutions)
    {step_1}<|im_end|>\n<|im_start|>assistant\n + <|im_end|>
    \n<|im_start|>user\n{step_2}<|im_end|>\n<|im_start|>assistant\n - <|im_end|> ...

Pieces are tokenized separately and concatenated, so the shared prefix is token-identical across solutions and
training and scoring see exactly the same ids. `judgement_positions[i]` is the index of step i's `+`/`-` token;
the logits that predict it sit one position earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rlhf.processing import IM_END, IM_START, IMAGE_PLACEHOLDER, text_tokenizer, with_placeholders

from .conversation import PRM_SYSTEM_PROMPT, QUESTION_HEADER, SOLUTION_HEADER, Judgement, check_judgement_tokens

TURN_END = f"{IM_END}\n{IM_START}assistant\n"
NEXT_TURN = f"\n{IM_START}user\n"


@dataclass
class PRMEncoding:
    """Token ids of one PRM conversation. `prefix_len` tokens (system + question + images) are shared by every
    solution to the same question; `judgement_positions` index the `+`/`-` tokens, one per step."""

    input_ids: list[int]
    prefix_len: int
    judgement_positions: list[int]
    labels: list[float] = field(default_factory=list)



def judgement_ids(processing_class) -> tuple[int, int]:
    """(id of `+`, id of `-`), checked to be single tokens."""
    return check_judgement_tokens(text_tokenizer(processing_class))


def encode_prefix(processing_class, question: str, num_tiles: Sequence[int] = (),
                  system: str | None = PRM_SYSTEM_PROMPT) -> list[int]:
    """Ids of the part shared by all solutions to `question`: system turn, question header, images."""
    question = with_placeholders(question, len(num_tiles))
    head = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    text = f"{head}{IM_START}user\n{QUESTION_HEADER}{question}{SOLUTION_HEADER}"
    if num_tiles:
        text = processing_class.expand_images(text, num_tiles)
    elif IMAGE_PLACEHOLDER in text:
        raise ValueError(f"question has {IMAGE_PLACEHOLDER} placeholders but no images")
    return _encode(processing_class, text)


def encode_steps(processing_class, steps: Sequence[str], labels: Sequence[bool | float] | None = None,
                 threshold: float = 0.0) -> tuple[list[int], list[int]]:
    """Ids of the solution turns (after the shared prefix) and the offsets of the judgement tokens in them.
    Without labels every judgement is written as `+` (scoring reads the logits before it, which never see it)."""
    plus, minus = judgement_ids(processing_class)
    im_end = text_tokenizer(processing_class).convert_tokens_to_ids(IM_END)
    ids: list[int] = []
    positions: list[int] = []
    for i, step in enumerate(steps):
        if not step.strip():
            raise ValueError(f"step {i + 1} is empty")
        ids += _encode(processing_class, (NEXT_TURN if i else "") + step + TURN_END)
        positive = True if labels is None else labels[i] is True or (
            not isinstance(labels[i], bool) and float(labels[i]) > threshold)
        positions.append(len(ids))
        ids += [plus if positive else minus, im_end]
    return ids, positions


def encode_prm(processing_class, question: str, steps: Sequence[str], labels: Sequence[bool | float] | None = None,
               num_tiles: Sequence[int] = (), system: str | None = PRM_SYSTEM_PROMPT,
               threshold: float = 0.0) -> PRMEncoding:
    """The whole conversation of one solution."""
    prefix = encode_prefix(processing_class, question, num_tiles, system)
    body, offsets = encode_steps(processing_class, steps, labels, threshold)
    soft = [] if labels is None else [float(x) for x in labels]
    return PRMEncoding(prefix + body, len(prefix), [len(prefix) + o for o in offsets], soft)


def _encode(processing_class, text: str) -> list[int]:
    return text_tokenizer(processing_class)(text, add_special_tokens=False)["input_ids"]


__all__ = ["PRMEncoding", "encode_prefix", "encode_steps", "encode_prm", "judgement_ids", "Judgement"]
