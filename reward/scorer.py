"""Scoring solutions with a generative process reward model (reference section 3, "Scoring").

A step's score is P(`+`) after a softmax over the two logits {`+`, `-`} (`reward.prm_losses.plus_probability`, the
function training's metrics use) at the position where the assistant's answer to that step begins (the last token
of `<|im_start|>assistant\\n`, just before the judgement token). That position sees only earlier tokens, so the
judgement written after it does not matter: every step is written as `+`.

Three ways to compute the same numbers (`ScoringMethod`):

- `shared_prefix` (default): the image + question prefix, which every solution to one question shares, runs ONCE
  through the model (vision encoder included) with `use_cache=True`; the N solution bodies then run as a right-padded
  batch continuing from that KV cache (repeated along the batch dimension), with position ids continuing after the
  prefix and an attention mask covering prefix + body. One forward per chunk of `batch_size` bodies.
- `per_solution`: one full forward (prefix + body, images re-encoded) per solution, no prefix reuse.
- `per_step`: the first released scorer: one forward per step prefix, reading its last position.

In every method the LM head runs only at the judgement positions: the backbone's hidden states are gathered there,
projected by the LM head, and only the `+`/`-` columns are read; no (batch, seq, vocab) logits tensor is made.

`as_grpo_reward(scorer)` wraps a scorer as a TRL `GRPOTrainer` reward function.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from rlhf.choices import parse_choice
from rlhf.processing import InternVLChatProcessor, text_tokenizer

from .prm_data import encode_prefix, encode_steps, judgement_ids
from .prm_losses import plus_probability
from .step_settings import StepSettings


class Aggregation(StrEnum):
    """How step scores make a solution score."""

    MEAN = "mean"  # published default
    MIN = "min"
    PRODUCT = "product"
    LAST = "last"


AGGREGATORS: dict[Aggregation, Callable[[Sequence[float]], float]] = {
    Aggregation.MEAN: lambda s: sum(s) / len(s),
    Aggregation.MIN: min,
    Aggregation.PRODUCT: math.prod,
    Aggregation.LAST: lambda s: s[-1],
}
EMPTY_SOLUTION_SCORE = 0.0  # a solution with no non-blank step: ranked below every scored one


class ScoringMethod(StrEnum):
    """How the model is run; all three give the same step scores."""

    SHARED_PREFIX = "shared_prefix"
    PER_SOLUTION = "per_solution"
    PER_STEP = "per_step"


@dataclass
class SolutionScore:
    step_scores: list[float]
    score: float


@dataclass
class ScoringStats:
    """Work done since the last `reset`: what the benchmark and tests compare between methods."""

    forwards: int = 0  # language-model forward calls
    sequences: int = 0  # rows in those calls (a shared prefix and each body count one each)
    tokens: int = 0  # tokens through the language model, padding excluded
    padded_tokens: int = 0  # the same, right padding included
    image_tiles: int = 0  # tiles through the vision encoder

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


ImageLike = Image.Image | str | Path
Solution = str | Sequence[str]


class PRMScorer:
    """Step and solution scores of a VisualPRM-style generative PRM.

    `model` is an `InternVLForConditionalGeneration` (with an `InternVLChatProcessor`) or a text-only causal LM
    (with its tokenizer); a PEFT wrapper is unwrapped. `settings` are the PRM's step settings
    (`reward.step_settings`: read them from its checkpoint with `scoring_settings(path)`; default: `StepSettings()`,
    the released VisualPRM's): text solutions are split with them (`StepSettings.split`), and its system prompt
    opens every conversation; a list of strings is taken as the steps. `max_patches` is the tile budget per question
    (split evenly over several images, at least one tile each; default: the processor's). `batch_size` is the
    number of solutions (bodies) per forward.
    """

    def __init__(self, model, processor, aggregation: Aggregation | str = Aggregation.MEAN, batch_size: int = 8,
                 method: ScoringMethod | str = ScoringMethod.SHARED_PREFIX, max_patches: int | None = None,
                 settings: StepSettings | None = None):
        self.aggregation = parse_choice(Aggregation, aggregation, "aggregation")
        self.method = parse_choice(ScoringMethod, method, "method")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor = model, processor
        self.settings = settings if settings is not None else StepSettings()
        self.batch_size, self.max_patches = batch_size, max_patches
        self.plus_id, self.minus_id = judgement_ids(processor)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone, self.lm_head = base.model, base.get_output_embeddings()
        tokenizer = text_tokenizer(processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.stats = ScoringStats()

    # -- public API -----------------------------------------------------------------------------------------------
    def steps_of(self, solution: Solution) -> list[str]:
        if isinstance(solution, str):
            return self.settings.split(solution)
        return list(solution)

    def aggregate(self, step_scores: Sequence[float]) -> float:
        return AGGREGATORS[self.aggregation](step_scores) if step_scores else EMPTY_SOLUTION_SCORE

    def score(self, question: str, images: Sequence[ImageLike] | None, solution: Solution) -> SolutionScore:
        return self.score_many(question, images, [solution])[0]

    def score_many(self, question: str, images: Sequence[ImageLike] | None,
                   solutions: Sequence[Solution]) -> list[SolutionScore]:
        """Scores of N solutions to one question (the prefix is encoded once)."""
        steps = [self.steps_of(s) for s in solutions]
        num_tiles, pixel_values = self._pixel_values(images)
        prefix = encode_prefix(self.processor, question, num_tiles, self.settings.system_prompt)
        scorable = [i for i, s in enumerate(steps) if s]
        bodies = [encode_steps(self.processor, steps[i]) for i in scorable]
        for ids, _ in bodies:
            if self.image_token_id is not None and self.image_token_id in ids:
                raise ValueError("a solution step contains the image-context token; solutions must be plain text")
        run = {ScoringMethod.SHARED_PREFIX: self._shared_prefix, ScoringMethod.PER_SOLUTION: self._per_solution,
               ScoringMethod.PER_STEP: self._per_step}[self.method]
        with torch.inference_mode():
            probs = run(prefix, bodies, pixel_values) if bodies else []
        out = [SolutionScore([], EMPTY_SOLUTION_SCORE) for _ in solutions]
        for i, p in zip(scorable, probs):
            out[i] = SolutionScore(p, self.aggregate(p))
        return out

    # -- images -----------------------------------------------------------------------------------------------
    def _pixel_values(self, images: Sequence[ImageLike] | None) -> tuple[list[int], torch.Tensor | None]:
        images = list(images or [])
        if not images:
            return [], None
        if not isinstance(self.processor, InternVLChatProcessor):
            raise ValueError("this PRM is text-only (its processing class is a tokenizer) but images were given")
        ip = self.processor.image_processor
        budget = max(1, (self.max_patches or ip.max_patches) // len(images))
        tiles = []
        for image in images:
            if not isinstance(image, Image.Image):
                with Image.open(image) as f:
                    image = f.convert("RGB")
            tiles.append(ip.tiles(image, budget))
        pixel_values = ip.to_tensor([t for ts in tiles for t in ts])
        return [len(ts) for ts in tiles], pixel_values.to(self._device, self.model.dtype)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- methods ----------------------------------------------------------------------------------------------
    def _shared_prefix(self, prefix, bodies, pixel_values) -> list[list[float]]:
        ids = torch.tensor([prefix], device=self._device)
        kwargs = {} if pixel_values is None else {"pixel_values": pixel_values}
        out = self.backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **kwargs)
        self._count(1, 1, len(prefix), len(prefix), pixel_values)
        cache = out.past_key_values
        order = sorted(range(len(bodies)), key=lambda i: -len(bodies[i][0]))  # long first: less padding per chunk
        probs: list[list[float]] = [[] for _ in bodies]
        chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for n, chunk in enumerate(chunks):
            past = cache if n == len(chunks) - 1 else copy.deepcopy(cache)  # the last chunk may consume the cache
            past.batch_repeat_interleave(len(chunk))
            rows = [bodies[i][0] for i in chunk]
            reads = [[o - 1 for o in bodies[i][1]] for i in chunk]
            for i, p in zip(chunk, self._forward(rows, reads, past=past, past_len=len(prefix))):
                probs[i] = p
        return probs

    def _per_solution(self, prefix, bodies, pixel_values) -> list[list[float]]:
        probs: list[list[float]] = []
        for start in range(0, len(bodies), self.batch_size):
            chunk = bodies[start:start + self.batch_size]
            rows = [prefix + ids for ids, _ in chunk]
            reads = [[len(prefix) + o - 1 for o in offsets] for _, offsets in chunk]
            pv = None if pixel_values is None else pixel_values.repeat(len(chunk), 1, 1, 1)
            probs += self._forward(rows, reads, pixel_values=pv)
        return probs

    def _per_step(self, prefix, bodies, pixel_values) -> list[list[float]]:
        probs = []
        for ids, offsets in bodies:
            row = []
            for o in offsets:
                tokens = prefix + ids[:o]
                row += self._forward([tokens], [[len(tokens) - 1]], pixel_values=pixel_values)[0]
            probs.append(row)
        return probs

    # -- one forward ------------------------------------------------------------------------------------------
    def _forward(self, rows: list[list[int]], reads: list[list[int]], *, past=None, past_len: int = 0,
                 pixel_values: torch.Tensor | None = None) -> list[list[float]]:
        """P(`+`) at positions `reads[i]` (indices into `rows[i]`) of right-padded rows that continue `past`."""
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), past_len + width), dtype=torch.long)
        mask[:, :past_len] = 1
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, past_len:past_len + len(row)] = 1
        positions = torch.arange(past_len, past_len + width).expand(len(rows), -1)
        kwargs: dict[str, Any] = {} if pixel_values is None else {"pixel_values": pixel_values}
        if past is not None:
            kwargs.update(past_key_values=past, use_cache=True)
        else:
            kwargs["use_cache"] = False
        dev = self._device
        hidden = self.backbone(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                               **kwargs).last_hidden_state
        self._count(1, len(rows), sum(map(len, rows)), ids.numel(), pixel_values)
        row_idx = torch.tensor([i for i, r in enumerate(reads) for _ in r], device=dev)
        col_idx = torch.tensor([p for r in reads for p in r], device=dev)
        plus = plus_probability(self.lm_head(hidden[row_idx, col_idx]), self.plus_id, self.minus_id).tolist()
        out, start = [], 0
        for r in reads:
            out.append(plus[start:start + len(r)])
            start += len(r)
        return out

    def _count(self, forwards: int, sequences: int, tokens: int, padded: int, pixel_values: torch.Tensor | None
               ) -> None:
        self.stats.forwards += forwards
        self.stats.sequences += sequences
        self.stats.tokens += tokens
        self.stats.padded_tokens += padded
        self.stats.image_tiles += 0 if pixel_values is None else pixel_values.shape[0]


# -- TRL GRPOTrainer reward function -------------------------------------------------------------------------------


def _text_of(content: Any) -> tuple[str, list]:
    """(text, images) of a message content: a string, or a list of typed parts (`text` / `image`)."""
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content or []:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "image" and part.get("image") is not None:
            images.append(part["image"])
    return "\n".join(texts), images


def _question_of(prompt: Any) -> tuple[str, list]:
    """Question text and the images embedded in a prompt (a string, or conversational messages: user turns)."""
    if isinstance(prompt, str):
        return prompt, []
    texts, images = [], []
    for message in prompt:
        if message.get("role") == "user":
            text, imgs = _text_of(message.get("content"))
            texts.append(text)
            images += imgs
    return "\n".join(texts), images


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "\n\n".join(_text_of(m.get("content"))[0] for m in completion if m.get("role", "assistant") == "assistant")


def _fingerprint(images: Sequence[ImageLike]) -> tuple:
    keys = []
    for image in images:
        if isinstance(image, Image.Image):
            keys.append((image.size, image.mode, hashlib.sha1(image.tobytes()).hexdigest()))
        else:
            keys.append(str(image))
    return tuple(keys)


def as_grpo_reward(scorer: PRMScorer, question_key: str = "prompt", image_key: str = "images"):
    """A TRL `GRPOTrainer` reward function: `reward(prompts, completions, **kwargs) -> list[float]`.

    GRPOTrainer calls it with the prompts, the completions (strings, or `[{"role": "assistant", "content": ...}]`
    when conversational), `completion_ids` and every other dataset column as a keyword list. The question is the
    prompt (its user turns' text when conversational) or the column `question_key`; the images are the column
    `image_key` (`images`, or a single-image `image` column), else the image parts of a conversational prompt.
    Completions of one question (its G generations) are scored together, so the prefix runs once per question.
    """

    def reward(prompts, completions, **kwargs) -> list[float]:
        questions = prompts if question_key == "prompt" else kwargs[question_key]
        if image_key in kwargs:
            column = kwargs[image_key]
        elif image_key == "images" and "image" in kwargs:
            column = [[x] if x is not None else None for x in kwargs["image"]]
        else:
            column = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        inputs = []
        for i, (question, images) in enumerate(zip(questions, column, strict=True)):
            text, embedded = _question_of(question)
            if images is not None and not isinstance(images, (list, tuple)):
                images = [images]
            images = list(images) if images is not None else embedded
            inputs.append((text, images))
            groups.setdefault((text, _fingerprint(images)), []).append(i)
        rewards = [0.0] * len(prompts)
        for idx in groups.values():
            text, images = inputs[idx[0]]
            scores = scorer.score_many(text, images, [_completion_text(completions[i]) for i in idx])
            for i, s in zip(idx, scores):
                rewards[i] = s.score
        return rewards

    reward.__name__ = f"prm_{scorer.aggregation.value}"
    return reward


__all__ = ["Aggregation", "AGGREGATORS", "EMPTY_SOLUTION_SCORE", "ScoringMethod", "SolutionScore", "ScoringStats",
           "PRMScorer", "as_grpo_reward"]
