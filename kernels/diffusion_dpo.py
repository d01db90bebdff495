"""Triton kernels for the per-image denoising errors of the diffusion preference losses.

Every diffusion preference loss (Diffusion-DPO, SmPO, Diffusion-KTO, RankDPO) reads the big
[N, C, H, W] predictions only through the per-image mean squared errors
m_i = mean((ε_θ,i − ε_i)²) and r_i = mean((ε_ref,i − ε_i)²); everything after that is a tiny
epilogue on [N] vectors. So the fusion is:

* ``mse_forward``: one pass over model_pred, ref_pred and target that yields both m and r
  (fp32 accumulation whatever the input dtypes; each input keeps its own dtype, so a bf16
  prediction against an fp32 noise target needs no host-side cast). Each row is split into
  chunks over the first grid axis so that a handful of large images still fill the GPU; the
  per-chunk partial sums go to an [N, S] buffer that the caller sums (deterministic, no atomics).
* ``mse_backward``: d(model_pred)_i = g_i · 2(ε_θ,i − ε_i)/n, elementwise, written in
  model_pred's dtype. The reference and the target get no gradient.

Inputs are contiguous [N, n] views; offsets are int64 so rows of any size are safe. The torch
twin is ``prefops.losses.diffusion_torch``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["mse_forward", "mse_backward"]

_BLOCK = 1024


@triton.jit
def _sq_err_partials(x_ptr, r_ptr, t_ptr, part_x_ptr, part_r_ptr, n, chunk, S,
                     HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    """Program (split s, row i): Σ over this chunk of row i of (x−t)² (and (r−t)²), fp32."""
    split = tl.program_id(0)
    row = tl.program_id(1)
    base = row.to(tl.int64) * n
    start = split.to(tl.int64) * chunk
    acc_x = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_r = tl.zeros((BLOCK,), dtype=tl.float32)
    for off in range(0, chunk, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        t = tl.load(t_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        dx = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32) - t
        acc_x += dx * dx
        if HAS_REF:
            dr = tl.load(r_ptr + base + idx, mask=mask, other=0.0).to(tl.float32) - t
            acc_r += dr * dr
    tl.store(part_x_ptr + row * S + split, tl.sum(acc_x, axis=0))
    if HAS_REF:
        tl.store(part_r_ptr + row * S + split, tl.sum(acc_r, axis=0))


@triton.jit
def _sq_err_backward(x_ptr, t_ptr, g_ptr, dx_ptr, n, scale, BLOCK: tl.constexpr):
    """dx[i, k] = g_i · scale · (x[i, k] − t[i, k]) with scale = 2/n."""
    blk = tl.program_id(0)
    row = tl.program_id(1)
    base = row.to(tl.int64) * n
    idx = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    g = tl.load(g_ptr + row) * scale
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + base + idx, (g * (x - t)).to(dx_ptr.dtype.element_ty), mask=mask)


def _splits(N: int, n: int, block: int, max_splits: Optional[int], device) -> tuple[int, int]:
    """(chunk, S): chunk (a multiple of ``block``) of a row per program, S programs per row."""
    if max_splits is None:
        # Aim at a few programs per SM in all; one per row when rows are few blocks long anyway.
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        max_splits = max(1, -(-4 * sms // max(N, 1)))
    blocks = -(-n // block)
    per_split = -(-blocks // max(1, min(max_splits, blocks)))
    chunk = per_split * block
    return chunk, -(-n // chunk)


def mse_forward(x: torch.Tensor, r: Optional[torch.Tensor], t: torch.Tensor, *, block: int = _BLOCK,
                max_splits: Optional[int] = None):
    """Per-row mean squared errors of [N, n] ``x`` (and ``r``) against ``t``: (m [N], r [N] or None), fp32."""
    N, n = t.shape
    chunk, S = _splits(N, n, block, max_splits, t.device)
    part_x = torch.empty((N, S), device=t.device, dtype=torch.float32)
    part_r = torch.empty((N, S), device=t.device, dtype=torch.float32) if r is not None else part_x
    if N and n:
        _sq_err_partials[(S, N)](x, r if r is not None else x, t, part_x, part_r, n, chunk, S,
                                 HAS_REF=r is not None, BLOCK=block)
    m = part_x.sum(1) / n
    return m, (part_r.sum(1) / n if r is not None else None)


def mse_backward(x: torch.Tensor, t: torch.Tensor, grad: torch.Tensor, *, block: int = _BLOCK) -> torch.Tensor:
    """d(mean_k (x−t)²)/dx for [N, n] ``x``, ``t`` weighted by the [N] upstream ``grad``; dtype of ``x``."""
    N, n = x.shape
    dx = torch.empty_like(x)
    g = grad.detach().to(torch.float32).contiguous()
    if N and n:
        _sq_err_backward[(triton.cdiv(n, block), N)](x, t, g, dx, n, 2.0 / n, BLOCK=block)
    return dx
