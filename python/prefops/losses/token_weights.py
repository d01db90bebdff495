"""Per-token weights and per-pair weights computed from token-level quantities.

Batch layout everywhere in prefops' fused losses: rows [0, B) are the chosen responses and rows
[B, 2B) the rejected ones (TRL's concatenated batch); ``mask`` is 1 on completion tokens.
"""

from __future__ import annotations

import torch

__all__ = ["ld_dpo_weights", "tabpo_diff_weights", "tgdpo_token_weights", "wpo_pair_weights", "weighted_sequence_logps",
           "tokenized_pair_batch"]


def _halves(x: torch.Tensor):
    if x.shape[0] % 2:
        raise ValueError(f"expected a [2B, ...] batch of chosen then rejected rows, got {x.shape[0]} rows")
    return x.chunk(2, dim=0)


def ld_dpo_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO: completion token k (k = cumsum of the mask) weighs 1 while k ≤ min(|y_w|, |y_l|) of
    its pair, α after; 0 off the completion. ``mask`` is [2B, T]; returns [2B, T]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    m = mask.to(torch.float32)
    pos = m.cumsum(dim=1)
    lens = m.sum(dim=1)
    lc, lr = _halves(lens)
    shared = torch.minimum(lc, lr).repeat(2)[:, None]
    return m * torch.where(pos <= shared, torch.ones_like(pos), torch.full_like(pos, alpha))


def tabpo_diff_weights(targets: torch.Tensor, mask: torch.Tensor, factor: float = 1.2) -> torch.Tensor:
    """TAB-PO token weights: 1 on completion tokens, × ``factor`` where the chosen and rejected
    completions hold different token ids at the same completion position (aligned by k, the
    index within the completion). Positions past the shorter completion have nothing to differ
    from and stay 1, as in the TAB-PO source (``_apply_diff_weight`` compares k < min(|c|, |r|)).
    ``targets`` and ``mask`` are [2B, T]; returns [2B, T] float weights (0 off the completion)."""
    m = mask.bool()
    B2, T = targets.shape
    pos = m.long().cumsum(dim=1) - 1  # completion index of each token (valid where m)
    lens = m.sum(dim=1)
    max_len = int(lens.max()) if B2 else 0
    # Completion tokens packed to the left: [2B, max_len], -1 beyond each completion.
    packed = torch.full((B2, max(max_len, 1)), -1, dtype=torch.long, device=targets.device)
    rows = torch.arange(B2, device=targets.device)[:, None].expand(B2, T)
    packed[rows[m], pos[m]] = targets[m].long()
    pc, pr = _halves(packed)
    differs = ((pc != pr) & (pc >= 0) & (pr >= 0)).repeat(2, 1)  # [2B, max_len], within both completions
    w = torch.zeros(B2, T, dtype=torch.float32, device=targets.device)
    w[m] = torch.where(differs[rows[m], pos[m]], factor, 1.0).to(torch.float32)
    return w


@torch.no_grad()
def wpo_pair_weights(token_logps: torch.Tensor, log_sum_p2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO (TRL ``use_weighting``): w(y) = exp(mean over completion tokens of logp − log Σ_v p_v²),
    per pair w(y_w)·w(y_l), without gradient. Inputs [2B, T]; returns [B]."""
    m = mask.to(token_logps.dtype)
    mean = ((token_logps - log_sum_p2) * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    wc, wr = _halves(torch.exp(mean))
    return wc * wr


def weighted_sequence_logps(token_logps: torch.Tensor, weights: torch.Tensor, normalize: bool = False):
    """Σ_t w_t·logp_t per row, or Σ w·logp / Σ w with ``normalize`` (0 for rows without weight)."""
    w = weights.to(token_logps.dtype)
    total = (token_logps * w).sum(dim=1)
    if not normalize:
        return total
    wsum = w.sum(dim=1)
    return total / torch.where(wsum == 0, torch.ones_like(wsum), wsum)


@torch.no_grad()
def tgdpo_token_weights(reward_token_logps: torch.Tensor, ref_token_logps: torch.Tensor, mask: torch.Tensor, *,
                        alpha: float = 0.5, beta: float = 0.1) -> torch.Tensor:
    """TGDPO token guidance: r̂_t = rm_t − ref_t from a frozen token-level reward model (any
    DPO-trained model); weights 1 + αβ·r̂_t on the chosen rows and 1 − αβ·r̂_t on the rejected rows,
    detached, 0 off the completion. With ``dpo_loss_from_hidden(token_weights=...)`` and a
    per-token reference (``ref_hidden``) this gives −log σ(Σ β(1+αβ r̂ʷ)Δʷ − Σ β(1−αβ r̂ˡ)Δˡ)."""
    r_hat = (reward_token_logps - ref_token_logps).float()
    rc, rr = _halves(r_hat)
    w = torch.cat([1 + alpha * beta * rc, 1 - alpha * beta * rr], dim=0)
    return w * mask.to(w.dtype)


def tokenized_pair_batch(rows, *, pad_token_id: int = 0, ignore_index: int = -100,
                         diff_factor: float = 1.2) -> dict:
    """Pad rows of ``prefops.tokenize_pairs`` (a pyarrow Table or a list of dicts) into the
    fused losses' batch: rows [0, B) chosen, [B, 2B) rejected, right-padded to one length T.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` [2B, T] (TRL's collator
    layout); ``targets`` [2B, T−1] = ``input_ids[:, 1:]`` with ``ignore_index`` off the
    completion (the hidden state at position t predicts token t+1, so pass ``hidden[:, :-1]``);
    ``diff_mask`` [2B, T−1] aligned with ``targets``; ``token_weights`` [2B, T−1] = TAB-PO's raw
    weights, 1 on completion targets and ``diff_factor`` where the aligned chosen/rejected
    tokens differ; ``shared_length`` [B] (LD-DPO's l_p)."""
    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    seqs, completion, diff = [], [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            seqs.append(list(r["prompt_ids"]) + list(r[f"{side}_ids"]))
            completion.append(list(r[f"{side}_completion_mask"]))
            diff.append(list(r[f"{side}_diff_mask"]))
    T = max((len(s) for s in seqs), default=0)

    def pad(lists, value):
        return torch.tensor([x + [value] * (T - len(x)) for x in lists], dtype=torch.long).reshape(len(lists), T)

    input_ids = pad(seqs, pad_token_id)
    attention = pad([[1] * len(s) for s in seqs], 0)
    completion_mask = pad(completion, 0)
    diff_mask = pad(diff, 0)[:, 1:]
    target_mask = completion_mask[:, 1:].bool()
    targets = input_ids[:, 1:].masked_fill(~target_mask, ignore_index)
    weights = target_mask.to(torch.float32) * (1.0 + (diff_factor - 1.0) * diff_mask.to(torch.float32))
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion_mask,
        "targets": targets,
        "diff_mask": diff_mask,
        "token_weights": weights,
        "shared_length": torch.tensor([int(r["shared_length"]) for r in rows], dtype=torch.long),
    }
