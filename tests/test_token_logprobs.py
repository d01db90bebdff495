"""token_logprobs against a float64 full-softmax oracle: values, gradients, reductions, options.

Both backends run here. Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set in
conftest) on CPU tensors at small shapes; with a GPU they run natively.
"""

import math

import pytest

torch = pytest.importorskip("torch")

from prefops.ops import token_logprobs  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"]
SHAPES = [(47, 31, 123), (1, 16, 32), (64, 48, 257), (130, 20, 300)]


def oracle_logits(x, w, b=None, temperature=1.0, softcap=None):
    z = x.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def oracle_logps(x, w, t, b=None, temperature=1.0, softcap=None, ignore_index=-100):
    """Per-token log p(target) in float64 from full logits; 0 at ignored tokens."""
    lp = torch.log_softmax(oracle_logits(x, w, b, temperature, softcap), dim=-1)
    valid = t != ignore_index
    picked = lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def make(n, h, v, dtype=torch.float32, bias=False, scale=1.0, seed=0, ignore_frac=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / math.sqrt(h)).to(DEVICE, dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    return x, w, b, t.to(DEVICE)


# bf16 runs through the Triton kernels under the interpreter too (its tl.dot gets fp32 copies of
# the bf16 values; loads, casts, stores and atomics stay bf16).
CASES = [(be, dt) for be in BACKENDS for dt in (torch.float32, torch.bfloat16)]


def tol(dtype):
    # Logits accumulate in fp32 either way; bf16 only rounds the returned gradients.
    return dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=1.6e-2)


def grads_vs_oracle(out_logps, ref_logps, tensors, ref_tensors, dtype, seed=1):
    g = torch.randn(out_logps.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    got = torch.autograd.grad((out_logps * g).sum(), tensors)
    want = torch.autograd.grad((ref_logps * g.double()).sum(), ref_tensors)
    for a, e in zip(got, want):
        assert a.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), e, **tol(dtype))
        else:
            # bf16: d(logits) is rounded to bf16 before the two backward GEMMs (as TRL's and CCE's
            # bf16 paths do), so entries far below the largest one carry that absolute error.
            torch.testing.assert_close(a.double(), e, atol=2**-7 * float(e.abs().max()), rtol=1.6e-2)


def as_f64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_match_float64(backend, dtype, shape):
    x, w, b, t = make(*shape, dtype=dtype, bias=True, ignore_frac=0.2, seed=sum(shape))
    out = token_logprobs(x, w, t, bias=b, backend=backend)
    xd, wd, bd = as_f64(x, w, b)
    ref = oracle_logps(xd, wd, t, bd)
    assert out.logps.dtype == torch.float32 and out.logps.shape == t.shape
    torch.testing.assert_close(out.logps.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    assert (out.logps[t == -100] == 0).all()
    grads_vs_oracle(out.logps, ref, (x, w, b), (xd, wd, bd), dtype)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_temperature_and_softcap(backend, dtype):
    x, w, b, t = make(40, 24, 90, dtype=dtype, bias=True, scale=6.0, seed=3)
    out = token_logprobs(x, w, t, bias=b, temperature=0.7, logit_softcap=5.0, backend=backend)
    xd, wd, bd = as_f64(x, w, b)
    ref = oracle_logps(xd, wd, t, bd, temperature=0.7, softcap=5.0)
    torch.testing.assert_close(out.logps.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    grads_vs_oracle(out.logps, ref, (x, w, b), (xd, wd, bd), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_weight_only_grad(backend):
    x, w, _, t = make(33, 17, 70, seed=4)
    x = x.detach()  # frozen hidden states: only dW is computed
    out = token_logprobs(x, w, t, backend=backend)
    (gw,) = torch.autograd.grad(out.logps.sum(), [w])
    wd = w.detach().double().requires_grad_()
    (rw,) = torch.autograd.grad(oracle_logps(x.double(), wd, t).sum(), [wd])
    torch.testing.assert_close(gw.double(), rw, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_and_log_sum_p2(backend):
    x, w, b, t = make(29, 16, 77, bias=True, scale=2.0, seed=5, ignore_frac=0.3)
    out = token_logprobs(x, w, t, bias=b, return_entropy=True, return_log_sum_p2=True, backend=backend)
    p = torch.softmax(oracle_logits(x.detach(), w.detach(), b.detach()), -1)
    entropy = -(p * p.log()).sum(-1)
    log_sum_p2 = (p * p).sum(-1).log()
    valid = t != -100
    torch.testing.assert_close(out.entropy.double()[valid], entropy[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.log_sum_p2.double()[valid], log_sum_p2[valid], atol=1e-4, rtol=1e-4)
    assert (out.entropy[~valid] == 0).all() and not out.entropy.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [dict(), dict(temperature=0.7, logit_softcap=3.0),
                                       dict(chunk_elements=300)])  # torch: ties across vocab chunks
def test_mean_logits_and_is_top1_match_argmax_with_ties(backend, transform):
    n, h, v = 61, 16, 150
    x, w, b, t = make(n, h, v, bias=True, scale=2.0, seed=8, ignore_frac=0.2)
    with torch.no_grad():
        # Ties for the argmax: rows 40.. of the vocabulary copy rows 0.. (ids before and after a
        # target), and targets are set to the argmax or to a copy of it.
        w[40:80] = w[0:40]
        b[40:80] = b[0:40]
        first = oracle_logits(x, w, b, transform.get("temperature", 1.0), transform.get("logit_softcap")).argmax(-1)
    t = t.clone()
    for i in range(0, n, 3):
        if t[i] != -100:
            t[i] = first[i] if i % 2 else (first[i] + 40 if first[i] < 40 else first[i])
    out = token_logprobs(x, w, t, bias=b, return_mean_logits=True, return_is_top1=True, backend=backend,
                         **transform)
    z = oracle_logits(x.detach(), w.detach(), b.detach(), transform.get("temperature", 1.0),
                      transform.get("logit_softcap"))
    valid = t != -100
    torch.testing.assert_close(out.mean_logits.double()[valid], z.mean(-1)[valid], atol=1e-5, rtol=1e-5)
    expected_top1 = (z.argmax(-1) == t) & valid
    assert out.is_top1.dtype == torch.bool
    assert torch.equal(out.is_top1, expected_top1)
    # The ties matter: some targets are a later copy of the first argmax (not top-1), some the first.
    assert 0 < int(expected_top1.sum()) < int(valid.sum())
    tied_later = valid & (z.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) == z.max(-1).values) & ~expected_top1
    assert tied_later.any()
    assert (out.mean_logits[~valid] == 0).all() and not out.mean_logits.requires_grad
    # Asking for the statistics changes nothing else.
    plain = token_logprobs(x, w, t, bias=b, backend=backend, **transform)
    torch.testing.assert_close(out.logps, plain.logps, atol=0, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 3, 4, 7])
def test_triton_vocab_splits_combine_mean_logits_and_top1(num_splits):
    # Ties between id j and j+100 land in different splits, or in one, depending on the count.
    pytest.importorskip("triton")
    from prefops.kernels import token_logprobs as kern

    x, w, _, t = make(45, 16, 200, scale=2.0, seed=9)
    x, w = x.detach(), w.detach()
    w[100:200] = w[0:100]
    z = oracle_logits(x, w)
    first = z.argmax(-1)
    t = torch.where(torch.arange(45, device=DEVICE) % 3 == 0, first, t)
    t = torch.where(torch.arange(45, device=DEVICE) % 3 == 1, (first + 100) % 200, t)
    m, s, e, q, zt, zs, mb = kern.combine_partials(*kern.forward_partials(
        x, w, None, t, with_zsum=True, with_top1=True, num_splits=num_splits))
    expected = z.argmax(-1) == t
    assert 0 < int(expected.sum()) < 45
    assert torch.equal((zt >= m) & (zt > mb), expected)
    torch.testing.assert_close(zs.double() / 200, z.mean(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_padded_3d_reductions_with_token_weights(backend, reduction):
    B, T, H, V = 3, 11, 20, 64
    x, w, _, t = make(B * T, H, V, seed=6)
    x3 = x.detach().reshape(B, T, H).requires_grad_()
    t3 = t.reshape(B, T).clone()
    t3[0, 7:] = -100  # right padding
    t3[2, :3] = -100  # left padding
    tw = torch.rand(B, T, generator=torch.Generator().manual_seed(7)).to(DEVICE) + 0.5
    out = token_logprobs(x3, w, t3, token_weights=tw, reduction=reduction, backend=backend)
    assert out.logps.shape == (B, T) and out.seq_logps.shape == (B,)
    xd, wd = as_f64(x3, w)
    ref_tok = oracle_logps(xd, wd, t3)
    mask = (t3 != -100).double()
    ref = (ref_tok * tw.double() * mask).sum(-1)
    if reduction == "mean":
        ref = ref / (tw.double() * mask).sum(-1)
    torch.testing.assert_close(out.seq_logps.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.seq_lengths, mask.sum(-1).float())
    got = torch.autograd.grad(out.seq_logps.sum(), [x3, w])
    want = torch.autograd.grad(ref.sum(), [xd, wd])
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_equal_padded_rows(backend):
    lengths = [5, 1, 9, 4]
    H, V, T = 12, 50, max(lengths)
    x, w, _, t = make(sum(lengths), H, V, seed=8)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=DEVICE)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(DEVICE)
    t = t.clone()
    t[2] = -100  # an ignored token inside a packed sequence
    packed_cu = token_logprobs(x, w, t, cu_seqlens=cu, reduction="sum", backend=backend)
    packed_seg = token_logprobs(x, w, t, segment_ids=seg, reduction="sum", backend=backend)
    xp = torch.zeros(len(lengths), T, H, device=DEVICE)
    tp = torch.full((len(lengths), T), -100, device=DEVICE, dtype=t.dtype)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        xp[i, : b - a] = x.detach()[a:b]
        tp[i, : b - a] = t[a:b]
    padded = token_logprobs(xp, w, tp, reduction="sum", backend=backend)
    torch.testing.assert_close(packed_cu.seq_logps, padded.seq_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_seg.seq_logps, padded.seq_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_cu.seq_lengths, torch.tensor([4.0, 1.0, 9.0, 4.0], device=DEVICE))
    # tokens with a negative segment id belong to no sequence
    seg2 = seg.clone()
    seg2[-4:] = -1
    partial = token_logprobs(x, w, t, segment_ids=seg2, num_sequences=4, reduction="sum", backend=backend)
    assert partial.seq_logps[3].item() == 0.0 and partial.seq_lengths[3].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_single_valid_token(backend):
    x, w, b, t = make(6, 8, 40, bias=True, seed=9)
    none = torch.full_like(t, -100)
    out = token_logprobs(x, w, none, bias=b, reduction="mean", backend=backend)
    assert (out.logps == 0).all() and out.seq_logps.item() == 0.0
    gx, gw, gb = torch.autograd.grad(out.seq_logps, [x, w, b])
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in (gx, gw, gb))
    one = none.clone()
    one[3] = 7
    out = token_logprobs(x, w, one, bias=b, reduction="sum", backend=backend)
    ref = oracle_logps(x.detach(), w.detach(), one, b.detach())
    torch.testing.assert_close(out.seq_logps.double(), ref.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,n", [("torch", 65_536), ("triton", 4_096)])
def test_very_long_sequence_sum_stays_exact(backend, n):
    # One sequence of n tokens: the per-sequence sum accumulates n fp32 terms, and gradients
    # reach every token. Triton runs a shorter one under the CPU interpreter.
    x, w, b, t = make(n, 16, 64, bias=True, seed=11, ignore_frac=0.1)
    out = token_logprobs(x.unsqueeze(0), w, t.unsqueeze(0), bias=b, reduction="sum", backend=backend)
    ref = oracle_logps(x.detach(), w.detach(), t, b.detach())
    torch.testing.assert_close(out.seq_logps.double().squeeze(), ref.sum(), atol=0, rtol=2e-6)
    gx, gw = torch.autograd.grad(out.seq_logps.sum(), [x, w])
    xe, we = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ex, ew = torch.autograd.grad(oracle_logps(xe, we, t, b.detach()).sum(), [xe, we])
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(gx.double(), ex, atol=1e-5 * float(ex.abs().max()), rtol=1e-4)
    torch.testing.assert_close(gw.double(), ew, atol=1e-5 * float(ew.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite_and_exact(backend):
    # Logits around ±1e3: a naive exp overflows fp32; the online log-sum-exp must not.
    x, w, b, t = make(20, 16, 60, scale=400.0, seed=10)
    out = token_logprobs(x, w, t, backend=backend, return_entropy=True)
    ref = oracle_logps(x.detach(), w.detach(), t)
    assert torch.isfinite(out.logps).all() and torch.isfinite(out.entropy).all()
    torch.testing.assert_close(out.logps.double(), ref, atol=1e-2, rtol=1e-5)
    gx, gw = torch.autograd.grad(out.logps.sum(), [x, w])
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_chunking_does_not_change_results():
    x, w, b, t = make(50, 10, 97, bias=True, seed=11)
    outs = [token_logprobs(x, w, t, bias=b, backend="torch", chunk_elements=c) for c in (1, 37, 500, None)]
    grads = [torch.autograd.grad(o.logps.sum(), [x, w, b]) for o in outs]
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o.logps, outs[0].logps, atol=1e-5, rtol=1e-5)
        for a, e in zip(g, grads[0]):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_triton_chunked_backward_with_small_chunks_equals_one_chunk():
    x, w, b, t = make(40, 16, 300, bias=True, seed=12)
    outs = [token_logprobs(x, w, t, bias=b, backend="triton", chunk_elements=c) for c in (1, 10**7)]
    grads = [torch.autograd.grad(o.logps.sum(), [x, w, b]) for o in outs]
    for a, e in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_gradcheck_torch_path_float64():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, -100, 8, 0, 3])
    tw = torch.rand(5, generator=g, dtype=torch.float64)

    def f(x, w, b):
        out = token_logprobs(x, w, t, bias=b, temperature=0.8, logit_softcap=3.0, token_weights=tw,
                             reduction="sum", backend="torch", chunk_elements=6)
        return out.logps, out.seq_logps

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("eps", [0.0, 0.02, 0.3])
def test_gradient_filter_stays_within_documented_bound(eps):
    x, w, b, t = make(48, 16, 256, bias=True, scale=3.0, seed=14)
    g = torch.randn(48, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    exact = token_logprobs(x, w, t, bias=b, backend="triton")
    filt = token_logprobs(x, w, t, bias=b, backend="triton", grad_filter_eps=eps)
    torch.testing.assert_close(filt.logps, exact.logps)
    ge = torch.autograd.grad((exact.logps * g).sum(), [x, w, b])
    gf = torch.autograd.grad((filt.logps * g).sum(), [x, w, b])
    if eps == 0.0:
        for a, e in zip(gf, ge):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
        return
    # Each skipped d(logit) entry is below |g|·eps, so |ΔdX| ≤ |g|·eps·Σ_v‖W_v‖∞ and
    # |Δdb_v| ≤ eps·Σ_n|g_n|.
    bound_x = (g.abs()[:, None] * eps * w.detach().abs().sum(0)[None, :]) + 1e-5
    assert ((gf[0] - ge[0]).abs() <= bound_x).all()
    assert ((gf[2] - ge[2]).abs() <= eps * g.abs().sum() + 1e-5).all()
    if eps >= 0.3:
        assert not torch.equal(gf[0], ge[0])  # something was actually skipped


def test_bad_inputs_are_named():
    x, w, _, t = make(4, 8, 10)
    with pytest.raises(ValueError, match=r"targets at token 2 is 10: must be \[0, 10\)"):
        token_logprobs(x, w, torch.tensor([1, 2, 10, 3], device=DEVICE))
    with pytest.raises(ValueError, match=r"position \(1, 0\)"):
        token_logprobs(x.reshape(2, 2, 8), w, torch.tensor([[1, 2], [-5, 3]], device=DEVICE))
    with pytest.raises(ValueError, match="weight must be"):
        token_logprobs(x, w[:, :5], t)
    with pytest.raises(ValueError, match="targets must have shape"):
        token_logprobs(x, w, t[:3])
    with pytest.raises(TypeError, match="share one floating dtype"):
        token_logprobs(x, w.double(), t)
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(x, w, t.float())
    with pytest.raises(ValueError, match="reduction"):
        token_logprobs(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(x, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="cu_seqlens must"):
        token_logprobs(x, w, t, cu_seqlens=torch.tensor([0, 3]), reduction="sum")
    with pytest.raises(ValueError, match="use reduction='sum' or 'mean'"):
        token_logprobs(x, w, t, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="backend"):
        token_logprobs(x, w, t, backend="cuda")


@pytest.mark.skipif(GPU, reason="checks the CPU-without-interpreter message")
def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    import os
    import subprocess
    import sys

    code = ("import torch; from prefops.ops import token_logprobs\n"
            "try:\n"
            "    token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n"
            "print(token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])).logps.shape)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "TRITON_INTERPRET=1" in out and "torch.Size([3])" in out  # auto falls back to the torch path
