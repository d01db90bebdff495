"""Losses against the formulas of ../shared/docs/ALGORITHMS.md (written out here independently,
in float64), and the fused hidden-state path against the sequence-level one."""

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_token_logprobs import oracle_logps  # noqa: E402

from prefops.losses import (  # noqa: E402
    dpo_loss, dpo_loss_from_hidden, ld_dpo_weights, madpo_weights, simpo_loss, simpo_loss_from_hidden,
    tabpo_diff_weights, wpo_pair_weights,
)

BACKENDS = ["torch", "triton"]


def seqs(B=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c, r, rc, rr = ((torch.randn(B, generator=g, dtype=torch.float64) * 5 - 20).to(dtype) for _ in range(4))
    lc = torch.randint(1, 30, (B,), generator=g).to(dtype)
    lr = torch.randint(1, 30, (B,), generator=g).to(dtype)
    return c.requires_grad_(), r.requires_grad_(), rc, rr, lc, lr


def logsig(x):
    return -torch.log1p(torch.exp(-x))


def close(got, want, inputs):
    """Same value and same gradients with respect to ``inputs`` (float64 autograd of the formula)."""
    torch.testing.assert_close(got, want)
    for a, e in zip(torch.autograd.grad(got, inputs, retain_graph=True),
                    torch.autograd.grad(want, inputs, retain_graph=True)):
        torch.testing.assert_close(a, e)


def test_cdpo_label_smoothing_formula():
    c, r, rc, rr, *_ = seqs()
    beta, eps = 0.1, 0.2
    h = (c - rc) - (r - rr)
    want = (-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)).mean()
    got, m = dpo_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    close(got, want, (c, r))
    torch.testing.assert_close(m["rewards/margins"], (beta * h).mean().detach())
    assert m["rewards/accuracies"].item() == (h > 0).double().mean().item()


def test_robust_and_ipo_sum_and_hinge_formulas():
    c, r, rc, rr, *_ = seqs(seed=1)
    beta, eps = 0.5, 0.1
    h = (c - rc) - (r - rr)
    robust = ((-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps)).mean()
    close(dpo_loss(c, r, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)[0], robust, (c, r))
    close(dpo_loss(c, r, rc, rr, beta=beta, loss_type="ipo_sum")[0], ((h - 1 / (2 * beta)) ** 2).mean(), (c, r))
    close(dpo_loss(c, r, rc, rr, beta=beta, loss_type="hinge")[0], torch.relu(1 - beta * h).mean(), (c, r))


def test_rpo_both_forms():
    c, r, rc, rr, lc, lr = seqs(seed=2)
    beta, eta = 0.1, 0.7
    h = (c - rc) - (r - rr)
    dpo = -logsig(beta * h)
    main = dpo_loss(c, r, rc, rr, beta=beta, loss_type=["sigmoid", "nll"], loss_weights=[1.0, eta])[0]
    close(main, (dpo + eta * beta * (-c)).mean(), (c, r))
    avg = dpo_loss(c, r, rc, rr, beta=beta, loss_type=["sigmoid", "nll_mean"], loss_weights=[1.0, eta],
                   chosen_lengths=lc, rejected_lengths=lr)[0]
    close(avg, (dpo + eta * (-c / lc)).mean(), (c, r))


def test_fdpo_margin_and_label_flip_rule():
    c, r, rc, rr, *_ = seqs(seed=3)
    hw = torch.tensor([0, 0, 1, 1, 0, 1])
    hl = torch.tensor([0, 1, 1, 0, 1, 0])
    beta, lam = 0.1, 10.0
    h = (c - rc) - (r - rr)
    want = (-logsig(beta * (h - lam * (hl - hw).double()))).mean()
    got = dpo_loss(c, r, rc, rr, beta=beta, loss_type="fdpo", fdpo_lambda=lam, chosen_hallucinated=hw,
                   rejected_hallucinated=hl)[0]
    close(got, want, (c, r))
    # λ = 0 is plain DPO
    close(dpo_loss(c, r, rc, rr, beta=beta, loss_type="fdpo", fdpo_lambda=0.0, chosen_hallucinated=hw,
                   rejected_hallucinated=hl)[0],
          dpo_loss(c, r, rc, rr, beta=beta)[0], (c, r))


def test_simpo_formula_and_defaults():
    c, r, _, _, lc, lr = seqs(seed=4)
    beta, ratio, eps = 2.0, 0.5, 0.1
    z = beta * (c / lc - r / lr - ratio)
    want = (-(1 - eps) * logsig(z) - eps * logsig(-z)).mean()
    close(simpo_loss(c, r, lc, lr, label_smoothing=eps)[0], want, (c, r))
    # SFT term: one token-level mean NLL over all chosen tokens (SimPO's trainer, TRL CPO's
    # cpo_alpha), added after the mean and not sample-weighted; not a mean of per-pair means.
    w = torch.linspace(0.5, 2.0, c.shape[0], dtype=c.dtype)
    with_sft, metrics = simpo_loss(c, r, lc, lr, sft_weight=0.3, sample_weights=w)
    close(with_sft, (w * -logsig(z)).mean() + 0.3 * (-c.sum() / lc.sum()), (c, r))
    assert not torch.allclose((-c.sum() / lc.sum()), (-c / lc).mean())  # the two readings differ here
    summed = simpo_loss(c, r, lc, lr, sft_weight=0.3, reduction="sum")[0]
    close(summed, (-logsig(z)).sum() + 0.3 * c.shape[0] * (-c.sum() / lc.sum()), (c, r))
    per_pair = simpo_loss(c, r, lc, lr, sft_weight=0.3, reduction="none")[0]
    torch.testing.assert_close(per_pair.mean(), simpo_loss(c, r, lc, lr, sft_weight=0.3)[0])
    # Metrics as SimPO/CPO log them: length-averaged log-probs.
    torch.testing.assert_close(metrics["logps/chosen"], (c / lc).mean().detach())
    torch.testing.assert_close(metrics["logps/rejected"], (r / lr).mean().detach())
    torch.testing.assert_close(metrics["nll_loss"], (-c.sum() / lc.sum()).detach())


def test_madpo_weights_formula():
    m = torch.tensor([-10.0, -1.0, 0.0, 0.5, 3.0, 8.0], dtype=torch.float64)
    cmax, cmin, lam, tau = 2.0, 0.5, 1.0, math.log(999)
    c = cmin + (cmax - cmin) / (1 + ((cmax - 1) / (1 - cmin)) * torch.exp(lam * (m.abs() - tau)))
    w = torch.sigmoid(c * m) / torch.sigmoid(m)
    want = torch.where(m > -tau, w, torch.ones_like(w))
    torch.testing.assert_close(madpo_weights(m), want)
    c_, r_, rc, rr, *_ = seqs(seed=5)
    h = (c_ - rc) - (r_ - rr)
    got = dpo_loss(c_, r_, rc, rr, sample_weights=madpo_weights(m))[0]
    close(got, (want * -logsig(0.1 * h)).mean(), (c_, r_))


def test_ld_dpo_weights_by_hand():
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)  # chosen 4 tokens, rejected 2
    w = ld_dpo_weights(mask, 0.25)
    torch.testing.assert_close(w, torch.tensor([[0, 1, 1, 0.25, 0.25, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.float32))


def test_tabpo_diff_weights_by_hand():
    t = torch.tensor([[-100, 5, 6, 7, 8], [-100, -100, 5, 9, 7]])
    mask = t != -100
    w = tabpo_diff_weights(t, mask, factor=1.2)
    # completions [5,6,7,8] vs [5,9,7]: position 1 differs; position 3 is only in the chosen, so
    # (as the TAB-PO source compares k < min(|c|, |r|)) it is not up-weighted
    torch.testing.assert_close(w, torch.tensor([[0, 1, 1.2, 1, 1], [0, 0, 1, 1.2, 1]], dtype=torch.float32))
    # The helper's example: chosen [5,6,7] vs rejected [5,6,7,8,9] gives no weight above 1.
    t2 = torch.tensor([[5, 6, 7, -100, -100], [5, 6, 7, 8, 9]])
    torch.testing.assert_close(tabpo_diff_weights(t2, t2 != -100), (t2 != -100).to(torch.float32))


def test_wpo_pair_weights_formula():
    g = torch.Generator().manual_seed(6)
    lp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    lsp = -torch.rand(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) > 0.3
    per = torch.exp(((lp - lsp) * mask).sum(1) / mask.sum(1).clamp(min=1))
    torch.testing.assert_close(wpo_pair_weights(lp, lsp, mask), per[:2] * per[2:])


def test_bad_loss_arguments():
    c, r, rc, rr, lc, lr = seqs()
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(c, r, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(c, r, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="robust DPO needs"):
        dpo_loss(c, r, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_weights has 1 entries for 2"):
        dpo_loss(c, r, rc, rr, loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="fdpo"):
        dpo_loss(c, r, rc, rr, loss_type="fdpo")


# ---- fused path: hidden states → loss ----


def fused_batch(B=3, T=9, H=16, V=50, seed=0, dtype=torch.float32):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / 4).to(dtype).requires_grad_()
    ref_hidden = (hidden.detach() + 0.3 * torch.randn(2 * B, T, H, generator=g).to(dtype))
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(2 * B):  # prompt tokens and right padding are ignored
        p = int(torch.randint(1, 4, (1,), generator=g))
        e = int(torch.randint(p + 1, T + 1, (1,), generator=g))
        targets[i, :p] = -100
        targets[i, e:] = -100
    return hidden, weight, ref_hidden, targets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(), dict(ld_alpha=0.5), dict(ld_alpha=0.5, ld_alpha_reference=False),
                                  dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                                  dict(token_weights="tabpo", normalize_token_weights=True, beta=0.5),
                                  dict(loss_type="ipo"), dict(use_wpo_weighting=True),
                                  dict(ld_alpha=0.5, loss_type=["sigmoid", "nll"], loss_weights=[1.0, 0.3]),
                                  dict(token_weights="tabpo", normalize_token_weights=True,
                                       loss_type=["sigmoid", "nll_mean"], loss_weights=[1.0, 0.3])])
def test_fused_dpo_equals_float64_sequence_path(backend, opts):
    hidden, weight, ref_hidden, targets = fused_batch(seed=len(str(opts)))
    opts = dict(opts)
    mask = targets != -100
    if opts.get("token_weights") == "tabpo":
        opts["token_weights"] = tabpo_diff_weights(targets, mask)
    loss, metrics = dpo_loss_from_hidden(hidden, weight, targets, ref_hidden=ref_hidden, backend=backend, **opts)

    # Independent float64 path: full-softmax log-probs, weights and sums written out here.
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp = oracle_logps(hd, wd, targets)
    ref_lp = oracle_logps(ref_hidden.double(), weight.detach().double(), targets)
    m = mask.double()
    tw = opts.get("token_weights")
    w = m if tw is None else m * tw.double()
    ld = opts.get("ld_alpha")
    w_pol = w * ld_dpo_weights(mask, ld).double() if ld is not None else w
    w_ref = w_pol if opts.get("ld_alpha_reference", True) else w

    def reduce(x, ww):
        s = (x * ww).sum(1)
        return s / ww.sum(1) if opts.get("normalize_token_weights") else s

    B = targets.shape[0] // 2
    s, rs = reduce(lp, w_pol), reduce(ref_lp, w_ref)
    beta = opts.get("beta", 0.1)
    h = (s[:B] - rs[:B]) - (s[B:] - rs[B:])
    lt = opts.get("loss_type", "sigmoid")
    if lt == "ipo":
        L = m.sum(1)
        d = (s[:B] - rs[:B]) / L[:B] - (s[B:] - rs[B:]) / L[B:]
        per = (d - 1 / (2 * beta)) ** 2
    else:
        per = -F.logsigmoid(beta * h)
    if opts.get("use_wpo_weighting"):
        lsp = torch.log((torch.softmax(hd.detach() @ wd.detach().T, -1) ** 2).sum(-1))
        e = torch.exp(((lp.detach() - lsp) * m).sum(1) / m.sum(1))
        per = per * e[:B] * e[B:]
    want = per.mean()
    if lt == ["sigmoid", "sft"]:
        want = want + 0.5 * (-lp[:B][mask[:B]].mean())
    # RPO's NLL terms take the plain Σ log p(y_w), not the weighted sums of the preference term.
    plain = (lp * m).sum(1)[:B]
    if lt == ["sigmoid", "nll"]:
        want = want + 0.3 * (-beta * plain).mean()
    if lt == ["sigmoid", "nll_mean"]:
        want = want + 0.3 * (-plain / m.sum(1)[:B]).mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"].double(), s[:B].mean().detach(), atol=1e-4, rtol=1e-5)
    got = torch.autograd.grad(loss, [hidden, weight])
    ref = torch.autograd.grad(want, [hd, wd])
    for a, e in zip(got, ref):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_precomputed_reference_equals_ref_hidden(backend):
    hidden, weight, ref_hidden, targets = fused_batch(seed=11)
    a, _ = dpo_loss_from_hidden(hidden, weight, targets, ref_hidden=ref_hidden, backend=backend)
    ref_lp = oracle_logps(ref_hidden.double(), weight.detach().double(), targets).sum(1)
    B = targets.shape[0] // 2
    b, _ = dpo_loss_from_hidden(hidden, weight, targets, ref_chosen_logps=ref_lp[:B].float(),
                                ref_rejected_logps=ref_lp[B:].float(), backend=backend)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_simpo_equals_sequence_simpo(backend):
    hidden, weight, _, targets = fused_batch(seed=12)
    loss, _ = simpo_loss_from_hidden(hidden, weight, targets, backend=backend)
    lp = oracle_logps(hidden.detach().double(), weight.detach().double(), targets)
    mask = (targets != -100).double()
    B = targets.shape[0] // 2
    s, L = lp.sum(1), mask.sum(1)
    want = simpo_loss(s[:B], s[B:], L[:B], L[B:])[0]
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgdpo_token_guidance_formula(backend):
    from prefops.losses import tgdpo_token_weights

    hidden, weight, ref_hidden, targets = fused_batch(seed=13)
    g = torch.Generator().manual_seed(14)
    rm_hidden = ref_hidden + 0.2 * torch.randn(ref_hidden.shape, generator=g)
    mask = targets != -100
    rm_tok = oracle_logps(rm_hidden.double(), weight.detach().double(), targets)
    ref_tok = oracle_logps(ref_hidden.double(), weight.detach().double(), targets)
    alpha, beta = 0.5, 0.1
    w = tgdpo_token_weights(rm_tok, ref_tok, mask, alpha=alpha, beta=beta)
    loss, _ = dpo_loss_from_hidden(hidden, weight, targets, ref_hidden=ref_hidden, token_weights=w, beta=beta,
                                   backend=backend)
    lp = oracle_logps(hidden.detach().double(), weight.detach().double(), targets)
    d = (lp - ref_tok) * mask
    r_hat = (rm_tok - ref_tok)
    B = targets.shape[0] // 2
    inner = (beta * (1 + alpha * beta * r_hat[:B]) * d[:B]).sum(1) - (beta * (1 - alpha * beta * r_hat[B:]) * d[B:]).sum(1)
    want = (-F.logsigmoid(inner)).mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tabpo_loss_formula(backend):
    from prefops.losses import TABPOLoss

    hidden, weight, ref_hidden, targets = fused_batch(seed=15, V=12)
    weight = (weight.detach() * 6).requires_grad_()
    # Every other chosen token becomes the model's top choice, so the barrier gate (logp < log τ)
    # is open on some tokens and shut on others.
    top = (hidden.detach() @ weight.detach().T).argmax(-1)
    B = targets.shape[0] // 2
    sel = (targets[:B] != -100) & (torch.arange(targets.shape[1]) % 2 == 0)
    targets[:B][sel] = top[:B][sel]
    mask = targets != -100
    tw = tabpo_diff_weights(targets, mask)
    loss, metrics = TABPOLoss(beta=0.5, tau=0.66, barrier_weight=0.5, backend=backend)(
        hidden, weight, targets, token_weights=tw, ref_hidden=ref_hidden)
    hd, wd = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    lp = oracle_logps(hd, wd, targets)
    ref = oracle_logps(ref_hidden.double(), weight.detach().double(), targets)
    w = tw.double() * mask
    s, rs = (lp * w).sum(1) / w.sum(1), (ref * w).sum(1) / w.sum(1)
    l_dpo = -F.logsigmoid(0.5 * ((s[:B] - s[B:]) - (rs[:B] - rs[B:])))
    barriers, gates = [], []
    for i in range(B):
        m = mask[i]
        wt = w[i][m] / w[i][m].mean()
        gate = (lp[i][m] < math.log(0.66)).double()
        gates.append(gate)
        barriers.append((-lp[i][m] * wt * gate).sum() / torch.clamp((wt * gate).sum(), min=1.0))
    all_gates = torch.cat(gates)
    assert 0 < all_gates.sum() < all_gates.numel()
    want = l_dpo.mean() + 0.5 * torch.stack(barriers).mean()
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(loss, [hidden, weight])
    for a, e in zip(got, torch.autograd.grad(want, [hd, wd])):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-4)
    assert "barrier" in metrics and "rewards/accuracies" in metrics


def test_module_forms_equal_functional_and_refuse_double_options():
    from prefops.losses import DPOLoss

    hidden, weight, ref_hidden, targets = fused_batch(seed=16)
    mod = DPOLoss(beta=0.2, loss_type="ipo", backend="torch")
    a, _ = mod(hidden, weight, targets, ref_hidden=ref_hidden)
    b, _ = dpo_loss_from_hidden(hidden, weight, targets, ref_hidden=ref_hidden, beta=0.2, loss_type="ipo",
                                backend="torch")
    assert a.item() == b.item()
    assert "beta=0.2" in repr(mod)
    with pytest.raises(TypeError, match="configured with"):
        mod(hidden, weight, targets, beta=0.3)
