"""Listwise (LiPO-λ, pairwise, Plackett–Luce), KTO and BCO against brute-force float64 versions
of the formulas in ../shared/docs/ALGORITHMS.md."""

import math

import pytest

torch = pytest.importorskip("torch")

from prefops.losses import BCOLoss, bco_loss, dpo_loss, kto_loss, listwise_loss, pad_lists  # noqa: E402


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > -30 else x


def brute_listwise(logps, ref, labels, sizes, beta, kind, normalize=False):
    """Per-prompt python loops; Δ from ranks of the current scores (ties by position)."""
    total = 0.0
    for p, k in enumerate(sizes):
        s = [beta * (logps[p][i] - ref[p][i]) for i in range(k)]
        psi = labels[p][:k]
        if kind == "plackett_luce":
            order = sorted(range(k), key=lambda i: (-psi[i], i))
            loss = 0.0
            for a in range(k):
                tail = [s[order[b]] for b in range(a, k)]
                mx = max(tail)
                loss -= s[order[a]] - (mx + math.log(sum(math.exp(t - mx) for t in tail)))
            total += loss
            continue
        order = sorted(range(k), key=lambda i: (-s[i], i))
        rank = {i: r + 1 for r, i in enumerate(order)}
        pairs = []
        for i in range(k):
            for j in range(k):
                if psi[i] > psi[j]:
                    if kind == "lipo_lambda":
                        d = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1)) * abs(1 / math.log1p(rank[i]) - 1 / math.log1p(rank[j]))
                    else:
                        d = 1.0
                    pairs.append((d, s[i] - s[j]))
        norm = sum(d for d, _ in pairs) if normalize else 1.0
        norm = norm or 1.0
        total += -sum(d / norm * logsig(x) for d, x in pairs)
    return total / len(sizes)


def random_lists(seed, P=5, K=6):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, K + 1, (P,), generator=g).tolist()
    offsets = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)))
    n = offsets[-1].item()
    flat_logps = torch.randn(n, generator=g, dtype=torch.float64) * 10 - 40
    flat_ref = torch.randn(n, generator=g, dtype=torch.float64) * 10 - 40
    flat_labels = torch.randint(0, 4, (n,), generator=g).double()  # ties on purpose
    logps, mask = pad_lists(flat_logps, offsets)
    ref, _ = pad_lists(flat_ref, offsets)
    labels, _ = pad_lists(flat_labels, offsets)
    return logps, ref, labels, mask, sizes


@pytest.mark.parametrize("kind,normalize", [("lipo_lambda", False), ("lipo_lambda", True), ("pairwise", False),
                                            ("pairwise", True), ("plackett_luce", False)])
@pytest.mark.parametrize("seed", range(4))
def test_listwise_equals_brute_force(kind, normalize, seed):
    logps, ref, labels, mask, sizes = random_lists(seed)
    logps.requires_grad_()
    loss, metrics = listwise_loss(logps, ref, labels, list_mask=mask, beta=0.05, loss_type=kind, normalize_lambda=normalize)
    want = brute_listwise(logps.tolist(), ref.tolist(), labels.tolist(), sizes, 0.05, kind, normalize)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # Gradient: finite differences of the brute force (Δ fixed: ranks carry no gradient).
    (g,) = torch.autograd.grad(loss, logps)
    assert (g[~mask] == 0).all()
    p, i = 0, 1
    h = 1e-6
    lp = logps.detach().clone()
    lp[p, i] += h
    up = brute_listwise(lp.tolist(), ref.tolist(), labels.tolist(), sizes, 0.05, kind, normalize)
    lp[p, i] -= 2 * h
    down = brute_listwise(lp.tolist(), ref.tolist(), labels.tolist(), sizes, 0.05, kind, normalize)
    assert g[p, i].item() == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-9)
    assert 0.0 <= metrics["rewards/accuracies"].item() <= 1.0


@pytest.mark.parametrize("kind,normalize", [("lipo_lambda", True), ("pairwise", False), ("plackett_luce", False)])
def test_two_responses_are_exactly_dpo(kind, normalize):
    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 5 - 20 for _ in range(4))
    c.requires_grad_()
    r.requires_grad_()
    labels = torch.tensor([[3.0, 1.0]]).expand(8, 2)
    lw, _ = listwise_loss(torch.stack([c, r], 1), torch.stack([rc, rr], 1), labels, beta=0.1, loss_type=kind,
                          normalize_lambda=normalize)
    ld, _ = dpo_loss(c, r, rc, rr, beta=0.1)
    torch.testing.assert_close(lw, ld, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(lw, [c, r]), torch.autograd.grad(ld, [c, r])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_lipo_lambda_two_responses_without_normalisation_scales_dpo():
    c, r = torch.tensor([-10.0, -12.0], dtype=torch.float64), torch.tensor([-11.0, -9.0], dtype=torch.float64)
    labels = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    lw, _ = listwise_loss(torch.stack([c, r], 1), None, labels, beta=0.1)
    ld, _ = dpo_loss(c, r, beta=0.1)
    factor = (2**2 - 1) * abs(1 / math.log(2) - 1 / math.log(3))
    assert lw.item() == pytest.approx(factor * ld.item(), rel=1e-12)


def test_ties_make_no_pairs():
    logps = torch.tensor([[-1.0, -5.0, -3.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 1.0, 1.0]])
    for kind in ("lipo_lambda", "pairwise"):
        assert listwise_loss(logps, None, labels, loss_type=kind)[0].item() == 0.0


def test_kto_formula():
    g = torch.Generator().manual_seed(4)
    S, R = torch.randn(10, generator=g, dtype=torch.float64) - 20, torch.randn(10, generator=g, dtype=torch.float64) - 20
    KS, KR = torch.randn(10, generator=g, dtype=torch.float64) - 20, torch.randn(10, generator=g, dtype=torch.float64) - 21
    des = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1]).bool()
    beta, lD, lU = 0.1, 1.0, 1.5
    z0 = max((KS - KR).mean().item(), 0.0)
    want = sum((lD * (1 - 1 / (1 + math.exp(-beta * (s - r - z0)))) if d else
                lU * (1 - 1 / (1 + math.exp(-beta * (z0 - (s - r))))))
               for s, r, d in zip(S.tolist(), R.tolist(), des.tolist())) / 10
    loss, m = kto_loss(S, R, des, kl_logps=KS, ref_kl_logps=KR, beta=beta, desirable_weight=lD, undesirable_weight=lU)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert m["kl"].item() == pytest.approx(z0)
    rw = beta * (S - R)
    assert m["rewards/margins"].item() == pytest.approx(rw[des].mean().item() - rw[~des].mean().item(), rel=1e-12)
    assert "rewards/margins" not in kto_loss(S[des], R[des], des[des], kl_logps=KS, ref_kl_logps=KR)[1]
    # gradient w.r.t. the policy log-probs: the formula in float64 autograd (z0 carries none)
    Sg = S.clone().requires_grad_()
    (g,) = torch.autograd.grad(kto_loss(Sg, R, des, kl_logps=KS, ref_kl_logps=KR, beta=beta, desirable_weight=lD,
                                        undesirable_weight=lU)[0], Sg)
    Sf = S.clone().requires_grad_()
    r = Sf - R
    f = torch.where(des, lD * (1 - torch.sigmoid(beta * (r - z0))), lU * (1 - torch.sigmoid(beta * (z0 - r)))).mean()
    (gf,) = torch.autograd.grad(f, Sf)
    torch.testing.assert_close(g, gf)
    # negative KL estimates clamp to 0
    loss0, m0 = kto_loss(S, R, des, kl_logps=KR, ref_kl_logps=KS + 5, beta=beta)
    assert m0["kl"].item() == 0.0


def test_bco_formula_and_running_mean():
    g = torch.Generator().manual_seed(5)
    bco = BCOLoss(beta=0.2)
    seen = []
    for step in range(3):
        S, R = torch.randn(6, generator=g, dtype=torch.float64) - 20, torch.randn(6, generator=g, dtype=torch.float64) - 20
        des = torch.tensor([1, 0, 1, 0, 1, 1]).bool()
        seen += (0.2 * (S - R)).tolist()
        delta = sum(seen) / len(seen)
        loss, m = bco(S, R, des)
        r = (0.2 * (S - R)).tolist()
        want = sum(-logsig(x - delta) if d else -logsig(-(x - delta)) for x, d in zip(r, des.tolist())) / 6
        assert loss.item() == pytest.approx(want, rel=1e-12)
        assert bco_loss(S, R, des, delta=delta, beta=0.2)[0].item() == pytest.approx(want, rel=1e-12)
        Sg, Sf = S.clone().requires_grad_(), S.clone().requires_grad_()
        (grad,) = torch.autograd.grad(bco_loss(Sg, R, des, delta=delta, beta=0.2)[0], Sg)
        x = 0.2 * (Sf - R) - delta
        f = torch.where(des, -torch.nn.functional.logsigmoid(x), -torch.nn.functional.logsigmoid(-x)).mean()
        torch.testing.assert_close(grad, torch.autograd.grad(f, Sf)[0])
    state = bco.state_dict()
    fresh = BCOLoss(beta=0.2)
    fresh.load_state_dict(state)
    assert fresh.running.mean == pytest.approx(sum(seen) / len(seen))
