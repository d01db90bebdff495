"""Listwise preference losses over K responses per prompt (LiPO-λ, uniform pairwise, Plackett–Luce).

Inputs are padded [P, K] tensors (P prompts, up to K responses each) with ``list_mask`` marking
real entries, so list sizes may differ per prompt; ``pad_lists`` turns flat values + offsets
(what ``prefops prep`` listwise output holds) into that layout. Scores are
s_i = β·(S(y_i) − R(y_i)); labels ψ are larger-is-better, equal labels are ties (no pair).
The loss is a sum over each list's pairs, averaged over prompts. All pairs of all lists are
handled at once as [P, K, K] tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from prefops.losses.pairwise import reduce_losses

__all__ = ["LISTWISE_LOSS_TYPES", "listwise_loss", "pad_lists"]

LISTWISE_LOSS_TYPES = ("lipo_lambda", "pairwise", "plackett_luce")


def pad_lists(values: torch.Tensor, offsets: torch.Tensor, pad_value: float = 0.0):
    """Flat [Σ K_p] values and [P+1] offsets → ([P, K_max] padded values, [P, K_max] mask)."""
    offsets = offsets.to(device=values.device, dtype=torch.long)
    sizes = offsets[1:] - offsets[:-1]
    P = sizes.numel()
    K = int(sizes.max()) if P else 0
    col = torch.arange(K, device=values.device)
    mask = col[None, :] < sizes[:, None]
    out = torch.full((P, K), pad_value, dtype=values.dtype, device=values.device)
    out[mask] = values  # row-major order matches the flat layout
    return out, mask


def _ranks(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based rank of each entry under descending scores within its list (padding last;
    equal scores by position)."""
    s = scores.detach().masked_fill(~mask, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order).contiguous())
    return ranks


def listwise_loss(
    logps: torch.Tensor,
    ref_logps: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    list_mask: Optional[torch.Tensor] = None,
    beta: float = 0.05,
    loss_type: str = "lipo_lambda",
    normalize_lambda: bool = False,
    rank_by: str = "scores",
    reduction: str = "mean",
):
    """Listwise loss and metrics.

    Args:
        logps, ref_logps: [P, K] per-response Σ log-probs of the policy and the reference
            (``ref_logps=None``: reference-free).
        labels: [P, K] graded labels ψ (higher is better; ties allowed).
        list_mask: [P, K] bool, True on real responses (default: all).
        loss_type: "lipo_lambda": −Σ_{ψi>ψj} Δij·log σ(si − sj) with
            Δij = |Gi − Gj|·|1/D(τi) − 1/D(τj)|, G = 2^ψ − 1, D(τ) = log(1 + τ), τ the 1-based rank
            (no gradient through ranks or Δ);
            "pairwise": the same with Δij = 1; "plackett_luce": listMLE over the label order.
        normalize_lambda: divide each list's Δ by their sum over its pairs (then K = 2 is
            exactly DPO's −log σ(βh)).
        rank_by: what τ ranks by: "scores", the current model scores (LiPO-λ, as LambdaLoss), or
            "labels", the true order (RankDPO's Eq. 6; Δ is then fixed per list). Ties rank by
            position; tied pairs get no weight either way, as |Gi − Gj| = 0.
        reduction: "mean" over prompts, "sum", or "none" ([P]).
    """
    if loss_type not in LISTWISE_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LISTWISE_LOSS_TYPES}, got {loss_type!r}")
    if rank_by not in ("scores", "labels"):
        raise ValueError(f"rank_by must be 'scores' or 'labels', got {rank_by!r}")
    if logps.dim() != 2 or labels.shape != logps.shape:
        raise ValueError(f"logps and labels must both be [P, K], got {tuple(logps.shape)} and {tuple(labels.shape)}")
    mask = torch.ones_like(logps, dtype=torch.bool) if list_mask is None else list_mask.bool()
    ref = ref_logps.detach() if ref_logps is not None else torch.zeros_like(logps)
    scores = beta * (logps - ref)
    psi = labels.to(scores.dtype)
    valid_pair = mask[:, :, None] & mask[:, None, :]
    better = (psi[:, :, None] > psi[:, None, :]) & valid_pair  # i strictly preferred to j
    diff = scores[:, :, None] - scores[:, None, :]

    if loss_type == "plackett_luce":
        # Sort by label (descending, stable), padding last; loss = −Σ_k [s_(k) − logsumexp_{m≥k} s_(m)].
        key = psi.masked_fill(~mask, float("-inf"))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        s = scores.gather(1, order)
        m = mask.gather(1, order)
        s_masked = s.masked_fill(~m, float("-inf"))
        tail_lse = torch.logcumsumexp(s_masked.flip(1), dim=1).flip(1)
        terms = torch.where(m, s - tail_lse, torch.zeros_like(s))
        per_list = -terms.sum(1)
    else:
        if loss_type == "lipo_lambda":
            with torch.no_grad():
                gains = torch.pow(2.0, psi) - 1.0
                tau = _ranks(scores if rank_by == "scores" else psi, mask).to(scores.dtype)
                inv_d = 1.0 / torch.log1p(tau)
                delta = (gains[:, :, None] - gains[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
                delta = delta * better
        else:
            delta = better.to(scores.dtype)
        if normalize_lambda:
            total = delta.sum(dim=(1, 2), keepdim=True)
            delta = delta / torch.where(total == 0, torch.ones_like(total), total)
        per_list = -(delta * F.logsigmoid(diff)).masked_fill(~better, 0.0).sum(dim=(1, 2))

    loss = reduce_losses(per_list, None, reduction)
    with torch.no_grad():
        n_pairs = better.sum().clamp(min=1)
        top = torch.sort(psi.masked_fill(~mask, float("-inf")), dim=1, descending=True, stable=True).indices[:, 0]
        bottom = torch.sort(psi.masked_fill(~mask, float("inf")), dim=1, stable=True).indices[:, 0]
        metrics = {
            "rewards/accuracies": ((diff > 0) & better).sum() / n_pairs,
            "rewards/margins": (diff * better).sum() / n_pairs,
            "rewards/chosen": scores.gather(1, top[:, None]).mean(),
            "rewards/rejected": scores.gather(1, bottom[:, None]).mean(),
            "logps/chosen": logps.gather(1, top[:, None]).mean(),
            "logps/rejected": logps.gather(1, bottom[:, None]).mean(),
        }
    return loss, metrics
