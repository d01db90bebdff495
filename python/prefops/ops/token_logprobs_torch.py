"""Pure-torch twin of ``prefops.kernels.token_logprobs``: the same math in bounded chunks.

This is the CPU path, the fallback when triton is missing, and the oracle the kernels are
tested against. Memory is bounded: logits exist one [token chunk, vocab chunk] block at a time,
computed in fp32 (fp64 for fp64 inputs); the backward recomputes them chunk by chunk.

Logit transform, in this order: raw = x·Wᵀ + b; softcap: c·tanh(raw/c); then ÷ temperature.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits per block


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunk_sizes(n_tokens: int, vocab: int, chunk_elements: int | None) -> tuple[int, int]:
    """(token chunk, vocab chunk) with token_chunk · vocab_chunk ≤ chunk_elements."""
    budget = max(int(chunk_elements or DEFAULT_CHUNK_ELEMENTS), 1)
    vocab_chunk = max(1, min(vocab, budget // max(1, min(n_tokens, 1024))))
    token_chunk = max(1, min(max(n_tokens, 1), budget // vocab_chunk))
    return token_chunk, vocab_chunk


def _transform(raw, temperature, softcap):
    z = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    return z / temperature if temperature != 1.0 else z


def _raw_grad_scale(raw, temperature, softcap):
    """dz/d(raw), elementwise."""
    scale = 1.0 / temperature
    if softcap is None:
        return scale
    return scale * (1.0 - torch.tanh(raw / softcap) ** 2)


def forward_stats(x, w, b, targets, *, vocab_start=0, temperature=1.0, softcap=None,
                  with_entropy=False, with_sumsq=False, with_zsum=False, with_top1=False, chunk_elements=None):
    """Per-token (max, Σe^{z-max}, Σe^{z-max}·z, Σe^{2(z-max)}, target logit, Σz, "before")
    over this weight's vocabulary rows; the target logit is 0 for targets outside
    [vocab_start, vocab_start+V). Unrequested statistics are None.

    "before" stands in for the kernels' max of z over the ids before the target: the max when
    the first argmax comes before the target, else -inf. It gives the same
    ``(target logit >= max) & (target logit > before)`` (the target is the first argmax) and
    costs nothing: the argmax comes with the max each chunk needs anyway."""
    n, _ = x.shape
    vocab = w.shape[0]
    cd = compute_dtype(x)
    m = torch.full((n,), float("-inf"), device=x.device, dtype=cd)
    s = torch.zeros(n, device=x.device, dtype=cd)
    e = torch.zeros(n, device=x.device, dtype=cd) if with_entropy else None
    q = torch.zeros(n, device=x.device, dtype=cd) if with_sumsq else None
    zt = torch.zeros(n, device=x.device, dtype=cd)
    zs = torch.zeros(n, device=x.device, dtype=cd) if with_zsum else None
    first = torch.zeros(n, device=x.device, dtype=torch.long) if with_top1 else None  # first argmax
    local_t = targets.long() - vocab_start
    nc, vc = chunk_sizes(n, vocab, chunk_elements)
    for v0 in range(0, vocab, vc):
        v1 = min(v0 + vc, vocab)
        wc = w[v0:v1].to(cd)
        bc = b[v0:v1].to(cd) if b is not None else None
        for n0 in range(0, n, nc):
            n1 = min(n0 + nc, n)
            raw = x[n0:n1].to(cd) @ wc.T
            if bc is not None:
                raw.add_(bc)
            z = _transform(raw, temperature, softcap)
            t = local_t[n0:n1]
            inside = (t >= v0) & (t < v1)
            picked = z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            zt[n0:n1] += torch.where(inside, picked, torch.zeros_like(picked))
            if zs is not None:
                zs[n0:n1] += z.sum(1)
            m_old = m[n0:n1]
            chunk_max, chunk_arg = z.max(dim=1)  # the first maximum of the chunk
            m_new = torch.maximum(m_old, chunk_max)
            if first is not None:  # an equal maximum in a later chunk is not the first
                first[n0:n1] = torch.where(chunk_max > m_old, chunk_arg + v0, first[n0:n1])
            alpha = torch.exp(m_old - m_new)
            if e is not None:
                pz = torch.exp(z - m_new[:, None])
                e[n0:n1] = e[n0:n1] * alpha + torch.linalg.vecdot(pz, z)
            else:
                pz = z.sub_(m_new[:, None]).exp_()  # z is not needed after this
            s[n0:n1] = s[n0:n1] * alpha + pz.sum(1)
            if q is not None:
                q[n0:n1] = q[n0:n1] * alpha * alpha + (pz * pz).sum(1)
            m[n0:n1] = m_new
    mb = torch.where(first < local_t, m, float("-inf")) if first is not None else None
    return m, s, e, q, zt, zs, mb


def backward(x, w, b, targets, lse, grad, *, vocab_start=0, temperature=1.0, softcap=None,
             chunk_elements=None, need_x=True, need_w=True, need_b=True):
    """(dX in the compute dtype, dW and db in the parameters' dtypes) for d(loss)/d(logp) = grad."""
    n, h = x.shape
    vocab = w.shape[0]
    cd = compute_dtype(x)
    dx = torch.zeros(n, h, device=x.device, dtype=cd) if need_x else None
    dw = torch.empty_like(w) if need_w else None
    db = torch.empty_like(b) if (b is not None and need_b) else None
    local_t = targets.long() - vocab_start
    g = grad.to(cd)
    lse = lse.to(cd)
    nc, vc = chunk_sizes(n, vocab, chunk_elements)
    for v0 in range(0, vocab, vc):
        v1 = min(v0 + vc, vocab)
        wc = w[v0:v1].to(cd)
        bc = b[v0:v1].to(cd) if b is not None else None
        dw_acc = torch.zeros(v1 - v0, h, device=x.device, dtype=cd) if need_w else None
        db_acc = torch.zeros(v1 - v0, device=x.device, dtype=cd) if db is not None else None
        for n0 in range(0, n, nc):
            n1 = min(n0 + nc, n)
            xc = x[n0:n1].to(cd)
            raw = xc @ wc.T
            if bc is not None:
                raw.add_(bc)
            # In place where possible: one [token chunk, vocab chunk] block live at a time. With the
            # identity transform z is raw itself and is overwritten; only the soft-cap scale reads raw,
            # and then z is a new tensor.
            gc = g[n0:n1]
            dz = _transform(raw, temperature, softcap).sub_(lse[n0:n1, None]).exp_().mul_(-gc[:, None])
            t = local_t[n0:n1]
            inside = (t >= v0) & (t < v1)
            rows = inside.nonzero().squeeze(1)
            dz[rows, t[rows] - v0] += gc[rows]
            draw = dz
            if softcap is not None or temperature != 1.0:
                draw = dz.mul_(_raw_grad_scale(raw, temperature, softcap))
            if dx is not None:
                dx[n0:n1] += draw @ wc
            if dw_acc is not None:
                dw_acc += draw.T @ xc
            if db_acc is not None:
                db_acc += draw.sum(0)
        if dw is not None:
            dw[v0:v1] = dw_acc.to(w.dtype)
        if db is not None:
            db[v0:v1] = db_acc.to(b.dtype)
    return dx, dw, db
