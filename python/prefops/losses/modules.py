"""nn.Module forms of the fused losses: configuration in __init__, tensors in forward.

    loss_fn = DPOLoss(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2])
    loss, metrics = loss_fn(hidden, model.lm_head.weight, targets,
                            ref_chosen_logps=rc, ref_rejected_logps=rr)

Every forward takes (hidden, weight, targets) first and everything else by keyword, like the
functional forms it calls.
"""

from __future__ import annotations

import torch

from prefops.losses.fused import dpo_loss_from_hidden, simpo_loss_from_hidden, tabpo_loss_from_hidden

__all__ = ["DPOLoss", "SimPOLoss", "TABPOLoss"]


class _FusedLoss(torch.nn.Module):
    _fn = None

    def __init__(self, **config):
        super().__init__()
        self.config = config

    def forward(self, hidden, weight, targets, **tensors):
        overlap = set(tensors) & set(self.config)
        if overlap:
            raise TypeError(f"{type(self).__name__} was configured with {sorted(overlap)}; pass them once")
        return type(self)._fn(hidden, weight, targets, **self.config, **tensors)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())


class DPOLoss(_FusedLoss):
    """``dpo_loss_from_hidden`` with fixed options (beta, loss_type, label_smoothing, ld_alpha, ...)."""

    _fn = staticmethod(dpo_loss_from_hidden)


class SimPOLoss(_FusedLoss):
    """``simpo_loss_from_hidden`` with fixed options (beta=2.0, gamma_beta_ratio=0.5, ...)."""

    _fn = staticmethod(simpo_loss_from_hidden)


class TABPOLoss(_FusedLoss):
    """``tabpo_loss_from_hidden`` with fixed options (beta=0.5, tau=0.66, barrier_weight=0.5)."""

    _fn = staticmethod(tabpo_loss_from_hidden)
