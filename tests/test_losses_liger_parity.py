"""prefops' fused DPO against Liger-Kernel's LigerFusedLinearDPOLoss (liger-kernel from PyPI, its
torch chunked path, compiled=False so it runs on CPU): loss and gradients of hidden and weight."""

import pytest

torch = pytest.importorskip("torch")
liger = pytest.importorskip("liger_kernel.chunked_loss")

from prefops.losses import dpo_loss_from_hidden  # noqa: E402

LIGER_TYPES = ["sigmoid", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
               "discopop"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", LIGER_TYPES)
def test_matches_liger_fused_linear_dpo(loss_type, backend):
    g = torch.Generator().manual_seed(LIGER_TYPES.index(loss_type))
    B, T, H, V = 3, 11, 16, 53
    hidden = torch.randn(2 * B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, H, generator=g)
    targets = torch.randint(0, V, (2 * B, T), generator=g)
    targets[:, :3] = -100
    targets[1, 8:] = -100
    targets[4, 6:] = -100
    ls = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    h_l, w_l = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = liger.LigerFusedLinearDPOLoss(beta=0.1, compiled=False, use_ref_model=True, loss_type=loss_type,
                                        label_smoothing=ls)(w_l, h_l, targets, ref_input=ref_hidden, ref_weight=weight)
    loss_l = out[0] if isinstance(out, tuple) else out
    h_p, w_p = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_p, _ = dpo_loss_from_hidden(h_p, w_p, targets, ref_hidden=ref_hidden, beta=0.1, loss_type=loss_type,
                                     label_smoothing=ls, backend=backend)
    torch.testing.assert_close(loss_p, loss_l, atol=1e-5, rtol=1e-5)
    for a, e in zip(torch.autograd.grad(loss_p, [h_p, w_p]), torch.autograd.grad(loss_l, [h_l, w_l])):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
