"""``token_logprobs``: log-probs of target tokens straight from hidden states and the lm_head.

    out = token_logprobs(hidden, weight, targets, token_weights=w, reduction="sum")
    out.logps       # [B, T] per-token log p(target), fp32, 0 at ignored tokens
    out.seq_logps   # [B]    Σ_t w_t·logp_t over each sequence's non-ignored tokens

The [N, V] logits are never materialised: on a GPU the Triton kernels of ``prefops.kernels``
keep them on chip; elsewhere (and when triton is missing) the torch twin in
``token_logprobs_torch`` works through bounded chunks. Both have exact backward passes into
``hidden``, ``weight`` and ``bias``.

Targets are not shifted here: pass the token that each hidden state predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from prefops.ops._backend import kernel_module, resolve_backend

from prefops.ops import token_logprobs_torch as _torch_impl

__all__ = ["token_logprobs", "TokenLogprobs"]

REDUCTIONS = ("none", "sum", "mean")
# Vocabulary columns of d(logits) held at once by the Triton chunked backward, per token.
_TRITON_CHUNK_ELEMENTS = 1 << 24


@dataclass
class TokenLogprobs:
    """What ``token_logprobs`` returns. Per-token fields have the shape of ``targets``."""

    logps: torch.Tensor
    """log p(target) per token (fp32; fp64 for fp64 inputs); 0 at ignored tokens."""
    seq_logps: Optional[torch.Tensor] = None
    """Per sequence: Σ w·logp (reduction="sum") or Σ w·logp / Σ w (reduction="mean")."""
    seq_lengths: Optional[torch.Tensor] = None
    """Per sequence: number of non-ignored tokens (float, same dtype as ``logps``)."""
    entropy: Optional[torch.Tensor] = None
    """Entropy of the predictive distribution per token (no gradient); 0 at ignored tokens."""
    log_sum_p2: Optional[torch.Tensor] = None
    """log Σ_v p_v² per token (WPO's weighting term, no gradient); 0 at ignored tokens."""
    mean_logits: Optional[torch.Tensor] = None
    """Mean over the vocabulary of the (transformed) logits per token, no gradient; 0 at
    ignored tokens. TRL's ``logits/chosen`` and ``logits/rejected`` average it over tokens."""
    is_top1: Optional[torch.Tensor] = None
    """Per token (bool): the target is the argmax of the logits (the first one, as
    ``torch.argmax`` picks, on ties); False at ignored tokens. TRL's ``mean_token_accuracy``."""


@dataclass(frozen=True)
class _Config:
    backend: str
    vocab_start: int
    temperature: float
    softcap: Optional[float]
    with_entropy: bool
    with_sumsq: bool
    with_mean_logits: bool
    with_top1: bool
    filter_eps: Optional[float]
    chunk_elements: Optional[int]
    process_group: object


# ---------------------------------------------------------------------------------------------
# Backend selection (at call time, never at import)
# ---------------------------------------------------------------------------------------------

def _kernels():
    return kernel_module("token_logprobs")


def _resolve_backend(backend: str, tensors) -> str:
    return resolve_backend(backend, tensors, "token_logprobs")


# ---------------------------------------------------------------------------------------------
# Vocab-parallel collectives
# ---------------------------------------------------------------------------------------------


def _allreduce_stats(m, s, e, q, zt, zs, mb, vocab, group):
    """Merge per-rank (max, Σe^{z-max}, …, target logit, Σz, max before the target) into the
    full-vocabulary values; also returns the full vocabulary size when Σz is asked for."""
    import torch.distributed as dist

    maxima = torch.stack([m] if mb is None else [m, mb])
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    mx = maxima[0]
    scale = torch.exp(m - mx)
    parts = [s * scale, zt]
    if e is not None:
        parts.append(e * scale)
    if q is not None:
        parts.append(q * scale * scale)
    if zs is not None:
        parts += [zs, torch.full_like(zs, vocab)]  # the shard sizes add up to the full vocabulary
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    s, zt = packed[0], packed[1]
    i = 2
    if e is not None:
        e, i = packed[i], i + 1
    if q is not None:
        q, i = packed[i], i + 1
    if zs is not None:
        zs, vocab = packed[i], packed[i + 1]
    return mx, s, e, q, zt, zs, (maxima[1] if mb is not None else None), vocab


# ---------------------------------------------------------------------------------------------
# Forward / backward of the per-token log-prob on compacted (all-valid) tokens
# ---------------------------------------------------------------------------------------------


def _forward(x, w, b, t, cfg: _Config):
    common = dict(vocab_start=cfg.vocab_start, temperature=cfg.temperature, softcap=cfg.softcap,
                  with_entropy=cfg.with_entropy, with_sumsq=cfg.with_sumsq, with_zsum=cfg.with_mean_logits,
                  with_top1=cfg.with_top1)
    if cfg.backend == "triton":
        kern = _kernels()
        m, s, e, q, zt, zs, mb = kern.combine_partials(*kern.forward_partials(x, w, b, t, **common))
    else:
        m, s, e, q, zt, zs, mb = _torch_impl.forward_stats(x, w, b, t, chunk_elements=cfg.chunk_elements, **common)
    vocab = w.shape[0]
    if cfg.process_group is not None:
        m, s, e, q, zt, zs, mb, vocab = _allreduce_stats(m, s, e, q, zt, zs, mb, vocab, cfg.process_group)
    log_s = torch.log(s)
    lse = m + log_s
    logp = zt - lse
    entropy = lse - e / s if e is not None else None
    log_sum_p2 = torch.log(q) - 2.0 * log_s if q is not None else None
    mean_logits = zs / vocab if zs is not None else None
    # The target is the first argmax: no logit above it, and none equal to it before it.
    is_top1 = (zt >= m) & (zt > mb) if mb is not None else None
    return logp, lse, entropy, log_sum_p2, mean_logits, is_top1


def _mm_accumulate(acc32, a, b):
    """acc32 += a @ b with fp32 accumulation, without upcasting whole operands on a GPU."""
    if a.dtype == acc32.dtype:
        acc32.addmm_(a, b)
    elif a.is_cuda:
        acc32.add_(torch.mm(a, b, out_dtype=acc32.dtype))
    else:
        acc32.addmm_(a.to(acc32.dtype), b.to(acc32.dtype))


def _backward(x, w, b, t, lse, grad, cfg: _Config, need_x, need_w, need_b):
    common = dict(vocab_start=cfg.vocab_start, temperature=cfg.temperature, softcap=cfg.softcap)
    if cfg.backend == "torch":
        dx, dw, db = _torch_impl.backward(x, w, b, t, lse, grad, chunk_elements=cfg.chunk_elements,
                                          need_x=need_x, need_w=need_w, need_b=need_b, **common)
    elif cfg.filter_eps is not None:
        dx, dw32, db32 = _kernels().fused_backward(x, w, b, t, lse.float().contiguous(),
                                                   grad.float().contiguous(), filter_eps=cfg.filter_eps,
                                                   **common)
        dx = dx if need_x else None  # computed anyway by the fused pass; not returned or all-reduced
        dw = dw32.to(w.dtype) if need_w else None
        db = db32.to(b.dtype) if (b is not None and need_b) else None
    else:
        dx, dw, db = _triton_chunked_backward(x, w, b, t, lse, grad, cfg, need_x, need_w, need_b, common)
    if dx is not None and cfg.process_group is not None:
        import torch.distributed as dist

        # hidden is replicated over the vocab shards: its gradient is the sum of every shard's.
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=cfg.process_group)
    return (dx.to(x.dtype) if dx is not None else None), dw, db


def _triton_chunked_backward(x, w, b, t, lse, grad, cfg, need_x, need_w, need_b, common):
    kern = _kernels()
    n, h = x.shape
    vocab = w.shape[0]
    budget = cfg.chunk_elements or _TRITON_CHUNK_ELEMENTS
    chunk = max(128, (budget // max(n, 1)) // 128 * 128)
    chunk = min(chunk, vocab)
    d_raw = torch.empty(n, chunk, device=x.device, dtype=x.dtype)
    dx = torch.zeros(n, h, device=x.device, dtype=torch.float32) if need_x else None
    dw = torch.empty_like(w) if need_w else None
    db = torch.empty_like(b) if (b is not None and need_b) else None
    lse32 = lse.float().contiguous()
    g32 = grad.float().contiguous()
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        kern.logits_grad_chunk(x, w, b, t, lse32, g32, d_raw, v0, v1, **common)
        d = d_raw[:, : v1 - v0]
        if dx is not None:
            _mm_accumulate(dx, d, w[v0:v1])
        if dw is not None:
            dw[v0:v1] = (d.T @ x).to(w.dtype)
        if db is not None:
            db[v0:v1] = d.float().sum(0).to(b.dtype)
    return dx, dw, db


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cfg: _Config):
        logp, lse, *stats = _forward(hidden, weight, bias, targets, cfg)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.cfg = cfg
        # entropy, log_sum_p2, mean_logits, is_top1: an empty tensor where not asked for.
        stats = [x if x is not None else logp.new_empty(0) for x in stats]
        ctx.mark_non_differentiable(*stats)
        return (logp, *stats)

    @staticmethod
    def backward(ctx, grad_logp, *_grad_stats):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw, db = _backward(hidden, weight, bias, targets, lse, grad_logp, ctx.cfg,
                               need_x, need_w, need_b and bias is not None)
        return dx, dw, db, None, None


# ---------------------------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, targets, bias, token_weights, temperature, logit_softcap, reduction,
                  segment_ids, cu_seqlens):
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden without H), "
                         f"got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got shape {tuple(bias.shape)}")
    if token_weights is not None and tuple(token_weights.shape) != tuple(targets.shape):
        raise ValueError(f"token_weights must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(token_weights.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {logit_softcap}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("pass segment_ids or cu_seqlens, not both")
    if (segment_ids is not None or cu_seqlens is not None) and hidden.dim() != 2:
        raise ValueError("segment_ids / cu_seqlens describe packed [N, H] inputs; 3-D inputs are one sequence per row")
    if (segment_ids is not None or cu_seqlens is not None) and reduction == "none":
        raise ValueError("segment_ids / cu_seqlens give per-sequence results: use reduction='sum' or 'mean'")


def _segments(n, segment_ids, cu_seqlens, num_sequences, device):
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, start at 0 and end at N={n}")
        count = cu.numel() - 1
        ids = torch.repeat_interleave(torch.arange(count, device=device), cu[1:] - cu[:-1], output_size=n)
        return ids, count
    ids = segment_ids.to(device=device, dtype=torch.long)
    if tuple(ids.shape) != (n,):
        raise ValueError(f"segment_ids must be [N={n}], got shape {tuple(ids.shape)}")
    count = int(num_sequences) if num_sequences is not None else int(ids.max().item()) + 1 if n else 0
    if n and int(ids.max()) >= count:
        raise ValueError(f"segment_ids hold {int(ids.max())} but num_sequences={count}")
    return ids, count


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    logit_softcap: Optional[float] = None,
    token_weights: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    num_sequences: Optional[int] = None,
    reduction: str = "none",
    return_entropy: bool = False,
    return_log_sum_p2: bool = False,
    return_mean_logits: bool = False,
    return_is_top1: bool = False,
    grad_filter_eps: Optional[float] = None,
    process_group=None,
    vocab_start_index: Optional[int] = None,
    backend: str = "auto",
    chunk_elements: Optional[int] = None,
) -> TokenLogprobs:
    """Per-token log p(target) from ``hidden`` [N, H] or [B, T, H] and ``weight`` [V, H].

    Logits are ``(softcap·tanh((hidden·weightᵀ + bias)/softcap)) / temperature``.

    Args:
        targets: token ids with the shape of ``hidden`` without its last dim; ``ignore_index``
            marks tokens that get logp 0 and no gradient.
        token_weights: per-token weights for the per-sequence reductions (not applied to
            ``logps``).
        segment_ids / cu_seqlens: sequence membership of packed 2-D inputs (negative segment
            ids belong to no sequence). 3-D inputs are one sequence per row. Without either, a
            2-D input reduces to one scalar.
        reduction: "none" (per-token only), "sum" (Σ w·logp per sequence) or "mean"
            (Σ w·logp / Σ w; 0 for sequences with no valid token).
        return_entropy / return_log_sum_p2 / return_mean_logits / return_is_top1: extra per-token
            statistics, without gradient (see ``TokenLogprobs``), from the same pass over the
            vocabulary.
        grad_filter_eps: Triton only. Skip backward tiles whose softmax entries are all below
            this value (and that hold no target): each skipped entry changes d(logit) by less
            than |grad|·eps. ``None`` (default) is exact.
        process_group / vocab_start_index: vocab-parallel mode. ``weight`` (and ``bias``) hold
            rows [vocab_start_index, vocab_start_index + V) of the full vocabulary (default
            rank·V); targets are full-vocabulary ids; max, sum-exp and the target logit are
            all-reduced, and the gradient of ``hidden`` is all-reduced (summed) over the group.
        backend: "auto" (Triton on CUDA tensors when triton is installed, else torch),
            "triton" or "torch".
        chunk_elements: logits elements held at once by the chunked paths (memory knob).
    """
    _check_inputs(hidden, weight, targets, bias, token_weights, temperature, logit_softcap, reduction,
                  segment_ids, cu_seqlens)
    if grad_filter_eps is not None and not grad_filter_eps >= 0:
        raise ValueError(f"grad_filter_eps must be >= 0 or None, got {grad_filter_eps}")
    resolved = _resolve_backend(backend, [hidden])
    if process_group is not None:
        import torch.distributed as dist

        rank = dist.get_rank(process_group)
        vocab_start = int(vocab_start_index) if vocab_start_index is not None else rank * weight.shape[0]
        vocab_total = None
    else:
        vocab_start = int(vocab_start_index or 0)
        vocab_total = weight.shape[0]
    cfg = _Config(backend=resolved, vocab_start=vocab_start, temperature=float(temperature),
                  softcap=float(logit_softcap) if logit_softcap is not None else None,
                  with_entropy=return_entropy, with_sumsq=return_log_sum_p2,
                  with_mean_logits=return_mean_logits, with_top1=return_is_top1,
                  filter_eps=grad_filter_eps if resolved == "triton" else None,
                  chunk_elements=chunk_elements, process_group=process_group)

    shape = targets.shape
    x = hidden.reshape(-1, hidden.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = targets.reshape(-1)
    n = t.numel()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= vocab_total) if vocab_total is not None else (t < 0))
    # One host sync for both checks (each bool() of a CUDA tensor waits for the device).
    any_bad, all_valid = torch.stack([bad.any(), valid.all()]).tolist()
    if any_bad:
        i = int(bad.nonzero()[0, 0])
        where = f"token {i}" if len(shape) == 1 else f"position {tuple(int(c) for c in torch.unravel_index(torch.tensor(i), shape))}"
        limit = f"[0, {vocab_total})" if vocab_total is not None else ">= 0"
        raise ValueError(f"targets at {where} is {int(t[i])}: must be {limit} or ignore_index={ignore_index}")

    if all_valid:
        idx = None
        xs, ts = x, t.contiguous()
    else:
        # Skip ignored tokens entirely (padding is often a third of a batch): gather, run, scatter.
        idx = valid.nonzero().squeeze(1)
        xs, ts = x.index_select(0, idx), t.index_select(0, idx).contiguous()

    if xs.shape[0] == 0:
        cd = _torch_impl.compute_dtype(x)
        # Keep the graph connected so .backward() works and gives zero gradients.
        zero = (x.sum() * 0).to(cd) + (w.sum() * 0).to(cd)
        if bias is not None:
            zero = zero + (bias.sum() * 0).to(cd)
        logp_s = zero.expand(0)
        ent_s = lsp_s = mean_s = x.new_zeros(0, dtype=cd)
        top1_s = x.new_zeros(0, dtype=torch.bool)
    else:
        logp_s, ent_s, lsp_s, mean_s, top1_s = _TokenLogprobsFunction.apply(xs, w, bias, ts, cfg)

    def scatter(values, differentiable):
        if idx is None:
            return values.reshape(shape)
        full = values.new_zeros(n)
        full = full.index_copy(0, idx, values) if differentiable else full.index_copy_(0, idx, values)
        return full.reshape(shape)

    out = TokenLogprobs(logps=scatter(logp_s, True))
    if return_entropy:
        out.entropy = scatter(ent_s, False)
    if return_log_sum_p2:
        out.log_sum_p2 = scatter(lsp_s, False)
    if return_mean_logits:
        out.mean_logits = scatter(mean_s, False)
    if return_is_top1:
        out.is_top1 = scatter(top1_s, False)
    if reduction == "none":
        return out

    mask = valid.reshape(shape).to(out.logps.dtype)
    weights = mask if token_weights is None else token_weights.to(out.logps.dtype) * mask
    weighted = out.logps * weights
    if hidden.dim() == 3:
        sums, wsum, lengths = weighted.sum(-1), weights.sum(-1), mask.sum(-1)
    elif segment_ids is None and cu_seqlens is None:
        sums, wsum, lengths = weighted.sum(), weights.sum(), mask.sum()
    else:
        ids, count = _segments(n, segment_ids, cu_seqlens, num_sequences, t.device)
        member = ids >= 0
        ids_m = ids[member]
        zeros = weighted.new_zeros(count)
        sums = zeros.index_add(0, ids_m, weighted[member])
        wsum = zeros.index_add(0, ids_m, weights[member])
        lengths = zeros.index_add(0, ids_m, mask[member])
    if reduction == "mean":
        # A sequence with no valid token has sum 0; divide by 1 there instead of 0.
        sums = sums / torch.where(wsum == 0, torch.ones_like(wsum), wsum)
    out.seq_logps = sums
    out.seq_lengths = lengths
    return out
