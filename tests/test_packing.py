"""Packed preference pairs ([prompt | chosen | rejected] in one row) against the two-row DPO layout.

The reference is the existing path: `MPOCollator` (rows [prompt|chosen] and [prompt|rejected]) + a plain full-logits
forward, log_softmax and gather. The packed path must give the same per-token log-probs and parameter gradients
(fp32, 1e-5) for the "sdpa" and "eager" attention implementations, while running the vision tower and the prompt
once per pair.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rlhf.collator import MPOCollator, record_to_row
from rlhf.losses import MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS, implicit_rewards, mpo_losses
from rlhf.mpo_head import _token_logps
from rlhf.packing import (
    PackedPairCollator,
    block_mask_for_pairs,
    pair_attention_mask,
    pair_mask_mod,
    packed_forward,
)

IMPLEMENTATIONS = ["sdpa", "eager"]


def noise_image(path, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory, tiny_processor):
    """Three pairs, batch-padded in both layouts: a wide image tiled 2 + thumbnail (chosen longer than rejected),
    a text-only pair (rejected longer), and two one-tile images (5 tiles in all)."""
    root = tmp_path_factory.mktemp("packing")
    records = [
        SimpleNamespace(question="<image>\nWhat is 3 + 4?", chosen="3 + 4 = 7. Answer: \\boxed{7}", rejected="8",
                        image_paths=[noise_image(root / "wide.png", (224, 112), 1)], tiles_per_image=2),
        SimpleNamespace(question="What is 1 + 2?", chosen="3",
                        rejected="1 + 2 = 4. So the total is 4. Answer: \\boxed{4}", image_paths=[],
                        tiles_per_image=None),
        SimpleNamespace(question="<image>\n<image>\nAdd the numbers shown by the coloured tiles.",
                        chosen="The tiles show 3 and 7. 3 + 7 = 10.", rejected="The tiles show 1.",
                        image_paths=[noise_image(root / "a.png", (112, 112), 2),
                                     noise_image(root / "b.png", (112, 112), 3)], tiles_per_image=1),
    ]
    for i, r in enumerate(records):
        r.source, r.line = "pairs", i + 1
    return [record_to_row(r, tiny_processor) for r in records]


@pytest.fixture(scope="module")
def model(tiny_processor):
    from rlhf.tiny import build_internvl

    return build_internvl(tiny_processor, seed=0).eval()


def reference_logps(model, processing_class, rows, max_length, widths):
    """Two-row path: per-token log-probs of each response, laid out (B, T) like the packed batch."""
    batch = MPOCollator(processing_class, max_length)(rows)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
    logits = model(**inputs).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    keep = batch["completion_mask"][:, 1:].bool()
    n = len(rows)
    return tuple(
        torch.stack([F.pad(logps[half * n + i][keep[half * n + i]], (0, width - int(keep[half * n + i].sum())))
                     for i in range(n)])
        for half, width in enumerate(widths)
    )


def packed_logps(model, batch):
    """The unfused MPO head's per-token log-probs (`rlhf.mpo_head`) on the packed rows."""
    chosen_hidden, rejected_hidden = packed_forward(model, batch)
    lm_head = model.get_output_embeddings()
    return (_token_logps(lm_head, chosen_hidden, batch["chosen_targets"]),
            _token_logps(lm_head, rejected_hidden, batch["rejected_targets"]))


def both_paths(model, processing_class, rows, max_length=None):
    batch = PackedPairCollator(processing_class, max_length)(rows)
    widths = (batch["chosen_mask"].size(1), batch["rejected_mask"].size(1))
    return batch, packed_logps(model, batch), reference_logps(model, processing_class, rows, max_length, widths)


# -------------------------------------------------------------------------------------------- layout, worked by hand


def test_worked_example_layout(tiny_processor):
    """Pair 0: prompt [11 12], chosen [21 22], rejected [31]; pair 1: prompt [13], chosen [23], rejected [32 33],
    padded by one. P = prompt, C = chosen, R = rejected, - = padding; 1 = query (row) may attend to key (column)."""
    pad = tiny_processor.tokenizer.pad_token_id
    rows = [{"prompt_ids": [11, 12], "chosen_ids": [21, 22], "rejected_ids": [31], "image_paths": [], "max_patches": 0},
            {"prompt_ids": [13], "chosen_ids": [23], "rejected_ids": [32, 33], "image_paths": [], "max_patches": 0}]
    batch = PackedPairCollator(tiny_processor)(rows)

    assert batch["input_ids"].tolist() == [[11, 12, 21, 22, 31], [13, 23, 32, 33, pad]]
    assert batch["segment_ids"].tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]
    # the rejected response restarts right after the prompt: pair 0 gives r0 position 2 = P, as c0 has
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    expected = [
        [[1, 0, 0, 0, 0],   # P
         [1, 1, 0, 0, 0],   # P
         [1, 1, 1, 0, 0],   # C
         [1, 1, 1, 1, 0],   # C
         [1, 1, 0, 0, 1]],  # R sees the prompt and itself, not the chosen tokens
        [[1, 0, 0, 0, 0],   # P
         [1, 1, 0, 0, 0],   # C
         [1, 0, 1, 0, 0],   # R
         [1, 0, 1, 1, 0],   # R
         [0, 0, 0, 0, 1]],  # - sees only itself (no empty row for SDPA)
    ]
    assert batch["attention_mask"].shape == (2, 1, 5, 5) and batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"][:, 0].int().tolist() == expected
    # sources: chosen token j <- P+j-1; rejected token 0 <- P-1, token j>0 <- P+C+j-1; padded slots point at 0
    assert batch["chosen_src"].tolist() == [[1, 2], [0, 0]]
    assert batch["chosen_targets"].tolist() == [[21, 22], [23, 0]]
    assert batch["chosen_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["rejected_src"].tolist() == [[1, 0], [0, 2]]
    assert batch["rejected_targets"].tolist() == [[31, 0], [32, 33]]
    assert batch["rejected_mask"].tolist() == [[1, 0], [1, 1]]
    assert "pixel_values" not in batch


def test_max_length_cuts_each_response_view(tiny_processor):
    """max_length 4 with a 2-token prompt leaves 2 tokens per response, as MPOCollator cuts [prompt|response]."""
    rows = [{"prompt_ids": [11, 12], "chosen_ids": [21, 22, 23], "rejected_ids": [31, 32, 33, 34],
             "image_paths": [], "max_patches": 0}]
    batch = PackedPairCollator(tiny_processor, max_length=4)(rows)
    assert batch["input_ids"].tolist() == [[11, 12, 21, 22, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3]]
    with pytest.raises(ValueError, match="tiny:7: prompt of 2 tokens leaves no room"):
        PackedPairCollator(tiny_processor, max_length=2)([{**rows[0], "source": "tiny", "line": 7}])


def test_flex_mask_mod_matches_dense_mask(tiny_processor, pair_rows):
    """mask_mod evaluated on every (b, q, kv) equals the dense mask; the BlockMask it builds gives flex attention
    (unfused, as it runs on CPU) the same output as SDPA with the dense mask."""
    for segment_ids in (PackedPairCollator(tiny_processor)(pair_rows)["segment_ids"],
                        torch.tensor([[0] * 5 + [1] * 7 + [2] * 4 + [-1] * 4, [0] * 3 + [1] * 2 + [2] * 15])):
        batch, length = segment_ids.shape
        b, q, kv = torch.arange(batch), torch.arange(length), torch.arange(length)
        evaluated = pair_mask_mod(segment_ids)(b[:, None, None], torch.zeros(()), q[None, :, None], kv[None, None, :])
        dense = pair_attention_mask(segment_ids)
        assert torch.equal(evaluated, dense[:, 0])

    from torch.nn.attention.flex_attention import flex_attention

    block_mask = block_mask_for_pairs(segment_ids, block_size=4)
    assert block_mask.shape == (2, 1, 20, 20)
    query, key, value = torch.randn(3, 2, 4, 20, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*without torch.compile", category=UserWarning)
        out = flex_attention(query, key, value, block_mask=block_mask)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=dense)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


# -------------------------------------------------------------------------------------------- against two rows


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("max_length", [None, 75])
def test_token_logps_equal_two_sequence_path(model, tiny_processor, pair_rows, implementation, max_length):
    """(P, C, R) = (70, 16, 2), (19, 2, 23), (58, 20, 7); max_length 75 cuts the chosen responses of pairs 0 and 2
    to 75 - 70 = 5 and 75 - 58 = 17 tokens."""
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        batch, (chosen, rejected), (ref_chosen, ref_rejected) = both_paths(model, tiny_processor, pair_rows, max_length)
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in pair_rows]
    assert lengths == [(70, 16, 2), (19, 2, 23), (58, 20, 7)]  # pair 0: <img> + 3 tiles x 16 + </img> + 20 text
    if max_length:
        assert batch["chosen_mask"].sum(1).tolist() == [5, 2, 17]
    pairs = ((chosen, ref_chosen, batch["chosen_mask"]), (rejected, ref_rejected, batch["rejected_mask"]))
    for logps, ref, mask in pairs:
        mask = mask.bool()
        assert (ref[~mask] == 0).all()  # the reference had exactly as many response tokens per row
        torch.testing.assert_close(logps[mask], ref[mask], atol=1e-5, rtol=0)
        assert logps[mask].max() < -1.0  # real log-probs of an untrained 640-token vocabulary, not zeros


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_equal_two_sequence_path(model, tiny_processor, pair_rows, implementation):
    """Gradients w.r.t. every parameter of (a) sum chosen logps - sum rejected logps and (b) the MPO total with a
    fixed reference (ref = policy logps detached + [0.5, -1.0, 2.0], δ = 0.3, beta = 0.1)."""
    model.set_attn_implementation(implementation)
    params = [p for p in model.parameters() if p.requires_grad]
    batch, (chosen, rejected), (ref_chosen, ref_rejected) = both_paths(model, tiny_processor, pair_rows)
    cmask, rmask = batch["chosen_mask"].float(), batch["rejected_mask"].float()
    offsets = torch.tensor([0.5, -1.0, 2.0])

    def losses(chosen, rejected):
        simple = (chosen * cmask).sum() - (rejected * rmask).sum()
        chosen_sum, rejected_sum = (chosen * cmask).sum(1), (rejected * rmask).sum(1)
        chosen_rewards = implicit_rewards(chosen_sum, chosen_sum.detach() + offsets, 0.1)
        rejected_rewards = implicit_rewards(rejected_sum, rejected_sum.detach() - offsets, 0.1)
        total, terms = mpo_losses(chosen_rewards, rejected_rewards, 0.3, chosen, cmask,
                                  MPO_LOSS_TYPES, MPO_LOSS_WEIGHTS)
        return simple, total, terms

    packed, reference = losses(chosen, rejected), losses(ref_chosen, ref_rejected)
    for name in reference[2]:
        torch.testing.assert_close(packed[2][name], reference[2][name], atol=1e-5, rtol=0)
    for i in range(2):
        grads = torch.autograd.grad(packed[i], params, retain_graph=True, allow_unused=True)
        ref_grads = torch.autograd.grad(reference[i], params, retain_graph=True, allow_unused=True)
        assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) == len(params)  # all parameters reached
        for p_grad, r_grad in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(p_grad, r_grad, atol=1e-5, rtol=1e-5)


def test_vision_tower_and_prompt_run_once_per_pair(model, tiny_processor, pair_rows):
    """5 tiles (3 + 1 + 1) per batch: the packed path encodes 5, the two-row path 10. Tokens per pair:
    P+C+R = 70+16+2, 19+2+23, 58+20+7 = 88, 44, 85 (217) against 2P+C+R = 158, 63, 143 (364)."""
    seen = []
    hook = model.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            batch, _, _ = both_paths(model, tiny_processor, pair_rows)
    finally:
        hook.remove()
    assert seen == [5, 10]
    assert batch["pixel_values"].shape[0] == 5
    assert (batch["segment_ids"] >= 0).sum(1).tolist() == [88, 44, 85]
    reference = MPOCollator(tiny_processor)(pair_rows)["attention_mask"].sum(1)
    assert (reference[:3] + reference[3:]).tolist() == [158, 63, 143]


def test_text_only_causal_lm(tiny_processor, pair_rows):
    """A Qwen2ForCausalLM with a plain tokenizer as processing class: same log-probs on the text-only pair."""
    from rlhf.tiny import build_causal_lm

    lm = build_causal_lm(tiny_processor.tokenizer, seed=1).eval()
    with torch.no_grad():
        batch, packed, ref = both_paths(lm, tiny_processor.tokenizer, pair_rows[1:2])
    for logps, ref_logps, mask in zip(packed, ref, (batch["chosen_mask"], batch["rejected_mask"])):
        torch.testing.assert_close(logps[mask.bool()], ref_logps[mask.bool()], atol=1e-5, rtol=0)


def test_attention_without_4d_mask_is_refused(tiny_processor, pair_rows):
    stub = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2")))
    batch = PackedPairCollator(tiny_processor)(pair_rows[1:2])
    with pytest.raises(ValueError, match="'flash_attention_2' takes none .use one of sdpa, eager, flex_attention"):
        packed_forward(stub, batch)
