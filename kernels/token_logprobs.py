"""Triton kernels for target-token log-probs straight from hidden states and the lm_head weight.

The [N, V] logits never reach global memory in the forward pass: each program multiplies a
block of tokens by tiles of the vocabulary (``tl.dot``, fp32 accumulation) and keeps an online
log-sum-exp on chip, picking up the target logit from whichever tile holds it (the Cut
Cross-Entropy idea). The vocabulary is split over a second grid axis so that small batches
still fill the GPU; the per-split partials are combined by the caller (``combine_partials``),
which is also where vocab-parallel ranks meet.

Two backward passes share the same logits-gradient tile code:

* ``logits_grad_chunk`` writes d(raw logits) for one vocabulary chunk; the caller turns it into
  dX and dW with two GEMMs (cuBLAS on a GPU). Extra memory is one [N, chunk] block;
  deterministic.
* ``fused_backward`` never writes logits: each (token block, vocab tile) program adds its
  share of dX and dW with fp32 atomics, and can skip tiles whose softmax entries are all below
  ``filter_eps`` (gradient filtering). Faster when most of the vocabulary is negligible, but
  the summation order (and so the last bits) depends on scheduling.

Logit transform, in this order: raw = x·Wᵀ + b; softcap: c·tanh(raw/c); then ÷ temperature.
The torch twin of every function here is ``prefops.ops.token_logprobs_torch``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward_partials", "combine_partials", "logits_grad_chunk", "fused_backward"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tanh(x):
    # 1 - 2/(e^{2x}+1): saturates cleanly to ±1 (no inf/inf) and needs no libdevice.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_x_w(x_ptr, w_ptr, rn64, rv64, n_mask, v_mask, h0, H, stride_x, stride_w,
              DOT_FP32: tl.constexpr, BH: tl.constexpr):
    """One [BN, BH] block of hidden rows and one [BV, BH] block of weight rows (zeros outside)."""
    rh = h0 + tl.arange(0, BH)
    h_mask = rh < H
    xb = tl.load(x_ptr + rn64[:, None] * stride_x + rh[None, :],
                 mask=n_mask[:, None] & h_mask[None, :], other=0.0)
    wb = tl.load(w_ptr + rv64[:, None] * stride_w + rh[None, :],
                 mask=v_mask[:, None] & h_mask[None, :], other=0.0)
    if DOT_FP32:
        xb = xb.to(tl.float32)
        wb = wb.to(tl.float32)
    return xb, wb, rh, h_mask


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_mask, v_mask, H, stride_x, stride_w,
                 inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
                 BH: tl.constexpr):
    """(raw, z): the [BN, BV] raw logits and transformed logits of one tile, fp32."""
    rn64 = rn.to(tl.int64)
    rv64 = rv.to(tl.int64)
    acc = tl.zeros((BN, BV), dtype=tl.float32)
    for h0 in range(0, H, BH):
        xb, wb, rh, h_mask = _load_x_w(x_ptr, w_ptr, rn64, rv64, n_mask, v_mask, h0, H, stride_x, stride_w,
                                       DOT_FP32, BH)
        acc = tl.dot(xb, tl.trans(wb), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rv, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    z = acc
    if HAS_SOFTCAP:
        z = softcap * _tanh(acc / softcap)
    z = z * inv_temp
    return acc, z


@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, m_ptr, s_ptr, e_ptr, q_ptr, zt_ptr, zs_ptr, mb_ptr,
                    N, V, H, stride_x, stride_w, v_per_split, vocab_start, inv_temp, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_ENTROPY: tl.constexpr,
                    WITH_SUMSQ: tl.constexpr, WITH_ZSUM: tl.constexpr, WITH_TOP1: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                    BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_mask = rn < N
    tgt = tl.load(tgt_ptr + rn, mask=n_mask, other=-1).to(tl.int64) - vocab_start
    m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BN,), dtype=tl.float32)
    e = tl.zeros((BN,), dtype=tl.float32)
    q = tl.zeros((BN,), dtype=tl.float32)
    zt = tl.zeros((BN,), dtype=tl.float32)
    zs = tl.zeros((BN,), dtype=tl.float32)
    mb = tl.full((BN,), float("-inf"), dtype=tl.float32)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    for v0 in range(v_begin, v_end, BV):
        rv = v0 + tl.arange(0, BV)
        v_mask = rv < v_end
        raw, z = _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_mask, v_mask, H, stride_x, stride_w,
                              inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, PRECISION, DOT_FP32, BN, BV, BH)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        hit = (rv.to(tl.int64)[None, :] == tgt[:, None]) & v_mask[None, :]
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if WITH_ZSUM:
            zs += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
        if WITH_TOP1:
            # Max over the ids before the target: argmax returns the first maximum, so a tie
            # with an earlier id means the target is not the top-1 prediction.
            before = (rv.to(tl.int64)[None, :] < tgt[:, None]) & v_mask[None, :]
            mb = tl.maximum(mb, tl.max(tl.where(before, z, float("-inf")), axis=1))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        pz = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(pz, axis=1)
        if WITH_ENTROPY:
            e = e * alpha + tl.sum(pz * tl.where(v_mask[None, :], z, 0.0), axis=1)
        if WITH_SUMSQ:
            q = q * alpha * alpha + tl.sum(pz * pz, axis=1)
        m = m_new
    out = pid_s * N + rn
    tl.store(m_ptr + out, m, mask=n_mask)
    tl.store(s_ptr + out, s, mask=n_mask)
    tl.store(zt_ptr + out, zt, mask=n_mask)
    if WITH_ENTROPY:
        tl.store(e_ptr + out, e, mask=n_mask)
    if WITH_SUMSQ:
        tl.store(q_ptr + out, q, mask=n_mask)
    if WITH_ZSUM:
        tl.store(zs_ptr + out, zs, mask=n_mask)
    if WITH_TOP1:
        tl.store(mb_ptr + out, mb, mask=n_mask)


@triton.jit
def _raw_grad_tile(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rn, rv, n_mask, v_mask, H,
                   stride_x, stride_w, vocab_start, inv_temp, softcap, HAS_BIAS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                   BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    """Recompute one logits tile and return (d loss/d raw logits, softmax p, local target ids),
    given d loss/d logp_target = g per token."""
    raw, z = _logits_tile(x_ptr, w_ptr, b_ptr, rn, rv, n_mask, v_mask, H, stride_x, stride_w,
                          inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, PRECISION, DOT_FP32, BN, BV, BH)
    tgt = tl.load(tgt_ptr + rn, mask=n_mask, other=-1).to(tl.int64) - vocab_start
    lse = tl.load(lse_ptr + rn, mask=n_mask, other=0.0)
    g = tl.load(g_ptr + rn, mask=n_mask, other=0.0)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(rv.to(tl.int64)[None, :] == tgt[:, None], 1.0, 0.0)
    d = g[:, None] * (onehot - p) * inv_temp
    if HAS_SOFTCAP:
        th = _tanh(raw / softcap)
        d = d * (1.0 - th * th)
    return d, p, tgt


@triton.jit
def _logits_grad_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, out_ptr,
                        N, H, stride_x, stride_w, stride_out, v_lo, v_hi, vocab_start,
                        inv_temp, softcap,
                        HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                        DOT_FP32: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rv = v_lo + pid_v * BV + tl.arange(0, BV)
    n_mask = rn < N
    v_mask = rv < v_hi
    d, p, tgt = _raw_grad_tile(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rn, rv, n_mask, v_mask, H,
                               stride_x, stride_w, vocab_start, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                               PRECISION, DOT_FP32, BN, BV, BH)
    cols = (rv - v_lo).to(tl.int64)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * stride_out + cols[None, :],
             d.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & v_mask[None, :])


@triton.jit
def _fused_backward_kernel(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
                           N, V, H, stride_x, stride_w, vocab_start, inv_temp, softcap, filter_eps,
                           HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, FILTER: tl.constexpr,
                           PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BN: tl.constexpr,
                           BV: tl.constexpr, BH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rv = pid_v * BV + tl.arange(0, BV)
    n_mask = rn < N
    v_mask = rv < V
    d, p, tgt = _raw_grad_tile(x_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, rn, rv, n_mask, v_mask, H,
                               stride_x, stride_w, vocab_start, inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP,
                               PRECISION, DOT_FP32, BN, BV, BH)
    live = n_mask[:, None] & v_mask[None, :]
    d = tl.where(live, d, 0.0)
    needed = True
    if FILTER:
        # Skip the tile when every softmax entry is below eps and no target falls in it.
        has_target = tl.sum(tl.where((rv.to(tl.int64)[None, :] == tgt[:, None]) & live, 1, 0)) > 0
        big = tl.max(tl.where(live, p, 0.0)) >= filter_eps
        needed = has_target | big
    if needed:
        rn64 = rn.to(tl.int64)
        rv64 = rv.to(tl.int64)
        dc = d.to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            dc = dc.to(tl.float32)
        for h0 in range(0, H, BH):
            xb, wb, rh, h_mask = _load_x_w(x_ptr, w_ptr, rn64, rv64, n_mask, v_mask, h0, H, stride_x, stride_w,
                                           DOT_FP32, BH)
            dx = tl.dot(dc, wb, input_precision=PRECISION)
            tl.atomic_add(dx_ptr + rn64[:, None] * H + rh[None, :], dx,
                          mask=n_mask[:, None] & h_mask[None, :])
            dw = tl.dot(tl.trans(dc), xb, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + rv64[:, None] * H + rh[None, :], dw,
                          mask=v_mask[:, None] & h_mask[None, :])
        if HAS_BIAS:
            tl.atomic_add(db_ptr + rv, tl.sum(d, axis=0), mask=v_mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so the combine is exercised
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _launch_config(x: torch.Tensor):
    """Block sizes and launch options; chosen at call time from the tensor, never at import."""
    if _interpreting() or x.device.type != "cuda":
        return dict(BN=16, BV=32, BH=16), {}
    if x.element_size() <= 2:
        return dict(BN=128, BV=128, BH=64), dict(num_warps=8, num_stages=3)
    return dict(BN=64, BV=64, BH=32), dict(num_warps=4, num_stages=2)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"  # fp32 inputs get fp32 products, as torch.matmul gives by default
    return "tf32"


def _common(x, w, b, temperature, softcap):
    return dict(
        stride_x=x.stride(0), stride_w=w.stride(0), inv_temp=1.0 / float(temperature),
        softcap=float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None, PRECISION=_precision(x),
        # The interpreter's tl.dot mishandles 16-bit floats: feed it the same values as fp32
        # (bf16/fp16 products are exact in fp32, so the math matches the GPU's fp32 accumulation).
        DOT_FP32=_interpreting() and x.dtype != torch.float32,
    )


def forward_partials(x, w, b, targets, *, vocab_start=0, temperature=1.0, softcap=None,
                     with_entropy=False, with_sumsq=False, with_zsum=False, with_top1=False, num_splits=None):
    """Per-split partial statistics [S, N] fp32: running max m, Σe^{z-m}, Σe^{z-m}·z,
    Σe^{2(z-m)}, the target logit (0 where the target is outside the split), Σz, and the max of
    z over the ids before the target (-inf where none is in the split). Unrequested ones are None."""
    N, H = x.shape
    V = w.shape[0]
    blocks, opts = _launch_config(x)
    n_blocks = triton.cdiv(N, blocks["BN"])
    v_tiles = triton.cdiv(V, blocks["BV"])
    if num_splits is None:
        num_splits = triton.cdiv(2 * _sm_count(x.device), n_blocks)
    num_splits = max(1, min(num_splits, v_tiles))
    v_per_split = triton.cdiv(v_tiles, num_splits) * blocks["BV"]
    num_splits = triton.cdiv(V, v_per_split)
    f32 = dict(device=x.device, dtype=torch.float32)
    m = torch.empty(num_splits, N, **f32)
    s = torch.empty(num_splits, N, **f32)
    zt = torch.empty(num_splits, N, **f32)
    e = torch.zeros(num_splits, N, **f32) if with_entropy else s
    q = torch.zeros(num_splits, N, **f32) if with_sumsq else s
    zs = torch.empty(num_splits, N, **f32) if with_zsum else s
    mb = torch.empty(num_splits, N, **f32) if with_top1 else s
    _forward_kernel[(n_blocks, num_splits)](
        x, w, b if b is not None else x, targets, m, s, e, q, zt, zs, mb, N, V, H,
        v_per_split=v_per_split, vocab_start=vocab_start,
        WITH_ENTROPY=with_entropy, WITH_SUMSQ=with_sumsq, WITH_ZSUM=with_zsum, WITH_TOP1=with_top1,
        **_common(x, w, b, temperature, softcap), **blocks, **opts)
    return (m, s, (e if with_entropy else None), (q if with_sumsq else None), zt,
            (zs if with_zsum else None), (mb if with_top1 else None))


def combine_partials(m, s, e, q, zt, zs=None, mb=None):
    """Merge [S, N] partials over S into per-token (max, sumexp, e, q, target logit, Σz,
    max before the target)."""
    mx = m.max(dim=0).values
    scale = torch.exp(m - mx)  # 0 for empty splits (m = -inf)
    out_s = (s * scale).sum(0)
    out_e = (e * scale).sum(0) if e is not None else None
    out_q = (q * scale * scale).sum(0) if q is not None else None
    out_zs = zs.sum(0) if zs is not None else None
    out_mb = mb.max(dim=0).values if mb is not None else None
    return mx, out_s, out_e, out_q, zt.sum(0), out_zs, out_mb


def logits_grad_chunk(x, w, b, targets, lse, grad, out, v_lo, v_hi, *, vocab_start=0,
                      temperature=1.0, softcap=None):
    """Write d(loss)/d(raw logits)[:, v_lo:v_hi] into ``out`` ([N, >= v_hi-v_lo], any float dtype)."""
    N, H = x.shape
    blocks, opts = _launch_config(x)
    grid = (triton.cdiv(N, blocks["BN"]), triton.cdiv(v_hi - v_lo, blocks["BV"]))
    _logits_grad_kernel[grid](
        x, w, b if b is not None else x, targets, lse, grad, out, N, H,
        stride_out=out.stride(0), v_lo=v_lo, v_hi=v_hi, vocab_start=vocab_start,
        **_common(x, w, b, temperature, softcap), **blocks, **opts)
    return out


def fused_backward(x, w, b, targets, lse, grad, *, vocab_start=0, temperature=1.0, softcap=None,
                   filter_eps=None):
    """(dX, dW, db) in fp32 by one tiled pass with atomics; tiles whose softmax entries are all
    below ``filter_eps`` (and hold no target) are skipped."""
    N, H = x.shape
    V = w.shape[0]
    blocks, opts = _launch_config(x)
    dx = torch.zeros(N, H, device=x.device, dtype=torch.float32)
    dw = torch.zeros(V, H, device=x.device, dtype=torch.float32)
    db = torch.zeros(V, device=x.device, dtype=torch.float32) if b is not None else dx
    grid = (triton.cdiv(N, blocks["BN"]), triton.cdiv(V, blocks["BV"]))
    _fused_backward_kernel[grid](
        x, w, b if b is not None else x, targets, lse, grad, dx, dw, db, N, V, H,
        vocab_start=vocab_start, filter_eps=float(filter_eps or 0.0), FILTER=filter_eps is not None,
        **_common(x, w, b, temperature, softcap), **blocks, **opts)
    return dx, dw, (db if b is not None else None)
