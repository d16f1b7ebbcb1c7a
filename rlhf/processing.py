"""InternVL chat formatting, dynamic tiling and `<image>` expansion, without torchvision.

The stock `InternVLProcessor` of transformers insists on a video processor, which needs torchvision. This module
does what InternVL does for images (reference section 4) with PIL and numpy only:

- dynamic tiling: pick the (cols, rows) grid whose aspect ratio is closest to the image's, resize, cut square
  tiles row by row, add a thumbnail when there is more than one tile;
- each `<image>` placeholder becomes `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`;
- ChatML prompts: `<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n`.

`InternVLChatProcessor` saves and loads with `save_pretrained` / `from_pretrained`, and also loads from a real
`OpenGVLab/InternVL3-*-hf` checkpoint folder (tokenizer + config.json), so tiny and real models share one path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_utils import ImageProcessingMixin

IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The default system message of InternVL's `internvl2_5` conversation template (InternVL2.5 and InternVL3): InternVL's
# fine-tuning, MPO training and inference put it before every conversation that has no system turn. An interface
# constant, reproduced verbatim; without it token ids differ from InternVL's on every sample.
INTERNVL_SYSTEM_PROMPT = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
# Named system prompts a recipe may give by name (`system_prompt: internvl2_5`); '' means no system turn.
SYSTEM_PROMPTS = {"internvl2_5": INTERNVL_SYSTEM_PROMPT}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROCESSOR_FILE = "mmalign_processor.json"


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) grids with min_num <= cols * rows <= max_num, ordered by tile count."""
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: Sequence[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """InternVL's rule: closest aspect ratio; on a tie, the later (larger) grid wins when the image area exceeds
    half the area of that grid's tiles."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(
    image: Image.Image, *, tile_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> list[Image.Image]:
    """Cut `image` into InternVL tiles (row by row), plus a thumbnail when there is more than one tile."""
    width, height = image.size
    cols, rows = closest_grid(width, height, candidate_grids(min_num, max_num), tile_size)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


class InternVLTileProcessor(ImageProcessingMixin):
    """Image processor: dynamic tiling, bicubic resize, ImageNet normalisation. Output `pixel_values` has shape
    (total tiles, 3, tile_size, tile_size) and `num_patches` the tile count of each image."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        tile_size: int = 448,
        min_patches: int = 1,
        max_patches: int = 12,
        use_thumbnail: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.tile_size = tile_size
        self.min_patches = min_patches
        self.max_patches = max_patches
        self.use_thumbnail = use_thumbnail
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def tiles(self, image: Image.Image, max_patches: int | None = None) -> list[Image.Image]:
        return dynamic_tiles(
            image.convert("RGB"),
            tile_size=self.tile_size,
            min_num=self.min_patches,
            max_num=max_patches or self.max_patches,
            use_thumbnail=self.use_thumbnail,
        )

    def num_tiles(self, width: int, height: int, max_patches: int | None = None) -> int:
        """Tile count without touching pixels (used to count tokens before loading a batch)."""
        grids = candidate_grids(self.min_patches, max_patches or self.max_patches)
        cols, rows = closest_grid(width, height, grids, self.tile_size)
        n = cols * rows
        return n + 1 if self.use_thumbnail and n > 1 else n

    def to_tensor(self, tiles: Sequence[Image.Image]) -> torch.Tensor:
        arr = np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])  # (n, H, W, 3)
        arr = (arr - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    def __call__(
        self, images: Sequence[Image.Image], max_patches: int | Sequence[int] | None = None
    ) -> BatchFeature:
        if not isinstance(max_patches, Sequence):
            max_patches = [max_patches] * len(images)
        per_image = [self.tiles(img, mp) for img, mp in zip(images, max_patches, strict=True)]
        tiles = [t for ts in per_image for t in ts]
        pixel_values = self.to_tensor(tiles) if tiles else torch.zeros(0, 3, self.tile_size, self.tile_size)
        return BatchFeature({"pixel_values": pixel_values, "num_patches": [len(ts) for ts in per_image]})


def resolve_system_prompt(value: str | None) -> str | None:
    """A recipe's `system_prompt`: a name of `SYSTEM_PROMPTS` gives its text, '' or None gives no system turn, any
    other string is used as written."""
    if not value:
        return None
    return SYSTEM_PROMPTS.get(value, value)


def with_placeholders(text: str, n_images: int) -> str:
    """InternVL's rule: a text with images but no `<image>` gets `<image>\\n` in front, one per image. A text that has
    placeholders is returned as written (`InternVLChatProcessor.expand_images` checks their count)."""
    if n_images and IMAGE_PLACEHOLDER not in text:
        return f"{IMAGE_PLACEHOLDER}\n" * n_images + text
    return text


def chat_prompt(user: str, system: str | None = None) -> str:
    """ChatML prompt up to and including the assistant header (reference section 4)."""
    head = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    return f"{head}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"


class InternVLChatProcessor(ProcessorMixin):
    """Tokenizer + tile processor for InternVL chat models. `processor(text=[...], images=[[img, ...], ...])`
    expands the `<image>` placeholders of each text with its images' tiles and tokenizes."""

    def __init__(
        self,
        image_processor: InternVLTileProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_seq_length = image_seq_length
        missing = [t for t in (IMG_START, IMG_END, IMG_CONTEXT, IM_END) if tokenizer.convert_tokens_to_ids(t) in
                   (None, tokenizer.unk_token_id)]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} lacks the InternVL tokens {missing}")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    # -- text -------------------------------------------------------------------------------------------------
    def image_tokens(self, num_tiles: int) -> str:
        return IMG_START + IMG_CONTEXT * (self.image_seq_length * num_tiles) + IMG_END

    def expand_images(self, text: str, num_tiles: Sequence[int]) -> str:
        parts = text.split(IMAGE_PLACEHOLDER)
        if len(parts) - 1 != len(num_tiles):
            raise ValueError(f"text has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(num_tiles)} images")
        out = [parts[0]]
        for n, part in zip(num_tiles, parts[1:]):
            out += [self.image_tokens(n), part]
        return "".join(out)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_image_tokens(self, sizes: Sequence[tuple[int, int]], max_patches: int | None = None) -> int:
        """Tokens the images of one prompt take, from their (width, height) alone."""
        return sum(self.image_seq_length * self.image_processor.num_tiles(w, h, max_patches) + 2 for w, h in sizes)

    # -- batches ----------------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Sequence[Image.Image]] | None = None,
        max_patches: int | Sequence[int | None] | None = None,
        return_tensors: str | None = "pt",
        padding_side: str = "right",
        **kwargs: Any,
    ) -> BatchFeature:
        """`images[i]` are the images of `text[i]` in placeholder order; `max_patches[i]` their tile budget."""
        texts = [text] if isinstance(text, str) else list(text)
        images = images if images is not None else [[] for _ in texts]
        if not isinstance(max_patches, Sequence):
            max_patches = [max_patches] * len(texts)
        pixel_values, num_patches, expanded = [], [], []
        for t, imgs, mp in zip(texts, images, max_patches, strict=True):
            if imgs:
                feats = self.image_processor(list(imgs), max_patches=mp)
                pixel_values.append(feats["pixel_values"])
                num_patches.extend(feats["num_patches"])
                t = self.expand_images(t, feats["num_patches"])
            elif IMAGE_PLACEHOLDER in t:
                raise ValueError(f"text has {IMAGE_PLACEHOLDER} placeholders but no images")
            expanded.append(t)
        ids = [self.encode(t) for t in expanded]
        data: dict[str, Any] = {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
        if return_tensors == "pt":
            width = max(len(x) for x in ids)
            pad_id = self.tokenizer.pad_token_id
            data["input_ids"] = torch.full((len(ids), width), pad_id, dtype=torch.long)
            data["attention_mask"] = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                sl = slice(width - len(x), width) if padding_side == "left" else slice(0, len(x))
                data["input_ids"][i, sl] = torch.tensor(x, dtype=torch.long)
                data["attention_mask"][i, sl] = 1
        if pixel_values:
            data["pixel_values"] = torch.cat(pixel_values)
            data["num_patches"] = num_patches
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # -- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        ip = self.image_processor
        config = {
            "processor_class": type(self).__name__,
            "image_seq_length": self.image_seq_length,
            "image_processor": {
                "tile_size": ip.tile_size,
                "min_patches": ip.min_patches,
                "max_patches": ip.max_patches,
                "use_thumbnail": ip.use_thumbnail,
                "image_mean": ip.image_mean,
                "image_std": ip.image_std,
            },
        }
        (path / PROCESSOR_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return [str(path / PROCESSOR_FILE)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> InternVLChatProcessor:
        """Load a processor saved by `save_pretrained`, or build one for a real InternVL `-hf` checkpoint folder
        from its tokenizer and `config.json` (tile size from the vision config, tokens per tile from the model)."""
        path = Path(pretrained_model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
        if (path / PROCESSOR_FILE).is_file():
            config = json.loads((path / PROCESSOR_FILE).read_text())
            image_processor = InternVLTileProcessor(**config["image_processor"])
            seq = config["image_seq_length"]
        elif (path / "config.json").is_file():
            model_config = json.loads((path / "config.json").read_text())
            vision = model_config.get("vision_config", {})
            size = vision.get("image_size", 448)
            size = size[0] if isinstance(size, list) else size
            patch = vision.get("patch_size", 14)
            patch = patch[0] if isinstance(patch, list) else patch
            ratio = model_config.get("downsample_ratio", 0.5)
            seq = model_config.get("image_seq_length") or int((size // patch) ** 2 * ratio**2)
            image_processor = InternVLTileProcessor(tile_size=size, max_patches=kwargs.get("max_patches", 12))
        else:
            raise FileNotFoundError(f"{path}: neither {PROCESSOR_FILE} nor config.json found")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=seq)


def text_tokenizer(processing_class) -> PreTrainedTokenizerBase:
    """The tokenizer of a processing class: an `InternVLChatProcessor`'s own, or a plain tokenizer itself."""
    return processing_class.tokenizer if isinstance(processing_class, InternVLChatProcessor) else processing_class
