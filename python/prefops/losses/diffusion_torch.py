"""Pure-torch twin of ``prefops.kernels.diffusion_dpo``: per-image mean squared errors.

The backward comes from autograd. Everything is computed in fp32 (fp64 for fp64 inputs), as the
Diffusion-DPO scripts do with ``.float()`` before the MSE.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["per_image_mse", "mse_pair"]


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def per_image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all non-batch dims of (pred − target)², [N]; differentiable in ``pred``."""
    dt = _acc_dtype(pred, target)
    d = pred.to(dt) - target.detach().to(dt)
    return d.pow(2).reshape(d.shape[0], -1).mean(1)


def mse_pair(model_pred: torch.Tensor, ref_pred: Optional[torch.Tensor], target: torch.Tensor):
    """(model MSE [N] with gradient, reference MSE [N] without one, or None)."""
    m = per_image_mse(model_pred, target)
    if ref_pred is None:
        return m, None
    with torch.no_grad():
        r = per_image_mse(ref_pred, target).to(m.dtype)
    return m, r
