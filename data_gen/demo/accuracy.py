"""Accuracy of a policy on tile-sum items: greedy, pass@n and majority@n, and where greedy answers first go wrong.

Generation runs through the in-process `HFBackend` (batched, left-padded, KV cache; greedy is argmax), with the
question alone as the prompt (`PromptTemplate.PLAIN`: the demo policy learned its answer format in SFT). Answers
are judged with `reward.verify.is_correct` against the item's `answer`.

    acc, responses = greedy_accuracy(model, processor, task.items("test", 200))
    scores = sample_accuracy(model, processor, items, n=8, temperature=0.8)   # scores.pass_at_n, .majority_at_n
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Sequence

from reward.steps import split_steps
from reward.verify import extract_answer, is_correct
from rlhf.errors import UserError

from ..prompts import PromptTemplate, build_prompt
from .task import TaskItem, claim_kind, step_truth

MAX_NEW_TOKENS = 128  # the longest gold solution of 5 tiles: 77 tokens with <|im_end|> (117 per tile)


class FirstError(StrEnum):
    """Where a response first goes wrong, by `data_gen.demo.task.step_truth`: the kind of its first wrong claim."""

    NONE = "none"  # every step right, the answer included
    READING = "reading"  # a value read from the image is wrong, or a claim before any partial sum is unparseable
    SUM = "sum"  # every reading is right, a partial sum is wrong (or a later claim unparseable)
    ANSWER = "answer"  # every partial sum is right, the answer step (or a step after it) is wrong
    INCOMPLETE = "incomplete"  # no step is wrong but the answer never comes


@dataclass
class SampleScores:
    """`n` samples per item: `pass_at_n` (some sample correct), `majority_at_n` (the most frequent extracted answer,
    ties to the earliest, is correct), `mean_accuracy` (the fraction of correct samples: pass@1), `responses[i]`
    the samples of item i and `correct[i]` their verdicts."""

    n: int
    pass_at_n: float
    majority_at_n: float
    mean_accuracy: float
    responses: list[list[str]]
    correct: list[list[bool]]


def _generate(model, processor, items: Sequence[TaskItem], *, n: int, temperature: float, batch_size: int,
              seed: int, max_new_tokens: int) -> list[list[str]]:
    from ..backends.base import GenerationRequest, SamplingParams
    from ..backends.hf import HFBackend
    from rlhf.jobs.runner import item_seed

    if batch_size < 1:
        raise UserError(f"evaluation batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    backend = HFBackend(model=model, processor=processor, batch_size=batch_size)
    params = SamplingParams(temperature=temperature, top_k=None, top_p=1.0, n=n, max_new_tokens=max_new_tokens)
    requests = [GenerationRequest(id=it.id, prompt=build_prompt(it.question, PromptTemplate.PLAIN),
                                  images=[it.image], sampling=params, seed=item_seed(seed, it.id)) for it in items]
    try:
        results = backend.generate(requests)
    finally:
        model.train(was_training)
    failed = [r for r in results if not r.ok]
    if failed:
        raise UserError(f"evaluation: generation failed for {len(failed)} item(s), first {failed[0].id}: "
                        f"{failed[0].error}")
    return [r.texts for r in results]


def greedy_accuracy(model: Any, processor: Any, items: Sequence[TaskItem], batch_size: int = 64,
                    max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[float, list[str]]:
    """(fraction of items whose greedy response is correct, the responses in item order)."""
    if not items:
        return 0.0, []
    texts = _generate(model, processor, items, n=1, temperature=0.0, batch_size=batch_size, seed=0,
                      max_new_tokens=max_new_tokens)
    responses = [t[0] for t in texts]
    correct = sum(is_correct(r, it.answer) for r, it in zip(responses, items))
    return correct / len(items), responses


def majority_correct(responses: Sequence[str], verdicts: Sequence[bool]) -> bool:
    """Whether the most frequent extracted answer (ties: the one seen first) is correct; False with no answer."""
    answers = [extract_answer(r) for r in responses]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == top)
    return verdicts[answers.index(winner)]


def sample_accuracy(model: Any, processor: Any, items: Sequence[TaskItem], *, n: int = 8, temperature: float = 0.8,
                    batch_size: int = 64, seed: int = 0, max_new_tokens: int = MAX_NEW_TOKENS) -> SampleScores:
    """Sample `n` responses per item at `temperature` (no top-k/top-p cut; sample j of an item is seeded from
    `seed`, the item id and j, so results do not depend on `batch_size`) and score them."""
    if n < 1 or temperature <= 0:
        raise UserError(f"sample_accuracy needs n >= 1 and temperature > 0, got n={n}, temperature={temperature}")
    if not items:
        return SampleScores(n, 0.0, 0.0, 0.0, [], [])
    texts = _generate(model, processor, items, n=n, temperature=temperature, batch_size=batch_size, seed=seed,
                      max_new_tokens=max_new_tokens)
    correct = [[is_correct(t, it.answer) for t in ts] for ts, it in zip(texts, items)]
    return SampleScores(
        n=n,
        pass_at_n=sum(any(c) for c in correct) / len(items),
        majority_at_n=sum(majority_correct(ts, c) for ts, c in zip(texts, correct)) / len(items),
        mean_accuracy=sum(map(sum, correct)) / (n * len(items)),
        responses=texts,
        correct=correct,
    )


def first_error(item: TaskItem, response: str) -> FirstError:
    """Where `response` first goes wrong for `item` (see `FirstError`)."""
    steps = split_steps(response)
    truth = step_truth(item.values, steps)
    if all(truth):
        answered = bool(steps) and is_correct(steps[-1], item.answer)
        return FirstError.NONE if answered else FirstError.INCOMPLETE
    wrong = truth.index(False)
    claims = [line for step in steps[:wrong] for line in step.splitlines() if line.strip()]
    claims += [line for line in steps[wrong].splitlines() if line.strip()] or [""]
    bad = step_truth(item.values, claims).index(False)  # one claim per step: the first wrong claim
    kind = claim_kind(claims[bad])
    if kind is None:  # unparseable: a reading if nothing but readings came before it
        kind = "sum" if any(claim_kind(c) in ("sum", "answer") for c in claims[:bad]) else "reading"
    return {"reading": FirstError.READING, "sum": FirstError.SUM, "answer": FirstError.ANSWER}[kind]


def first_errors(items: Sequence[TaskItem], responses: Sequence[str]) -> dict[str, int]:
    """How many responses first go wrong where, one count per `FirstError` (zeros included), in enum order."""
    counts = Counter(first_error(it, r) for it, r in zip(items, responses, strict=True))
    return {kind.value: counts[kind] for kind in FirstError}
