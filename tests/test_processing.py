"""InternVL tiling, image-token expansion, ChatML and processor persistence."""

import shutil

import pytest
import torch
from PIL import Image

from rlhf.processing import (
    IMG_CONTEXT,
    InternVLChatProcessor,
    InternVLTileProcessor,
    candidate_grids,
    chat_prompt,
    closest_grid,
    dynamic_tiles,
)


@pytest.mark.parametrize(
    "size, max_num, grid, tiles",
    [
        # square 448: (1,1), (2,2), (3,3) tie at ratio 1; area 448^2 is not > 0.5 * 448^2 * 4 -> stays (1,1)
        ((448, 448), 12, (1, 1), 1),
        # 1000x1000: area 1e6 > 0.5*448^2*4 = 401,408 -> (2,2); > 0.5*448^2*9 = 903,168 -> (3,3); + thumbnail
        ((1000, 1000), 12, (3, 3), 10),
        # 2:1 at 896x448: (2,1) exact; (4,2) ties but 802,816 is not > 0.5*448^2*8 -> (2,1); + thumbnail
        ((896, 448), 12, (2, 1), 3),
        # 800x600 (1.333) with max 6: closest ratios 1.5 (3,2) diff 0.167 vs 1.0 diff 0.333 -> (3,2)
        ((800, 600), 6, (3, 2), 7),
        # tall 300x900 (0.333) -> (1,3)
        ((300, 900), 12, (1, 3), 4),
        # budget 1 -> always one tile, no thumbnail
        ((1000, 500), 1, (1, 1), 1),
    ],
)
def test_tiling_rule(size, max_num, grid, tiles):
    assert closest_grid(*size, candidate_grids(1, max_num), 448) == grid
    assert InternVLTileProcessor(max_patches=max_num).num_tiles(*size) == tiles
    assert len(dynamic_tiles(Image.new("RGB", size), max_num=max_num)) == tiles


def test_candidate_grids_bounds():
    grids = candidate_grids(1, 6)
    assert all(1 <= c * r <= 6 for c, r in grids)
    assert (3, 2) in grids and (2, 3) in grids and (4, 2) not in grids
    products = [c * r for c, r in grids]
    assert products == sorted(products)


def test_tiles_cut_row_by_row():
    # left half red, right half blue, 2:1 -> (2,1): tile 0 red, tile 1 blue, thumbnail mixed
    img = Image.new("RGB", (224, 112), (255, 0, 0))
    img.paste((0, 0, 255), (112, 0, 224, 112))
    tiles = dynamic_tiles(img, tile_size=112, max_num=4)
    assert len(tiles) == 3
    assert tiles[0].getpixel((50, 50)) == (255, 0, 0)
    assert tiles[1].getpixel((50, 50)) == (0, 0, 255)


def test_normalisation_imagenet():
    proc = InternVLTileProcessor(tile_size=112, max_patches=1)
    out = proc([Image.new("RGB", (112, 112), (255, 0, 0))])
    assert out["pixel_values"].shape == (1, 3, 112, 112)
    # red channel: (1 - 0.485) / 0.229 = 2.2489; green: (0 - 0.456) / 0.224 = -2.0357
    assert out["pixel_values"][0, 0, 5, 5].item() == pytest.approx(2.2489, abs=1e-3)
    assert out["pixel_values"][0, 1, 5, 5].item() == pytest.approx(-2.0357, abs=1e-3)


def test_expansion_and_chat(tiny_processor):
    p = tiny_processor
    assert p.image_seq_length == 16  # (112 / 14)^2 patches, pixel-unshuffled by 0.5
    text = chat_prompt("<image>\nHow many?")
    assert text == "<|im_start|>user\n<image>\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    batch = p(text=[text], images=[[Image.new("RGB", (224, 112))]], max_patches=4)
    ids = batch["input_ids"][0].tolist()
    # 2 tiles + thumbnail = 3 tiles x 16 tokens
    assert ids.count(p.image_token_id) == 48
    assert batch["num_patches"] == [3]
    assert batch["pixel_values"].shape == (3, 3, 112, 112)
    with pytest.raises(ValueError, match="placeholders"):
        p(text=["<image> <image>"], images=[[Image.new("RGB", (112, 112))]])


def test_count_image_tokens_matches_expansion(tiny_processor):
    p = tiny_processor
    sizes = [(224, 112), (112, 112)]
    text = p.expand_images("<image><image>", [p.image_processor.num_tiles(w, h, 4) for w, h in sizes])
    assert len(p.encode(text)) == p.count_image_tokens(sizes, 4) == (3 * 16 + 2) + (1 * 16 + 2)


def test_save_and_load(tiny_processor, tmp_path):
    tiny_processor.save_pretrained(tmp_path)
    loaded = InternVLChatProcessor.from_pretrained(tmp_path)
    assert loaded.image_seq_length == tiny_processor.image_seq_length
    assert loaded.image_processor.tile_size == 112
    assert loaded.encode("The tiles show 3, 7.") == tiny_processor.encode("The tiles show 3, 7.")
    assert loaded.image_token_id == tiny_processor.image_token_id


def test_load_real_checkpoint_layout(tiny_checkpoint, tmp_path):
    """A transformers-native InternVL checkpoint has config.json + tokenizer but no processor file of ours: the
    processor is built from the vision config (tile size 112 here, 448 in InternVL3) and the tokenizer."""
    folder = tmp_path / "hf-layout"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "mmalign_processor.json").unlink()
    proc = InternVLChatProcessor.from_pretrained(folder)
    assert proc.image_processor.tile_size == 112
    assert proc.image_seq_length == 16


def test_tiny_checkpoint_round_trip(tiny_checkpoint, tiny_processor):
    from rlhf.models import load_model_and_processor
    from rlhf.tiny import build_internvl

    model, proc = load_model_and_processor(str(tiny_checkpoint))
    fresh = build_internvl(tiny_processor, seed=0)
    batch = proc(text=[chat_prompt("<image>\nhi")], images=[[Image.new("RGB", (112, 112), (9, 99, 199))]])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, fresh(**inputs).logits, atol=1e-5)
    assert "model.safetensors" in {p.name for p in tiny_checkpoint.iterdir()}


def test_with_placeholders_puts_one_image_per_image_in_front_when_the_text_has_none():
    from rlhf.processing import with_placeholders

    assert with_placeholders("Sum?", 2) == "<image>\n<image>\nSum?"  # one per image, in front
    assert with_placeholders("Sum?", 0) == "Sum?"  # text only
    assert with_placeholders("Left <image> right <image>", 2) == "Left <image> right <image>"  # written ones stay
    assert with_placeholders("<image>\nSum?", 3) == "<image>\nSum?"  # a wrong count is expand_images' to report


def test_text_tokenizer_unwraps_the_internvl_processor_and_passes_a_tokenizer_through(tiny_processor):
    from rlhf.processing import text_tokenizer

    assert text_tokenizer(tiny_processor) is tiny_processor.tokenizer
    assert text_tokenizer(tiny_processor.tokenizer) is tiny_processor.tokenizer
