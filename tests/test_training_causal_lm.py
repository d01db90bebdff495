"""prefops.training on real transformers models (tiny, random weights, built from configs).

The oracle is the plain transformers forward: full logits → float64 log-softmax → shifted
target gather → masked sums → the DPO formula written out here; gradients of every parameter
are compared with the helper's (hidden states → fused op → loss).
"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefops.training import (  # noqa: E402
    PreferenceCollator, causal_lm_preference_loss, completion_lengths, completion_targets, load_reference_logps, lm_head_of,
    precompute_reference_logps, reference_logps,
)
from prefops.demo import tiny_causal_lm, tiny_tokenizer  # noqa: E402

ROWS = [
    dict(pair_id=10, prompt="Human: what is two plus two?\n\nAssistant:", chosen=" four, it is four.",
         rejected=" I will not say."),
    dict(pair_id=11, prompt="Human: name a fruit\n\nAssistant:", chosen=" an apple",
         rejected=" a brown fox jumps over the lazy dog and runs"),
    dict(pair_id=12, prompt="Human: hi", chosen=" hello there, how can I help?", rejected=" go away"),
]


@pytest.fixture(scope="module")
def tok():
    texts = [r[k] for r in ROWS for k in ("prompt", "chosen", "rejected")] * 5
    return tiny_tokenizer(texts, vocab_size=200)


def _pair(tok, seed=0, tie=False, **cfg):
    policy = tiny_causal_lm(len(tok), seed=seed, tie_word_embeddings=tie, **cfg)
    ref = tiny_causal_lm(len(tok), seed=seed + 1, tie_word_embeddings=tie, **cfg)
    return policy, ref


def _oracle_seq_logps(model, batch):
    """Σ completion log-probs per row from the model's own full-logit forward, in float64."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tgt = batch["input_ids"][:, 1:]
    tok_logp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    mask = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).double()
    return (tok_logp * mask).sum(1)


def _oracle_dpo(policy, ref, batch, beta):
    s = _oracle_seq_logps(policy, batch)
    with torch.no_grad():
        r = _oracle_seq_logps(ref, batch)
    B = s.numel() // 2
    h = (s[:B] - r[:B]) - (s[B:] - r[B:])
    return -torch.nn.functional.logsigmoid(beta * h).mean()


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_completion_targets_shift_by_hand():
    ids = torch.tensor([[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    t = completion_targets(ids, comp, attention_mask=att)
    expected = []
    for r in range(2):
        row = []
        for i in range(6):
            ok = i + 1 < 6 and comp[r, i + 1] == 1 and att[r, i + 1] == 1
            row.append(int(ids[r, i + 1]) if ok else -100)
        expected.append(row)
    assert t.tolist() == expected
    # a pack: the token before a new sequence (position 0) must not predict it
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    comp = torch.ones_like(ids)
    assert completion_targets(ids, comp, position_ids=pos).tolist() == [[2, 3, -100, 5, 6, -100]]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_helper_matches_plain_forward_values_and_grads(tok, tie, backend):
    policy, ref = _pair(tok, tie=tie)
    twin = copy.deepcopy(policy)
    batch = PreferenceCollator(tok)(ROWS)
    loss, metrics = causal_lm_preference_loss(policy, batch, ref_model=ref, beta=0.3, backend=backend)
    loss.backward()
    expected = _oracle_dpo(twin, ref, batch, 0.3)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-5
    g, g_ref = _grads(policy), _grads(twin)
    assert g.keys() == g_ref.keys() and len(g) > 5
    for name in g:
        scale = g_ref[name].abs().max().item() + 1e-6
        assert (g[name] - g_ref[name]).abs().max().item() <= 2e-4 * scale + 1e-6, name
    if tie:
        assert lm_head_of(policy).weight is policy.model.embed_tokens.weight
    s = _oracle_seq_logps(twin, batch).detach()
    assert torch.allclose(metrics["logps/chosen"].double(), s[:3].mean(), atol=1e-4)
    assert torch.allclose(metrics["logps/rejected"].double(), s[3:].mean(), atol=1e-4)


@pytest.mark.parametrize("loss_type", [["sigmoid", "sft"], ["ipo", "sigmoid_norm"]])
def test_padding_free_pack_equals_padded(tok, loss_type):
    policy, ref = _pair(tok)
    twin = copy.deepcopy(policy)
    padded = PreferenceCollator(tok)(ROWS)
    packed = PreferenceCollator(tok, padding_free=True)(ROWS)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum())
    # per-sequence completion counts, read from the pack's segments and from the padded rows
    assert completion_lengths(packed).tolist() == padded["completion_mask"].sum(1).tolist()
    a, _ = causal_lm_preference_loss(policy, padded, ref_model=ref, beta=0.2, loss_type=loss_type)
    b, _ = causal_lm_preference_loss(twin, packed, ref_model=ref, beta=0.2, loss_type=loss_type)
    a.backward()
    b.backward()
    assert abs(a.item() - b.item()) < 1e-5
    for (n, p), (_, q) in zip(policy.named_parameters(), twin.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_precomputed_reference_round_trip(tok, tmp_path):
    policy, ref = _pair(tok)
    collate = PreferenceCollator(tok)
    path = precompute_reference_logps(ref, ROWS, collate, tmp_path / "ref.parquet", batch_size=2, progress=False)
    table = load_reference_logps(path)
    assert sorted(table) == [10, 11, 12]
    oracle = _oracle_seq_logps(ref, collate(ROWS)).detach()
    for i, pid in enumerate([10, 11, 12]):
        assert abs(table[pid][0] - oracle[i].item()) < 1e-4
        assert abs(table[pid][1] - oracle[3 + i].item()) < 1e-4
    with_ref = PreferenceCollator(tok, reference_logps=table)(ROWS)
    a, _ = causal_lm_preference_loss(policy, with_ref, beta=0.1)
    b, _ = causal_lm_preference_loss(policy, collate(ROWS), ref_model=ref, beta=0.1)
    assert abs(a.item() - b.item()) < 1e-5
    with pytest.raises(ValueError, match="pair_id 99"):
        PreferenceCollator(tok, reference_logps=table)([dict(ROWS[0], pair_id=99)])


def test_precompute_failure_leaves_no_file(tok, tmp_path):
    _, ref = _pair(tok)
    rows = ROWS + [dict(pair_id=13, prompt="x", chosen=None, rejected="y")]
    with pytest.raises(ValueError, match="row 1: field 'chosen'"):
        precompute_reference_logps(ref, rows, PreferenceCollator(tok), tmp_path / "ref.parquet", batch_size=2,
                                   progress=False)
    assert list(tmp_path.iterdir()) == []


def test_no_reference_is_an_error_and_reference_free_works(tok):
    policy, _ = _pair(tok)
    batch = PreferenceCollator(tok)(ROWS)
    with pytest.raises(ValueError, match="no reference"):
        causal_lm_preference_loss(policy, batch)
    loss, _ = causal_lm_preference_loss(policy, batch, reference_free=True, beta=0.5)
    s = _oracle_seq_logps(policy, batch)
    expected = -torch.nn.functional.logsigmoid(0.5 * (s[:3] - s[3:])).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


def test_reference_runs_without_dropout_and_keeps_its_mode(tok):
    policy, ref = _pair(tok)
    for layer in ref.model.layers:
        layer.self_attn.attention_dropout = 0.5  # active only in training mode
    batch = PreferenceCollator(tok)(ROWS)
    ref.train()
    losses = [causal_lm_preference_loss(policy, batch, ref_model=ref, beta=0.5)[0].item() for _ in range(3)]
    assert ref.training  # restored
    ref.eval()
    in_eval = causal_lm_preference_loss(policy, batch, ref_model=ref, beta=0.5)[0].item()
    assert not ref.training
    assert losses == [in_eval] * 3


@pytest.mark.parametrize("attrs,temperature", [
    ({}, 1.0),
    ({"logit_scale": 0.5}, 2.0),                                  # Cohere: logits × 0.5
    ({"logits_scaling": 4.0}, 4.0),                               # Granite / MiniCPM3: logits ÷ 4
    ({"logits_scaling": 4.0, "model_type": "hyperclovax"}, 0.25),  # HyperCLOVA X: logits × 4
    ({"lm_head_multiplier": 4.0}, 0.25),                          # Falcon-H1
    ({"output_multiplier": 4.0}, 0.25),                           # Muse, without a soft-cap
])
def test_lm_head_reads_each_family_logit_scale(tok, attrs, temperature):
    from prefops.training.causal_lm import lm_head_of

    model = tiny_causal_lm(len(tok), seed=0)
    for k, v in attrs.items():
        setattr(model.config, k, v)
    assert lm_head_of(model).temperature == pytest.approx(temperature)
    model.config.final_logit_softcapping = 30.0
    if temperature != 1.0:  # a multiplier before the cap: refused rather than applied after it
        with pytest.raises(ValueError, match="before the soft-cap"):
            lm_head_of(model)


def test_collator_adds_one_eos(tok):
    eos = tok.eos_token
    with_eos = PreferenceCollator(tok)([dict(prompt="Human: hi", chosen=" hello" + eos, rejected=" go away")])
    plain = PreferenceCollator(tok)([dict(prompt="Human: hi", chosen=" hello", rejected=" go away")])
    assert torch.equal(with_eos["input_ids"], plain["input_ids"])
    row = plain["input_ids"][0][plain["attention_mask"][0].bool()].tolist()
    assert row.count(tok.eos_token_id) == 1 and row[-1] == tok.eos_token_id


def test_simpo_through_helper(tok):
    policy, _ = _pair(tok)
    batch = PreferenceCollator(tok)(ROWS)
    loss, _ = causal_lm_preference_loss(policy, batch, loss="simpo", beta=2.0, gamma_beta_ratio=0.25)
    s = _oracle_seq_logps(policy, batch)
    n = (batch["completion_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum(1).double()
    avg = s / n
    expected = -torch.nn.functional.logsigmoid(2.0 * (avg[:3] - avg[3:]) - 0.5).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


def test_softcapped_model_matches_its_own_logits(tok):
    """Gemma-2 caps its final logits; the op must apply the same cap."""
    cfg = transformers.Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=3.0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg)
    with torch.no_grad():  # large logits so the cap matters
        model.lm_head.weight.mul_(40.0)
    head = lm_head_of(model)
    assert head.logit_softcap == 3.0
    batch = PreferenceCollator(tok)(ROWS)
    c, r = reference_logps(model, batch)
    oracle = _oracle_seq_logps(model, batch)
    assert torch.allclose(torch.cat([c, r]).double(), oracle, atol=1e-4)


def test_peft_reference_is_base_model(tok):
    peft = pytest.importorskip("peft")
    base, _ = _pair(tok)
    frozen = copy.deepcopy(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    batch = PreferenceCollator(tok)(ROWS)
    a, _ = causal_lm_preference_loss(model, batch, beta=0.1)  # reference: adapters disabled
    a.backward()
    b, _ = causal_lm_preference_loss(model, batch, ref_model=frozen, beta=0.1)
    assert abs(a.item() - b.item()) < 1e-6
    assert a.item() != pytest.approx(math.log(2), abs=1e-4)  # the LoRA weights do move the policy
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    head_lora = peft.get_peft_model(tiny_causal_lm(len(tok), seed=3),
                                    peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="LoRA adapter"):
        causal_lm_preference_loss(head_lora, batch, beta=0.1)


def test_collator_conversational_and_errors(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    rows = [dict(prompt=[{"role": "user", "content": "name a fruit"}],
                 chosen=[{"role": "assistant", "content": "an apple"}],
                 rejected=[{"role": "assistant", "content": "a fox"}])]
    batch = PreferenceCollator(tok)(rows)
    ids, comp = batch["input_ids"][0], batch["completion_mask"][0].bool()
    assert tok.decode(ids[comp]).strip() == "an apple"
    assert "name a fruit" in tok.decode(ids[~comp & batch["attention_mask"][0].bool()])
    with pytest.raises(ValueError, match="row 0: missing field 'rejected'"):
        PreferenceCollator(tok)([dict(prompt="a", chosen="b")])
    with pytest.raises(ValueError, match="no tokens left"):
        PreferenceCollator(tok, max_length=2)([dict(prompt="a long prompt here", chosen="b", rejected="c")])
    short = PreferenceCollator(tok, max_prompt_length=3)([ROWS[0]])
    assert (short["completion_mask"][0] == 0).logical_and(short["attention_mask"][0] == 1).sum() == 3


def test_dpo_training_learns_a_synthetic_preference():
    """Chosen completions use tokens 3..9, rejected 10..16: DPO must teach that to a tiny LM,
    on held-out pairs too."""
    gen = torch.Generator().manual_seed(0)

    def make_batch(n):
        T_p, T_c = 4, 6
        prompt = torch.randint(20, 40, (n, T_p), generator=gen)
        good = torch.randint(3, 10, (n, T_c), generator=gen)
        bad = torch.randint(10, 17, (n, T_c), generator=gen)
        ids = torch.cat([torch.cat([prompt, good], 1), torch.cat([prompt, bad], 1)])
        comp = torch.zeros_like(ids)
        comp[:, T_p:] = 1
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=comp)

    policy = tiny_causal_lm(48, seed=0)
    ref = copy.deepcopy(policy).eval()
    held_out = make_batch(32)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)

    def evaluate():
        with torch.no_grad():
            loss, m = causal_lm_preference_loss(policy, held_out, ref_model=ref, beta=0.1)
        return loss.item(), m["rewards/accuracies"].item()

    loss0, acc0 = evaluate()
    assert abs(loss0 - math.log(2)) < 1e-4  # policy == reference at the start
    for _ in range(25):
        loss, _ = causal_lm_preference_loss(policy, make_batch(16), ref_model=ref, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, acc1 = evaluate()
    assert loss1 < 0.5 * loss0
    assert acc1 >= 0.95


def test_an_unscored_first_completion_token_counts_for_ipo_but_not_for_the_nll_mean(tok):
    # Empty prompts and no BOS: each completion's first token sits at position 0 and is not
    # scored. TRL's IPO / sigmoid_norm divide by all completion tokens; the NLL mean is over the
    # scored ones.
    from tokenizers import processors

    tok = copy.deepcopy(tok)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")  # no BOS
    policy, ref = _pair(tok)
    batch = PreferenceCollator(tok)([dict(r, prompt="") for r in ROWS])
    assert bool(batch["completion_mask"][:, 0].all())
    s = _oracle_seq_logps(policy, batch).detach()
    with torch.no_grad():
        r = _oracle_seq_logps(ref, batch)
    n_all = batch["completion_mask"].sum(1).double()
    n_scored = n_all - 1
    assert completion_lengths(batch).tolist() == n_all.tolist()
    B = s.numel() // 2
    beta = 0.3
    nll, _ = causal_lm_preference_loss(policy, batch, ref_model=ref, beta=beta, loss_type="nll_mean")
    assert nll.item() == pytest.approx(-(s[:B] / n_scored[:B]).mean().item(), rel=1e-5)
    ipo, _ = causal_lm_preference_loss(policy, batch, ref_model=ref, beta=beta, loss_type="ipo")
    d = (s[:B] - r[:B]) / n_all[:B] - (s[B:] - r[B:]) / n_all[B:]
    assert ipo.item() == pytest.approx(((d - 1 / (2 * beta)) ** 2).mean().item(), rel=1e-5)
