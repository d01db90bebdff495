"""The pair-table steps (curriculum, flip_labels, reward_augment) against the pure-Python
reference on random tables, their invariants, and their independence from seed reuse, batch
boundaries and thread count; then on the real samples."""

import math
from collections import Counter, defaultdict

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import prefops
from prefops import _native
import reference_steps as ref

HEX = "0123456789abcdef"
MARGINS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0, 2.0, 3.5, -1.0, 1e-9, 7.25])
SCORES = st.one_of(st.integers(-3, 10).map(float), st.sampled_from([0.5, 2.25, 1 / 3, 1e-5, 6.5, -0.0, 1e17]))
LABEL = st.sampled_from([0, 1, None])


@st.composite
def pair_tables(draw, max_rows=40):
    n = draw(st.integers(0, max_rows))
    rows = []
    for i in range(n):
        c, r = draw(SCORES), draw(SCORES)
        rows.append({
            "prompt_id": f"p{draw(st.integers(0, 6))}",
            # Short random ids collide now and then: ties fall back to the input position.
            "pair_id": "".join(draw(st.lists(st.sampled_from(HEX), min_size=1, max_size=3))),
            "prompt": draw(st.sampled_from(["Q?", "é {x}", "line\nbreak", ""])),
            "chosen": f"c{i}",
            "rejected": f"r{i}",
            "score_chosen": c,
            "score_rejected": r,
            "margin": draw(MARGINS),
            "chosen_model": draw(st.sampled_from(["m1", "m2", None])),
            "rejected_model": draw(st.sampled_from(["m1", "m3"])),
            "chosen_hallucinated": draw(LABEL),
            "rejected_hallucinated": draw(LABEL),
            "rm_chosen": draw(st.one_of(st.none(), st.floats(-2, 2, allow_nan=False))),
            "rm_rejected": draw(st.floats(-2, 2, allow_nan=False)),
            "rm_margin": draw(st.floats(-5, 5, allow_nan=False)),
            "id": i,
        })
    return rows


SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("pair_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.string()), ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
    ("margin", pa.float64()), ("chosen_model", pa.string()), ("rejected_model", pa.string()),
    ("chosen_hallucinated", pa.int64()), ("rejected_hallucinated", pa.int64()), ("rm_chosen", pa.float64()),
    ("rm_rejected", pa.float64()), ("rm_margin", pa.float64()), ("id", pa.int64()),
])


def to_table(rows, chunk=None):
    t = pa.Table.from_pylist(rows, schema=SCHEMA)
    if chunk:
        t = pa.Table.from_batches(t.to_batches(max_chunksize=chunk), schema=SCHEMA)
    return t


def same(a, b):
    """Row lists equal, with -0.0 == 0.0 and NaN == NaN."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x.keys(), y.keys())
        for k in x:
            u, v = x[k], y[k]
            if isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v):
                continue
            assert u == v, (k, u, v, x, y)


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---- curriculum -------------------------------------------------------------------------------

@SETTINGS
@given(rows=pair_tables(), by=st.sampled_from(["margin", "rm_margin", "score_chosen", "id"]),
       descending=st.booleans(), schedule=st.sampled_from(["stages", "global"]),
       chunk=st.sampled_from([None, 1, 3, 7]), threads=st.sampled_from([1, 2]))
def test_curriculum_matches_reference(rows, by, descending, schedule, chunk, threads):
    got = prefops.curriculum(to_table(rows, chunk), by=by, descending_is_easy=descending, schedule=schedule,
                             threads=threads)
    want = ref.curriculum(rows, by=by, descending_is_easy=descending, schedule=schedule)
    same(got.table.to_pylist(), want)
    assert got.stats["rows"] == len(rows)
    if schedule == "stages":
        assert got.table.schema.field("stage").type == pa.int64()
        per_prompt = Counter(r["prompt_id"] for r in rows)
        assert got.stats["prompts"] == len(per_prompt)
        # Stage i holds one pair of every prompt with more than i pairs.
        want_sizes = [sum(1 for c in per_prompt.values() if c > i) for i in range(max(per_prompt.values(), default=0))]
        assert got.stats["pairs_per_stage"] == want_sizes
        stages_of = defaultdict(list)
        for r in got.table.to_pylist():
            stages_of[r["prompt_id"]].append(r["stage"])
        assert all(sorted(s) == list(range(per_prompt[p])) for p, s in stages_of.items())
    else:
        assert "stage" not in got.table.column_names and got.stats["stages"] == 0


# ---- flip -------------------------------------------------------------------------------------

FLIP_OPTIONS = st.fixed_dictionaries({
    "factual": st.booleans(),
    "reward": st.sampled_from([None, 0.0, 0.5]),
    "rate": st.sampled_from([None, 0.0, 0.3, 1.0]),
    "seed": st.integers(0, 2**64 - 1),
}).filter(lambda o: o["factual"] or o["reward"] is not None or o["rate"] is not None)


def run_flip(table, o, threads=None):
    return prefops.flip_labels(table, factual=o["factual"],
                               reward_columns=None if o["reward"] is None else ("rm_chosen", "rm_rejected"),
                               reward_min_gap=o["reward"] or 0.0, rate=o["rate"], seed=o["seed"], threads=threads)


@SETTINGS
@given(rows=pair_tables(), o=FLIP_OPTIONS, chunk=st.sampled_from([None, 1, 4]), threads=st.sampled_from([1, 2]))
def test_flip_matches_reference(rows, o, chunk, threads):
    got = run_flip(to_table(rows, chunk), o, threads)
    want, counts = ref.flip(
        rows,
        factual=("chosen_hallucinated", "rejected_hallucinated", "hallucinated") if o["factual"] else None,
        reward=None if o["reward"] is None else ("rm_chosen", "rm_rejected", o["reward"]),
        rate=o["rate"], seed=o["seed"])
    same(got.table.to_pylist(), want)
    s = got.stats
    assert (s["flipped_factual"], s["flipped_reward"], s["flipped_random"]) == (
        counts["factual"], counts["reward"], counts["random"])
    assert s["flipped_total"] == sum(r["flipped"] for r in want)
    if o["factual"]:
        labels = Counter((r["chosen_hallucinated"], r["rejected_hallucinated"]) for r in rows)
        f = s["factual_labels"]
        assert f["chosen_hallucinated_only"] == labels[(1, 0)] == s["flipped_factual"]
        assert f["both_factual"] == labels[(0, 0)] and f["both_hallucinated"] == labels[(1, 1)]
        assert f["unlabelled"] == sum(n for k, n in labels.items() if None in k)


@SETTINGS
@given(rows=pair_tables(), seed=st.integers(0, 2**64 - 1), rate=st.floats(0, 1))
def test_random_flip_twice_restores_and_factual_flip_is_idempotent(rows, seed, rate):
    table = to_table(rows)
    once = prefops.flip_labels(table, rate=rate, seed=seed)
    twice = prefops.flip_labels(once.table, rate=rate, seed=seed)
    same(twice.table.drop_columns(["flipped"]).to_pylist(), rows)
    assert not any(twice.table.column("flipped").to_pylist())
    # F-DPO: labels move with the responses, (1,0) becomes (0,1): a second pass changes nothing.
    f1 = prefops.flip_labels(table, factual=True)
    f2 = prefops.flip_labels(f1.table, factual=True)
    same(f2.table.to_pylist(), f1.table.to_pylist())
    assert f2.stats["flipped_total"] == 0
    assert f1.stats["factual_labels"]["chosen_hallucinated_only"] == f2.stats["factual_labels"][
        "rejected_hallucinated_only"] - f1.stats["factual_labels"]["rejected_hallucinated_only"]
    # Undoing exactly the recorded swaps restores the input.
    undone = [ref.swap(r, [("chosen_hallucinated", "rejected_hallucinated")]) if r["flipped"] else r
              for r in f1.table.to_pylist()]
    same([{k: v for k, v in r.items() if k != "flipped"} for r in undone], rows)


def test_flip_with_factual_labels_meaning_factual_and_custom_names():
    rows = [{"pair_id": str(i), "chosen": f"c{i}", "rejected": f"r{i}", "margin": 1.0, "fw": fw, "fl": fl}
            for i, (fw, fl) in enumerate([(True, False), (False, True), (True, True), (False, False), (None, True)])]
    r = prefops.flip_labels(pa.Table.from_pylist(rows), factual_columns=("fw", "fl"))
    assert r.table.column("flipped").to_pylist() == [False, True, False, False, False]
    out = r.table.to_pylist()[1]
    # Custom label columns are swapped along with the responses.
    assert (out["chosen"], out["rejected"], out["fw"], out["fl"], out["margin"]) == ("r1", "c1", True, False, -1.0)
    want, _ = ref.flip(rows, factual=("fw", "fl", "factual"))
    same(r.table.to_pylist(), want)


def test_flip_errors_name_the_column_and_row():
    t = pa.Table.from_pylist([{"pair_id": "a", "chosen": "x", "rejected": "y", "margin": 1.0,
                               "chosen_hallucinated": 2, "rejected_hallucinated": 0}])
    with pytest.raises(prefops.DataError, match=r"<arrow>: row 0, field 'chosen_hallucinated': a factuality label "
                                                r"must be 0/1 or true/false, got 2"):
        prefops.flip_labels(t, factual=True)
    with pytest.raises(prefops.DataError, match=r"missing factuality label columns.*--hallucinated-columns"):
        prefops.flip_labels(t.drop_columns(["chosen_hallucinated"]), factual=True)
    with pytest.raises(prefops.DataError, match=r"missing column 'rm_c' \(the reward model's score of the chosen"):
        prefops.flip_labels(t, reward_columns=("rm_c", "rm_r"))
    with pytest.raises(prefops.DataError, match=r"missing column 'pair_id'"):
        prefops.flip_labels(t.drop_columns(["pair_id"]), rate=0.5)
    with pytest.raises(ValueError, match="nothing to flip"):
        prefops.flip_labels(t)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        prefops.flip_labels(t, rate=1.5)


# ---- augment ----------------------------------------------------------------------------------

TEMPLATES = st.sampled_from(["default", "ultrafeedback", "{prompt} [{score}]", "{{goal: {score}}}\n{prompt}"])


@SETTINGS
@given(rows=pair_tables(), template=TEMPLATES, chunk=st.sampled_from([None, 1, 5]), threads=st.sampled_from([1, 2]))
def test_augment_matches_reference(rows, template, chunk, threads):
    got = prefops.reward_augment(to_table(rows, chunk), template=template, threads=threads)
    text = prefops.steps.TEMPLATES.get(template, template)
    same(got.table.to_pylist(), ref.augment(rows, text))
    assert got.table.num_rows == 2 * len(rows) == got.stats["rows_out"]
    assert got.table.column("target_score").to_pylist() == got.table.column("score_chosen").to_pylist()
    assert got.stats["equal_scores"] == sum(r["score_chosen"] == r["score_rejected"] for r in rows)


@settings(max_examples=300, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False))
@example(x=562949953421312.2)  # two shortest forms equally near (…312.25): Python keeps the even one
@example(x=-562949953421312.2)
def test_score_format_matches_the_python_rule(x):
    assert _native.format_score(x) == ref.format_score(x)


@settings(max_examples=200, deadline=None)
@given(k=st.integers(2**46, 2**53 - 1), quarter=st.sampled_from([0.25, 0.75, 0.125, 0.375]), sign=st.sampled_from([1, -1]))
def test_score_format_breaks_ties_as_python_does(k, quarter, sign):
    """Near 2^49 a double's exact value can sit halfway between two shortest 16-digit forms."""
    x = sign * (k + quarter)
    assert _native.format_score(x) == ref.format_score(x)


def test_augment_conversational_prompt_rewrites_the_first_user_message():
    rows = [{"pair_id": "p", "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                        {"role": "user", "content": "again"}],
             "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}],
             "score_chosen": 9.0, "score_rejected": 2.5, "margin": 6.5}]
    got = prefops.reward_augment(pa.Table.from_pylist(rows), template="{prompt} (aim: {score})").table.to_pylist()
    assert [m["content"] for m in got[0]["prompt"]] == ["be brief", "hi (aim: 9)", "again"]
    assert [m["content"] for m in got[1]["prompt"]] == ["be brief", "hi (aim: 2.5)", "again"]
    assert got[1]["chosen"][0]["content"] == "go" and got[1]["margin"] == -6.5
    same(got, ref.augment(rows, "{prompt} (aim: {score})"))


def test_augment_errors():
    t = pa.Table.from_pylist([{"pair_id": "a", "prompt": "p", "chosen": "x", "rejected": "y",
                               "score_chosen": 1.0, "score_rejected": None, "margin": 1.0}])
    with pytest.raises(prefops.DataError, match=r"row 0, field 'score_rejected': reward augmentation needs a finite "
                                                r"score, got null"):
        prefops.reward_augment(t)
    with pytest.raises(ValueError, match=r"template: must contain \{score\}"):
        prefops.reward_augment(t, template="{prompt} only")
    with pytest.raises(ValueError, match=r"unknown placeholder '\{rating\}'"):
        prefops.reward_augment(t, template="{prompt} {rating}")
    with pytest.raises(prefops.DataError, match="missing column 'prompt'"):
        prefops.reward_augment(t.drop_columns(["prompt"]))


# ---- determinism: seeds, chunking, threads (enough rows for several work slices) -------------

def big_rows(n=150_000):
    import random

    rnd = random.Random(7)
    rows = {"prompt_id": [], "pair_id": [], "prompt": [], "chosen": [], "rejected": [], "score_chosen": [],
            "score_rejected": [], "margin": [], "chosen_hallucinated": [], "rejected_hallucinated": []}
    for i in range(n):
        c, r = float(rnd.randint(0, 10)), float(rnd.randint(0, 10))
        rows["prompt_id"].append(f"p{rnd.randrange(n // 4)}")
        rows["pair_id"].append(f"{rnd.getrandbits(64):016x}")
        rows["prompt"].append("q")
        rows["chosen"].append(f"c{i}")
        rows["rejected"].append(f"r{i}")
        rows["score_chosen"].append(c)
        rows["score_rejected"].append(r)
        rows["margin"].append(c - r)
        rows["chosen_hallucinated"].append(rnd.random() < 0.3)
        rows["rejected_hallucinated"].append(rnd.random() < 0.3)
    return pa.table(rows)


@pytest.fixture(scope="module")
def big():
    return big_rows()


STEPS = {
    "curriculum": lambda t, **k: prefops.curriculum(t, **k),
    "curriculum_global": lambda t, **k: prefops.curriculum(t, schedule="global", **k),
    "flip": lambda t, **k: prefops.flip_labels(t, factual=True, rate=0.2, seed=11, **k),
    "augment": lambda t, **k: prefops.reward_augment(t, **k),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_independent_of_chunking_and_threads(big, step, monkeypatch):
    run = STEPS[step]
    base = run(big, threads=1).table
    rechunked = pa.Table.from_batches(big.to_batches(max_chunksize=9_999))
    assert run(rechunked, threads=2).table.equals(base)
    monkeypatch.setenv(prefops.THREADS_ENV, "2")
    r = run(big.combine_chunks())
    assert r.threads == 2 and r.table.equals(base)
    monkeypatch.setenv(prefops.THREADS_ENV, "1")
    r = run(big)
    assert r.threads == 1 and r.table.equals(base)


def test_random_flip_depends_on_seed_and_pair_id_only(big):
    a = prefops.flip_labels(big, rate=0.25, seed=1).table.column("flipped").to_pylist()
    b = prefops.flip_labels(big.slice(50_000), rate=0.25, seed=1).table.column("flipped").to_pylist()
    c = prefops.flip_labels(big, rate=0.25, seed=2).table.column("flipped").to_pylist()
    assert a[50_000:] == b and a != c
    assert abs(sum(a) / len(a) - 0.25) < 0.01


# ---- chaining and inputs ----------------------------------------------------------------------

def test_steps_chain_and_take_results_paths_and_other_arrow_producers(tmp_path):
    pairs = prefops.prep(prefops.sample_path("hh"), strategy="best_vs_worst", skip_invalid=True)
    n = pairs.table.num_rows
    t = pairs.table.append_column("score_chosen_rm", pa.array([float(i % 5) for i in range(n)]))
    t = t.append_column("score_rejected_rm", pa.array([float(i % 3) for i in range(n)]))
    flipped = prefops.flip_labels(t, rate=0.1, seed=4)
    augmented = prefops.reward_augment(flipped, score_columns=("score_chosen_rm", "score_rejected_rm"))
    staged = prefops.curriculum(augmented, by="score_chosen_rm")
    assert staged.table.num_rows == 2 * n
    assert set(staged.table.column_names) >= {"flipped", "source_pair_id", "target_score", "stage"}
    # A polars frame and a file give the same result as the pyarrow table.
    pl = pytest.importorskip("polars")
    from_polars = prefops.flip_labels(pl.from_arrow(t), rate=0.1, seed=4).table
    assert from_polars.to_pylist() == flipped.table.to_pylist()
    path = tmp_path / "pairs.parquet"
    prefops.prep(prefops.sample_path("hh"), path, strategy="best_vs_worst", skip_invalid=True)
    assert prefops.curriculum(path).table.equals(prefops.curriculum(pairs).table)
    # Writing: a path in, a file out; the result then has no table.
    out = prefops.curriculum(path, tmp_path / "c.jsonl")
    assert out.table is None and out.output == tmp_path / "c.jsonl"
    assert prefops.curriculum(out).table.num_rows == n


# ---- the real samples -------------------------------------------------------------------------

def test_imagereward_best_vs_each_curriculum_stages(shared_data):
    pairs = prefops.prep(shared_data / "imagereward_test.json", strategy="best_vs_each").table
    rows = pairs.to_pylist()
    r = prefops.curriculum(pairs)
    got = r.table.to_pylist()
    same(got, ref.curriculum(rows))
    per_prompt = Counter(x["prompt_id"] for x in rows)
    sizes = r.stats["pairs_per_stage"]
    assert sizes[0] == len(per_prompt) == r.stats["prompts"] and sum(sizes) == len(rows)
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == max(per_prompt.values())
    # Within a prompt, stage i is never easier than stage i + 1 (margin = rank gap to the best).
    by_prompt = defaultdict(list)
    for x in got:
        by_prompt[x["prompt_id"]].append((x["stage"], x["margin"]))
    for items in by_prompt.values():
        margins = [m for _, m in sorted(items)]
        assert margins == sorted(margins, reverse=True)
    # Stages are contiguous and ordered easy→hard inside.
    stages = [x["stage"] for x in got]
    assert stages == sorted(stages)
    for s in range(len(sizes)):
        m = [x["margin"] for x in got if x["stage"] == s]
        assert m == sorted(m, reverse=True)
    sampler = prefops.CurriculumSampler(r.table, batch_size=32, seed=0)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(len(got)))
    assert [stages[i] for i in seen] == sorted(stages)


def test_hh_flip_and_augment_on_real_pairs(shared_data):
    pairs = prefops.prep(shared_data / "hh_harmless_test.jsonl.gz", skip_invalid=True).table
    r = prefops.flip_labels(pairs, rate=0.2, seed=0)
    want, counts = ref.flip(pairs.to_pylist(), rate=0.2, seed=0)
    same(r.table.to_pylist(), want)
    assert 0.17 < counts["random"] / pairs.num_rows < 0.23
    # HH has no scores: augmentation says which row and column.
    with pytest.raises(prefops.DataError, match=r"row 0, field 'score_chosen'.*got null"):
        prefops.reward_augment(pairs)


def test_llamafactory_conversational_augment(shared_data):
    pairs = prefops.prep(shared_data / "llamafactory_dpo_en_demo.json").table
    n = pairs.num_rows
    t = (pairs.drop_columns(["score_chosen", "score_rejected"])
         .append_column("score_chosen", pa.array([float(8 + i % 3) for i in range(n)]))
         .append_column("score_rejected", pa.array([2.5 + i % 4 for i in range(n)])))
    got = prefops.reward_augment(t, template="ultrafeedback").table
    same(got.to_pylist(), ref.augment(t.to_pylist(), prefops.steps.TEMPLATES["ultrafeedback"]))
    assert got.num_rows == 2 * n


# ---- the sampler ------------------------------------------------------------------------------

def test_curriculum_sampler_batches_stage_by_stage():
    stages = [0, 1, 0, 2, 1, 0, 0, 1]
    S = prefops.CurriculumSampler
    s = S(stages, batch_size=2, shuffle=False)
    assert list(s) == [[0, 2], [5, 6], [1, 4], [7], [3]] and len(s) == 5
    s = S(stages, batch_size=2, shuffle=False, drop_last=True)
    assert list(s) == [[0, 2], [5, 6], [1, 4]] and len(s) == 3
    a, b = list(S(stages, batch_size=3, seed=5)), list(S(stages, batch_size=3, seed=5))
    assert a == b
    for batch in a:
        assert len({stages[i] for i in batch}) == 1
    assert [stages[i] for batch in a for i in batch] == sorted(stages)
    s = S(stages, batch_size=3, seed=5)
    orders = set()
    for epoch in range(8):
        s.set_epoch(epoch)
        orders.add(tuple(i for batch in s for i in batch))
    assert len(orders) > 1
    s.set_stage(1)
    assert sorted(i for batch in s for i in batch) == [1, 4, 7] and len(s) == 1
    with pytest.raises(ValueError, match="no stage 9"):
        s.set_stage(9)
    assert S(pa.table({"x": [1, 2, 3]}), batch_size=2, shuffle=False).stage_sizes == {0: 3}


def test_curriculum_sampler_is_a_torch_sampler_when_torch_is_there():
    torch = pytest.importorskip("torch")
    r = prefops.curriculum(prefops.prep(prefops.sample_path("imagereward"), strategy="best_vs_each"))
    sampler = prefops.CurriculumSampler(r.table, batch_size=16, seed=0)
    assert isinstance(sampler, torch.utils.data.Sampler)
    data = list(range(r.table.num_rows))
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    assert sum(len(b) for b in loader) == len(data)
