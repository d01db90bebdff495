"""PrefopsDPOTrainer against TRL's own DPOTrainer on the same model, batch and config."""

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from prefops.demo import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from prefops.training.trl_trainer import PrefopsDPOTrainer  # noqa: E402

ROWS = [
    dict(prompt="Human: what is two plus two?\n\nAssistant:", chosen=" four, it is four.", rejected=" I will not."),
    dict(prompt="Human: name a fruit\n\nAssistant:", chosen=" an apple", rejected=" a brown fox jumps over it"),
    dict(prompt="Human: hi", chosen=" hello there, how can I help?", rejected=" go away"),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer([r[k] for r in ROWS for k in r] * 5, vocab_size=200)


def _trainers(tok, tmp_path, ref=True, model=None, **config):
    model = model if model is not None else tiny_causal_lm(len(tok), seed=0)
    ref_model = tiny_causal_lm(len(tok), seed=1) if ref else None
    # float32 (DPOConfig defaults to bf16): exact parity; bf16 has its own test below.
    config = {"bf16": False, **config}
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", **config)
    ds = datasets.Dataset.from_list(ROWS)
    stock = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=ref_model, args=args, train_dataset=ds,
                           processing_class=tok)
    ours = PrefopsDPOTrainer(model=copy.deepcopy(model), ref_model=ref_model, args=args, train_dataset=ds,
                             processing_class=tok)
    return stock, ours


def _compare(stock, ours):
    batch = next(iter(stock.get_train_dataloader()))
    a = stock.compute_loss(stock.model, batch)
    b = ours.compute_loss(ours.model, batch)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(a.item()))
    for (n, p), (_, q) in zip(stock.model.named_parameters(), ours.model.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n
    # Every metric TRL logs, the per-token ones (entropy, logits/*, mean_token_accuracy) included.
    names = set(stock._metrics["train"])
    assert {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"} <= names
    assert set(ours._metrics["train"]) >= names, names - set(ours._metrics["train"])
    for name in sorted(names):
        assert ours._metrics["train"][name][-1] == pytest.approx(stock._metrics["train"][name][-1], rel=1e-5,
                                                                 abs=1e-5), name


@pytest.mark.parametrize("config", [
    dict(beta=0.2),
    dict(beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(beta=0.3, loss_type=["ipo"]),
    dict(beta=0.1, ld_alpha=0.5),
    dict(beta=0.1, use_weighting=True),
    dict(beta=0.1, f_divergence_type="js_divergence"),
])
def test_loss_and_grads_equal_trl(tok, tmp_path, config):
    _compare(*_trainers(tok, tmp_path, **config))


def _fitted_lm(tok, steps=60):
    """The tiny LM after some language-model steps on the rows: peaked predictions that get
    some targets right (a random one is near uniform and never top-1)."""
    model = tiny_causal_lm(len(tok), seed=0)
    batch = tok([r["prompt"] + r[k] for r in ROWS for k in ("chosen", "rejected")], padding=True,
                return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_token_metrics_equal_trl_on_a_model_that_predicts_tokens(tok, tmp_path):
    stock, ours = _trainers(tok, tmp_path, model=_fitted_lm(tok), beta=0.1)
    _compare(stock, ours)
    logged = stock._metrics["train"]
    assert 0.1 < logged["mean_token_accuracy"][-1] < 0.95, logged["mean_token_accuracy"]
    assert logged["entropy"][-1] < 0.8 * math.log(len(tok)), logged["entropy"]


def test_precomputed_reference_equals_trl(tok, tmp_path):
    stock, ours = _trainers(tok, tmp_path, beta=0.1, precompute_ref_log_probs=True)
    _compare(stock, ours)


def test_peft_reference_equals_trl(tok, tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = tiny_causal_lm(len(tok), seed=0)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[],
                         use_cpu=True, save_strategy="no", beta=0.1, bf16=False)
    ds = datasets.Dataset.from_list(ROWS)
    stock = trl.DPOTrainer(model=peft.get_peft_model(copy.deepcopy(base), lora), args=args, train_dataset=ds,
                           processing_class=tok)
    ours = PrefopsDPOTrainer(model=peft.get_peft_model(copy.deepcopy(base), lora), args=args, train_dataset=ds,
                             processing_class=tok)
    ours.model.load_state_dict(stock.model.state_dict())  # same random LoRA init
    _compare(stock, ours)


def test_mixed_precision_runs_the_backbones_in_bf16_as_trl_does(tok, tmp_path):
    # Accelerate's bf16 autocast wraps model.forward, which prefops bypasses to reach the
    # backbone: the trainer must enter it itself. One real training step each, separate references.
    model, ref_model = tiny_causal_lm(len(tok), seed=0), tiny_causal_lm(len(tok), seed=1)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", beta=0.2, bf16=True)
    ds = datasets.Dataset.from_list(ROWS)
    losses, dtypes = [], []
    for cls in (trl.DPOTrainer, PrefopsDPOTrainer):
        t = cls(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref_model), args=args, train_dataset=ds,
                processing_class=tok)
        seen = []
        for m in (t.model, t.ref_model):
            m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
        t.train()
        losses.append([h["loss"] for h in t.state.log_history if "loss" in h][0])
        dtypes.append(set(seen))
    assert dtypes[0] == dtypes[1] == {torch.bfloat16}, dtypes
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)


def test_trainer_trains(tok, tmp_path):
    _, ours = _trainers(tok, tmp_path, beta=0.1)
    ours.train()
    steps = [h for h in ours.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert "rewards/accuracies" in steps[0]


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_length_normalised_losses_count_an_unpredicted_first_completion_token_as_trl(tok, tmp_path, loss_type):
    # An empty prompt puts a completion token at position 0, which nothing predicts: TRL still
    # counts it in the length that "ipo" and "sigmoid_norm" divide by (completion_mask.sum).
    from tokenizers import processors

    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # no BOS
    rows = [dict(r, prompt="") for r in ROWS[:2]] + ROWS[2:]
    model, ref_model = tiny_causal_lm(len(tok), seed=0), tiny_causal_lm(len(tok), seed=1)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", beta=0.3, loss_type=[loss_type],
                         bf16=False)
    ds = datasets.Dataset.from_list(rows)
    stock = trl.DPOTrainer(model=copy.deepcopy(model), ref_model=ref_model, args=args, train_dataset=ds,
                           processing_class=tok)
    ours = PrefopsDPOTrainer(model=copy.deepcopy(model), ref_model=ref_model, args=args, train_dataset=ds,
                             processing_class=tok)
    batch = next(iter(stock.get_train_dataloader()))
    assert batch["completion_mask"][:, 0].any()  # the case under test is really in the batch
    _compare(stock, ours)


def test_collator_ids_equal_trl_tokenization_also_where_tokens_merge_across_the_boundary(tmp_path):
    from prefops.training import PreferenceCollator

    # A vocabulary with merges (the fixture's 200 tokens are bytes only): " fru" + "it" encode
    # whole as " fruit", a token that straddles the prompt/completion boundary.
    tok = tiny_tokenizer([r[k] for r in ROWS for k in r] * 5, vocab_size=400)
    rows = ROWS + [dict(prompt="Human: name a fru", chosen="it, an apple", rejected="it fox")]
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                         use_cpu=True, save_strategy="no", bf16=False)
    stock = trl.DPOTrainer(model=tiny_causal_lm(len(tok), seed=0), ref_model=tiny_causal_lm(len(tok), seed=1),
                           args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    with pytest.warns(UserWarning, match="not a prefix"):
        batch = PreferenceCollator(tok)(rows)
    cut = 0
    for i, row in enumerate(stock.train_dataset):
        for s, side in enumerate(("chosen", "rejected")):
            r = s * len(rows) + i
            n = int(batch["attention_mask"][r].sum())
            assert batch["input_ids"][r, :n].tolist() == row["prompt_ids"] + row[f"{side}_ids"], (i, side)
            assert batch["completion_mask"][r, :n].tolist() == ([0] * len(row["prompt_ids"])
                                                                + [1] * len(row[f"{side}_ids"])), (i, side)
        cut += len(tok(rows[i]["prompt"])["input_ids"]) - len(row["prompt_ids"])
    assert cut > 0  # the merge case really cut into the prompt
