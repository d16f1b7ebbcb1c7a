"""Tiny models for tests and the embedded default: built from configs with random weights, no hub.

- `build_tokenizer()`: a byte-level BPE tokenizer trained in-process (digits split one by one, as Qwen2 does),
  with the ChatML and InternVL image tokens as special tokens.
- `build_processor()`: that tokenizer + the tile processor with 112 px tiles (8 x 8 patches of 14 px,
  pixel-unshuffled to 4 x 4 = 16 image tokens per tile).
- `build_internvl()`: a transformers-native `InternVLForConditionalGeneration` (InternViT-style vision tower +
  Qwen2 text model) of about 1.8M parameters; `build_causal_lm()`: the text-only Qwen2 counterpart.
- `save_tiny()`: writes model (safetensors) + processor to a folder that `from_pretrained` loads back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .processing import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, InternVLChatProcessor, InternVLTileProcessor

SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]

# Enough text for a small BPE vocabulary covering chain-of-thought arithmetic, answer formats, PRM judgements.
_CORPUS = """\
system user assistant You are a helpful assistant. Answer the question step by step.
Add the numbers shown by the coloured tiles, left to right, top to bottom.
The tiles show 3, 7, 5 and 9. 3 + 7 = 10. 10 + 5 = 15. 15 + 9 = 24. Answer: \\boxed{24}
The tiles show 1, 2, 4, 6 and 8. 1 + 2 = 3. 3 + 4 = 7. 7 + 6 = 13. 13 + 8 = 21. Answer: \\boxed{21}
Final answer: 42. The answer is B. (A) (B) (C) (D) option A B C D
Please reason step by step, and put your final answer on the last line as Answer: \\boxed{}.
### Question: ### Solution Process: + - the solution process is correct up to the current step.
You are an advanced AI assistant, designed to serve as a process supervision model. In this task, I will provide
a problem statement followed by the first step of the solution process. For each subsequent turn, I will give you
a new step in the solution. Your role is to assess whether the solution process is correct up to the current step.
Respond with "+" if you believe the solution process is correct up to this step. Respond with "-" if you detect any
issues or errors in the process up to this step. Only respond with "+" or "-". Do not provide any additional
explanations, comments, or justifications. Your task is to verify the accuracy and correctness of each step.
What is in the image? A red square, a green circle, a blue triangle. How many objects are there? There are four.
The sum of the numbers is the total. First, read the values. Then add them one at a time. So the total is
"""


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny InternVL (measured to learn the tile task on 2 CPU cores in minutes)."""

    vision_hidden: int = 96
    vision_layers: int = 2
    vision_heads: int = 4
    tile_size: int = 112
    patch_size: int = 14
    text_hidden: int = 192
    text_layers: int = 3
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    max_positions: int = 4096
    vocab_size: int = 640


def build_tokenizer(vocab_size: int = TinySizes.vocab_size) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on a fixed corpus: deterministic, offline, `+` and `-` single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return fast


def build_processor(sizes: TinySizes = TinySizes(), max_patches: int = 1) -> InternVLChatProcessor:
    tile = InternVLTileProcessor(tile_size=sizes.tile_size, max_patches=max_patches)
    seq = (sizes.tile_size // sizes.patch_size) ** 2 // 4  # pixel-unshuffle by 0.5
    return InternVLChatProcessor(image_processor=tile, tokenizer=build_tokenizer(sizes.vocab_size), image_seq_length=seq)


def _text_config(sizes: TinySizes, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=sizes.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        bos_token_id=None,
    )


def build_internvl(
    processor: InternVLChatProcessor, sizes: TinySizes = TinySizes(), seed: int = 0
) -> InternVLForConditionalGeneration:
    """Random-weight tiny InternVL whose vocabulary and image token match `processor`."""
    tokenizer = processor.tokenizer
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=sizes.vision_hidden,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.vision_heads,
            intermediate_size=4 * sizes.vision_hidden,
            image_size=[sizes.tile_size, sizes.tile_size],
            patch_size=[sizes.patch_size, sizes.patch_size],
        ),
        text_config=_text_config(sizes, tokenizer).to_dict(),
        image_token_id=processor.image_token_id,
        image_seq_length=processor.image_seq_length,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _set_generation_ids(model, tokenizer)
    return model


def build_causal_lm(tokenizer: PreTrainedTokenizerFast, sizes: TinySizes = TinySizes(), seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(_text_config(sizes, tokenizer))
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def save_tiny(path: str | Path, *, text_only: bool = False, sizes: TinySizes = TinySizes(), seed: int = 0) -> Path:
    """Write a tiny checkpoint (safetensors) + its processor/tokenizer to `path`."""
    path = Path(path)
    processor = build_processor(sizes)
    model = build_causal_lm(processor.tokenizer, sizes, seed) if text_only else build_internvl(processor, sizes, seed)
    model.save_pretrained(path, safe_serialization=True)
    if text_only:
        processor.tokenizer.save_pretrained(path)
    else:
        processor.save_pretrained(path)
    (path / "mmalign_tiny.json").write_text(str(asdict(sizes)).replace("'", '"') + "\n")
    return path
