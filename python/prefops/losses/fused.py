"""Fused preference losses: hidden states + lm_head weight → loss, logits never materialised.

    loss, metrics = dpo_loss_from_hidden(hidden, lm_head.weight, targets,
                                         ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)

Batch layout (TRL's concatenated batch): ``hidden`` [2B, T, H] and ``targets`` [2B, T], rows
[0, B) the chosen responses and [B, 2B) the rejected ones; ``targets`` holds the token each
hidden state predicts (already shifted) and ``ignore_index`` off the completion. Per-token
log-probs come from ``prefops.ops.token_logprobs`` (Triton on a GPU, chunked torch elsewhere);
per-token weights (LD-DPO, TAB-PO, TGDPO, user weights) are applied in the per-sequence
reduction; the pair epilogue is ``prefops.losses.pairwise``.

The reference comes from precomputed per-sequence log-probs (``ref_chosen_logps`` /
``ref_rejected_logps``), from the reference model's hidden states (``ref_hidden``, with
``ref_weight`` or the policy's weight, no gradient), or is absent (reference-free).
"""

from __future__ import annotations

from typing import Optional

import torch

from prefops.losses.pairwise import dpo_loss, simpo_loss
from prefops.losses.token_weights import ld_dpo_weights, weighted_sequence_logps, wpo_pair_weights
from prefops.ops.token_logprobs import token_logprobs

__all__ = ["dpo_loss_from_hidden", "simpo_loss_from_hidden", "tabpo_loss_from_hidden", "PolicyLogps", "policy_logps"]


class PolicyLogps:
    """Per-token and per-sequence log-probs of a [2B, T] chosen-then-rejected batch."""

    def __init__(self, token_logps, mask, log_sum_p2=None, stats=None):
        self.token_logps = token_logps  # [2B, T], 0 off the completion
        self.mask = mask  # [2B, T] bool
        self.log_sum_p2 = log_sum_p2
        self.stats = stats  # the TokenLogprobs with entropy, mean_logits, is_top1 (token_metrics=True)
        self.lengths = mask.sum(dim=1).to(token_logps.dtype)

    def sequence(self, weights=None, normalize=False):
        w = self.mask.to(self.token_logps.dtype) if weights is None else weights
        return weighted_sequence_logps(self.token_logps, w, normalize)

    def halves(self, x):
        return x.chunk(2, dim=0)


def policy_logps(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0, logit_softcap=None,
                 return_log_sum_p2=False, token_metrics=False, backend="auto", chunk_elements=None) -> PolicyLogps:
    if hidden.dim() != 3 or targets.dim() != 2:
        raise ValueError(f"fused losses take hidden [2B, T, H] and targets [2B, T], got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    if hidden.shape[0] % 2:
        raise ValueError(f"the batch must hold chosen then rejected rows (2B rows), got {hidden.shape[0]}")
    out = token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                         logit_softcap=logit_softcap, return_log_sum_p2=return_log_sum_p2,
                         return_entropy=token_metrics, return_mean_logits=token_metrics,
                         return_is_top1=token_metrics, backend=backend, chunk_elements=chunk_elements)
    return PolicyLogps(out.logps, targets != ignore_index, out.log_sum_p2, out if token_metrics else None)


def _with_token_metrics(metrics: dict, pl: PolicyLogps) -> dict:
    """TRL's per-token metrics over the completion tokens, from the statistics the log-prob pass
    computed: ``entropy`` (chosen and rejected tokens), ``logits/chosen``, ``logits/rejected``
    (mean logit over the vocabulary, averaged over tokens) and ``mean_token_accuracy`` (chosen
    tokens whose target is the argmax); ``tokens/chosen`` and ``tokens/rejected`` count the
    tokens, to weight these means when averaging over processes."""
    if pl.stats is None:
        return metrics
    with torch.no_grad():
        mask_c, mask_r = pl.halves(pl.mask)
        n_c, n_r = mask_c.sum().float(), mask_r.sum().float()

        def mean(x, mask, n):
            return (x.float() * mask).sum() / n.clamp(min=1.0)

        mean_c, mean_r = pl.halves(pl.stats.mean_logits)
        top1_c, _ = pl.halves(pl.stats.is_top1)
        metrics["entropy"] = mean(pl.stats.entropy, pl.mask, n_c + n_r)
        metrics["logits/chosen"] = mean(mean_c, mask_c, n_c)
        metrics["logits/rejected"] = mean(mean_r, mask_r, n_r)
        metrics["mean_token_accuracy"] = mean(top1_c, mask_c, n_c)
        metrics["tokens/chosen"], metrics["tokens/rejected"] = n_c, n_r
    return metrics


def _token_weights(pl: PolicyLogps, token_weights, ld_alpha):
    w = pl.mask.to(pl.token_logps.dtype)
    if token_weights is not None:
        w = w * token_weights.to(w.dtype)
    if ld_alpha is not None:
        w = w * ld_dpo_weights(pl.mask, ld_alpha).to(w.dtype)
    return w


def dpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    normalize_token_weights: bool = False,
    ld_alpha: Optional[float] = None,
    ld_alpha_reference: bool = True,
    use_wpo_weighting: bool = False,
    sample_weights: Optional[torch.Tensor] = None,
    completion_lengths: Optional[torch.Tensor] = None,
    token_metrics: bool = False,
    backend: str = "auto",
    chunk_elements: Optional[int] = None,
    **loss_kwargs,
):
    """DPO-family loss straight from the last hidden states; see ``prefops.losses.dpo_loss`` for
    ``beta``, ``loss_type`` (one or a list, with ``loss_weights``), ``label_smoothing``,
    ``f_divergence`` and the rest of ``loss_kwargs``.

    Args:
        token_weights: [2B, T] per-token weights inside S(y) = Σ w_t·logp_t (TAB-PO, TGDPO-style,
            any user weights); the same weights are applied to the reference.
        normalize_token_weights: S(y) = Σ w·logp / Σ w (TAB-PO's s(y)).
        ld_alpha: LD-DPO: tokens past the shorter completion of the pair weigh α.
        ld_alpha_reference: apply LD-DPO to the reference too (TRL does; the original
            implementation did not). Only applies to ``ref_hidden``.
        use_wpo_weighting: WPO: each pair's loss × w(y_w)·w(y_l) (no gradient).
        sample_weights: [B] per-pair weights (curriculum, MADPO, Sem-DPO, ...).
        completion_lengths: [2B] token counts that "ipo" and "sigmoid_norm" divide by; default
            the tokens scored (``targets != ignore_index``). TRL's trainer counts a completion
            token at position 0 too, which nothing predicts (``prefops.training.completion_lengths``
            gives its count). "nll_mean" always averages over the scored tokens.
        token_metrics: also return TRL's per-token metrics (``entropy``, ``logits/chosen``,
            ``logits/rejected``, ``mean_token_accuracy``, with ``tokens/chosen`` and
            ``tokens/rejected``), computed in the same pass over the vocabulary as the log-probs.

    Returns:
        (loss, metrics) with TRL-named, detached metrics.
    """
    pl = policy_logps(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                      logit_softcap=logit_softcap, return_log_sum_p2=use_wpo_weighting, token_metrics=token_metrics,
                      backend=backend, chunk_elements=chunk_elements)
    loss, metrics = _dpo_loss_given_policy(
        pl, weight, targets, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, ignore_index=ignore_index,
        temperature=temperature, logit_softcap=logit_softcap, token_weights=token_weights,
        normalize_token_weights=normalize_token_weights, ld_alpha=ld_alpha, ld_alpha_reference=ld_alpha_reference,
        use_wpo_weighting=use_wpo_weighting, sample_weights=sample_weights, completion_lengths=completion_lengths,
        backend=backend, chunk_elements=chunk_elements, **loss_kwargs)
    return loss, _with_token_metrics(metrics, pl)


def _dpo_loss_given_policy(pl: PolicyLogps, weight, targets, *, ref_chosen_logps, ref_rejected_logps, ref_hidden,
                           ref_weight, ref_bias, ignore_index, temperature, logit_softcap, token_weights,
                           normalize_token_weights, ld_alpha, ld_alpha_reference, use_wpo_weighting, sample_weights,
                           backend, chunk_elements, completion_lengths=None, **loss_kwargs):
    """The part of ``dpo_loss_from_hidden`` after the policy's log-probs (TAB-PO reuses them)."""
    w = _token_weights(pl, token_weights, ld_alpha)
    chosen, rejected = pl.halves(pl.sequence(w, normalize_token_weights))

    if ref_hidden is not None:
        if ref_chosen_logps is not None or ref_rejected_logps is not None:
            raise ValueError("pass the reference as ref_hidden or as ref_chosen_logps/ref_rejected_logps, not both")
        with torch.no_grad():
            ref = policy_logps(ref_hidden, ref_weight if ref_weight is not None else weight, targets, bias=ref_bias,
                               ignore_index=ignore_index, temperature=temperature, logit_softcap=logit_softcap,
                               backend=backend, chunk_elements=chunk_elements)
            rw = _token_weights(ref, token_weights, ld_alpha if ld_alpha_reference else None)
            ref_chosen_logps, ref_rejected_logps = ref.halves(ref.sequence(rw, normalize_token_weights))
    elif (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")

    loss_types = loss_kwargs.get("loss_type", "sigmoid")
    loss_types = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    if {"nll", "nll_mean"} & set(loss_types) and (token_weights is not None or ld_alpha is not None
                                                  or normalize_token_weights):
        loss_kwargs["chosen_nll_logps"] = pl.halves(pl.sequence())[0]  # RPO's NLL: unweighted S(y_w)
    if "sft" in loss_types:
        cm, _ = pl.halves(pl.mask)
        ct, _ = pl.halves(pl.token_logps)
        loss_kwargs["chosen_token_logps_mean"] = ct[cm].mean()
    if use_wpo_weighting:
        wpo = wpo_pair_weights(pl.token_logps, pl.log_sum_p2, pl.mask)
        sample_weights = wpo if sample_weights is None else sample_weights * wpo
    chosen_lengths, rejected_lengths = pl.halves(pl.lengths)  # the scored tokens
    if completion_lengths is not None:
        if tuple(completion_lengths.shape) != tuple(pl.lengths.shape):
            raise ValueError(f"completion_lengths must be [2B] = {tuple(pl.lengths.shape)}, got "
                             f"{tuple(completion_lengths.shape)}")
        loss_kwargs["chosen_nll_lengths"] = chosen_lengths  # nll_mean keeps the scored tokens
        chosen_lengths, rejected_lengths = pl.halves(completion_lengths.to(pl.lengths))
    return dpo_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, chosen_lengths=chosen_lengths,
                    rejected_lengths=rejected_lengths, sample_weights=sample_weights, **loss_kwargs)


def simpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    token_metrics: bool = False,
    backend: str = "auto",
    chunk_elements: Optional[int] = None,
    **loss_kwargs,
):
    """SimPO straight from the last hidden states (no reference); see ``prefops.losses.simpo_loss``.
    ``token_metrics``: as in ``dpo_loss_from_hidden``."""
    pl = policy_logps(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                      logit_softcap=logit_softcap, token_metrics=token_metrics, backend=backend,
                      chunk_elements=chunk_elements)
    chosen, rejected = pl.halves(pl.sequence())
    chosen_lengths, rejected_lengths = pl.halves(pl.lengths)
    loss, metrics = simpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, **loss_kwargs)
    return loss, _with_token_metrics(metrics, pl)


def tabpo_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    token_weights: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    beta: float = 0.5,
    tau: float = 0.66,
    barrier_weight: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    backend: str = "auto",
    chunk_elements: Optional[int] = None,
):
    """TAB-PO: token-weighted DPO on s(y) = Σ w·logp / Σ w (policy and reference alike) plus a
    confidence-gated barrier on the chosen responses:
    B = Σ(−logp_t)·w̃_t·g_t / max(Σ w̃_t·g_t, 1), g_t = 1[logp_t < log τ], w̃ the weights scaled
    to mean 1 over each response's valid tokens; total = mean(L_dpo) + barrier_weight·mean(B).
    ``token_weights``: [2B, T] raw weights (``tabpo_diff_weights``, span weights, ...)."""
    pl = policy_logps(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                      logit_softcap=logit_softcap, backend=backend, chunk_elements=chunk_elements)
    loss_dpo, metrics = _dpo_loss_given_policy(
        pl, weight, targets, ref_chosen_logps=None, ref_rejected_logps=None, ref_hidden=ref_hidden,
        ref_weight=ref_weight, ref_bias=ref_bias, ignore_index=ignore_index, temperature=temperature,
        logit_softcap=logit_softcap, token_weights=token_weights, normalize_token_weights=True, ld_alpha=None,
        ld_alpha_reference=True, use_wpo_weighting=False, sample_weights=None, backend=backend,
        chunk_elements=chunk_elements, beta=beta)
    mask_c, _ = pl.halves(pl.mask)
    lp_c, _ = pl.halves(pl.token_logps)
    w_c, _ = pl.halves(token_weights.to(lp_c.dtype) * pl.mask.to(lp_c.dtype))
    valid = mask_c.to(lp_c.dtype)
    mean_w = w_c.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)
    w_tilde = w_c / torch.where(mean_w == 0, torch.ones_like(mean_w), mean_w)
    gate = ((lp_c.detach() < torch.log(torch.tensor(tau, dtype=lp_c.dtype))) & mask_c).to(lp_c.dtype)
    barrier = ((-lp_c) * w_tilde * gate).sum(1) / (w_tilde * gate).sum(1).clamp(min=1.0)
    metrics["barrier"] = barrier.detach().mean()
    metrics["loss/dpo"] = loss_dpo.detach()
    return loss_dpo + barrier_weight * barrier.mean(), metrics
