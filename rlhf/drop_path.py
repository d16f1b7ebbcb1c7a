"""Stochastic depth (drop path) on InternVL's vision tower, as InternVL's training sets it (`drop_path_rate`).

InternViT drops each residual branch of each vision layer per sample: layer i of n uses the rate
`rate * i / (n - 1)` (a linear ramp from 0 at the first layer to `rate` at the last), a dropped sample's branch is
zero and a kept one is scaled by `1 / (1 - p)`. The released InternVL3 MPO runs use `drop_path_rate 0.1`.
transformers' `InternVLVisionLayer` has no drop path, so `add_vision_drop_path` adds it with forward hooks on each
layer's attention and MLP branches (the branch is multiplied by its layer scale after the hook, which commutes with
a per-sample mask). In eval mode the hooks do nothing.
"""

from __future__ import annotations

import torch


def drop_path_rates(rate: float, n_layers: int) -> list[float]:
    """The per-layer rates: `torch.linspace(0, rate, n_layers)`, as InternViT builds them."""
    return [float(x) for x in torch.linspace(0, rate, n_layers)] if n_layers else []


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples (dim 0) with probability `p`, scale the rest by 1 / (1 - p)."""
    if p <= 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def _vision_layers(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    tower = getattr(inner, "vision_tower", None)
    encoder = getattr(tower, "encoder", None)
    return list(getattr(encoder, "layer", []))


def add_vision_drop_path(model: torch.nn.Module, rate: float) -> list[float]:
    """Hook drop path into every vision layer of an InternVL model; returns the per-layer rates ([] when the model
    has no vision tower or `rate` is 0). Raises ValueError for a rate outside [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate}")
    layers = _vision_layers(model)
    if rate == 0.0 or not layers:
        return []
    rates = drop_path_rates(rate, len(layers))
    for layer, p in zip(layers, rates):
        if p == 0.0:
            continue

        def attention_hook(module, args, output, p=p):
            if isinstance(output, tuple):
                return (drop_path(output[0], p, module.training), *output[1:])
            return drop_path(output, p, module.training)

        def mlp_hook(module, args, output, p=p):
            return drop_path(output, p, module.training)

        layer.attention.register_forward_hook(attention_hook)
        layer.mlp.register_forward_hook(mlp_hook)
    return rates
