"""Listwise preparation (``prefops.lists``): equal to the pure-Python reference on the bundled
ImageReward sample (ties) and on generated UltraFeedback / Nectar / grouped inputs; properties
(labels order-consistent, ties equal, sizes within policy, counts reconcile); determinism across
threads and chunking; errors; the output feeding listwise_loss and rank_dpo_loss; the CLI."""

import json
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefops
from prefops import _native
from conftest import ROOT, read_jsonl, write_jsonl
from reference_lists import LIST_KEYS, from_nectar, from_ranked_list, from_ultrafeedback, lists_from_groups

IMAGEREWARD = prefops.sample_path("imagereward")


def project(rows, keys=LIST_KEYS):
    return [{k: r.get(k, [None] * r["list_size"] if k in ("ranks", "models") else None) for k in keys} for r in rows]


def check_stats(stats, want_rows, want_stats):
    """prefops's counters equal the reference's, and reconcile with the rows written."""
    ls = stats["lists"]
    assert ls["lists_made"] == stats["rows_written"] == len(want_rows) == want_stats["lists_made"]
    assert ls["responses_listed"] == want_stats["responses_listed"]
    assert ls["responses_below_min_size"] == want_stats["responses_below_min_size"]
    assert ls["lists_truncated"] == want_stats.get("lists_truncated", 0)
    assert ls["lists_with_ties"] == want_stats.get("lists_with_ties", 0)
    assert stats["ties_kept"] == want_stats.get("ties_kept", 0)
    assert stats["dropped"] == want_stats["dropped"]
    assert {int(k): v for k, v in ls["sizes"].items()} == want_stats["sizes"]
    d = stats["dropped"]
    assert stats["prompts"] == ls["lists_made"] + d.get("below_min_size", 0)
    assert stats["responses"] == (ls["responses_listed"] + ls["responses_below_min_size"] + d.get("duplicate_response", 0)
                                  + d.get("over_list_size", 0))


# --- the bundled ImageReward sample: ranked lists with ties ------------------------------------

@pytest.mark.parametrize("options", [
    {},
    {"list_size": 4},
    {"list_size": 4, "seed": 7},
    {"list_size": 3, "truncate": "random", "seed": 3},
    {"list_size": 2},
    {"min_size": 9, "dedupe": False},
])
def test_imagereward_sample_matches_reference(options):
    records = json.loads(IMAGEREWARD.read_text())
    want, want_stats = lists_from_groups([from_ranked_list(r) for r in records], **options)
    result = prefops.lists(IMAGEREWARD, **options)
    got = result.table.to_pylist()
    assert project(got, LIST_KEYS[:-2] + ["list_size"]) == project(want, LIST_KEYS[:-2] + ["list_size"])
    assert all(r["id"] for r in got)  # the record's other columns are carried through
    check_stats(result.stats, want, want_stats)
    assert result.kind == "lists" and result.format == "ranked_list"
    if not options:
        assert result.stats["ties_kept"] > 0  # the sample does have ties, and they stay ties


# --- generated UltraFeedback-, Nectar- and grouped-style inputs --------------------------------

WORDS = ["alpha", "beta", "gamma", "é ü", "line\nbreak", 'quote"d', "dup"]


def generated_records(kind, n, seed):
    rng = random.Random(seed)
    records = []
    for p in range(n):
        k = rng.randint(2, 8)  # the readers refuse single-response records
        texts = [rng.choice(WORDS) + f" {rng.randint(0, 3)}" for _ in range(k)]
        if kind == "ultrafeedback":
            records.append({"instruction": f"question {p % (n // 2 + 1)}", "source": "gen",
                            "completions": [{"response": t, "overall_score": float(rng.choice([1, 2, 2.5, 7, 7, 10])),
                                             "model": rng.choice(["m1", "m2"])} for t in texts]})
        else:
            records.append({"prompt": f"question {p}", "answers": [{"answer": t, "rank": float(rng.randint(1, 4)),
                                                                    "model": "m"} for t in texts]})
    return records


@pytest.mark.parametrize("kind,options", [
    ("ultrafeedback", {}),
    ("ultrafeedback", {"label": "score", "list_size": 4}),
    ("ultrafeedback", {"list_size": 3, "truncate": "random", "seed": 11, "min_size": 3}),
    ("nectar", {"list_size": 5, "seed": 2}),
    ("nectar", {"dedupe": False, "min_size": 1}),
])
def test_generated_inputs_match_reference(tmp_path, kind, options):
    records = generated_records(kind, 300, seed=len(str(options)))
    src = write_jsonl(tmp_path / "in.jsonl", records)
    groups = [from_ultrafeedback(r) if kind == "ultrafeedback" else from_nectar(r) for r in records]
    want, want_stats = lists_from_groups(groups, **options)
    result = prefops.lists(src, tmp_path / "out.jsonl", **options)
    got = read_jsonl(tmp_path / "out.jsonl")
    keys = LIST_KEYS if kind == "nectar" else [k for k in LIST_KEYS if k != "ranks"]
    assert project(got, keys) == project(want, keys)
    if kind == "ultrafeedback":
        assert all(r["source"] == "gen" for r in got)  # other columns carried through
    check_stats(result.stats, want, want_stats)


# --- hypothesis: random grouped data and options ------------------------------------------------

TEXTS = st.sampled_from(["a", "b", "c", "dup", "é ü", "line\nbreak", "x" * 30])
SCORES = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([0.5, 1.5, -0.0, 1e-9]))


@st.composite
def grouped_rows(draw, ranked=False):
    rows = []
    for p in range(draw(st.integers(1, 10))):
        responses = []
        for _ in range(draw(st.integers(2, 9))):
            r = {"content": draw(TEXTS)}
            if ranked:
                r["rank"] = float(draw(st.integers(1, 4)))
            else:
                r["score"] = draw(SCORES)
            responses.append(r)
        rows.append({"prompt": f"prompt {draw(st.integers(0, 4))}", "responses": responses,
                     "prompt_id": f"id-{p}" if draw(st.booleans()) else None})
    return rows


@st.composite
def list_options(draw, scored=True):
    list_size = draw(st.sampled_from([None, 2, 3, 5]))
    return {
        "list_size": list_size,
        "label": draw(st.sampled_from(["dense_rank", "score"] if scored else ["dense_rank"])),
        "truncate": draw(st.sampled_from(["top", "random"])),
        "min_size": draw(st.integers(1, list_size or 4)),
        "dedupe": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**64 - 1)),
    }


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_lists_match_reference_and_keep_their_invariants(data):
    ranked = data.draw(st.booleans())
    rows = data.draw(grouped_rows(ranked=ranked))
    options = data.draw(list_options(scored=not ranked))
    want, want_stats = lists_from_groups(rows, **options)
    result = prefops.lists(pa.Table.from_pylist(rows), format="grouped", **options)
    got = result.table.to_pylist()
    assert project(got) == project(want)
    check_stats(result.stats, want, want_stats)
    for row in got:
        labels, gains, n = row["labels"], row["gains"], row["list_size"]
        assert len(row["responses"]) == len(labels) == len(gains) == n
        assert options["min_size"] <= n <= (options["list_size"] or n)
        pref = [s if s is not None else -r for s, r in zip(row["scores"], row["ranks"])]
        for a in range(n):
            for b in range(n):
                # Labels order-consistent with the preference, ties equal.
                assert (labels[a] > labels[b]) == (pref[a] > pref[b])
                assert (labels[a] == labels[b]) == (pref[a] == pref[b])
        assert gains == [2.0 ** x - 1 for x in labels]
        if options["label"] == "dense_rank":
            assert min(labels) == 0 and sorted(set(labels)) == [float(i) for i in range(len(set(labels)))]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=grouped_rows(), options=list_options(), threads=st.sampled_from([2, 3]),
       chunk=st.sampled_from([64, 300]), out=st.sampled_from(["jsonl", "parquet"]))
def test_output_is_byte_identical_for_any_threads_and_chunking(tmp_path_factory, rows, options, threads, chunk, out):
    d = tmp_path_factory.mktemp("det")
    src = write_jsonl(d / "in.jsonl", rows)
    native = dict(kind="lists", format="grouped", **options)
    _native.prep(src, d / f"a.{out}", threads=1, chunk_bytes=1 << 20, **native)
    _native.prep(src, d / f"b.{out}", threads=threads, chunk_bytes=chunk, batch_rows=3, **native)
    assert (d / f"a.{out}").read_bytes() == (d / f"b.{out}").read_bytes()


def test_imagereward_parquet_is_byte_identical_across_threads_and_batches(tmp_path, shared_data):
    src = shared_data / "imagereward_test.json"
    digests = set()
    for threads, chunk in [(1, 1 << 22), (2, 4096), (4, 50_000)]:
        out = tmp_path / f"t{threads}.parquet"
        _native.prep(src, out, kind="lists", list_size=4, truncate="random", seed=5, threads=threads,
                     chunk_bytes=chunk)
        digests.add(out.read_bytes())
    assert len(digests) == 1


def test_seeds_decide_truncation_and_other_prompts_do_not():
    row = {"prompt": "p", "prompt_id": "fixed",
           "responses": [{"content": str(i), "score": float(i % 2)} for i in range(8)]}
    others = [{"prompt": f"q{i}", "prompt_id": None,
               "responses": [{"content": "a", "score": 1.0}, {"content": "b", "score": 1.0}, {"content": "c", "score": 0.0}]}
              for i in range(30)]
    for truncate in ("top", "random"):
        opts = dict(format="grouped", list_size=3, truncate=truncate, seed=11)
        alone = prefops.lists(pa.Table.from_pylist([row]), **opts).table.to_pylist()
        mixed = prefops.lists(pa.Table.from_pylist(others[:10] + [row] + others[10:]), **opts).table.to_pylist()
        assert [r for r in mixed if r["prompt_id"] == "fixed"] == alone
        draws = {tuple(prefops.lists(pa.Table.from_pylist([row]), **{**opts, "seed": s}).table["responses"][0].as_py())
                 for s in range(12)}
        assert len(draws) > 1
        if truncate == "top":  # the four responses scored 1 tie at the cut: three of them stay
            assert all(all(int(t) % 2 == 1 for t in d) for d in draws)


def test_same_lists_from_file_pyarrow_polars_and_batches(tmp_path):
    import polars as pl

    rows = [from_ranked_list(r) for r in json.loads(IMAGEREWARD.read_text())[:60]]
    grouped = [{"prompt": g["prompt"], "responses": g["responses"]} for g in rows]
    src = write_jsonl(tmp_path / "in.jsonl", grouped)
    opts = dict(format="grouped", list_size=3)
    prefops.lists(src, tmp_path / "out.jsonl", **opts)
    want = read_jsonl(tmp_path / "out.jsonl")
    table = pa.Table.from_pylist(grouped)
    assert prefops.lists(table, **opts).table.to_pylist() == want
    assert prefops.lists(pl.from_arrow(table), **opts).table.to_pylist() == want
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7))
    assert prefops.lists(reader, **opts).table.to_pylist() == want


@pytest.mark.parametrize("sample", ["imagereward", "llamafactory_dpo"])
@pytest.mark.parametrize("out_name", ["lists.jsonl", "lists.jsonl.gz", "lists.parquet"])
def test_jsonl_and_parquet_outputs_hold_the_same_rows(tmp_path, sample, out_name):
    import gzip

    src = prefops.sample_path(sample)
    prefops.lists(src, tmp_path / out_name, list_size=4)
    if out_name.endswith(".parquet"):
        rows = pq.read_table(tmp_path / out_name).to_pylist()
    elif out_name.endswith(".gz"):
        rows = [json.loads(line) for line in gzip.open(tmp_path / out_name, "rt")]
    else:
        rows = read_jsonl(tmp_path / out_name)
    assert rows == prefops.lists(src, list_size=4).table.to_pylist()
    if sample == "llamafactory_dpo":  # chat messages survive as lists of {role, content}
        assert rows[0]["responses"][0][0]["role"] == "assistant"


def test_unpaired_kto_rows_are_grouped_into_lists():
    src = prefops.sample_path("llamafactory_kto")
    result = prefops.lists(src, min_size=1, label="score")
    rows = result.table.to_pylist()
    assert result.stats["responses"] == sum(r["list_size"] for r in rows) + result.stats["dropped"].get(
        "duplicate_response", 0) + result.stats["lists"]["responses_below_min_size"]
    for r in rows:
        assert r["labels"] == r["scores"] and set(r["labels"]) <= {0.0, 1.0}
        assert r["labels"] == sorted(r["labels"], reverse=True)


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"list_size": 1}, "list_size must be an integer >= 2"),
    ({"list_size": 0}, "list_size"),
    ({"list_size": -3}, "list_size"),
    ({"list_size": 2.5}, "list_size"),
    ({"list_size": True}, "list_size"),
    ({"min_size": 0}, "min_size"),
    ({"list_size": 3, "min_size": 4}, r"min_size \(4\) must not exceed list_size \(3\)"),
    ({"label": "ndcg"}, "label must be one of"),
    ({"truncate": "bottom"}, "truncate must be one of"),
    ({"label": "score"}, "label 'score' needs scored responses, but ranked_list records only rank them"),
])
def test_bad_options_are_value_errors(tmp_path, kwargs, match):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=match):
        prefops.lists(IMAGEREWARD, out, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_native_layer_validates_too():
    with pytest.raises(ValueError, match="list_size must be at least 2"):
        _native.prep(str(IMAGEREWARD), kind="lists", list_size=1)
    with pytest.raises(ValueError, match="unknown label"):
        _native.prep(str(IMAGEREWARD), kind="lists", label="x")


def test_missing_scores_are_named_by_line_and_field(tmp_path):
    rows = [
        {"prompt": "p1", "responses": [{"content": "a", "score": 1.0}, {"content": "b", "score": 0.0}]},
        {"prompt": "p2", "responses": [{"content": "a", "rank": 1}, {"content": "b", "rank": 2}]},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.parquet"
    with pytest.raises(prefops.DataError, match=r"in\.jsonl: line 2, field 'responses\[0\]\.score': label 'score'"):
        prefops.lists(src, out, label="score")
    assert not out.exists()
    result = prefops.lists(src, out, label="score", skip_invalid=True)
    assert result.stats["skipped"] == {"missing_field": 1} and result.stats["rows_written"] == 1
    # TRL pairs without scores name the TRL column.
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(prefops.DataError, match=r"line 1, field 'score_chosen'"):
        prefops.lists(trl, label="score")
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "responses": [{"content": "a", "score": 5000.0},
                                                                          {"content": "b", "score": 0.0}]}])
    with pytest.raises(prefops.DataError, match=r"responses\[0\]\.score': score 5000 is too large"):
        prefops.lists(big, label="score")


def test_reader_errors_are_the_same_as_prep(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "q", "completions": [
        {"response": "a", "overall_score": 1}, {"response": "b", "overall_score": "7"}]}])
    with pytest.raises(prefops.DataError) as lists_error:
        prefops.lists(src)
    with pytest.raises(prefops.DataError) as prep_error:
        prefops.prep(src)
    assert str(lists_error.value) == str(prep_error.value)
    assert "completions[1].overall_score" in str(lists_error.value)


# --- list_tensors and the losses ----------------------------------------------------------------

def test_list_tensors_layout_and_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    result = prefops.lists(IMAGEREWARD, list_size=5, min_size=3)
    rows = result.table.to_pylist()
    lt = prefops.list_tensors(result, with_responses=True)
    sizes = [r["list_size"] for r in rows]
    assert lt.offsets.tolist() == [0] + list(__import__("itertools").accumulate(sizes))
    assert lt.labels.shape == lt.mask.shape == (len(rows), max(sizes))
    for p, r in enumerate(rows):
        n = r["list_size"]
        assert lt.mask[p].tolist() == [True] * n + [False] * (max(sizes) - n)
        assert lt.labels[p, :n].tolist() == r["labels"] and lt.gains[p, :n].tolist() == r["gains"]
        assert lt.labels[p, n:].abs().sum() == 0
    assert lt.responses == [x for r in rows for x in r["responses"]]
    padded = prefops.list_tensors(result, pad_to=7)
    assert padded.mask.shape[1] == 7 and torch.equal(padded.labels[:, : max(sizes)], lt.labels)
    with pytest.raises(ValueError, match="pad_to=2 but row"):
        prefops.list_tensors(result, pad_to=2)
    values = torch.arange(lt.flat_labels.numel(), dtype=torch.float64)
    assert torch.equal(lt.pad(values)[lt.mask], values)
    # The same tensors from JSONL and Parquet files, and from a polars frame.
    import polars as pl

    for name in ("l.jsonl", "l.parquet"):
        prefops.lists(IMAGEREWARD, tmp_path / name, list_size=5, min_size=3)
        again = prefops.list_tensors(tmp_path / name)
        assert torch.equal(again.labels, lt.labels) and torch.equal(again.offsets, lt.offsets)
    assert torch.equal(prefops.list_tensors(pl.from_arrow(result.table)).gains, lt.gains)
    with pytest.raises(ValueError, match="column 'labels' not found"):
        prefops.list_tensors(prefops.prep(IMAGEREWARD).table)


def _logp(text, salt):
    """A deterministic stand-in for a model's summed log-prob of a response."""
    return -((hash((str(text), salt)) % 1000) / 100.0)


def test_k2_lists_give_the_dpo_loss_of_the_pairs(shared_data):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from prefops.losses import listwise_loss

    src = shared_data / "hh_harmless_test.jsonl.gz"
    pairs = prefops.prep(src, skip_invalid=True).table.to_pylist()
    result = prefops.lists(src, list_size=2, skip_invalid=True)
    lists = result.table.to_pylist()
    assert [(r["prompt_id"], r["responses"][0], r["responses"][1]) for r in lists] == \
        [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs]
    beta = 0.1
    lt = prefops.list_tensors(result, dtype=torch.float64)
    flat = [x for r in lists for x in r["responses"]]
    logps = lt.pad(torch.tensor([_logp(x, 0) for x in flat], dtype=torch.float64))
    ref = lt.pad(torch.tensor([_logp(x, 1) for x in flat], dtype=torch.float64))
    for loss_type in ("lipo_lambda", "pairwise"):
        loss, _ = listwise_loss(logps, ref, lt.labels, list_mask=lt.mask, beta=beta, loss_type=loss_type,
                                normalize_lambda=True)
        h = torch.tensor([(_logp(p["chosen"], 0) - _logp(p["chosen"], 1)) - (_logp(p["rejected"], 0) - _logp(p["rejected"], 1))
                          for p in pairs], dtype=torch.float64)
        dpo = -F.logsigmoid(beta * h).mean()
        assert torch.allclose(loss, dpo, rtol=1e-12, atol=1e-12), loss_type


def test_imagereward_lists_feed_rank_dpo_loss():
    torch = pytest.importorskip("torch")
    from prefops.losses import diffusion_dpo_loss, rank_dpo_loss

    g = torch.Generator().manual_seed(0)
    # K = 4 with ties and short lists padded: finite, and padding values do not matter.
    lt = prefops.list_tensors(prefops.lists(IMAGEREWARD, list_size=4), pad_to=5)
    P, K = lt.labels.shape
    shape = (P, K, 2, 3, 3)
    model, ref, target = (torch.randn(shape, generator=g) for _ in range(3))
    loss, metrics = rank_dpo_loss(model, ref, target, lt.labels, list_mask=lt.mask, beta=50.0)
    assert torch.isfinite(loss)
    noisy = model.clone()
    noisy[~lt.mask] = 7.0
    assert torch.allclose(rank_dpo_loss(noisy, ref, target, lt.labels, list_mask=lt.mask, beta=50.0)[0], loss)
    # K = 2 lists whose two images differ in label: Diffusion-DPO with β_DPO = 2β.
    table = prefops.lists(IMAGEREWARD, list_size=2).table
    keep = [i for i, labels in enumerate(table["labels"].to_pylist()) if labels[0] > labels[1]]
    lt2 = prefops.list_tensors(table.take(keep))
    m2, r2, t2 = (torch.randn((len(keep), 2, 2, 3, 3), generator=g) for _ in range(3))
    ranked, _ = rank_dpo_loss(m2, r2, t2, lt2.labels, list_mask=lt2.mask, beta=50.0, normalize_lambda=True)
    flat = lambda x: torch.cat([x[:, 0], x[:, 1]])  # noqa: E731  winners then losers
    pairwise, _ = diffusion_dpo_loss(flat(m2), flat(r2), flat(t2), beta=100.0)
    assert torch.allclose(ranked, pairwise, rtol=1e-5, atol=1e-6)


# --- CLI --------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "prefops.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_writes_lists_and_stats(tmp_path):
    out, stats = tmp_path / "lists.parquet", tmp_path / "stats.json"
    done = run_cli("lists", IMAGEREWARD, "-o", out, "--list-size", 4, "--truncate", "random", "--seed", 3,
                   "--stats", stats)
    assert done.returncode == 0, done.stderr
    assert "lists made 466" in done.stderr
    assert pq.read_table(out).to_pylist() == prefops.lists(IMAGEREWARD, list_size=4, truncate="random",
                                                           seed=3).table.to_pylist()
    report = json.loads(stats.read_text())
    assert report["kind"] == "lists" and report["list_size"] == 4 and report["truncate"] == "random"
    assert report["lists"]["lists_made"] == report["rows_written"] == 466


def test_cli_errors(tmp_path):
    bad = run_cli("lists", IMAGEREWARD, "-o", tmp_path / "x.jsonl", "--list-size", 1)
    assert bad.returncode == 2 and "--list-size must be at least 2" in bad.stderr
    score = run_cli("lists", IMAGEREWARD, "-o", tmp_path / "x.jsonl", "--label", "score")
    assert score.returncode == 1 and "label 'score' needs scored responses" in score.stderr
    assert not (tmp_path / "x.jsonl").exists()
    assert run_cli("lists", IMAGEREWARD).returncode == 2
    dry = run_cli("lists", IMAGEREWARD, "--dry-run", "-q")
    assert dry.returncode == 0 and dry.stderr == ""


def test_big_arrow_batches_are_sliced_without_changing_output_or_error_rows():
    groups = [from_ranked_list(r) for r in json.loads(IMAGEREWARD.read_text())[:50]]
    table = pa.Table.from_pylist([{"prompt": g["prompt"], "responses": g["responses"]} for g in groups])
    opts = dict(kind="lists", format="grouped", list_size=3, truncate="random", seed=1)
    whole, _ = _native.prep(table, **opts)
    sliced, _ = _native.prep(table, threads=3, batch_rows=7, **opts)
    assert sliced.to_pylist() == whole.to_pylist()
    rows = table.to_pylist()
    rows[20]["responses"][1]["rank"] = None  # the reader's own check: a response needs a score or rank
    bad = pa.Table.from_pylist(rows)
    messages = []
    for batch_rows in (8192, 7):
        with pytest.raises(prefops.DataError) as e:
            _native.prep(bad, threads=2, batch_rows=batch_rows, **opts)
        messages.append(str(e.value))
    assert messages[0] == messages[1] and "row 2" in messages[0] and "responses[1]" in messages[0]
