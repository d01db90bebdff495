"""The tokenize step against an independent reference built on the Python `tokenizers` package,
TRL 1.16's own DPO tokenization, and the LD-DPO / TAB-PO losses it feeds.

Tokenizers are trained here on the bundled HH-RLHF sample (no network): a GPT-2-like byte-level
BPE, a Llama-like BPE that adds BOS (with a tokenizer_config.json naming its EOS), and a
BERT-like WordPiece ([CLS] … [SEP])."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import prefops

HH_PAIRS = None


def hh_pairs():
    global HH_PAIRS
    if HH_PAIRS is None:
        # The sample has a few empty responses: skipped, as prep reports.
        HH_PAIRS = prefops.prep(prefops.sample_path("hh"), skip_invalid=True).table
    return HH_PAIRS


def _texts():
    t = hh_pairs()
    return [x for c in ("prompt", "chosen", "rejected") for x in t.column(c).to_pylist()]


def _byte_level(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(), trainer)
    tok.save(str(path))
    return path


def _llama_like(path):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(path))
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def _wordpiece(path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                        show_progress=False)
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.save(str(path))
    return path


# name -> (builder, EOS token for eos_token="auto" when a tokenizer_config.json is beside it, else given)
KINDS = {"byte_level": (_byte_level, "<|endoftext|>"), "llama_like": (_llama_like, "</s>"),
         "wordpiece": (_wordpiece, "[SEP]")}


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    out = {}
    for name, (build, _) in KINDS.items():
        d = tmp_path_factory.mktemp(name)
        out[name] = build(d / "tokenizer.json")
    return out


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def reference(rows, path, *, add_special_tokens=True, eos=None, max_prompt_length=None, max_completion_length=None,
              split="joint", cuts=None):
    """ALGORITHMS.md by hand: ids per TRL's text path (split="joint": prompt and prompt + completion
    + EOS text encoded, split at the shorter common prefix; "separate": each text on its own, EOS id
    appended), then the length limits; |y| = Σ m_t, l_p = min(|y_w|, |y_l|), a completion token
    differs when the other completion has no token or another one at its index. ``cuts``, a list,
    gets each row's number of prompt tokens the joint split left out."""
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    eos_id = None if eos is None else tok.token_to_id(eos)
    out = []
    for prompt, chosen, rejected in rows:
        p = tok.encode(prompt, add_special_tokens=add_special_tokens).ids
        comps = []
        for text in (chosen, rejected):
            if split == "joint":
                if eos is not None and not text.endswith(eos):
                    text += eos
                ids = tok.encode(prompt + text, add_special_tokens=add_special_tokens).ids
            else:
                ids = tok.encode(text, add_special_tokens=False).ids
                if eos_id is not None and (not ids or ids[-1] != eos_id):
                    ids = ids + [eos_id]
            comps.append(ids)
        if split == "joint":
            n = min(_common_prefix(p, ids) for ids in comps)
            if cuts is not None:
                cuts.append(len(p) - n)
            p, comps = p[:n], [ids[n:] for ids in comps]
        if max_prompt_length is not None and len(p) > max_prompt_length:
            p = p[len(p) - max_prompt_length:]
        if max_completion_length is not None:
            comps = [ids[:max_completion_length] for ids in comps]
        c, r = comps
        mask = lambda ids: [0] * len(p) + [1] * len(ids)
        lengths = (sum(mask(c)), sum(mask(r)))
        # TAB-PO: 1 where both completions have token k and they differ (k < min(|a|, |b|)).
        differ = lambda a, b: [0] * len(p) + [int(k < len(b) and a[k] != b[k]) for k in range(len(a))]
        out.append({
            "prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
            "chosen_completion_mask": mask(c), "rejected_completion_mask": mask(r),
            "shared_length": min(lengths),
            "chosen_diff_mask": differ(c, r), "rejected_diff_mask": differ(r, c),
        })
    return out


COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_completion_mask", "rejected_completion_mask",
           "shared_length", "chosen_diff_mask", "rejected_diff_mask"]


def made(table):
    return table.select(COLUMNS).to_pylist()


def triples(table):
    return list(zip(*(table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))))


SPLITS = ["joint", "separate"]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("options", [
    {},
    {"max_prompt_length": 16, "max_completion_length": 8},
    {"add_special_tokens": False, "eos_token": None},
])
def test_matches_reference_on_hh(tokenizers_dir, kind, options, split):
    path = tokenizers_dir[kind]
    pairs = hh_pairs()
    r = prefops.tokenize_pairs(pairs, path, split=split, **options)
    eos = options.get("eos_token", "auto")
    if eos == "auto":
        eos = "</s>" if kind == "llama_like" else None  # only it has a tokenizer_config.json
    cuts = []
    want = reference(triples(pairs), path, add_special_tokens=options.get("add_special_tokens", True), eos=eos,
                     max_prompt_length=options.get("max_prompt_length"),
                     max_completion_length=options.get("max_completion_length"), split=split, cuts=cuts)
    assert made(r.table) == want
    assert r.table.select(pairs.column_names).equals(pairs)  # input columns kept as they were
    s = r.stats
    assert s["rows"] == len(want) == pairs.num_rows
    assert s["eos_token"] == eos
    assert s["split"] == split
    assert s["boundary_cut_prompts"] == sum(n > 0 for n in cuts)
    assert s["boundary_cut_tokens"] == sum(cuts)
    if kind == "wordpiece" and split == "joint" and options.get("add_special_tokens", True):
        # The prompt's own [SEP] is never a prefix of prompt + completion [SEP]: every row loses it.
        assert s["boundary_cut_prompts"] == pairs.num_rows
        assert s["boundary_cut_first"] == {"row": 0, "text": "[SEP]", "tokens": ["[SEP]"]}
        assert "prompt end cut" in r.summary() and "'[SEP]'" in r.summary()
    elif s["boundary_cut_prompts"] == 0:
        assert s["boundary_cut_first"] is None and "prompt end cut" not in r.summary()
    assert s["prompt_tokens"] == sum(len(w["prompt_ids"]) for w in want)
    assert s["tokens"] == sum(len(w[k]) for w in want for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert s["mean_shared_length"] == pytest.approx(sum(w["shared_length"] for w in want) / len(want))
    if "max_prompt_length" in options:
        assert all(len(w["prompt_ids"]) <= 16 and len(w["chosen_ids"]) <= 8 for w in want)
        assert s["truncated_prompts"] > 0 and s["truncated_chosen"] > 0
    else:
        assert s["truncated_prompts"] == s["truncated_chosen"] == s["truncated_rejected"] == 0
    if kind == "wordpiece" and options == {}:  # [CLS] first (a cut prompt keeps its end, not its [CLS])
        first = want[0]["prompt_ids"]
        assert first[0] == Tokenizer.from_file(str(path)).token_to_id("[CLS]")


def test_eos_given_and_types(tokenizers_dir):
    pairs = hh_pairs().slice(0, 50)
    path = tokenizers_dir["byte_level"]
    r = prefops.tokenize_pairs(pairs, path, eos_token="<|endoftext|>", threads=2)
    assert made(r.table) == reference(triples(pairs), path, eos="<|endoftext|>")
    eos_id = Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>")
    assert all(ids[-1] == eos_id for ids in r.table.column("chosen_ids").to_pylist())
    assert r.table.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert r.table.schema.field("chosen_diff_mask").type == pa.list_(pa.int8())
    assert r.table.schema.field("shared_length").type == pa.int32()
    assert "tokenize" in r.summary() and "EOS '<|endoftext|>' (given)" in r.summary()


def trl_ids(path, eos, rows):
    """(prompt_ids, chosen_ids, rejected_ids) per row from TRL 1.16's own
    ``DPOTrainer._prepare_dataset`` (text path: EOS text appended, prompt and prompt + completion
    tokenized, split at the common prefix), run on a stub trainer."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=eos)
    ds = Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(("prompt", "chosen", "rejected"))})
    stub = SimpleNamespace(_tokenizer=tok, _is_vision_dataset=False)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    out = trl_dpo.DPOTrainer._prepare_dataset(stub, ds, tok, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in out]


def ids(table):
    return list(zip(*(table.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))))


@pytest.mark.parametrize("kind", list(KINDS))
def test_trl_parity(tokenizers_dir, kind):
    """The default (joint) split gives TRL 1.16's ids on every row, for a byte-level, a
    Llama-like (BOS) and a BERT-like ([CLS] … [SEP]: TRL drops the prompt's [SEP]) tokenizer."""
    path, eos = tokenizers_dir[kind], KINDS[kind][1]
    pairs = hh_pairs().slice(0, 120)
    want = trl_ids(path, eos, triples(pairs))
    ours = prefops.tokenize_pairs(pairs, path, eos_token=eos).table
    assert len(want) == ours.num_rows == 120
    for i, (a, b) in enumerate(zip(want, ids(ours))):
        assert a == b, f"row {i}"
    # TRL's collator builds the same completion masks from these columns.
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from prefops.losses import tokenized_pair_batch

    batch = trl_dpo.DataCollatorForPreference(pad_token_id=0)(ours.slice(0, 4).to_pylist())
    mine = tokenized_pair_batch(ours.slice(0, 4))
    assert batch["completion_mask"].tolist() == mine["completion_mask"].tolist()
    assert batch["input_ids"].tolist() == mine["input_ids"].tolist()


def merging_rows(eos):
    """Pairs whose tokens merge across the prompt/completion boundary, and one that already ends
    with the EOS text."""
    return [
        ("Human: hi\n\nAssistant: ", "Hello there.", " Hi!"),  # prompt ends in a space: only chosen merges
        ("Human: finish the word\n\nAssistant: The answ", "er is 42", "er was 41"),  # mid-word
        ("Q: 2+2=", "4", "5"),                                           # no whitespace at the boundary
        ("Human: say done\n\nAssistant:", f" done{eos}", " ok"),        # already ends with the EOS text
        ("Café au lait, naï", "ve 日本語 🙂", " résumé"),                  # unicode, mid-word
        ("Human: x\n\nAssistant:", " Sure", " No"),                     # clean boundary
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_joint_matches_trl_where_tokens_merge(tokenizers_dir, kind):
    """Where tokens merge across the boundary only the joint split reproduces TRL; this is why
    it is the default. The separate split still equals its own reference."""
    path, eos = tokenizers_dir[kind], KINDS[kind][1]
    rows = merging_rows(eos)
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(("prompt", "chosen", "rejected"))})
    want = trl_ids(path, eos, rows)
    joint = prefops.tokenize_pairs(table, path, eos_token=eos)
    assert ids(joint.table) == want
    assert made(joint.table) == reference(rows, path, eos=eos)
    eos_id = Tokenizer.from_file(str(path)).token_to_id(eos)
    done = joint.table.column("chosen_ids").to_pylist()[3]
    # No second EOS (the BERT-like post-processor adds its own [SEP] after the text's).
    assert done[-1] == eos_id and done.count(eos_id) == (2 if kind == "wordpiece" else 1)
    # The stats count what TRL left out: rows, and prompt tokens (several in a row for some).
    full = [len(Tokenizer.from_file(str(path)).encode(r[0]).ids) for r in rows]
    lost = [n - len(w[0]) for n, w in zip(full, want)]
    assert joint.stats["boundary_cut_prompts"] == sum(n > 0 for n in lost) > 0
    assert joint.stats["boundary_cut_tokens"] == sum(lost)
    assert joint.stats["boundary_cut_first"]["row"] == next(i for i, n in enumerate(lost) if n)
    assert "prompt end cut" in joint.summary()

    separate = prefops.tokenize_pairs(table, path, eos_token=eos, split="separate")
    assert made(separate.table) == reference(rows, path, eos=eos, split="separate")
    differ = [i for i, (a, b) in enumerate(zip(ids(separate.table), want)) if a != b]
    assert differ, "separate encoding should differ from TRL where tokens merge"
    assert 1 in differ  # the mid-word prompt merges with "er" for every one of these tokenizers
    if kind != "wordpiece":  # (BertPreTokenizer splits on whitespace: nothing merges with a space)
        # Row 0: chosen absorbs the prompt's trailing space, rejected does not; both completions
        # start at the shorter common prefix, so the rejected one starts with that space.
        p_ids, c_ids, r_ids = want[0]
        full = Tokenizer.from_file(str(path)).encode(rows[0][0]).ids
        assert len(p_ids) == len(full) - 1 and r_ids[0] == full[-1]
    assert separate.stats["boundary_cut_prompts"] == 0 and "prompt end cut" not in separate.summary()


def test_feeds_ld_dpo_and_tabpo_losses(tokenizers_dir):
    torch = pytest.importorskip("torch")
    from prefops.losses import (
        dpo_loss_from_hidden, ld_dpo_weights, tabpo_diff_weights, tabpo_loss_from_hidden, tokenized_pair_batch,
    )

    path = tokenizers_dir["llama_like"]
    rows = prefops.tokenize_pairs(hh_pairs().slice(0, 6), path, max_completion_length=24).table
    b = tokenized_pair_batch(rows)
    targets, mask = b["targets"], b["targets"] != -100
    # The losses' own weights, computed from the padded batch, equal the step's columns.
    assert torch.equal(tabpo_diff_weights(targets, mask, 1.2), b["token_weights"])
    ld = ld_dpo_weights(mask, 0.5)
    k = mask.long().cumsum(1)
    shared = b["shared_length"].repeat(2)[:, None]
    assert torch.equal(ld, mask.float() * torch.where(k <= shared, 1.0, 0.5))

    torch.manual_seed(0)
    vocab = Tokenizer.from_file(str(path)).get_vocab_size()
    n, T = targets.shape
    hidden = torch.randn(n, T, 16, requires_grad=True)
    weight = torch.randn(vocab, 16) * 0.1
    ref_hidden = hidden.detach() + 0.01 * torch.randn(n, T, 16)
    loss, _ = dpo_loss_from_hidden(hidden, weight, targets, ref_hidden=ref_hidden, ld_alpha=0.5, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.abs().sum() > 0
    loss, metrics = tabpo_loss_from_hidden(hidden, weight, targets, token_weights=b["token_weights"],
                                           ref_hidden=ref_hidden, backend="torch")
    assert torch.isfinite(loss) and torch.isfinite(metrics["barrier"])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_cli_chains_with_prep(tokenizers_dir, tmp_path, suffix):
    pairs = tmp_path / f"pairs{suffix}"
    out = tmp_path / f"tokens{suffix}"
    cli = [sys.executable, "-m", "prefops.cli"]
    subprocess.run(cli + ["prep", str(prefops.sample_path("hh")), "-o", str(pairs), "--skip-invalid", "-q"], check=True)
    path = tokenizers_dir["byte_level"]

    def tokenize(output, *options, tokenizer=path):
        return subprocess.run(cli + ["tokenize", str(pairs), "-o", str(output), "--tokenizer", str(tokenizer),
                                     *options], capture_output=True, text=True)

    p = tokenize(out, "--eos-token", "<|endoftext|>", "--max-completion-length", "32",
                 "--stats", str(tmp_path / "s.json"))
    assert p.returncode == 0, p.stderr
    assert "truncated" in p.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    back = prefops.convert(out).table  # read back through prefops (JSONL integers come back as int64)
    src = prefops.convert(pairs).table
    assert made(back) == reference(triples(src), path, eos="<|endoftext|>", max_completion_length=32)
    assert (stats["step"], stats["rows"], stats["max_completion_length"]) == ("tokenize", back.num_rows, 32)
    assert stats["split"] == "joint"
    if suffix == ".parquet":
        schema = pq.read_schema(out)
        assert schema.field("chosen_ids").type == pa.list_(pa.int32())
        # Parquet -> JSONL -> Parquet keeps the values.
        j = tmp_path / "again.jsonl"
        prefops.convert(out, output=j)
        assert made(prefops.convert(j).table) == made(back)
    sep = tmp_path / f"separate{suffix}"
    p = tokenize(sep, "--eos-token", "<|endoftext|>", "--split", "separate", "--stats", str(tmp_path / "s2.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "s2.json").read_text())["split"] == "separate"
    assert made(prefops.convert(sep).table) == reference(triples(src), path, eos="<|endoftext|>", split="separate")
    p = tokenize(tmp_path / "y.jsonl", "--split", "both")
    assert p.returncode == 2 and "invalid choice: 'both'" in p.stderr
    p = tokenize(tmp_path / "x.jsonl", tokenizer=tmp_path / "missing.json")
    assert p.returncode == 1 and "missing.json" in p.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_errors(tokenizers_dir, tmp_path):
    pairs = hh_pairs().slice(0, 5)
    path = tokenizers_dir["byte_level"]
    with pytest.raises(OSError, match="nope.json.*no such tokenizer file"):
        prefops.tokenize_pairs(pairs, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
        prefops.tokenize_pairs(pairs, bad)
    with pytest.raises(prefops.DataError, match="missing column 'rejected'"):
        prefops.tokenize_pairs(pairs.drop_columns(["rejected"]), path)
    empty = pairs.set_column(3, "chosen", pa.array([""] * 5))
    for split in SPLITS:
        with pytest.raises(prefops.DataError, match="row 0, field 'chosen': chosen encodes to no tokens"):
            prefops.tokenize_pairs(empty, path, eos_token=None, split=split)
    # With an EOS an empty completion is just [EOS] (documented).
    r = prefops.tokenize_pairs(empty, path, eos_token="<|endoftext|>")
    assert r.table.column("chosen_ids").to_pylist()[0] == [Tokenizer.from_file(str(path)).token_to_id("<|endoftext|>")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        prefops.tokenize_pairs(pairs, path, eos_token="</s>")
    with pytest.raises(ValueError, match="max_prompt_length must be >= 1"):
        prefops.tokenize_pairs(pairs, path, max_prompt_length=0)
    with pytest.raises(ValueError, match="split must be 'joint' or 'separate', got 'both'"):
        prefops.tokenize_pairs(pairs, path, split="both")
    convo = prefops.prep(prefops.sample_path("llamafactory_dpo")).table
    with pytest.raises(prefops.DataError, match="holds conversations.*chat template"):
        prefops.tokenize_pairs(convo, path)


@pytest.fixture(scope="module")
def byte_level_path(tokenizers_dir):
    return tokenizers_dir["byte_level"]


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, text, text), min_size=1, max_size=12),
       max_prompt=st.none() | st.integers(1, 6), max_completion=st.none() | st.integers(1, 6),
       threads=st.integers(1, 4), split=st.sampled_from(SPLITS))
def test_random_unicode_matches_reference(byte_level_path, rows, max_prompt, max_completion, threads, split):
    table = pa.table({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                      "rejected": [r[2] for r in rows]})
    kw = dict(max_prompt_length=max_prompt, max_completion_length=max_completion, split=split)
    r = prefops.tokenize_pairs(table, byte_level_path, eos_token="<|endoftext|>", threads=threads, **kw)
    got = made(r.table)
    assert got == reference(rows, byte_level_path, eos="<|endoftext|>", **kw)
    for g in got:
        assert max_prompt is None or len(g["prompt_ids"]) <= max_prompt
        assert 1 <= len(g["chosen_ids"]) <= (max_completion or 10**9)
    assert r.table.equals(prefops.tokenize_pairs(table, byte_level_path, eos_token="<|endoftext|>", threads=1,
                                                 **kw).table)


def test_thread_count_and_batching_do_not_change_output(byte_level_path):
    pairs = hh_pairs()
    # Many small batches and a large one, 1 and 3 threads: the same table.
    batched = pa.Table.from_batches(pairs.to_batches(max_chunksize=37))
    one = prefops.tokenize_pairs(pairs, byte_level_path, threads=1).table
    three = prefops.tokenize_pairs(batched, byte_level_path, threads=3).table
    assert one.combine_chunks().equals(three.combine_chunks())
