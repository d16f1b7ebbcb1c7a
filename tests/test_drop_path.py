"""Stochastic depth on the vision tower (rlhf.drop_path), as InternViT's drop_path_rate."""

import pytest
import torch

from rlhf.drop_path import add_vision_drop_path, drop_path, drop_path_rates


def test_rates_ramp_linearly_like_internvit():
    # InternViT: dpr = linspace(0, drop_path_rate, num_hidden_layers); 5 layers at 0.1 -> 0, .025, .05, .075, .1
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    x = torch.ones(2000, 3, 4)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    kept = per_sample[:, 0] != 0
    assert torch.allclose(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.75))  # kept samples scaled by 1 / (1 - p)
    assert bool((per_sample[~kept] == 0).all())  # a dropped sample loses the whole branch
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(drop_path(x, 0.25, training=False), x)


def test_hooks_on_the_tiny_internvl_vision_tower(tiny_internvl):
    tower = tiny_internvl.model.vision_tower
    n = len(tower.encoder.layer)
    pixels = torch.randn(4, 3, 56, 56)
    tiny_internvl.eval()
    with torch.no_grad():
        before = tower(pixel_values=pixels).last_hidden_state
    rates = add_vision_drop_path(tiny_internvl, 0.5)
    assert rates == pytest.approx(drop_path_rates(0.5, n))
    with torch.no_grad():
        assert torch.allclose(tower(pixel_values=pixels).last_hidden_state, before)  # eval: no-op
        tiny_internvl.train()
        torch.manual_seed(1)
        trained = tower(pixel_values=pixels).last_hidden_state
    assert not torch.allclose(trained, before)
    with pytest.raises(ValueError, match="drop_path must be in"):
        add_vision_drop_path(tiny_internvl, 1.0)
