"""Pairwise preference losses on per-sequence log-probs (the cheap epilogue of every DPO variant).

    loss, metrics = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta=0.1, loss_type="sigmoid")

Every input is a [B] tensor of Σ_t m_t·logp_t per response (``token_logprobs(...,
reduction="sum").seq_logps``). The formulas are those of ../shared/docs/ALGORITHMS.md and, for
the loss types TRL has, TRL's ``DPOTrainer`` (trl 1.16); tests check both. Everything here is
elementwise over the batch: no Python loop over pairs.

Metrics use TRL's names and are detached: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (batch means).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_TYPES", "F_DIVERGENCES", "dpo_loss", "simpo_loss", "madpo_weights", "preference_metrics",
]

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "ipo_sum", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "nll", "nll_mean", "fdpo",
)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Loss types that need the per-response token counts.
_NEEDS_LENGTHS = {"ipo", "sigmoid_norm", "nll_mean"}


def _f_scores(logratios: torch.Tensor, f_divergence: str, alpha: float) -> torch.Tensor:
    """f'(π/π_ref) evaluated through the log-ratio (TRL's f-divergence DPO)."""
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        # exp clamped at 80 (TRL's bound for fp32/bf16) so it stays finite
        t = ((alpha - 1.0) * logratios).float().clamp(max=80.0)
        return ((torch.exp(t) - 1.0) / (alpha - 1.0)).to(logratios.dtype)
    raise ValueError(f"f_divergence must be one of {F_DIVERGENCES}, got {f_divergence!r}")


def reduce_losses(per_item: torch.Tensor, sample_weights: Optional[torch.Tensor] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Per-pair (or per-list) losses, times optional per-item weights, reduced: "mean", "sum" or
    "none" (the weighted [B] tensor itself). Every loss of prefops.losses ends here."""
    if sample_weights is not None:
        per_item = per_item * sample_weights.to(per_item.dtype)
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def preference_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict:
    """TRL-named, detached batch means."""
    cr, rr = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "rewards/margins": (cr - rr).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _per_pair_loss(loss_type, *, beta, label_smoothing, delta, chosen_scores, rejected_scores, chosen_logratios,
                   rejected_logratios, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_lengths, rejected_lengths, discopop_tau, fdpo_lambda, chosen_hallucinated,
                   rejected_hallucinated, chosen_token_logps_mean, chosen_nll_logps, chosen_nll_lengths):
    eps = label_smoothing
    if loss_type == "sigmoid":  # DPO; with label smoothing ε: conservative DPO (cDPO)
        z = beta * delta
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "ipo_sum"):
        if loss_type == "ipo":  # TRL: log-ratios averaged per completion token
            d = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
        else:  # the paper's sums
            d = delta
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        z = beta * delta
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "robust":
        z = beta * delta
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = (torch.sort(chosen_logps - rejected_logps, dim=0).values
                 - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values)
        else:
            d = torch.sort(chosen_logratios, dim=0).values - torch.sort(rejected_logratios, dim=0).values
        return -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        z = beta * delta
        mod = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod
    if loss_type == "sigmoid_norm":
        d = chosen_scores / chosen_lengths.clamp(min=1.0) - rejected_scores / rejected_lengths.clamp(min=1.0)
        return -F.logsigmoid(beta * d)
    if loss_type == "sft":  # TRL: mean NLL over all chosen tokens of the batch, spread over pairs
        if chosen_token_logps_mean is None:
            raise ValueError("loss_type 'sft' needs chosen_lengths (the token-level mean over the batch)")
        return (-chosen_token_logps_mean).expand(delta.shape[0])
    # RPO's NLL is on the plain S(y_w), whatever token weights shape the preference term.
    s_w = chosen_logps if chosen_nll_logps is None else chosen_nll_logps
    if loss_type == "nll":  # RPO, paper form: β·(−S(y_w)); η is this term's loss weight
        return -beta * s_w
    if loss_type == "nll_mean":  # RPO, "average" form: −S(y_w)/|y_w|
        n_w = chosen_lengths if chosen_nll_lengths is None else chosen_nll_lengths
        return -s_w / n_w.clamp(min=1.0)
    if loss_type == "fdpo":  # F-DPO: −log σ(β·(h − λ·(h_l − h_w)))
        if chosen_hallucinated is None or rejected_hallucinated is None:
            raise ValueError("loss_type 'fdpo' needs chosen_hallucinated and rejected_hallucinated (0/1 per pair)")
        hw, hl = chosen_hallucinated.to(delta.dtype), rejected_hallucinated.to(delta.dtype)
        return -F.logsigmoid(beta * (delta - fdpo_lambda * (hl - hw)))
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def madpo_weights(reward_margins: torch.Tensor, *, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0,
                  tau: float = math.log(999.0)) -> torch.Tensor:
    """MADPO per-pair weights from a reward model's margin m (detached):
    c(|m|) = c_min + (c_max − c_min)/(1 + ((c_max − 1)/(1 − c_min))·exp(λ(|m| − τ)));
    w = σ(c·m)/σ(m) where m > −τ, else 1."""
    m = reward_margins.detach().double()
    c = c_min + (c_max - c_min) / (1 + ((c_max - 1) / (1 - c_min)) * torch.exp(lam * (m.abs() - tau)))
    w = torch.exp(F.logsigmoid(c * m) - F.logsigmoid(m))
    return torch.where(m > -tau, w, torch.ones_like(w)).to(reward_margins.dtype)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    beta: float = 0.1,
    loss_type: Union[str, Sequence[str]] = "sigmoid",
    loss_weights: Optional[Sequence[float]] = None,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    sample_weights: Optional[torch.Tensor] = None,
    discopop_tau: float = 0.05,
    fdpo_lambda: float = 10.0,
    chosen_hallucinated: Optional[torch.Tensor] = None,
    rejected_hallucinated: Optional[torch.Tensor] = None,
    chosen_token_logps_mean: Optional[torch.Tensor] = None,
    chosen_nll_logps: Optional[torch.Tensor] = None,
    chosen_nll_lengths: Optional[torch.Tensor] = None,
    reduction: str = "mean",
):
    """DPO-family loss and TRL-named metrics from per-sequence log-probs.

    Args:
        chosen_logps, rejected_logps: policy Σ logp per response, [B].
        ref_chosen_logps, ref_rejected_logps: the reference model's, [B] (no gradient is taken
            through them). ``None`` means a zero reference (reference-free).
        loss_type: one of ``LOSS_TYPES`` or a list; with a list, the per-pair losses are
            combined with ``loss_weights`` (default 1 each), as TRL does. ``"ipo"`` uses
            length-normalised log-ratios (TRL), ``"ipo_sum"`` the paper's sums; ``"nll"`` and
            ``"nll_mean"`` are RPO's two NLL terms (combine them with "sigmoid").
        label_smoothing: ε of cDPO ("sigmoid"), robust DPO, EXO and AOT. (TRL 1.16's "sigmoid"
            ignores it; prefops applies cDPO, as its formula asks.)
        f_divergence / f_alpha: f-divergence DPO scores (TRL's ``f_divergence_type`` and
            ``f_alpha_divergence_coef``, default 0.5 as TRL's).
        chosen_lengths, rejected_lengths: completion token counts, [B] (needed by "ipo",
            "sigmoid_norm", "nll_mean").
        sample_weights: per-pair weights, [B] (curriculum, MADPO via ``madpo_weights``, Sem-DPO,
            WPO, any column); applied to the per-pair loss before the reduction.
        chosen_token_logps_mean: for "sft": the mean log-prob over all chosen completion tokens.
        chosen_nll_logps: for "nll"/"nll_mean": the plain Σ log p(y_w) when ``chosen_logps`` are
            token-weighted (LD-DPO, TAB-PO weights; the fused losses pass it); default
            ``chosen_logps``.
        chosen_nll_lengths: for "nll_mean": the tokens summed in ``chosen_nll_logps``, when
            ``chosen_lengths`` counts differently (the fused losses pass the scored tokens when
            "ipo"/"sigmoid_norm" get TRL's completion count); default ``chosen_lengths``.
        reduction: "mean" (default), "sum" or "none" (per-pair losses).

    Returns:
        (loss, metrics): the reduced loss and a dict of detached tensors.
    """
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(loss_types)
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chosen_logps.shape != rejected_logps.shape or chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps and rejected_logps must both be [B], got {tuple(chosen_logps.shape)} and "
                         f"{tuple(rejected_logps.shape)}")
    for lt in loss_types:
        if lt not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {lt!r}")
        if lt in _NEEDS_LENGTHS and (chosen_lengths is None or rejected_lengths is None):
            raise ValueError(f"loss_type {lt!r} needs chosen_lengths and rejected_lengths")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError("exo_pair needs 0 < label_smoothing < 1")
    if f_divergence != "reverse_kl" and not set(loss_types) <= {"sigmoid", "hinge", "ipo", "ipo_sum", "sigmoid_norm",
                                                                 "robust", "exo_pair", "discopop", "nll", "nll_mean",
                                                                 "sft"}:
        raise ValueError(f"f_divergence {f_divergence!r} applies to loss types built on the score difference")

    zero = torch.zeros_like(chosen_logps)
    ref_c = ref_chosen_logps.detach() if ref_chosen_logps is not None else zero
    ref_r = ref_rejected_logps.detach() if ref_rejected_logps is not None else zero
    chosen_logratios = chosen_logps - ref_c
    rejected_logratios = rejected_logps - ref_r
    chosen_scores = _f_scores(chosen_logratios, f_divergence, f_alpha)
    rejected_scores = _f_scores(rejected_logratios, f_divergence, f_alpha)
    delta = chosen_scores - rejected_scores
    lengths = dict(chosen_lengths=chosen_lengths.to(delta.dtype) if chosen_lengths is not None else None,
                   rejected_lengths=rejected_lengths.to(delta.dtype) if rejected_lengths is not None else None)

    per_pair = None
    for lt, lw in zip(loss_types, weights):
        term = _per_pair_loss(
            lt, beta=beta, label_smoothing=label_smoothing, delta=delta, chosen_scores=chosen_scores,
            rejected_scores=rejected_scores, chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
            chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
            discopop_tau=discopop_tau, fdpo_lambda=fdpo_lambda, chosen_hallucinated=chosen_hallucinated,
            rejected_hallucinated=rejected_hallucinated, chosen_token_logps_mean=chosen_token_logps_mean,
            chosen_nll_logps=chosen_nll_logps,
            chosen_nll_lengths=chosen_nll_lengths.to(delta.dtype) if chosen_nll_lengths is not None else None,
            **lengths)
        per_pair = term * lw if per_pair is None else per_pair + term * lw
    loss = reduce_losses(per_pair, sample_weights, reduction)
    metrics = preference_metrics(chosen_logps, rejected_logps, beta * chosen_logratios, beta * rejected_logratios)
    return loss, metrics


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    sample_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
):
    """SimPO (no reference): a(y) = S(y)/|y|, z = a(y_w) − a(y_l) − γ/β,
    loss = −(1−ε)·log σ(βz) − ε·log σ(−βz), reduced, + sft_weight·NLL where NLL = −ΣS(y_w)/Σ|y_w|
    is one token-level mean over every chosen token of the batch, not sample-weighted (the SimPO
    trainer's and TRL CPO's ``cpo_alpha`` term; with reduction "none" it is added to every pair,
    with "sum" B times). ``logps/chosen``/``logps/rejected`` are length-averaged, as those
    trainers log them; with ``sft_weight`` the metrics also hold ``nll_loss``."""
    a_w = chosen_logps / chosen_lengths.to(chosen_logps.dtype).clamp(min=1.0)
    a_l = rejected_logps / rejected_lengths.to(rejected_logps.dtype).clamp(min=1.0)
    z = beta * (a_w - a_l - gamma_beta_ratio)
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    loss = reduce_losses(per_pair, sample_weights, reduction)
    metrics = preference_metrics(a_w, a_l, beta * a_w, beta * a_l)
    if sft_weight:
        nll = -chosen_logps.sum() / chosen_lengths.to(chosen_logps.dtype).sum().clamp(min=1.0)
        loss = loss + sft_weight * (nll * per_pair.shape[0] if reduction == "sum" else nll)
        metrics["nll_loss"] = nll.detach()
    return loss, metrics
