"""Diffusion preference losses against their formulas written out here in float64 (values and
gradients with respect to model_pred), and against the loss lines of the Diffusion-DPO scripts.

Both backends run: without a GPU the Triton kernel runs under TRITON_INTERPRET=1 (conftest) on
CPU tensors at small shapes.
"""

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from prefops.losses import (diffusion_dpo_loss, diffusion_kto_loss, diffusion_mse, listwise_loss,  # noqa: E402
                            rank_dpo_loss, smpo_loss)

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(6, 3, 5, 7), (2, 4, 8, 8), (4, 1030), (2, 1, 1, 1)]  # B=3 odd dims, B=1, a row past one block


def make(shape, dtype=torch.float32, seed=0, spread=0.05, target_dtype=None):
    """(model_pred, ref_pred, target): predictions near the target so that β = 5000 gives O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    x = t + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    r = t + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    td = target_dtype or dtype
    return (x.to(DEVICE, dtype).requires_grad_(), r.to(DEVICE, dtype), t.to(DEVICE, td))


def leaf64(x):
    """The exact values of ``x`` in float64 as a fresh leaf (the oracle's input)."""
    return x.detach().double().requires_grad_()


def mse64(x, t):
    return ((x.double() - t.double()) ** 2).reshape(x.shape[0], -1).mean(1)


def tol(dtype):
    # fp32 accumulation either way; bf16 only rounds the gradient that is handed back.
    return 2e-5 if dtype == torch.float32 else 1.6e-2


def assert_rel(got, want, rtol, what=""):
    """max |got − want| ≤ rtol · max(|want|, tiny)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-12)
    assert err <= rtol * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def check(loss, want, x, x64, dtype, loss_rtol=1e-5):
    """Same value, and same gradient wrt model_pred (float64 autograd of the written-out formula)."""
    assert_rel(loss, want, loss_rtol, "loss")
    (gx,) = torch.autograd.grad(loss, x, retain_graph=True)
    (gw,) = torch.autograd.grad(want, x64, retain_graph=True)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    assert_rel(gx, gw, tol(dtype), "grad")


def dpo_oracle(x64, r, t, beta, factor=0.5, weights=None):
    m, rr = mse64(x64, t), mse64(r, t)
    B = m.shape[0] // 2
    inside = -factor * beta * ((m[:B] - m[B:]) - (rr[:B] - rr[B:]))
    per = -torch.log(1 / (1 + torch.exp(-inside)))
    return (per if weights is None else per * weights.double()).mean(), inside


# ---------------------------------------------------------------------------------------------
# Per-image MSE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_per_image_mse_and_gradient(backend, dtype, shape):
    x, r, t = make(shape, dtype, seed=len(shape))
    r.requires_grad_()
    m, rm = diffusion_mse(x, r, t, backend=backend)
    assert m.dtype == torch.float32 and rm.dtype == torch.float32 and m.shape == (shape[0],)
    assert_rel(m, mse64(x, t), 1e-5, "m")
    assert_rel(rm, mse64(r, t), 1e-5, "r")
    assert not rm.requires_grad
    g = torch.randn(shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x64 = leaf64(x)
    check((m * g).sum(), (mse64(x64, t) * g.double()).sum(), x, x64, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mse_mixed_dtypes_and_no_reference(backend):
    x, _, t = make((4, 3, 5, 5), torch.bfloat16, target_dtype=torch.float32)  # bf16 prediction, fp32 noise
    m, rm = diffusion_mse(x, None, t, backend=backend)
    assert rm is None
    x64 = leaf64(x)
    check(m.sum(), mse64(x64, t).sum(), x, x64, torch.bfloat16)
    with torch.no_grad():  # no autograd graph needed
        assert_rel(diffusion_mse(x, None, t, backend=backend)[0], mse64(x, t), 1e-5)


def test_kernel_splits_rows_into_chunks():
    """Several programs per row (and several blocks per program) still sum to the row's MSE."""
    pytest.importorskip("triton")
    from prefops.kernels import diffusion_dpo as K

    x, r, t = make((3, 2, 9, 11), torch.float32)
    n = 2 * 9 * 11
    for block, splits in [(16, 3), (16, 1), (32, 100), (256, None)]:
        m, rm = K.mse_forward(x.detach().reshape(3, n), r.reshape(3, n), t.reshape(3, n), block=block,
                              max_splits=splits)
        assert_rel(m, mse64(x, t), 1e-5, f"m block={block}")
        assert_rel(rm, mse64(r, t), 1e-5, f"r block={block}")
    g = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    dx = K.mse_backward(x.detach().reshape(3, n), t.reshape(3, n), g, block=16)
    want = 2 * (x.detach().double() - t.double()).reshape(3, n) / n * g.double()[:, None]
    assert_rel(dx, want, 1e-6, "dx")


# ---------------------------------------------------------------------------------------------
# Diffusion-DPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[3:])
def test_diffusion_dpo_formula(backend, dtype, shape):
    x, r, t = make(shape, dtype, seed=7)
    loss, metrics = diffusion_dpo_loss(x, r, t, backend=backend)  # β = 5000, original convention
    x64 = leaf64(x)
    want, inside = dpo_oracle(x64, r, t, 5000.0)
    check(loss, want, x, x64, dtype, loss_rtol=1e-4)
    assert 0.01 < inside.abs().mean() < 20  # the test sits in the informative range of the sigmoid
    assert abs(metrics["rewards/accuracies"].item() - (inside > 0).double().mean().item()) < 1e-6
    assert_rel(metrics["rewards/margins"], inside.mean(), 1e-3)
    B = shape[0] // 2
    m, rm = mse64(x, t), mse64(r, t)
    for key, val in [("mse/model_chosen", m[:B]), ("mse/model_rejected", m[B:]), ("mse/ref_chosen", rm[:B]),
                     ("mse/ref_rejected", rm[B:]), ("mse/model", m), ("mse/ref", rm)]:
        assert_rel(metrics[key], val.mean(), 1e-5, key)
    assert_rel(metrics["rewards/chosen"] - metrics["rewards/rejected"], inside.mean(), 1e-3)
    assert all(not v.requires_grad for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_conventions_sample_weights_and_reductions(backend):
    x, r, t = make((8, 3, 5, 7), seed=11)
    w = torch.tensor([0.5, 2.0, 0.0, 1.5], device=DEVICE)
    x64 = leaf64(x)
    for convention, factor in [("original", 0.5), ("diffusers", 1.0)]:
        loss, _ = diffusion_dpo_loss(x, r, t, beta=2500.0, convention=convention, sample_weights=w, backend=backend)
        want, _ = dpo_oracle(x64, r, t, 2500.0, factor=factor, weights=w)
        check(loss, want, x, x64, torch.float32)
    # diffusers β is twice as strong: diffusers(β) = original(2β)
    a = diffusion_dpo_loss(x, r, t, beta=1000.0, convention="diffusers", reduction="none", backend=backend)[0]
    b = diffusion_dpo_loss(x, r, t, beta=2000.0, convention="original", reduction="none", backend=backend)[0]
    assert a.shape == (4,)
    torch.testing.assert_close(a, b)
    s = diffusion_dpo_loss(x, r, t, reduction="sum", backend=backend)[0]
    torch.testing.assert_close(s, 4 * diffusion_dpo_loss(x, r, t, backend=backend)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hinge_and_sft(backend):
    x, r, t = make((6, 3, 5, 7), seed=12)
    x64 = leaf64(x)
    _, inside = dpo_oracle(x64, r, t, 5000.0)
    loss, _ = diffusion_dpo_loss(x, r, t, loss_type="hinge", backend=backend)
    check(loss, torch.relu(1 - inside).mean(), x, x64, torch.float32)
    # SFT: plain MSE of the winners (DiffusionDPO train.py: F.mse_loss over the SFT batch); no reference
    loss, metrics = diffusion_dpo_loss(x, None, t, loss_type="sft", backend=backend)
    check(loss, F.mse_loss(x64[:3], t[:3].double()), x, x64, torch.float32)
    assert torch.autograd.grad(loss, x)[0][3:].abs().max() == 0  # losers get no gradient
    assert "rewards/accuracies" not in metrics and "mse/model_chosen" in metrics


def salesforce_train_py_loss(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO train.py, the "dpo" branch, as the script writes it."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, implicit_acc


def diffusers_script_loss(model_pred, ref_preds, target, beta_dpo):
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, loss_type "sigmoid"."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_scripts_loss_lines(backend):
    x, r, t = make((8, 4, 6, 6), seed=13)
    peer, peer_acc = salesforce_train_py_loss(x, r, t, 5000.0)
    loss, metrics = diffusion_dpo_loss(x, r, t, beta=5000.0, backend=backend)
    torch.testing.assert_close(loss, peer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(peer, x)[0], rtol=1e-4, atol=1e-9)
    assert metrics["rewards/accuracies"] == peer_acc

    peer, peer_acc = diffusers_script_loss(x, r, t, 2500.0)
    loss, metrics = diffusion_dpo_loss(x, r, t, beta=2500.0, convention="diffusers", backend=backend)
    torch.testing.assert_close(loss, peer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(peer, x)[0], rtol=1e-4, atol=1e-9)
    assert metrics["rewards/accuracies"] == peer_acc

    # at step 0 the policy is its reference: every logit is 0, loss log 2; the scripts' accuracies differ
    same = x.detach().clone()
    for convention, acc in [("original", 0.0), ("diffusers", 0.5)]:
        loss, metrics = diffusion_dpo_loss(x, same, t, convention=convention, backend=backend)
        assert abs(loss.item() - math.log(2)) < 1e-6 and metrics["rewards/accuracies"].item() == acc


def test_input_errors():
    x, r, t = make((5, 2, 3, 3))
    with pytest.raises(ValueError, match="2B"):
        diffusion_dpo_loss(x, r, t)
    x, r, t = make((4, 2, 3, 3))
    with pytest.raises(ValueError, match="needs ref_pred"):
        diffusion_dpo_loss(x, None, t)
    with pytest.raises(ValueError, match="convention"):
        diffusion_dpo_loss(x, r, t, convention="paper")
    with pytest.raises(ValueError, match="same"):
        diffusion_dpo_loss(x, r, t[:, :1])
    with pytest.raises(ValueError, match="backend"):
        diffusion_mse(x, r, t, backend="cuda")
    with pytest.raises(TypeError, match="float64"):
        diffusion_mse(x.double(), r, t, backend="triton")
    m, _ = diffusion_mse(x.double(), r, t)  # auto: fp64 goes to torch
    assert m.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# SmPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_smpo_formula(backend, dtype):
    x, r, t = make((6, 3, 5, 7), dtype, seed=21)
    lo, hi = 0.11543526500463486, 0.28201571106910706  # SmPO's PickScore range
    sw = torch.tensor([0.25, 0.20, 0.18], dtype=torch.float64)
    sl = torch.tensor([0.21, 0.22, 0.18], dtype=torch.float64)
    nw, nl = (sw - lo) / (hi - lo), (sl - lo) / (hi - lo)
    p = torch.exp(nw) / (torch.exp(nw) + torch.exp(nl))
    x64 = leaf64(x)
    m, rm = mse64(x64, t), mse64(r, t)
    inside = -0.5 * 2000.0 * (2 * p - 1) * 10 * ((m[:3] - m[3:]) - (rm[:3] - rm[3:]))
    want = -torch.log(torch.sigmoid(inside)).mean()
    loss, metrics = smpo_loss(x, r, t, score_chosen=sw.float(), score_rejected=sl.float(), score_range=(lo, hi),
                              beta=2000.0, backend=backend)
    check(loss, want, x, x64, dtype, loss_rtol=1e-4)
    assert abs(metrics["smpo/probs"].item() - p.mean().item()) < 1e-6
    loss_p, _ = smpo_loss(x, r, t, probs=p.float(), beta=2000.0, backend=backend)
    torch.testing.assert_close(loss_p, loss)


def test_smpo_with_unit_scale_is_diffusion_dpo():
    x, r, t = make((6, 3, 5, 7), seed=22)
    p = torch.full((3,), 0.55)  # (2p − 1)·10 = 1
    a = smpo_loss(x, r, t, probs=p, beta=5000.0)[0]
    b = diffusion_dpo_loss(x, r, t, beta=5000.0)[0]
    torch.testing.assert_close(a, b)
    # p = ½ (a tie) gives no signal at all
    loss = smpo_loss(x, r, t, probs=torch.full((3,), 0.5))[0]
    assert abs(loss.item() - math.log(2)) < 1e-6 and torch.autograd.grad(loss, x)[0].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# Diffusion-KTO
# ---------------------------------------------------------------------------------------------


def kto_oracle(x64, r, t, labels, beta, wd, wu, detach_kl=True):
    g = mse64(r, t) - mse64(x64, t)
    kl = g.mean().clamp(min=0)
    if detach_kl:
        kl = kl.detach()
    sgn = labels.double() * 2 - 1
    lam = torch.where(labels, torch.tensor(wd, dtype=torch.float64), torch.tensor(wu, dtype=torch.float64))
    return (lam * (1 - torch.sigmoid(sgn * beta * (g - kl)))).mean(), kl


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_diffusion_kto_formula(backend, dtype):
    x, r, t = make((7, 3, 5, 5), dtype, seed=31, spread=0.05)
    r = (t.double() + 1.2 * (r.double() - t.double())).to(r.dtype)  # reference a bit worse: KL > 0, not clamped
    labels = torch.tensor([True, False, True, True, False, False, True], device=DEVICE)
    x64 = leaf64(x)
    want, kl = kto_oracle(x64, r, t, labels, 1000.0, 1.0, 1.33)
    loss, metrics = diffusion_kto_loss(x, r, t, labels, undesirable_weight=1.33, backend=backend)
    check(loss, want, x, x64, dtype, loss_rtol=1e-4)
    assert abs(metrics["kl"].item() - kl.item()) < 1e-6
    # the written-out loss with a KL that is *not* detached has another gradient: the test can tell
    alt, _ = kto_oracle(x64, r, t, labels, 1000.0, 1.0, 1.33, detach_kl=False)
    assert kl.item() > 0
    (ga,) = torch.autograd.grad(alt, x64)
    (gw,) = torch.autograd.grad(want, x64)
    assert (ga - gw).abs().max() > 50 * tol(torch.float32) * gw.abs().max()  # far outside the fp32 bound


def test_diffusion_kto_kl_clamp_and_override():
    x, r, t = make((6, 2, 4, 4), seed=32)
    labels = torch.tensor([True, False, True, False, True, True], device=DEVICE)
    # reference worse than the policy on every image: mean g > 0, KL is that mean
    worse = t + 3 * (r - t)
    _, m = diffusion_kto_loss(x, worse, t, labels)
    g = mse64(worse, t) - mse64(x, t)
    assert g.mean() > 0 and abs(m["kl"].item() - g.mean().item()) < 1e-6
    # reference better than the policy: mean g < 0, KL clamps to 0
    better = t + (r - t) / 3
    loss, m = diffusion_kto_loss(x, better, t, labels, beta=100.0)
    assert m["kl"].item() == 0.0
    x64 = leaf64(x)
    check(loss, kto_oracle(x64, better, t, labels, 100.0, 1.0, 1.0)[0], x, x64, torch.float32)
    # a given KL (e.g. averaged over ranks) replaces the batch mean
    loss, m = diffusion_kto_loss(x, r, t, labels, beta=100.0, kl=torch.tensor(0.002))
    g = mse64(r, t) - mse64(x64, t)
    sgn = labels.double() * 2 - 1
    check(loss, (1 - torch.sigmoid(sgn * 100.0 * (g - 0.002))).mean(), x, x64, torch.float32)
    # all undesirable: chosen reward is NaN, not an error
    _, m = diffusion_kto_loss(x, r, t, torch.zeros(6, dtype=torch.bool))
    assert math.isnan(m["rewards/chosen"].item()) and not math.isnan(m["rewards/rejected"].item())


# ---------------------------------------------------------------------------------------------
# RankDPO
# ---------------------------------------------------------------------------------------------


def rank_oracle(x64, r, t, labels, mask, beta, rank_by="labels"):
    """RankDPO's Eq. 7 over s_i = −β(m_i − r_i), written out with loops; τ from the labels
    (the paper's Eq. 6) or from the current scores (LiPO-λ)."""
    P, K = labels.shape
    flat = lambda z: z.reshape(P * K, -1)  # noqa: E731
    s = (-beta * (mse64(flat(x64), flat(t)) - mse64(flat(r), flat(t)))).view(P, K)
    total = 0
    for p in range(P):
        idx = [k for k in range(K) if mask[p, k]]
        key = s if rank_by == "scores" else labels
        order = sorted(idx, key=lambda k: (-key[p, k].item(), k))
        tau = {k: order.index(k) + 1 for k in idx}
        for i in idx:
            for j in idx:
                if labels[p, i] > labels[p, j]:
                    gi, gj = 2.0 ** labels[p, i].item() - 1, 2.0 ** labels[p, j].item() - 1
                    delta = abs(gi - gj) * abs(1 / math.log(1 + tau[i]) - 1 / math.log(1 + tau[j]))
                    total = total - delta * torch.log(torch.sigmoid(s[p, i] - s[p, j]))
    return total / P


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank_by", [None, "labels", "scores"])
def test_rank_dpo_lipo_lambda_formula(backend, rank_by):
    P, K = 3, 4
    x, r, t = make((P, K, 2, 5, 3), seed=41)
    labels = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 2.0], [2.0, 0.0, 1.0, 9.0]], device=DEVICE)
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]], device=DEVICE)
    x64 = leaf64(x)
    kw = {} if rank_by is None else {"rank_by": rank_by}
    loss, metrics = rank_dpo_loss(x, r, t, labels, list_mask=mask, beta=2500.0, backend=backend, **kw)
    want = rank_oracle(x64, r, t, labels, mask, 2500.0, rank_by=rank_by or "labels")  # the paper's by default
    check(loss, want, x, x64, torch.float32, loss_rtol=1e-4)
    assert torch.autograd.grad(loss, x)[0][2, 3].abs().max() == 0  # padding gets no gradient
    assert "mse/model_chosen" in metrics and "logps/chosen" not in metrics


def test_rank_dpo_weights_follow_the_labels_not_the_model_order():
    # The paper's Δ (τ from the labels) is fixed per list: with logits z_i = s_i, the loss is
    # Σ Δij·softplus(−(z_i − z_j)) with Δ from the labels alone, whatever order the model
    # puts the images in. Ranking by scores agrees only when the model's order is the labels'.
    labels = torch.tensor([[0.9, 0.6, 0.4, 0.1]], dtype=torch.float64)
    g = 2.0 ** labels[0] - 1
    inv_d = 1 / torch.log1p(torch.arange(1.0, 5.0, dtype=torch.float64))
    delta = (g[:, None] - g[None, :]).abs() * (inv_d[:, None] - inv_d[None, :]).abs()
    better = labels[0][:, None] > labels[0][None, :]
    for z in ([3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 1.0, 0.0]):
        s = torch.tensor([z], dtype=torch.float64)
        want = (delta * F.softplus(-(s[0][:, None] - s[0][None, :])))[better].sum()
        by_labels = listwise_loss(s, None, labels, beta=1.0, rank_by="labels")[0]
        torch.testing.assert_close(by_labels, want, rtol=1e-12, atol=0)
        by_scores = listwise_loss(s, None, labels, beta=1.0)[0]
        assert (torch.isclose(by_scores, want, rtol=1e-12, atol=0)) == (z == [3.0, 2.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="rank_by"):
        listwise_loss(s, None, labels, rank_by="model")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_dpo_with_two_images_is_diffusion_dpo(backend):
    B = 3
    x, r, t = make((2 * B, 3, 5, 7), seed=42)
    lists = lambda z: z.view(2, B, *z.shape[1:]).transpose(0, 1)  # noqa: E731  [2B] → [B, 2] (winner, loser)
    labels = torch.tensor([[1.0, 0.0]] * B, device=DEVICE)
    want = diffusion_dpo_loss(x, r, t, beta=5000.0, convention="original", backend=backend)[0]
    for kw in (dict(normalize_lambda=True), dict(loss_type="pairwise")):
        got = rank_dpo_loss(lists(x), lists(r), lists(t), labels, beta=2500.0, backend=backend, **kw)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x, retain_graph=True)[0],
                                   rtol=1e-5, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Import hygiene
# ---------------------------------------------------------------------------------------------


def test_importing_and_cpu_use_do_not_import_triton():
    import os
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from prefops.losses import diffusion_dpo_loss, diffusion_mse\n"
            "print('after import', 'triton' in sys.modules)\n"
            "x = torch.randn(4, 3, 2, 2, requires_grad=True)\n"
            "diffusion_dpo_loss(x, torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))[0].backward()\n"
            "print('after cpu loss', 'triton' in sys.modules)\n"
            "try:\n"
            "    diffusion_mse(x, None, x.detach(), backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "after import False" in out and "after cpu loss False" in out
    assert "TRITON_INTERPRET=1" in out  # CPU tensors with backend='triton' say how to enable it
