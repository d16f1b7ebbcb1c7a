"""A rollout backend on a transformers model in this process (CPU or GPU): InternVL or a text-only causal LM.

Decoding is our own loop over `model(...)` with a KV cache, not `generate`, so that each sample draws its random
numbers from its own `torch.Generator`. Sample j of a request with seed s is seeded from (s, j) alone, so the same
request with the same seed gives the same texts whatever other requests share its batch, however the batch is
split and whatever `n` is (sample j of n = 2 is sample j of n = 8). The one caveat is floating point: a different
batch shape can change logits in the last bits, which flips a token only at an exact tie.

How one batch runs:

- rows: every (request, sample) pair, `batch_size` rows at a time;
- prefill: each distinct prompt of the batch once (LEFT padded, images expanded into tiles by the processor);
  the KV cache rows are then repeated for the request's samples;
- decode: per-row temperature, top-k and top-p, then an inverse-CDF draw with the row's generator (argmax when
  temperature == 0); a row ends at an end-of-turn token, a `stop` string or its `max_new_tokens`, and leaves the
  batch (its cache rows are dropped).

The prompt is ChatML (`rlhf.processing.chat_prompt`, system optional); `assistant_prefix` is written after the
assistant header and only the continuation comes back. A text-only model uses its tokenizer's chat template when
it has one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.errors import UserError
from rlhf.processing import IM_END, InternVLChatProcessor, chat_prompt

from .base import BackendUnavailable, GenerationRequest, GenerationResult, RolloutBackend

_SEED_BITS = 63
# torch errors (out of memory, a prompt longer than the model's positions) surface as these: they fail the request
# (retried alone first); anything else is a bug and propagates.
_REQUEST_ERRORS = (RuntimeError, ValueError, IndexError)


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a request seeded `seed` (blake2b: stable across processes)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, person=b"mmalign-hfsamp").digest()
    return int.from_bytes(digest, "big") >> (64 - _SEED_BITS)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UserError(f"hf backend: dtype must be a torch dtype name such as 'bfloat16' or 'float32', got {dtype!r}")
    return value


def pick_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` (R, V). Row r is greedy when temperature[r] == 0; otherwise softmax of
    logits / temperature over the top_k[r] most likely tokens (0 = no cut), then the smallest set whose probability
    reaches top_p[r] (the most likely token always stays), renormalised; the token is the first whose cumulative
    probability exceeds uniform[r] (in [0, 1)), tokens taken from most to least likely."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled = temperature > 0
    if not bool(sampled.any()):
        return greedy
    scaled = logits / torch.where(sampled, temperature, torch.ones_like(temperature)).unsqueeze(-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1])).unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    probs = probs.masked_fill((before >= top_p.unsqueeze(-1)) & (rank > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    pos = (cdf <= target).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    pos = torch.minimum(pos, (probs > 0).sum(dim=-1) - 1)  # never step past the kept tokens
    chosen = order.gather(-1, pos.unsqueeze(-1)).squeeze(-1)
    return torch.where(sampled, chosen, greedy)


@dataclass
class _Row:
    """One sample being decoded."""

    request: int  # index into the requests of `generate`
    sample: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string ended the row (cut before the stop string)


class HFBackend(RolloutBackend):
    """Sample with a transformers model in this process.

    Give `model_name_or_path` (a checkpoint folder, a hub id already in the cache, or an embedded tiny name such as
    "tiny-internvl"; loaded with `rlhf.models.load_model_and_processor`, safetensors only), or an already loaded
    `model` with its `processor` (an `InternVLChatProcessor`, or a tokenizer for a text-only causal LM).
    `batch_size` counts rows decoded together (a request with n samples takes n rows). `device` defaults to CUDA
    when there is one, `dtype` to bfloat16 on CUDA and float32 on CPU (a given `model` is moved to `device` only
    when `device` is set). `max_patches` is the tile budget per prompt, split over its images as in MMPR training
    (`max(1, max_patches // n_images)` each); None keeps the processor's own."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        model: Any = None,
        processor: Any = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_patches: int | None = None,
    ):
        if batch_size < 1:
            raise UserError(f"hf backend: batch_size must be >= 1, got {batch_size}")
        if max_patches is not None and max_patches < 1:
            raise UserError(f"hf backend: max_patches must be >= 1 or None, got {max_patches}")
        if (model is None) == (model_name_or_path is None):
            raise UserError("hf backend: give either model_name_or_path or an already loaded model (with processor)")
        if model is not None and processor is None:
            raise UserError("hf backend: a model given directly needs its processor (or tokenizer) too")
        self.batch_size = batch_size
        self.max_patches = max_patches
        if model is None:
            device = device or default_device()
            model, processor = self._load(model_name_or_path, device, _resolve_dtype(dtype, device))
        elif device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.processor = processor
        self.multimodal = isinstance(processor, InternVLChatProcessor)
        self.tokenizer = processor.tokenizer if self.multimodal else processor
        if self.tokenizer.pad_token_id is None:
            raise UserError("hf backend: the tokenizer has no pad token; set tokenizer.pad_token first")
        self.stop_ids = self._stop_ids()

    @staticmethod
    def _load(name: str, device: str, dtype: torch.dtype | str):
        from rlhf.models import load_model_and_processor

        try:
            model, processor = load_model_and_processor(name, dtype=dtype)
            return model.to(device), processor
        except UserError as err:  # the model folder's own one line (missing, no safetensors, corrupt)
            raise BackendUnavailable(f"hf backend cannot load {name!r}: {err}") from None
        except (OSError, ValueError, RuntimeError, KeyError) as err:  # missing folder, bad config, no such device
            first = (str(err).strip().splitlines() or [""])[0]
            raise BackendUnavailable(f"hf backend cannot load {name!r} on {device}: {type(err).__name__}: {first}")

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        for token_id in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(IM_END)):
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        if not ids:
            raise UserError("hf backend: no end-of-turn token found (tokenizer eos, <|im_end|>, generation_config)")
        return ids

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- prompts --------------------------------------------------------------------------------------------------
    def prompt_text(self, request: GenerationRequest) -> str:
        """The full prompt the model continues: ChatML up to the assistant header, then `assistant_prefix`."""
        user = request.user_text()
        if request.images and not self.multimodal:
            raise ValueError(f"request {request.id!r} has images but the model is text-only")
        template = getattr(self.tokenizer, "chat_template", None)
        if not self.multimodal and template:
            messages = ([{"role": "system", "content": request.system}] if request.system else [])
            messages.append({"role": "user", "content": user})
            head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            head = chat_prompt(user, request.system)
        return head + (request.assistant_prefix or "")

    def _encode(self, requests: list[GenerationRequest], texts: list[str]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for the prompts `texts` (one per request)."""
        if self.multimodal:
            budgets = [None if self.max_patches is None or not r.images else max(1, self.max_patches // len(r.images))
                       for r in requests]
            images = [[im.convert("RGB") for im in r.images] for r in requests]
            batch = self.processor(text=texts, images=images, max_patches=budgets, padding_side="left")
            batch.pop("num_patches", None)
        else:
            batch = self.tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                                   return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        errors: dict[int, str] = {}
        texts: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                texts[i] = self.prompt_text(request)
            except ValueError as err:
                errors[i] = f"cannot build the prompt: {err}"
        rows = [(i, j) for i in texts for j in range(requests[i].sampling.n)]
        done: dict[tuple[int, int], _Row] = {}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            try:
                done.update(self._decode(requests, texts, chunk))
            except _REQUEST_ERRORS as err:
                if len({i for i, _ in chunk}) == 1:
                    errors.setdefault(chunk[0][0], f"{type(err).__name__}: {err}")
                    continue
                for i in dict.fromkeys(i for i, _ in chunk):  # find the request that fails: each one alone
                    try:
                        done.update(self._decode(requests, texts, [r for r in chunk if r[0] == i]))
                    except _REQUEST_ERRORS as one_err:
                        errors.setdefault(i, f"{type(one_err).__name__}: {one_err}")
        results = []
        for i, request in enumerate(requests):
            if i in errors:
                results.append(GenerationResult.failure(request.id, errors[i]))
                continue
            samples = [done[(i, j)] for j in range(request.sampling.n)]
            results.append(GenerationResult(request.id, [self._text(row) for row in samples],
                                            sum(len(row.tokens) for row in samples)))
        return results

    def _text(self, row: _Row) -> str:
        if row.text is not None:
            return row.text
        tokens = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.stop_ids else row.tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _generators(self, requests: list[GenerationRequest], chunk: list[tuple[int, int]]) -> list[torch.Generator]:
        gens = []
        seeds: dict[int, int] = {}
        for i, j in chunk:
            if i not in seeds:
                seed = requests[i].effective_seed
                seeds[i] = seed if seed is not None else random.SystemRandom().getrandbits(_SEED_BITS)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(sample_seed(seeds[i], j))
            gens.append(gen)
        return gens

    @torch.inference_mode()
    def _decode(self, requests: list[GenerationRequest], texts: dict[int, str],
                chunk: list[tuple[int, int]]) -> dict[tuple[int, int], _Row]:
        """Decode the rows `chunk` ((request, sample) pairs) to the end; returns them by (request, sample)."""
        unique = list(dict.fromkeys(i for i, _ in chunk))
        inputs = self._encode([requests[i] for i in unique], [texts[i] for i in unique])
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]
        pick = torch.tensor([unique.index(i) for i, _ in chunk], device=mask.device)
        cache.batch_select_indices(pick)
        logits, mask, last = logits[pick], mask[pick], positions[pick, -1]

        rows = [_Row(i, j, g) for (i, j), g in zip(chunk, self._generators(requests, chunk))]
        sp = [requests[i].sampling for i, _ in chunk]
        device = logits.device
        temperature = torch.tensor([s.temperature for s in sp], dtype=torch.float32, device=device)
        top_k = torch.tensor([s.top_k or 0 for s in sp], dtype=torch.long, device=device)
        top_p = torch.tensor([s.top_p for s in sp], dtype=torch.float32, device=device)
        live = list(range(len(rows)))  # indices into rows of the rows still decoding, in cache order
        finished: dict[tuple[int, int], _Row] = {}
        while True:
            uniform = torch.stack([torch.rand((), generator=rows[r].generator) for r in live]).to(device)
            tokens = pick_tokens(logits, temperature, top_k, top_p, uniform).tolist()
            keep = []
            for slot, (r, token) in enumerate(zip(live, tokens)):
                row, params = rows[r], sp[r]
                row.tokens.append(token)
                ended = token in self.stop_ids or len(row.tokens) >= params.max_new_tokens
                if ended or self._hit_stop(row, params.stop):
                    finished[(row.request, row.sample)] = row
                else:
                    keep.append(slot)
            if not keep:
                return finished
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                temperature, top_k, top_p = temperature[index], top_k[index], top_p[index]
                mask, last = mask[index], last[index]
                tokens = [tokens[s] for s in keep]
                live = [live[s] for s in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
            last = last + 1
            out = self.model(input_ids=torch.tensor(tokens, device=device).unsqueeze(-1), attention_mask=mask,
                             position_ids=last.unsqueeze(-1), past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]

    def _hit_stop(self, row: _Row, stop: list[str] | None) -> bool:
        """True (and the row's text cut before it) when the row's text contains one of the `stop` strings."""
        if not stop:
            return False
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        if not cuts:
            return False
        row.text = text[:min(cuts)]
        return True

    def close(self) -> None:
        self.__dict__.pop("model", None)
