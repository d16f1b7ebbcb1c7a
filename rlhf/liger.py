"""Liger-Kernel layer kernels (RMSNorm, SwiGLU, RoPE) for the InternVL / Qwen2 language model: CUDA only."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def apply_liger_kernels(model: torch.nn.Module) -> bool:
    """Patch the Qwen2 layers of `model` in place with Liger's Triton kernels. On a machine without CUDA, logs one
    line and leaves the model as it is. Returns whether kernels were applied."""
    if not torch.cuda.is_available():
        logger.warning("use_liger_kernels: Liger's kernels are GPU-only (Triton on CUDA); training continues without them")
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    # Liger dispatches on the model type (internvl, qwen2); the LM head stays ours (fused log-probs).
    _apply_liger_kernel_to_instance(model=model, rms_norm=True, swiglu=True, rope=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)
    return True
