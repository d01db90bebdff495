"""Preference losses. Importing this module imports torch, never triton.

Sequence-level (per-sequence log-probs in): ``dpo_loss`` (every DPO-family loss type),
``simpo_loss``, ``listwise_loss`` (LiPO-λ, pairwise, Plackett–Luce), ``kto_loss``, ``bco_loss`` /
``BCOLoss``. Fused (hidden states + lm_head weight in): ``dpo_loss_from_hidden``,
``simpo_loss_from_hidden``. Helpers for per-token and per-pair weights: ``ld_dpo_weights``,
``tabpo_diff_weights``, ``wpo_pair_weights``, ``madpo_weights``.
"""

from prefops.losses.modules import DPOLoss, SimPOLoss, TABPOLoss
from prefops.losses.listwise import LISTWISE_LOSS_TYPES, listwise_loss, pad_lists
from prefops.losses.unpaired import BCOLoss, RunningMean, bco_loss, kto_loss
from prefops.losses.diffusion import diffusion_dpo_loss, diffusion_kto_loss, diffusion_mse, rank_dpo_loss, smpo_loss
from prefops.losses.fused import dpo_loss_from_hidden, simpo_loss_from_hidden, tabpo_loss_from_hidden
from prefops.losses.pairwise import F_DIVERGENCES, LOSS_TYPES, dpo_loss, madpo_weights, preference_metrics, simpo_loss
from prefops.losses.token_weights import (
    ld_dpo_weights, tabpo_diff_weights, tgdpo_token_weights, tokenized_pair_batch, weighted_sequence_logps,
    wpo_pair_weights,
)

__all__ = [
    "DPOLoss", "SimPOLoss", "TABPOLoss",
    "BCOLoss", "LISTWISE_LOSS_TYPES", "RunningMean", "bco_loss", "kto_loss", "listwise_loss", "pad_lists",
    "F_DIVERGENCES", "LOSS_TYPES", "dpo_loss", "dpo_loss_from_hidden", "ld_dpo_weights", "madpo_weights",
    "preference_metrics", "simpo_loss", "simpo_loss_from_hidden", "tabpo_diff_weights", "tabpo_loss_from_hidden", "tgdpo_token_weights", "weighted_sequence_logps",
    "wpo_pair_weights", "tokenized_pair_batch",
    "diffusion_dpo_loss", "diffusion_kto_loss", "diffusion_mse", "rank_dpo_loss", "smpo_loss",
]
