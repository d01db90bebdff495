"""prefops' DPO-family losses against TRL's own loss code (trl from PyPI, run through
tests/trl_harness.py): values, gradients and metrics, fp32 and bf16, odd shapes, masked tokens."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_harness import trl_dpo_loss  # noqa: E402

from prefops.losses import dpo_loss, ld_dpo_weights, weighted_sequence_logps, wpo_pair_weights  # noqa: E402

SHARED = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
          "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


def batch(B, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cm = torch.zeros(2 * B, T)
    for i in range(2 * B):  # prompt of 1-3 tokens, completion of random length, right padding
        start = int(torch.randint(1, 4, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        cm[i, start:end] = 1
    mask = cm[:, 1:]  # TRL shifts: token t+1 is predicted at position t
    lp = (-torch.rand(2 * B, T - 1, generator=g) * 4 * mask).to(dtype)
    lsp = (-torch.rand(2 * B, T - 1, generator=g) * 2).to(dtype)
    ref = (torch.randn(2 * B, generator=g) * 3 - 10).to(dtype)
    return cm, mask.bool(), lp, lsp, ref[:B], ref[B:]


def prefops_side(lp, mask, ref_c, ref_r, *, ld_alpha=None, use_weighting=False, lsp=None, loss_type="sigmoid", **kw):
    w = mask.to(lp.dtype) if ld_alpha is None else ld_dpo_weights(mask, ld_alpha).to(lp.dtype)
    seq = weighted_sequence_logps(lp, w)
    B = lp.shape[0] // 2
    lengths = mask.sum(1).to(lp.dtype)
    types = [loss_type] if isinstance(loss_type, str) else loss_type
    extra = {}
    if "sft" in types:
        extra["chosen_token_logps_mean"] = lp[:B][mask[:B]].mean()
    if use_weighting:
        extra["sample_weights"] = wpo_pair_weights(lp, lsp, mask)
    return dpo_loss(seq[:B], seq[B:], ref_c, ref_r, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
                    loss_type=loss_type, **extra, **kw)


def compare(kw_common, trl_kw, ours_kw, dtype=torch.float32, B=5, T=13, seed=0):
    cm, mask, lp0, lsp, ref_c, ref_r = batch(B, T, dtype, seed)
    lp_t = lp0.clone().requires_grad_()
    lp_o = lp0.clone().requires_grad_()
    # the model's log-probs carry no gradient off the completion
    loss_t, met_t = trl_dpo_loss(lp_t * mask, cm, ref_c, ref_r, log_sum_sq_probs=lsp, **kw_common, **trl_kw)
    loss_o, met_o = prefops_side(lp_o, mask, ref_c, ref_r, lsp=lsp, **kw_common, **ours_kw)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss_o.float(), loss_t.float(), **tol)
    (gt,) = torch.autograd.grad(loss_t, lp_t)
    (go,) = torch.autograd.grad(loss_o, lp_o)
    torch.testing.assert_close(go.float(), gt.float(), **tol)
    for k, v in met_t.items():
        assert abs(float(met_o[k]) - v) <= (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, abs(v)), k
    return loss_o


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", SHARED)
def test_each_trl_loss_type(loss_type, dtype):
    ls = 0.1 if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else 0.0
    compare(dict(beta=0.3, loss_type=loss_type, label_smoothing=ls), {}, {}, dtype=dtype,
            seed=SHARED.index(loss_type))


@pytest.mark.parametrize("f_div,alpha", [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                                         ("alpha_divergence", 1.0)])
def test_f_divergences(f_div, alpha):
    compare(dict(beta=0.2, loss_type="sigmoid"), dict(f_divergence_type=f_div, f_alpha=alpha),
            dict(f_divergence=f_div, f_alpha=alpha))


def test_alpha_divergence_default_alpha_is_trls():
    # Neither side is given alpha: prefops' default must be TRL's (0.5); with 1.0 the
    # alpha-divergence scores reduce to reverse KL and the loss silently becomes plain DPO.
    compare(dict(beta=0.2, loss_type="sigmoid"), dict(f_divergence_type="alpha_divergence"),
            dict(f_divergence="alpha_divergence"))


@pytest.mark.parametrize("types,weights", [(["sigmoid", "sft"], [1.0, 0.5]),
                                           (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
                                           (["hinge", "ipo"], [1.0, 2.0])])
def test_combined_loss_types(types, weights):
    compare(dict(beta=0.1, loss_type=types, loss_weights=weights), {}, {})


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_matches_trl(alpha):
    compare(dict(beta=0.1, loss_type="sigmoid", ld_alpha=alpha), {}, {}, B=4, T=17)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_wpo_weighting_matches_trl(loss_type):
    compare(dict(beta=0.1, loss_type=loss_type, use_weighting=True), {}, {})


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kw", [dict(loss_type="sigmoid"), dict(loss_type="ipo"), dict(loss_type=["sigmoid", "sft"]),
                                dict(loss_type="apo_zero", ld_alpha=0.5)])
def test_fused_linear_head_against_trl(backend, kw):
    """Through a small linear head: TRL gets per-token log-probs from full logits (autograd through
    log_softmax), prefops computes them fused; the losses and the gradients of hidden and weight agree."""
    from prefops.losses import dpo_loss_from_hidden

    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 10, 12, 40
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 3
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(2 * B):
        targets[i, : 1 + i % 3] = -100
        targets[i, T - i % 4:] = -100
    mask = targets != -100
    ref = torch.randn(2 * B, generator=g) - 30
    h_t, w_t = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp = torch.log_softmax(h_t @ w_t.T, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    cm = torch.cat([torch.zeros(2 * B, 1), mask.float()], dim=1)  # TRL's unshifted completion mask
    loss_t, _ = trl_dpo_loss(lp, cm, ref[:B], ref[B:], beta=0.1, **kw)
    h_o, w_o = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_o, _ = dpo_loss_from_hidden(h_o, w_o, targets, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
                                     beta=0.1, backend=backend, **kw)
    torch.testing.assert_close(loss_o, loss_t, atol=1e-5, rtol=1e-5)
    for a, e in zip(torch.autograd.grad(loss_o, [h_o, w_o]), torch.autograd.grad(loss_t, [h_t, w_t])):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
