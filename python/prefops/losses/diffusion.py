"""Diffusion preference losses: Diffusion-DPO, SmPO, Diffusion-KTO and RankDPO.

    loss, metrics = diffusion_dpo_loss(model_pred, ref_pred, target, beta=5000.0)

``model_pred`` / ``ref_pred`` are the policy's and the frozen reference's UNet outputs and
``target`` the regression target (the noise ε for epsilon-prediction, the velocity for
v-prediction), all [N, ...] with any trailing shape. Paired losses take the layout of the
Diffusion-DPO scripts and of prefops' LM losses: N = 2B, the B winners (chosen) first, then the
B losers in the same order, each pair sharing its timestep and noise. The only thing read from
the big tensors is the per-image MSE m_i = mean((ε_θ,i − ε_i)²) and r_i (the reference's);
``diffusion_mse`` computes both in one fused Triton pass on a GPU (exact backward into
``model_pred``; the reference and target get no gradient), or in torch elsewhere. The rest is an
[N]-sized epilogue. Formulas: ../shared/docs/ALGORITHMS.md, "Diffusion".

Metrics (detached batch means):
    mse/model, mse/ref                  ½(mean m_w + mean m_l), likewise r (the scripts' raw losses)
    mse/model_chosen, mse/model_rejected, mse/ref_chosen, mse/ref_rejected
    rewards/chosen, rewards/rejected    −s·(m_w − r_w), −s·(m_l − r_l), s the loss's scale
    rewards/margins                     the logit ("inside term") = chosen − rejected reward
    rewards/accuracies                  implicit accuracy, mean(inside > 0)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from prefops.losses import diffusion_torch as _torch_impl
from prefops.ops._backend import kernel_module, resolve_backend
from prefops.losses.listwise import listwise_loss
from prefops.losses.pairwise import reduce_losses
from prefops.losses.unpaired import _dist_group

__all__ = [
    "DIFFUSION_CONVENTIONS", "DIFFUSION_DPO_LOSS_TYPES", "diffusion_mse", "diffusion_dpo_loss", "smpo_loss",
    "diffusion_kto_loss", "rank_dpo_loss",
]

DIFFUSION_CONVENTIONS = ("original", "diffusers")
DIFFUSION_DPO_LOSS_TYPES = ("sigmoid", "hinge", "sft")

# ---------------------------------------------------------------------------------------------
# Per-image MSE: backend selection at call time (importing this module never imports triton)
# ---------------------------------------------------------------------------------------------

def _kernels():
    return kernel_module("diffusion_dpo")


def _resolve_backend(backend: str, tensors) -> str:
    return resolve_backend(backend, tensors, "diffusion_mse")


class _FusedMSE(torch.autograd.Function):
    """(m, r) from one kernel pass; backward: d(model_pred) = g·2(ε_θ − ε)/n, nothing else."""

    @staticmethod
    def forward(ctx, model_pred, ref_pred, target):
        N = target.shape[0]
        x = model_pred.reshape(N, -1).contiguous()
        t = target.reshape(N, -1).contiguous()
        r = ref_pred.reshape(N, -1).contiguous() if ref_pred is not None else None
        m, rm = _kernels().mse_forward(x, r, t)
        rm = rm if rm is not None else m.new_zeros(0)  # autograd outputs must be tensors
        ctx.mark_non_differentiable(rm)
        ctx.save_for_backward(x, t)
        ctx.shape = model_pred.shape
        return m, rm

    @staticmethod
    def backward(ctx, grad_m, _grad_r):
        if grad_m is None or not ctx.needs_input_grad[0]:
            return None, None, None
        x, t = ctx.saved_tensors
        return _kernels().mse_backward(x, t, grad_m).view(ctx.shape), None, None


def diffusion_mse(model_pred: torch.Tensor, ref_pred: Optional[torch.Tensor], target: torch.Tensor, *,
                  backend: str = "auto"):
    """Per-image mean squared errors over all non-batch dims: (m [N], r [N] or None).

    fp32 accumulation (fp64 for fp64 inputs, torch only). Gradient flows into ``model_pred``
    only. ``backend``: "auto" (Triton on CUDA when installed), "triton" (also on CPU under
    ``TRITON_INTERPRET=1``) or "torch".
    """
    if model_pred.dim() < 1 or model_pred.shape != target.shape:
        raise ValueError(f"model_pred and target must have the same [N, ...] shape, got {tuple(model_pred.shape)} "
                         f"and {tuple(target.shape)}")
    if ref_pred is not None and ref_pred.shape != target.shape:
        raise ValueError(f"ref_pred must have the shape of target {tuple(target.shape)}, got {tuple(ref_pred.shape)}")
    tensors = [model_pred, target] + ([ref_pred] if ref_pred is not None else [])
    if _resolve_backend(backend, tensors) == "torch":
        return _torch_impl.mse_pair(model_pred, ref_pred, target)
    m, r = _FusedMSE.apply(model_pred, ref_pred.detach() if ref_pred is not None else None, target.detach())
    return m, (r if ref_pred is not None else None)


# ---------------------------------------------------------------------------------------------
# Epilogues
# ---------------------------------------------------------------------------------------------


def _halves(x: torch.Tensor):
    if x.shape[0] % 2:
        raise ValueError(f"paired losses need [2B, ...] inputs (winners first, then losers), got N = {x.shape[0]}")
    return x.chunk(2)


@torch.no_grad()
def _pair_metrics(m, r, scale, ties_half: bool = False) -> dict:
    m_w, m_l = m.chunk(2)
    out = {"mse/model": 0.5 * (m_w.mean() + m_l.mean()), "mse/model_chosen": m_w.mean(),
           "mse/model_rejected": m_l.mean()}
    if r is not None:
        r_w, r_l = r.chunk(2)
        cr, rr = -scale * (m_w - r_w), -scale * (m_l - r_l)
        inside = cr - rr
        acc = (inside > 0).to(m.dtype).mean()
        if ties_half:  # the diffusers script counts a tie as half right
            acc = acc + 0.5 * (inside == 0).to(m.dtype).mean()
        out.update({"mse/ref": r.mean(), "mse/ref_chosen": r_w.mean(), "mse/ref_rejected": r_l.mean(),
                    "rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/margins": inside.mean(),
                    "rewards/accuracies": acc})
    return out


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: Optional[torch.Tensor],
    target: torch.Tensor,
    *,
    beta: float = 5000.0,
    convention: str = "original",
    loss_type: str = "sigmoid",
    sample_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
):
    """Diffusion-DPO (Wallace et al.): per pair, with m, r the policy / reference per-image MSEs,

        inside = −s·((m_w − m_l) − (r_w − r_l)),  s = β/2 ("original", SalesforceAIResearch
        train.py, β = 5000 in its launchers) or s = β ("diffusers", the diffusers community
        script, whose β = 2500 default is the same strength as 5000 here),

    "sigmoid": −log σ(inside); "hinge": max(0, 1 − inside); "sft": m_w (plain MSE on the winner;
    the losers get no gradient and ``ref_pred`` may be None).

    Args:
        model_pred, ref_pred, target: [2B, ...], winners first then losers.
        sample_weights: [B] per-pair weights, applied before the reduction.
        reduction: "mean" (default), "sum" or "none" ([B]).

    Returns (loss, metrics), metrics as in the module docstring; with the diffusers convention
    ties (inside = 0, e.g. at step 0 against a frozen copy) count ½ in rewards/accuracies, as in
    that script.
    """
    if convention not in DIFFUSION_CONVENTIONS:
        raise ValueError(f"convention must be one of {DIFFUSION_CONVENTIONS}, got {convention!r}")
    if loss_type not in DIFFUSION_DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DIFFUSION_DPO_LOSS_TYPES}, got {loss_type!r}")
    if ref_pred is None and loss_type != "sft":
        raise ValueError(f"loss_type {loss_type!r} needs ref_pred")
    _halves(model_pred)
    m, r = diffusion_mse(model_pred, ref_pred, target, backend=backend)
    scale = 0.5 * beta if convention == "original" else beta
    m_w, m_l = m.chunk(2)
    if loss_type == "sft":
        per_pair = m_w
    else:
        r_w, r_l = r.chunk(2)
        inside = -scale * ((m_w - m_l) - (r_w - r_l))
        per_pair = -F.logsigmoid(inside) if loss_type == "sigmoid" else torch.relu(1 - inside)
    return reduce_losses(per_pair, sample_weights, reduction), _pair_metrics(m, r, scale, convention == "diffusers")


def smpo_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    probs: Optional[torch.Tensor] = None,
    score_chosen: Optional[torch.Tensor] = None,
    score_rejected: Optional[torch.Tensor] = None,
    score_range: Optional[Sequence[float]] = None,
    beta: float = 5000.0,
    scale: float = 10.0,
    sample_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
):
    """SmPO (JaydenLyh/SmPO): Diffusion-DPO with a soft preference p per pair,

        p = e^{n_w} / (e^{n_w} + e^{n_l}),  inside = −½·β·(2p − 1)·scale·((m_w − m_l) − (r_w − r_l)),
        loss = −log σ(inside).

    Give ``probs`` ([B] p) or the reward scores ``score_chosen`` / ``score_rejected`` ([B]); with
    ``score_range=(lo, hi)`` they are first min-max normalised, n = (s − lo)/(hi − lo) (SmPO uses
    PickScore's range over Pick-a-Pic, (0.11543526500463486, 0.28201571106910706)). SmPO's noise
    comes from ReNoise inversion rather than sampling; that is the caller's business (pass it as
    ``target``). Layout and metrics as ``diffusion_dpo_loss``, plus ``smpo/probs``.
    """
    if probs is None:
        if score_chosen is None or score_rejected is None:
            raise ValueError("smpo_loss needs probs or both score_chosen and score_rejected")
        n_w, n_l = score_chosen, score_rejected
        if score_range is not None:
            lo, hi = score_range
            n_w, n_l = (n_w - lo) / (hi - lo), (n_l - lo) / (hi - lo)
        probs = torch.sigmoid(n_w - n_l)  # = e^{n_w} / (e^{n_w} + e^{n_l}), without overflow
    _halves(model_pred)
    m, r = diffusion_mse(model_pred, ref_pred, target, backend=backend)
    probs = probs.detach().to(device=m.device, dtype=m.dtype)
    s = 0.5 * beta * (2 * probs - 1) * scale
    m_w, m_l = m.chunk(2)
    r_w, r_l = r.chunk(2)
    inside = -s * ((m_w - m_l) - (r_w - r_l))
    metrics = _pair_metrics(m, r, s)
    metrics["smpo/probs"] = probs.mean()
    return reduce_losses(-F.logsigmoid(inside), sample_weights, reduction), metrics


def diffusion_kto_loss(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 1000.0,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Optional[torch.Tensor] = None,
    process_group=None,
    sync: bool = True,
    backend: str = "auto",
):
    """Diffusion-KTO (jacklishufan/diffusion-kto, halo "sigmoid"): unpaired images, [N, ...].

        g = r − m (per image),  z0 = clamp(mean over the batch of g, min 0), detached,
        loss = mean of λ_y·(1 − σ(sgn_y·β·(g − z0))),  sgn = +1 desirable, −1 undesirable.

    ``labels``: [N] bool (True = desirable). The batch mean z0 is averaged over data-parallel
    ranks before the clamp (``process_group``, or the default group when torch.distributed is
    initialised and ``sync``), as the script does; ``kl`` overrides it. Metrics: kl,
    rewards/chosen and rewards/rejected (mean β·g over desirable / undesirable, NaN when none),
    rewards/accuracies (mean(sgn·β·(g − z0) > 0)), mse/model, mse/ref.
    """
    m, r = diffusion_mse(model_pred, ref_pred, target, backend=backend)
    if labels.shape != m.shape:
        raise ValueError(f"labels must be [N] = {tuple(m.shape)}, got {tuple(labels.shape)}")
    g = r - m
    if kl is None:
        kl = g.detach().mean()
        group = _dist_group(process_group, sync)
        if group is not None:
            import torch.distributed as dist

            kl = kl.clone()
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
            kl = kl / dist.get_world_size(group)
    z0 = kl.detach().to(g.dtype).clamp(min=0)
    d = labels.to(m.device).bool()
    df = d.to(g.dtype)
    logit = (2 * df - 1) * beta * (g - z0)
    weight = desirable_weight * df + undesirable_weight * (1 - df)
    losses = weight * (1 - torch.sigmoid(logit))
    with torch.no_grad():
        nan = torch.full((), float("nan"), dtype=g.dtype, device=g.device)
        metrics = {"kl": z0, "rewards/chosen": (beta * g[d]).mean() if bool(d.any()) else nan,
                   "rewards/rejected": (beta * g[~d]).mean() if bool((~d).any()) else nan,
                   "rewards/accuracies": (logit > 0).to(g.dtype).mean(), "mse/model": m.mean(), "mse/ref": r.mean()}
    return losses.mean(), metrics


def rank_dpo_loss(
    model_pred: torch.Tensor,
    ref_pred: Optional[torch.Tensor],
    target: torch.Tensor,
    labels: torch.Tensor,
    *,
    list_mask: Optional[torch.Tensor] = None,
    beta: float = 2500.0,
    loss_type: str = "lipo_lambda",
    normalize_lambda: bool = False,
    rank_by: str = "labels",
    reduction: str = "mean",
    backend: str = "auto",
):
    """RankDPO (listwise Diffusion-DPO; Karthik et al. 2024, arXiv 2410.18013, Eqs. 5-7):
    [P, K, ...] predictions of K images per prompt, all noised at the same timestep.

    Loss per prompt: −Σ_{ψi>ψj} Δij·log σ(si − sj) with si = −β·(m_i − r_i) (m, r the model's and
    the reference's MSE to ``target``), Δij = |Gi − Gj|·|1/D(τi) − 1/D(τj)|, G = 2^ψ − 1,
    D(τ) = log(1 + τ), summed over pairs and averaged over prompts (``listwise_loss``, fed −m as
    the "log-probs"). ``rank_by="labels"`` (default) ranks τ by the labels, as the paper's Eq. 6
    and Algorithm 2 do; ``"scores"`` ranks by the current scores (LiPO-λ, and the reading of the
    paper's Figure 2). The paper's labels are each image's fraction of wins over several reward
    models, ψ ∈ [0, 1]; pass those for its gain scale (dense ranks 0..K−1 weigh pairs up to ~7×
    more at K = 4). It writes the squared error as a sum where we take the mean (a constant
    folded into β, for which it gives no value) and draws noise per image (share it or not: the
    caller's ``target``). ``labels`` [P, K] are larger-is-better grades (ties allowed),
    ``list_mask`` [P, K] marks real images (padding entries must hold finite values). With K = 2
    and ``normalize_lambda=True`` (or loss_type="pairwise") this is exactly Diffusion-DPO,
    original convention, with β_DPO = 2β: the default 2500 matches Diffusion-DPO's 5000.
    Metrics: listwise_loss's rewards/*, and mse/model_chosen, mse/model_rejected (MSE of each
    list's best / worst labelled image).
    """
    if model_pred.dim() < 2 or labels.shape != model_pred.shape[:2]:
        raise ValueError(f"model_pred must be [P, K, ...] with labels [P, K], got {tuple(model_pred.shape)} and "
                         f"{tuple(labels.shape)}")
    P, K = labels.shape
    flat = lambda x: x.reshape(P * K, *x.shape[2:]) if x is not None else None  # noqa: E731
    m, r = diffusion_mse(flat(model_pred), flat(ref_pred), flat(target), backend=backend)
    loss, metrics = listwise_loss(-m.view(P, K), -r.view(P, K) if r is not None else None, labels,
                                  list_mask=list_mask, beta=beta, loss_type=loss_type,
                                  normalize_lambda=normalize_lambda, rank_by=rank_by, reduction=reduction)
    metrics["mse/model_chosen"] = -metrics.pop("logps/chosen")
    metrics["mse/model_rejected"] = -metrics.pop("logps/rejected")
    return loss, metrics
