"""Unpaired preference losses: KTO and BCO, on per-sequence log-probs of desirable and
undesirable responses (``desirable`` is a [B] bool label per response).

Both need a batch statistic that must be the same on every data-parallel rank: KTO's KL
baseline z0 and BCO's running reward mean δ. Pass ``process_group`` (or use the default group
when torch.distributed is initialised and ``sync=True``) and they are all-reduced.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["kto_loss", "bco_loss", "RunningMean", "BCOLoss"]


def _dist_group(process_group, sync):
    import torch.distributed as dist

    if process_group is not None:
        return process_group
    if sync and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def _metrics(logps, rewards, desirable):
    d = desirable.bool()
    nan = torch.tensor(float("nan"), device=rewards.device, dtype=rewards.dtype)

    def mean(x, m):
        return x[m].mean() if bool(m.any()) else nan

    out = {"rewards/chosen": mean(rewards, d), "rewards/rejected": mean(rewards, ~d),
           "logps/chosen": mean(logps.detach(), d), "logps/rejected": mean(logps.detach(), ~d)}
    # TRL's KTO logs the margin only when the batch holds both kinds.
    if bool(d.any()) and bool((~d).any()):
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl_logps: Optional[torch.Tensor] = None,
    ref_kl_logps: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    process_group=None,
    sync: bool = True,
):
    """KTO: r = S − R; z0 = clamp(mean(S − R on mismatched prompt/completion pairs), min=0), detached
    and averaged over ranks; desirable λ_D·(1 − σ(β(r − z0))), undesirable λ_U·(1 − σ(β(z0 − r))).

    The KL baseline comes from ``kl_logps``/``ref_kl_logps`` (policy and reference Σ log-probs of
    mismatched pairs) or a precomputed ``kl``; with neither, z0 = 0. Returns (loss, metrics) with
    the loss a mean over all responses and ``metrics["kl"]``.
    """
    r = logps - ref_logps.detach()
    if kl is None:
        if kl_logps is not None and ref_kl_logps is not None:
            kl = (kl_logps - ref_kl_logps).mean().detach()
            group = _dist_group(process_group, sync)
            if group is not None:
                import torch.distributed as dist

                kl = kl.clone()
                dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
                kl = kl / dist.get_world_size(group)
        else:
            kl = torch.zeros((), device=logps.device, dtype=logps.dtype)
    z0 = kl.detach().clamp(min=0)
    d = desirable.bool()
    losses = torch.where(d, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    metrics = _metrics(logps, beta * r.detach(), d)
    metrics["kl"] = z0
    return losses.mean(), metrics


class RunningMean:
    """Mean of every reward seen so far (BCO's δ), optionally combined over ranks per update."""

    def __init__(self):
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, values: torch.Tensor, process_group=None, sync: bool = True) -> None:
        stats = torch.stack([values.detach().double().sum(), torch.tensor(float(values.numel()), dtype=torch.float64,
                                                                          device=values.device)])
        group = _dist_group(process_group, sync)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        self.total += float(stats[0])
        self.count += int(stats[1])

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> dict:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


def bco_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    delta: float,
    beta: float = 0.1,
):
    """BCO: r = β(S − R); desirable −log σ(r − δ), undesirable −log σ(−(r − δ)); mean over responses.
    ``delta`` is the running reward mean (see ``BCOLoss``, which keeps and synchronises it)."""
    r = beta * (logps - ref_logps.detach())
    d = desirable.bool()
    losses = torch.where(d, -F.logsigmoid(r - delta), -F.logsigmoid(-(r - delta)))
    metrics = _metrics(logps, r.detach(), d)
    metrics["delta"] = torch.tensor(float(delta))
    return losses.mean(), metrics


class BCOLoss(torch.nn.Module):
    """BCO with its running reward mean δ: each call first adds this batch's rewards (all ranks')
    to δ, then computes ``bco_loss``. δ is saved in the module's state dict."""

    def __init__(self, beta: float = 0.1, process_group=None, sync: bool = True):
        super().__init__()
        self.beta = beta
        self.process_group = process_group
        self.sync = sync
        self.running = RunningMean()

    def forward(self, logps, ref_logps, desirable):
        rewards = self.beta * (logps.detach() - ref_logps.detach())
        self.running.update(rewards, self.process_group, self.sync)
        return bco_loss(logps, ref_logps, desirable, delta=self.running.mean, beta=self.beta)

    def get_extra_state(self):
        return self.running.state_dict()

    def set_extra_state(self, state):
        self.running.load_state_dict(state)
