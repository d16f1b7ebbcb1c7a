"""A rollout backend on vLLM's offline engine (`vllm.LLM`), for GPU machines.

vLLM is imported when the backend is made, never at import time. Prompts are the model's chat template applied
by its tokenizer to the InternVL user text, `<image>` placeholders kept: vLLM's InternVL processor expands each one
into the image's tiles from `multi_modal_data`. Written for InternVL2.5/3 checkpoints (`OpenGVLab/InternVL3-*`).
"""

from __future__ import annotations

from typing import Any

from .base import BackendUnavailable, GenerationRequest, GenerationResult, RolloutBackend

VLLM_MISSING = (
    "the vllm backend needs vLLM and a GPU: pip install 'mmalign[vllm]' on a CUDA machine, "
    "or use the 'hf' or 'openai' backend"
)


class VLLMBackend(RolloutBackend):
    """`llm_kwargs` go to `vllm.LLM` unchanged (e.g. `enforce_eager=True`, `max_num_seqs=64`)."""

    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_images_per_prompt: int = 8,
        trust_remote_code: bool = True,
        seed: int = 0,
        **llm_kwargs: Any,
    ):
        try:
            import vllm
        except ImportError:
            raise BackendUnavailable(VLLM_MISSING) from None
        self._vllm = vllm
        try:
            self.llm = vllm.LLM(
                model=model_path,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                limit_mm_per_prompt={"image": max_images_per_prompt},
                trust_remote_code=trust_remote_code,
                seed=seed,
                **llm_kwargs,
            )
        except Exception as err:  # no GPU, out of memory, bad path: fatal, one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise BackendUnavailable(f"vLLM cannot load {model_path!r}: {type(err).__name__}: {first}") from err
        self.tokenizer = self.llm.get_tokenizer()

    def engine_input(self, request: GenerationRequest) -> dict:
        """{"prompt": chat-templated text, "multi_modal_data": {"image": [...]}} for `request`."""
        messages = [{"role": "system", "content": request.system}] if request.system else []
        messages.append({"role": "user", "content": request.user_text()})
        prefix = request.assistant_prefix
        if prefix is not None:
            messages.append({"role": "assistant", "content": prefix})
        prompt = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prefix is None, continue_final_message=prefix is not None
        )
        engine_input: dict = {"prompt": prompt}
        if request.images:
            engine_input["multi_modal_data"] = {"image": [im.convert("RGB") for im in request.images]}
        return engine_input

    def sampling_params(self, request: GenerationRequest):
        sp = request.sampling
        return self._vllm.SamplingParams(
            n=sp.n,
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k if sp.top_k is not None else -1,
            max_tokens=sp.max_new_tokens,
            seed=request.effective_seed,
            stop=sp.stop,
        )

    def _run(self, batch: list[tuple[int, dict, Any]], requests, results) -> None:
        outputs = self.llm.generate(
            [x for _, x, _ in batch], sampling_params=[p for _, _, p in batch], use_tqdm=False
        )
        for (i, _, _), out in zip(batch, outputs, strict=True):
            texts = [o.text for o in out.outputs]
            results[i] = GenerationResult(requests[i].id, texts, sum(len(o.token_ids) for o in out.outputs))

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        batch = []
        for i, request in enumerate(requests):
            try:
                batch.append((i, self.engine_input(request), self.sampling_params(request)))
            except Exception as err:
                results[i] = GenerationResult.failure(request.id, f"cannot build the request: {err}")
        try:
            if batch:
                self._run(batch, requests, results)
        except ValueError:  # one bad prompt (too long, too many images) fails the batch: find it one by one
            for item in batch:
                try:
                    self._run([item], requests, results)
                except ValueError as err:
                    results[item[0]] = GenerationResult.failure(requests[item[0]].id, f"vLLM refused it: {err}")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.__dict__.pop("llm", None)
