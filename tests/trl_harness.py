"""Run TRL's own DPO loss code (trl.DPOTrainer._compute_loss, trl 1.x) on given per-token log-probs.

TRL keeps its loss inside the trainer's compute_loss, around a model forward. This harness
builds a bare DPOTrainer (no model, no dataset), sets the attributes the loss reads, and passes
a stand-in model whose forward returns the log-probs we choose, so TRL's arithmetic runs
unchanged on our inputs. Only the test suite uses it.
"""

from collections import defaultdict
from types import SimpleNamespace

import torch


class _FakeModel:
    training = True

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, **kwargs):
        return self.outputs


def trl_dpo_loss(token_logps, completion_mask, ref_chosen_logps, ref_rejected_logps, *, beta, loss_type,
                 loss_weights=None, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha=None, ld_alpha=None,
                 use_weighting=False, log_sum_sq_probs=None, discopop_tau=0.05):
    """TRL's loss and metrics. token_logps: [2B, T-1] log-probs already 0 off the completion
    (what TRL's fused lm head returns); completion_mask: [2B, T] over input_ids."""
    from trl.trainer.dpo_trainer import DPOTrainer

    if f_alpha is None:  # TRL's own default, so that defaults are compared too
        from trl import DPOConfig

        f_alpha = DPOConfig.__dataclass_fields__["f_alpha_divergence_coef"].default
    tr = object.__new__(DPOTrainer)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    attrs = dict(
        accelerator=SimpleNamespace(device=token_logps.device, gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha, loss_types=types, loss_weights=list(loss_weights or [1.0] * len(types)),
        beta=beta, label_smoothing=label_smoothing, use_weighting=use_weighting,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    for k, v in attrs.items():
        object.__setattr__(tr, k, v)
    B2, T1 = token_logps.shape
    zeros = torch.zeros(B2, T1)
    outputs = SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros(B2, T1, dtype=torch.bool),
                              log_sum_sq_probs=log_sum_sq_probs if log_sum_sq_probs is not None else zeros)
    model = _FakeModel(outputs)
    object.__setattr__(tr, "model", model)
    inputs = dict(input_ids=torch.randint(0, 100, (B2, T1 + 1)), attention_mask=torch.ones(B2, T1 + 1, dtype=torch.long),
                  completion_mask=completion_mask, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)
    loss = tr._compute_loss(model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    return loss, metrics
