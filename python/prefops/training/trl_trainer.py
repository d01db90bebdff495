"""prefops losses inside TRL's ``DPOTrainer`` (trl ≥ 1.16): a drop-in subclass.

    from prefops.training.trl_trainer import PrefopsDPOTrainer
    trainer = PrefopsDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=ds,
                                processing_class=tokenizer)
    trainer.train()

Everything else is TRL's (dataset preparation, collator, reference precompute, logging,
checkpoints); only the loss computation is replaced: the policy and reference run their backbones
and the loss comes from the last hidden states and ``lm_head.weight`` through
``prefops.training.causal_lm_preference_loss``, so the [2B, T, V] logits are never built. The
DPOConfig knobs are honoured: ``beta``, ``loss_type`` (one or several) with ``loss_weights``,
``label_smoothing``, ``f_divergence_type`` / ``f_alpha_divergence_coef``, ``ld_alpha``,
``use_weighting`` (WPO), ``discopop_tau``, ``precompute_ref_log_probs``, PEFT references.
Importing this module imports trl.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from prefops.training.causal_lm import _model_inputs, causal_lm_preference_loss

__all__ = ["PrefopsDPOTrainer"]


class PrefopsDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the loss computed by prefops' fused op.

    Extra keyword: ``prefops_backend`` ("auto", "torch" or "triton") for the log-prob op."""

    def __init__(self, *args, prefops_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.prefops_backend = prefops_backend
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError("PrefopsDPOTrainer does not add MoE router aux losses; set DPOConfig(router_aux_loss_coef=0) "
                             "or turn output_router_logits off in the model config")

    def _prefops_loss_kwargs(self) -> dict:
        return dict(
            beta=self.beta, loss_type=list(self.loss_types), loss_weights=list(self.loss_weights),
            label_smoothing=self.label_smoothing, f_divergence=self.f_divergence_type,
            f_alpha=self.f_alpha_divergence_coef, ld_alpha=self.ld_alpha, use_wpo_weighting=self.use_weighting,
            discopop_tau=self.args.discopop_tau,
        )

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        ref_model = None
        if not self.precompute_ref_logps and self.ref_model is not None:
            ref_model = self.ref_model
        # Accelerate applies mixed precision by wrapping model.forward; the backbones are called
        # directly here, so enter its autocast explicitly (bf16=True, DPOConfig's default).
        with self.accelerator.autocast():
            loss, metrics = causal_lm_preference_loss(model, inputs, ref_model=ref_model, token_metrics=True,
                                                      backend=self.prefops_backend, **self._prefops_loss_kwargs())
        gather = self.accelerator.gather_for_metrics
        for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                     "logps/rejected"):
            if name in metrics:
                self._metrics[mode][name].append(gather(metrics[name].reshape(1)).float().mean().item())
        # Token means are weighted by each process's token count, as TRL sums tokens over processes.
        chosen, rejected = metrics["tokens/chosen"], metrics["tokens/rejected"]
        for name, count in (("entropy", chosen + rejected), ("logits/chosen", chosen),
                            ("logits/rejected", rejected), ("mean_token_accuracy", chosen)):
            sums = gather(torch.stack([metrics[name] * count, count]).reshape(1, 2)).sum(0)
            self._metrics[mode][name].append((sums[0] / sums[1]).item() if sums[1] > 0 else 0.0)
        if mode == "train":
            tokens = gather(inputs["attention_mask"].sum()).sum().item() if "attention_mask" in inputs else 0
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            with torch.no_grad():
                outputs = model(**_model_inputs(inputs))
            return loss, outputs
        return loss
