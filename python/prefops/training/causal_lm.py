"""Preference losses on transformers causal LMs, through the fused op (logits never built).

    collate = PreferenceCollator(tokenizer, max_length=512)
    batch = collate(rows)                      # rows: prefops prep output (prompt/chosen/rejected)
    loss, metrics = causal_lm_preference_loss(model, batch, ref_model=ref, beta=0.1)
    loss.backward()

The batch layout is TRL's (``DPODataCollator``): ``input_ids`` [2B, T] with the B chosen rows
first, ``attention_mask``, ``completion_mask`` (1 on completion tokens of ``input_ids``), and
optionally ``ref_chosen_logps`` / ``ref_rejected_logps`` [B] (precomputed reference), or a
padding-free pack: ``input_ids`` [1, N] with ``position_ids`` restarting at 0 per sequence (all
chosen sequences, then all rejected ones) and no ``attention_mask``.

The model runs its backbone only (``model.model``, ``model.transformer``, ...: whatever
``base_model_prefix`` names); the last hidden states and ``lm_head.weight`` go to
``prefops.losses``. Tied embeddings need nothing special (the head's weight is the embedding
parameter, so its gradient accumulates there). Logit scaling and soft-capping from the config
(Gemma-2/3 ``final_logit_softcapping``, Cohere ``logit_scale``, Granite ``logits_scaling``) are
applied inside the op. PEFT models: unless ``ref_model`` is given, the reference is the same model
with its "ref" adapter active (TRL's copy of an adapter being re-trained) or with its adapters
disabled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from prefops.losses.fused import dpo_loss_from_hidden, simpo_loss_from_hidden
from prefops.ops.token_logprobs import token_logprobs
from prefops.training._adapters import is_peft_model, reference_adapters, strip_wrappers

__all__ = [
    "LMHead", "PreferenceCollator", "causal_lm_preference_loss", "completion_lengths", "completion_targets",
    "last_hidden_states", "lm_head_of", "load_reference_logps", "precompute_reference_logps", "reference_logps",
]

IGNORE_INDEX = -100
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "pair_id", "token_weights",
                   "sample_weights", "labels"}


# ----------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LMHead:
    """What the fused op needs of a causal LM's output layer."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    temperature: float = 1.0  # logits are divided by it
    logit_softcap: Optional[float] = None


def _unwrap(model):
    """The transformers model under DDP / PEFT wrappers (LoRA layers stay injected in it)."""
    model = strip_wrappers(model)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def lm_head_of(model) -> LMHead:
    """The output layer of a causal LM as (weight, bias, temperature, soft-cap)."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no output embeddings (lm_head): not a causal LM?")
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise ValueError("the lm_head carries a LoRA adapter; the fused loss reads lm_head.weight directly, so "
                         "leave lm_head out of the adapter's target_modules (or merge the adapter first)")
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"unsupported lm_head {type(head).__name__}: expected a Linear-like module with .weight")
    cfg = getattr(inner, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    temperature, softcap = 1.0, None
    if cfg is not None:
        softcap = getattr(cfg, "final_logit_softcapping", None) or None
        scale = _logit_scale(cfg)
        if scale != 1.0:
            if softcap is not None:
                raise ValueError(f"{getattr(cfg, 'model_type', type(inner).__name__)}: a logit multiplier before "
                                 "the soft-cap is not supported by the fused op (it scales after the cap)")
            temperature = 1.0 / scale
    return LMHead(head.weight, getattr(head, "bias", None), temperature, softcap)


def _logit_scale(cfg) -> float:
    """What the model multiplies its logits by, read as TRL 1.16 reads it: Cohere's
    ``logit_scale``, Muse's ``output_multiplier``, Falcon-H1's ``lm_head_multiplier``, else
    ``logits_scaling`` (HyperCLOVA X multiplies by it; Granite and MiniCPM3 divide)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(cfg, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def _backbone(inner):
    prefix = getattr(inner, "base_model_prefix", "")
    backbone = getattr(inner, prefix, None) if prefix else None
    return backbone if isinstance(backbone, torch.nn.Module) and backbone is not inner else None


def _is_wrapped(model) -> bool:
    """DDP / FSDP1 wrappers (``.module``) and FSDP2 roots (``fully_shard``): their forward must run
    (it gathers parameters and sets up gradient synchronisation)."""
    if strip_wrappers(model) is not model:
        return True
    return any(type(m).__name__.startswith("FSDP") for m in (model, _unwrap(model)))


def last_hidden_states(model, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None, **model_kwargs) -> torch.Tensor:
    """The final hidden states [N, T, H] (after the final norm), without computing logits.

    Runs the backbone (``model.model`` etc.). A DDP-style wrapper (``.module``) and models
    without a backbone attribute run whole, through the wrapper's forward so that its gradient
    synchronisation is set up, with ``output_hidden_states=True`` and ``logits_to_keep=1`` (one
    logit per row). For a padding-free pack pass ``position_ids`` and no ``attention_mask``:
    transformers then masks attention per sequence.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                  **model_kwargs)
    backbone = None if _is_wrapped(model) else _backbone(_unwrap(model))
    if backbone is not None:
        out = backbone(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    out = model(**kwargs, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


# ----------------------------------------------------------------------------------------- batch


def completion_targets(input_ids: torch.Tensor, completion_mask: torch.Tensor, *,
                       attention_mask: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The label shift: targets[:, t] = input_ids[:, t+1] where token t+1 is a completion token,
    else ``ignore_index``; the last position predicts nothing. In a pack (``position_ids``), the
    last token of one sequence never predicts the first of the next."""
    keep = completion_mask[:, 1:].bool()
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    if position_ids is not None:
        keep &= position_ids[:, 1:] != 0
    targets = torch.full_like(input_ids, ignore_index)
    targets[:, :-1] = torch.where(keep, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], ignore_index))
    return targets


def _pack_segments(position_ids: torch.Tensor):
    """Start and end offsets of the sequences of a padding-free pack (each starts at position 0)."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("position_ids of a padding-free batch must start at 0 for every sequence")
    return starts, torch.cat([starts[1:], starts.new_tensor([pos.numel()])])


def _unpack(hidden: torch.Tensor, targets: torch.Tensor, position_ids: torch.Tensor, extra=None):
    """A padding-free pack [1, N, ...] → padded rows [S, T_max, ...] (one per sequence, in order)."""
    if hidden.shape[0] != 1:
        raise ValueError(f"a padding-free batch is one packed row, got {hidden.shape[0]} rows")
    pos = position_ids.reshape(-1)
    starts, ends = _pack_segments(position_ids)
    lengths = ends - starts
    T = int(lengths.max())
    col = torch.arange(T, device=pos.device)
    valid = col[None, :] < lengths[:, None]
    src = (starts[:, None] + col[None, :]).clamp(max=pos.numel() - 1)
    h = hidden[0][src]  # [S, T, H]; gradients flow back through the gather
    t = torch.where(valid, targets[0][src], torch.full_like(src, IGNORE_INDEX))
    e = None if extra is None else torch.where(valid, extra[0][src], torch.zeros_like(extra[0][src]))
    return h, t, e


def _model_inputs(batch: Mapping[str, Any]):
    return {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}


def _is_packed(batch) -> bool:
    return (batch.get("attention_mask") is None and batch.get("position_ids") is not None
            and batch["input_ids"].shape[0] == 1)


def completion_lengths(batch: Mapping[str, Any]) -> torch.Tensor:
    """Completion tokens per sequence, [2B], counted as TRL counts them for "ipo" and
    "sigmoid_norm": every completion token, also one at position 0 (an empty prompt and no BOS)
    that nothing predicts and so is not scored."""
    mask = batch["completion_mask"]
    if not _is_packed(batch):
        return mask.sum(dim=1)
    starts, ends = _pack_segments(batch["position_ids"])
    total = torch.cat([mask.new_zeros(1), mask.reshape(-1).cumsum(0)])
    return total[ends] - total[starts]


def _hidden_and_targets(model, batch, token_weights=None):
    kwargs = _model_inputs(batch)
    input_ids = kwargs.pop("input_ids")
    hidden = last_hidden_states(model, input_ids, **kwargs)
    if hidden.shape[1] != input_ids.shape[1]:  # prompt-learning PEFT prepends virtual tokens
        hidden = hidden[:, -input_ids.shape[1]:]
    pos = batch.get("position_ids")
    packed = _is_packed(batch)
    targets = completion_targets(input_ids, batch["completion_mask"], attention_mask=batch.get("attention_mask"),
                                 position_ids=pos if packed else None)
    if packed:
        hidden, targets, token_weights = _unpack(hidden, targets, pos, token_weights)
    return hidden, targets, token_weights


def _shifted_weights(batch):
    w = batch.get("token_weights")  # aligned with input_ids, like completion_mask
    if w is None:
        return None
    out = torch.zeros_like(w, dtype=torch.float32)
    out[:, :-1] = w[:, 1:].float()
    return out


@contextlib.contextmanager
def _eval_mode(module):
    """The reference runs without dropout (TRL prepares it in eval mode); its mode is restored."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _whole(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t  # an FSDP2 DTensor shard


@contextlib.contextmanager
def _reference_head(ref_model, source, dtype: torch.dtype):
    """The reference's output layer, whole and in the dtype of its hidden states.

    A sharded reference runs under no_grad, so FSDP frees its root parameters right after its
    forward, before the fused loss reads lm_head.weight: FSDP1's root unit is gathered again
    (``summon_full_params(recurse=False)``, full precision under mixed precision, hence the
    cast); under FSDP2 only the head's shards are (``full_tensor``), not the whole root, which
    is the whole model as TRL shards a reference."""
    gather = contextlib.nullcontext()
    if ref_model is not None and _is_fsdp1(ref_model):
        gather = type(ref_model).summon_full_params(ref_model, recurse=False, writeback=False)
    with gather:
        with torch.no_grad():  # only the gather and cast; the caller's loss keeps its graph
            head = lm_head_of(source)
            bias = _whole(head.bias)
            head = dataclasses.replace(head, weight=_whole(head.weight).to(dtype),
                                       bias=bias.to(dtype) if bias is not None else None)
        yield head


def _reference_context(model, ref_model):
    if ref_model is not None:
        return ref_model, _eval_mode(ref_model)
    if is_peft_model(model):
        return model, reference_adapters(model)
    return None, None


# ------------------------------------------------------------------------------------------ loss


def _is_fsdp1(model) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


def run_inside_forward(wrapper, fn):
    """``fn(inner)`` run as the forward of the module that ``wrapper`` wraps, and its result.

    Sharded wrappers gather parameters only inside their forward, and FSDP1 frees the root's
    parameters again right after it; a fused loss that reads ``lm_head.weight`` itself must
    therefore run there. Outputs get the wrapper's backward hooks (FSDP1 gathers the weight
    again for backward). Under DeepSpeed ZeRO-3 the weight is also registered as an external
    parameter of the model, so that the engine's forward gathers it (not tested here: no
    DeepSpeed in CI).
    """
    inner = wrapper.module
    if hasattr(getattr(lm_head_of(inner), "weight", None), "ds_id"):  # ZeRO-3 partitioned parameter
        from deepspeed.zero import register_external_parameter

        register_external_parameter(inner, lm_head_of(inner).weight)
    inner.forward = lambda *args, **kwargs: fn(inner)  # the instance attribute shadows the class method
    try:
        return wrapper()
    finally:
        del inner.forward


def causal_lm_preference_loss(
    model,
    batch: Mapping[str, Any],
    *,
    ref_model=None,
    loss: str = "dpo",
    reference_free: bool = False,
    backend: str = "auto",
    chunk_elements: Optional[int] = None,
    **loss_kwargs,
):
    """A preference loss of a causal LM on one collated batch, hidden states → loss.

    Args:
        model: a transformers causal LM (optionally PEFT- or DDP-wrapped); gradients flow into it.
        batch: TRL's layout (see the module docstring); ``token_weights`` (aligned with
            ``input_ids``) and ``sample_weights`` [B] are used when present.
        ref_model: the frozen reference. Not needed when the batch carries precomputed
            ``ref_chosen_logps`` / ``ref_rejected_logps`` or ``model`` is a PEFT model (then the
            reference is its adapter named "ref" if it has one, as TRL sets up, else ``model``
            with its adapters disabled).
        loss: ``"dpo"`` (every ``prefops.losses.dpo_loss`` type, LD-DPO, WPO, token weights)
            or ``"simpo"`` (no reference).
        reference_free: DPO against a zero reference (no reference model at all).
        loss_kwargs: passed on to ``dpo_loss_from_hidden`` / ``simpo_loss_from_hidden``
            (``beta``, ``loss_type``, ``label_smoothing``, ``ld_alpha``, ...).

    Returns:
        (loss, metrics), metrics TRL-named and detached.
    """
    if _is_fsdp1(model) or type(model).__name__ == "DeepSpeedEngine":
        return run_inside_forward(model, lambda inner: causal_lm_preference_loss(
            inner, batch, ref_model=ref_model, loss=loss, reference_free=reference_free, backend=backend,
            chunk_elements=chunk_elements, **loss_kwargs))
    hidden, targets, token_weights = _hidden_and_targets(model, batch, _shifted_weights(batch))
    head = lm_head_of(model)  # after the forward: FSDP2 roots keep their parameters gathered until backward
    common = dict(bias=head.bias, temperature=head.temperature, logit_softcap=head.logit_softcap, backend=backend,
                  chunk_elements=chunk_elements)
    if loss == "simpo":
        return simpo_loss_from_hidden(hidden, head.weight, targets, **common, **loss_kwargs)
    if loss != "dpo":
        raise ValueError(f"loss must be 'dpo' or 'simpo', got {loss!r}")
    loss_kwargs.setdefault("completion_lengths", completion_lengths(batch))
    if token_weights is not None:
        loss_kwargs["token_weights"] = token_weights
    if batch.get("sample_weights") is not None:
        loss_kwargs.setdefault("sample_weights", batch["sample_weights"])

    ref = {}
    if batch.get("ref_chosen_logps") is not None:
        ref = dict(ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"])
    elif not reference_free:
        ref_source, context = _reference_context(model, ref_model)
        if ref_source is None:
            raise ValueError("no reference: pass ref_model=, precomputed ref_chosen_logps/ref_rejected_logps in the "
                             "batch (see precompute_reference_logps), a PEFT model, or reference_free=True")
        with torch.no_grad(), context:
            ref_hidden, _, _ = _hidden_and_targets(ref_source, batch)
        with _reference_head(ref_model, ref_source, ref_hidden.dtype) as ref_head:
            return dpo_loss_from_hidden(hidden, head.weight, targets, **common, ref_hidden=ref_hidden,
                                        ref_weight=ref_head.weight, ref_bias=ref_head.bias, **loss_kwargs)
    return dpo_loss_from_hidden(hidden, head.weight, targets, **common, **ref, **loss_kwargs)


@torch.no_grad()
def reference_logps(ref_model, batch: Mapping[str, Any], *, model=None, ld_alpha: Optional[float] = None,
                    backend: str = "auto", chunk_elements: Optional[int] = None):
    """Per-sequence reference log-probs (chosen [B], rejected [B]) of one batch, in fp32.

    ``ref_model=None`` with a PEFT ``model``: the model with its adapters disabled. ``ld_alpha``:
    LD-DPO weighting of the reference (tokens past the pair's shorter completion weigh α)."""
    from prefops.losses.token_weights import ld_dpo_weights, weighted_sequence_logps

    source, context = _reference_context(model, ref_model)
    if source is None:
        raise ValueError("reference_logps needs ref_model= (or a PEFT model= to disable adapters on)")
    with context:
        hidden, targets, _ = _hidden_and_targets(source, batch)
    with _reference_head(ref_model, source, hidden.dtype) as head:
        out = token_logprobs(hidden, head.weight, targets, bias=head.bias, temperature=head.temperature,
                             logit_softcap=head.logit_softcap, backend=backend, chunk_elements=chunk_elements)
    mask = targets != IGNORE_INDEX
    weights = mask.float() if ld_alpha is None else ld_dpo_weights(mask, ld_alpha).float() * mask
    return weighted_sequence_logps(out.logps, weights, False).chunk(2)


# ------------------------------------------------------------------------------------- collation


def _as_text_or_messages(value, field: str, index: int):
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(m, Mapping) for m in value)):
        return value
    raise ValueError(f"row {index}: field {field!r} must be a string or a list of chat messages, "
                     f"got {type(value).__name__}")


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PreferenceCollator:
    """Rows of ``prefops prep`` output (or any prompt/chosen/rejected records; text or
    conversational) → a tokenized batch in TRL's layout.

    Args:
        tokenizer: a transformers tokenizer (for conversational rows it needs a chat template).
        max_length: prompt + completion tokens per sequence; completions are cut at the end.
        max_prompt_length: prompts longer than this keep their last tokens.
        padding_free: one packed row with ``position_ids`` instead of padded rows.
        reference_logps: ``{pair_id: (ref_chosen, ref_rejected)}`` from
            ``load_reference_logps``; every row then needs a ``pair_id``.
        add_eos: append the tokenizer's EOS to each text completion unless it already ends with
            it (as TRL does; chat templates end turns themselves).

    The ids are TRL 1.16's (for conversational rows, as long as they carry no ``tools`` or
    ``chat_template_kwargs``, which TRL passes to the template and this collator does not):
    the prompt and prompt + completion are each encoded whole, and the
    completion starts where those diverge (for chosen and rejected alike), so tokens that merge
    across the boundary belong to the completion. When that cuts into the prompt, a warning
    says so once (as TRL's does).
    """

    def __init__(self, tokenizer, *, max_length: Optional[int] = None, max_prompt_length: Optional[int] = None,
                 padding_free: bool = False, reference_logps: Optional[Mapping[Any, tuple]] = None,
                 add_eos: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.padding_free = padding_free
        self.reference_logps = reference_logps
        self.add_eos = add_eos
        self._warned_prompt_cut = False
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        self.pad_token_id = pad

    def _split(self, prompt, completions):
        """Prompt ids and each completion's ids, split where prompt and prompt + completion diverge."""
        tok = self.tokenizer
        if isinstance(prompt, list):  # conversational: the template renders prompt and prompt+completion
            def render(messages, **kw):
                ids = tok.apply_chat_template(messages, tokenize=True, **kw)
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

            prompt_ids = render(prompt, add_generation_prompt=True)
            fulls = [render(prompt + c) for c in completions]
        else:
            eos = tok.eos_token
            if self.add_eos and eos:
                completions = [c if c.endswith(eos) else c + eos for c in completions]
            prompt_ids = list(tok(prompt)["input_ids"])
            fulls = [list(tok(prompt + c)["input_ids"]) for c in completions]
        cut = min(_common_prefix_length(prompt_ids, f) for f in fulls)
        if cut < len(prompt_ids) and not self._warned_prompt_cut:
            self._warned_prompt_cut = True
            warnings.warn(f"the tokenized prompt is not a prefix of the tokenized prompt + completion (tokens merge "
                          f"across the boundary, or the chat template renders the prompt differently alone); the "
                          f"completion starts where they diverge, so {tok.decode(prompt_ids[cut:])!r} at the end "
                          f"of the prompt is left out, as TRL does. Shown once per collator.", stacklevel=3)
        return prompt_ids[:cut], [f[cut:] for f in fulls]

    def _sequence(self, prompt_ids, completion_ids):
        if self.max_prompt_length is not None:
            prompt_ids = prompt_ids[-self.max_prompt_length:] if self.max_prompt_length > 0 else []
        ids = prompt_ids + completion_ids
        mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        if self.max_length is not None:
            ids, mask = ids[:self.max_length], mask[:self.max_length]
        return ids, mask

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        seqs = {"chosen": [], "rejected": []}
        for i, row in enumerate(rows):
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise ValueError(f"row {i}: missing field {key!r} (have {sorted(row)})")
            prompt = _as_text_or_messages(row["prompt"], "prompt", i)
            completions = []
            for side in ("chosen", "rejected"):
                completion = _as_text_or_messages(row[side], side, i)
                if isinstance(prompt, list) != isinstance(completion, list):
                    raise ValueError(f"row {i}: prompt and {side} must both be text or both be messages")
                completions.append(completion)
            prompt_ids, completion_ids = self._split(prompt, completions)
            for side, ids in zip(("chosen", "rejected"), completion_ids):
                ids, mask = self._sequence(prompt_ids, ids)
                if not any(mask):
                    raise ValueError(f"row {i}: field {side!r} has no tokens left after truncation "
                                     f"(max_length={self.max_length})")
                seqs[side].append((ids, mask))
        ordered = seqs["chosen"] + seqs["rejected"]
        if self.padding_free:
            batch = {
                "input_ids": torch.tensor([[t for ids, _ in ordered for t in ids]]),
                "completion_mask": torch.tensor([[m for _, mask in ordered for m in mask]]),
                "position_ids": torch.tensor([[p for ids, _ in ordered for p in range(len(ids))]]),
            }
        else:
            T = max(len(ids) for ids, _ in ordered)
            n = len(ordered)
            input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
            attention = torch.zeros((n, T), dtype=torch.long)
            completion = torch.zeros((n, T), dtype=torch.long)
            for r, (ids, mask) in enumerate(ordered):  # right padding
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attention[r, :len(ids)] = 1
                completion[r, :len(ids)] = torch.tensor(mask)
            batch = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
        if self.reference_logps is not None:
            try:
                ref = [self.reference_logps[row["pair_id"]] for row in rows]
            except KeyError as e:
                raise ValueError(f"no precomputed reference log-probs for pair_id {e.args[0]!r}") from None
            batch["ref_chosen_logps"] = torch.tensor([r[0] for r in ref], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([r[1] for r in ref], dtype=torch.float32)
        if all("pair_id" in row for row in rows):
            batch["pair_id"] = [row["pair_id"] for row in rows]
        return batch


# ------------------------------------------------------------------------- reference precompute


def _batches(rows: Sequence[Mapping[str, Any]], size: int):
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def precompute_reference_logps(ref_model, rows: Union[Sequence[Mapping[str, Any]], Any], collator: PreferenceCollator,
                               path: Union[str, os.PathLike], *, batch_size: int = 8, model=None,
                               ld_alpha: Optional[float] = None, device: Optional[Union[str, torch.device]] = None,
                               progress: Optional[bool] = None, backend: str = "auto") -> Path:
    """Run the reference once over ``rows`` and store per-pair log-probs in a Parquet file
    (columns ``pair_id``, ``ref_chosen_logps``, ``ref_rejected_logps``; written atomically:
    a failed run leaves no file). ``rows`` may be a list of dicts or a pyarrow Table (prefops
    prep output); every row needs a unique ``pair_id``. Load it with ``load_reference_logps``
    and hand the mapping to ``PreferenceCollator(reference_logps=...)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    ids = [row.get("pair_id") for row in rows]
    if any(i is None for i in ids):
        raise ValueError("every row needs a pair_id to key its reference log-probs")
    if len(set(ids)) != len(ids):
        raise ValueError("pair_id values are not unique")
    if collator.reference_logps is not None:
        raise ValueError("the collator already attaches reference log-probs")
    path = Path(path)
    show = progress if progress is not None else os.isatty(2)
    chosen, rejected = [], []
    n_batches = math.ceil(len(rows) / batch_size)
    for i, chunk in enumerate(_batches(rows, batch_size)):
        batch = collator(chunk)
        if device is not None:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        c, r = reference_logps(ref_model, batch, model=model, ld_alpha=ld_alpha, backend=backend)
        chosen += c.float().cpu().tolist()
        rejected += r.float().cpu().tolist()
        if show:
            print(f"\rreference log-probs: batch {i + 1}/{n_batches}", end="", file=sys.stderr)
    if show:
        print(file=sys.stderr)
    table = pa.table({"pair_id": ids, "ref_chosen_logps": pa.array(chosen, pa.float32()),
                      "ref_rejected_logps": pa.array(rejected, pa.float32())})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def load_reference_logps(path: Union[str, os.PathLike]) -> dict:
    """``{pair_id: (ref_chosen_logps, ref_rejected_logps)}`` from ``precompute_reference_logps``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"pair_id", "ref_chosen_logps", "ref_rejected_logps"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: not a reference log-prob file (missing columns {sorted(missing)})")
    cols = table.to_pydict()
    return dict(zip(cols["pair_id"], zip(cols["ref_chosen_logps"], cols["ref_rejected_logps"])))
