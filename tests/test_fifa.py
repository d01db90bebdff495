"""FiFA filtering and its kNN tools against independent numpy references: k-th-neighbour
distances by brute force in float64, the Kozachenko–Leonenko estimate against closed-form
entropies (and against the formula evaluated on brute-force radii), importance and top-k
selection recomputed in numpy/Python; determinism across threads and batching; errors; the CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prefops
from conftest import read_jsonl

EULER = 0.5772156649015329


# ------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------

def brute_knn(x, k, metric):
    """float64 brute force: (distances, indices) [N, k], ties by index (stable sort)."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "l2":
        d = np.concatenate([np.sqrt(((x[s:s + 128, None, :] - x[None, :, :]) ** 2).sum(-1))
                            for s in range(0, len(x), 128)])
    else:
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = 1.0 - u @ u.T
        d = np.maximum(d, 0.0)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def digamma_int(n):
    """psi(n) for a positive integer: H_{n-1} - Euler's constant."""
    return math.fsum(1.0 / i for i in range(1, n)) - EULER


def kl_entropy_reference(x, k):
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    radius = brute_knn(x, k, "l2")[0][:, k - 1]
    log_ball = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)
    return digamma_int(n) - digamma_int(k) + log_ball + d * float(np.mean(np.log(radius)))


def fifa_reference(rows, emb, *, alpha, gamma, k, metric, keep, floor=1e-6, quality=None):
    """rows: dicts with prompt_id, pair_id, margin (and the quality column); emb: {prompt_id:
    vector} (the kNN population). Returns (kept rows in input order, importances, radii)."""
    ids = list(emb)
    mat = np.array([emb[i] for i in ids], dtype=np.float32)
    radius = dict(zip(ids, brute_knn(mat, k, metric)[0][:, k - 1]))
    imp = []
    for r in rows:
        q = r[quality] if quality else 0.0
        imp.append(r["margin"] + gamma * q + alpha * math.log(max(radius[r["prompt_id"]], floor)))
    order = sorted(range(len(rows)), key=lambda i: (-imp[i], rows[i]["pair_id"].encode(), i))
    kept = sorted(order[:keep])
    return [rows[i] for i in kept], [imp[i] for i in kept], radius


def matrix(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# kNN
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,d,k", [(2, 1, 1), (50, 3, 5), (300, 129, 1), (1100, 13, 4), (40, 770, 7)])
def test_knn_matches_numpy_brute_force(n, d, k, metric):
    x = matrix(n, d, seed=n + d)
    dist, idx = prefops.knn_search(x, k, metric=metric, threads=2)
    want_d, want_i = brute_knn(x, k, metric)
    assert dist.shape == idx.shape == (n, k) and dist.dtype == np.float64 and idx.dtype == np.int64
    np.testing.assert_allclose(dist, want_d, rtol=1e-9, atol=1e-12)
    assert (idx == want_i).all()  # random data: no ties
    np.testing.assert_allclose(prefops.knn_radius(x, k, metric=metric), want_d[:, -1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicates_are_at_distance_zero(metric):
    x = matrix(200, 24, seed=3) * 10
    x[7] = x[150]
    x[8] = x[150] * (2.0 if metric == "cosine" else 1.0)  # same direction
    dist, idx = prefops.knn_search(x, 2, metric=metric)
    for a, others in [(150, {7, 8}), (7, {150, 8}), (8, {7, 150})]:
        assert set(idx[a]) == others, (a, idx[a])
        assert dist[a].max() <= 1e-12
    assert dist[0, 0] > 0.1


def test_knn_threads_and_ivf_are_deterministic():
    x = matrix(1500, 20, seed=5)
    for mode in ["exact", "ivf"]:
        runs = [prefops.knn_search(x, 3, metric="l2", knn=mode, threads=t, seed=1) for t in (1, 2, 3)]
        for d, i in runs[1:]:
            assert d.tobytes() == runs[0][0].tobytes() and i.tobytes() == runs[0][1].tobytes()


def clustered(n_clusters, per, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, size=(n_clusters, d))
    return (np.repeat(centers, per, axis=0) + rng.standard_normal((n_clusters * per, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ivf_recall_and_full_probe_is_exact(metric):
    x = clustered(30, 100, 24, seed=1)
    k = 5
    want_d, exact_i = brute_knn(x, k, metric)
    d, i = prefops.knn_search(x, k, metric=metric, knn="ivf", nlist=30, nprobe=3, seed=0)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i, exact_i)])
    assert recall >= 0.9, recall
    # Found neighbours are real ones: their distances are exact, never below the true k-NN.
    assert (d >= want_d - 1e-9).all()
    # Probing every cluster searches every row: the exact answer.
    d_all, i_all = prefops.knn_search(x, k, metric=metric, knn="ivf", nlist=30, nprobe=30)
    np.testing.assert_allclose(d_all, want_d, rtol=1e-9, atol=1e-12)


def test_knn_errors():
    with pytest.raises(ValueError, match="need at least 6 rows"):
        prefops.knn_search(matrix(5, 3), 5)
    x = matrix(10, 3)
    x[4] = 0
    with pytest.raises(ValueError, match="row 4: embedding is all zeros"):
        prefops.knn_search(x, 2, metric="cosine")
    prefops.knn_search(x, 2, metric="l2")  # fine for L2
    x[6, 1] = np.nan
    with pytest.raises(ValueError, match="row 6: embedding value NaN at position 1 is not finite"):
        prefops.knn_search(x, 2, metric="l2")
    with pytest.raises(ValueError, match="2-D"):
        prefops.knn_search(np.zeros(5, np.float32), 1)
    with pytest.raises(ValueError, match="unknown kNN metric 'manhattan'"):
        prefops.knn_search(matrix(5, 2), 1, metric="manhattan")
    with pytest.raises(ValueError, match="knn must be one of"):
        prefops.knn_search(matrix(5, 2), 1, knn="hnsw")


# ------------------------------------------------------------------------------------------
# entropy
# ------------------------------------------------------------------------------------------

def test_entropy_is_the_kl_formula():
    x = np.random.default_rng(2).standard_normal((700, 4))
    for k in (1, 3, 8):
        assert prefops.knn_entropy(x.astype(np.float32), k) == pytest.approx(
            kl_entropy_reference(x.astype(np.float32), k), abs=1e-9)


def test_entropy_of_known_distributions():
    # Gaussian: H = ½ ln((2πe)^d det Σ). Over seeds the estimate at N = 4000, k = 3 lies within
    # ±0.05 of it; 0.1 leaves room.
    cov = np.array([[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]])
    want = 0.5 * math.log((2 * math.pi * math.e) ** 3 * np.linalg.det(cov))
    x = np.random.default_rng(0).multivariate_normal(np.zeros(3), cov, size=4000)
    assert abs(prefops.knn_entropy(x, 3) - want) < 0.1
    # Uniform on [0, 2]^d: H = d ln 2. The estimator overestimates near the faces (about
    # +0.08 at d = 3, N = 4000), hence the looser bound there.
    for d, tol in [(1, 0.03), (2, 0.06), (3, 0.15)]:
        x = np.random.default_rng(d).uniform(0, 2, size=(4000, d))
        assert abs(prefops.knn_entropy(x, 3) - d * math.log(2)) < tol, d
    # Scaling by c adds d ln c, exactly (up to rounding).
    x = np.random.default_rng(9).standard_normal((500, 2))
    assert prefops.knn_entropy(4 * x, 2) - prefops.knn_entropy(x, 2) == pytest.approx(2 * math.log(4), abs=1e-6)


def test_entropy_rejects_repeated_rows():
    x = matrix(50, 2)
    x[1] = x[2] = x[0]
    with pytest.raises(ValueError, match="distance 0"):
        prefops.knn_entropy(x, 2)
    assert math.isfinite(prefops.knn_entropy(x, 3))


# ------------------------------------------------------------------------------------------
# FiFA
# ------------------------------------------------------------------------------------------

def pairs_and_embeddings(n_prompts=60, n_pairs=300, dim=8, seed=0, dup=True):
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n_prompts)]
    emb = rng.standard_normal((n_prompts, dim)).astype(np.float32)
    if dup:
        emb[5] = emb[4]  # a duplicated prompt: rho_1 = 0, floored
    rows = []
    for j in range(n_pairs):
        rows.append({
            "prompt_id": ids[int(rng.integers(0, n_prompts))],
            "pair_id": f"{int(rng.integers(0, 10**6)):06x}",
            "margin": float(rng.choice([0.5, 1.0, 2.0, 3.0])),  # many ties before the kNN term
            "quality": float(rng.integers(0, 5)),
            "id": j,
        })
    return rows, ids, emb


def kept_ids(result):
    return result.table.column("id").to_pylist()


@pytest.mark.parametrize("metric,k", [("l2", 1), ("cosine", 3)])
def test_fifa_matches_numpy_reference(metric, k):
    rows, ids, emb = pairs_and_embeddings()
    table = pa.Table.from_pylist(rows)
    want_rows, want_imp, radius = fifa_reference(rows, dict(zip(ids, emb)), alpha=0.7, gamma=0.25, k=k,
                                                 metric=metric, keep=120, quality="quality")
    r = prefops.fifa_filter(table, emb, prompt_ids=ids, alpha=0.7, gamma=0.25, k=k, metric=metric,
                            keep_count=120, quality_column="quality")
    assert kept_ids(r) == [x["id"] for x in want_rows]
    np.testing.assert_allclose(r.table.column("importance").to_numpy(), want_imp, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r.table.column("knn_distance").to_numpy(),
                               [radius[x["prompt_id"]] for x in want_rows], rtol=1e-9, atol=1e-12)
    s = r.stats
    assert (s["rows"], s["kept"], s["dropped"]) == (300, 120, 180) == (300, r.table.num_rows, 300 - r.table.num_rows)
    assert s["threshold_importance"] == pytest.approx(min(want_imp), abs=1e-10)
    assert s["prompts"] == 60 and s["prompts_in_pairs"] == len({x["prompt_id"] for x in rows})
    assert s["duplicate_embeddings"] == 1 and s["embedding_dim"] == 8
    assert s["floored_prompts"] == (2 if k == 1 else 0)
    all_imp = fifa_reference(rows, dict(zip(ids, emb)), alpha=0.7, gamma=0.25, k=k, metric=metric, keep=300,
                             quality="quality")[1]
    assert s["importance"]["mean"] == pytest.approx(np.mean(all_imp), abs=1e-9)
    assert s["quality"] == {"min": 0.0, "mean": pytest.approx(np.mean([x["quality"] for x in rows])), "max": 4.0}
    assert s["margin"]["max"] == 3.0 and s["metric"] == metric and s["knn"] == "exact" and s["k"] == k
    assert r.stats["kept_importance"]["min"] == pytest.approx(min(want_imp), abs=1e-10)


def test_fifa_embedding_sources_agree(tmp_path):
    rows, ids, emb = pairs_and_embeddings(dup=False)
    by_id = dict(zip(ids, emb))
    opts = dict(alpha=1.0, gamma=0.0, k=2, keep_fraction=0.3)
    want = kept_ids(prefops.fifa_filter(pa.Table.from_pylist(rows), emb, prompt_ids=ids, **opts))
    assert len(want) == 90
    # Embedding column in the pairs table: fixed-size list<float32> and list<double>.
    col = pa.FixedSizeListArray.from_arrays(pa.array(np.stack([by_id[r["prompt_id"]] for r in rows]).ravel()), 8)
    with_col = pa.Table.from_pylist(rows).append_column("embedding", col)
    assert kept_ids(prefops.fifa_filter(with_col, **opts)) == want
    as_lists = pa.Table.from_pylist([{**r, "vec": [float(v) for v in by_id[r["prompt_id"]]]} for r in rows])
    assert kept_ids(prefops.fifa_filter(as_lists, embedding_column="vec", **opts)) == want
    # A Parquet file of prompt_id + embedding, and the same as an Arrow table; pairs from a file.
    emb_table = pa.table({"prompt_id": ids, "embedding": [list(map(float, v)) for v in emb]})
    pq.write_table(emb_table, tmp_path / "emb.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    assert kept_ids(prefops.fifa_filter(tmp_path / "pairs.parquet", tmp_path / "emb.parquet", **opts)) == want
    assert kept_ids(prefops.fifa_filter(pa.Table.from_pylist(rows), emb_table, **opts)) == want
    # Extra prompts in the embeddings join the kNN population (and change the radii).
    extra = np.concatenate([emb, emb[:10] + 1e-3]).astype(np.float32)
    r = prefops.fifa_filter(pa.Table.from_pylist(rows), extra, prompt_ids=ids + [f"x{i}" for i in range(10)], **opts)
    assert r.stats["prompts"] == 70 and r.stats["prompts_in_pairs"] == len({x["prompt_id"] for x in rows}) < 70


def test_fifa_deterministic_across_threads_batches_and_ivf(tmp_path):
    rows, ids, emb = pairs_and_embeddings(n_prompts=300, n_pairs=2000, seed=4)
    table = pa.Table.from_pylist(rows)
    outputs = []
    for threads, chunk in [(1, None), (2, 7), (3, 500)]:
        t = pa.Table.from_batches(table.to_batches(max_chunksize=chunk)) if chunk else table
        for knn in ["exact", "ivf"]:
            out = tmp_path / f"o{threads}{knn}.parquet"
            prefops.fifa_filter(t, emb, prompt_ids=ids, k=4, keep_fraction=0.25, knn=knn, nlist=12, threads=threads,
                                output=out)
            outputs.append((knn, out.read_bytes()))
    for knn in ["exact", "ivf"]:
        blobs = {b for m, b in outputs if m == knn}
        assert len(blobs) == 1, knn


@settings(max_examples=60, deadline=None)
@given(
    margins=st.lists(st.sampled_from([-1.0, 0.0, -0.0, 0.5, 2.0]), min_size=0, max_size=40),
    pair_ids=st.lists(st.sampled_from(["a", "b", "ab", "c", "é"]), min_size=40, max_size=40),
    budget=st.one_of(st.integers(0, 45).map(lambda c: ("count", c)),
                     st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0]).map(lambda f: ("fraction", f))),
)
def test_selection_property(margins, pair_ids, budget):
    """With alpha = 0 only margins count: the kept rows are the first of the order (margin desc,
    pair_id bytes asc, position asc), shown in input order; counts reconcile."""
    n = len(margins)
    emb = np.eye(4, dtype=np.float32)
    rows = [{"prompt_id": f"p{i % 4}", "pair_id": pair_ids[i], "margin": m, "id": i} for i, m in enumerate(margins)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([("prompt_id", pa.string()), ("pair_id", pa.string()),
                                                         ("margin", pa.float64()), ("id", pa.int64())]))
    kind, value = budget
    keep = min(value, n) if kind == "count" else int(math.floor(value * n + 0.5))
    kw = {"keep_count": value} if kind == "count" else {"keep_fraction": value}
    r = prefops.fifa_filter(table, emb, prompt_ids=["p0", "p1", "p2", "p3"], alpha=0.0, k=1, **kw)
    order = sorted(range(n), key=lambda i: (-(margins[i] + 0.0), pair_ids[i].encode(), i))
    assert kept_ids(r) == sorted(order[:keep])
    assert r.stats["kept"] == r.table.num_rows == keep and r.stats["dropped"] == n - keep
    if keep:
        assert r.stats["threshold_importance"] == margins[order[keep - 1]]
    else:
        assert r.stats["threshold_importance"] is None


def test_fifa_errors():
    rows, ids, emb = pairs_and_embeddings(n_prompts=10, n_pairs=20, dup=False)
    table = pa.Table.from_pylist(rows)
    bad = table.set_column(0, "prompt_id", pa.array([r["prompt_id"] for r in rows[:3]] + ["nope"] +
                                                    [r["prompt_id"] for r in rows[4:]]))
    with pytest.raises(prefops.DataError, match=r"<arrow>: row 3, field 'prompt_id': no embedding for prompt 'nope'"):
        prefops.fifa_filter(bad, emb, prompt_ids=ids, k=2, keep_count=3)
    m = table.column("margin").to_pylist()
    m[5] = float("nan")
    with pytest.raises(prefops.DataError, match=r"row 5, field 'margin': the FiFA margin must be finite, got NaN"):
        prefops.fifa_filter(table.set_column(2, "margin", pa.array(m)), emb, prompt_ids=ids, k=2, keep_count=3)
    with pytest.raises(prefops.DataError, match=r"missing column 'score'"):
        prefops.fifa_filter(table, emb, prompt_ids=ids, k=2, keep_count=3, quality_column="score")
    nan = emb.copy()
    nan[2, 3] = np.nan
    with pytest.raises(prefops.DataError, match=r"row 2, field 'embedding': embedding of prompt 'p002' has NaN"):
        prefops.fifa_filter(table, nan, prompt_ids=ids, k=2, keep_count=3)
    # The pairs' own column: one prompt, two different embeddings.
    vec = [[1.0, float(i == 7)] for i in range(len(rows))]
    same_prompt = pa.Table.from_pylist([{**r, "prompt_id": "p000" if i in (0, 7) else r["prompt_id"]}
                                        for i, r in enumerate(rows)]).append_column("embedding", pa.array(vec))
    with pytest.raises(prefops.DataError, match=r"row 7, field 'embedding': prompt 'p000' has a different embedding"):
        prefops.fifa_filter(same_prompt, k=1, keep_count=3, metric="l2")
    with pytest.raises(prefops.DataError, match=r"missing column 'embedding'"):
        prefops.fifa_filter(table, k=2, keep_count=3)
    with pytest.raises(ValueError, match="need at least 11 prompts"):
        prefops.fifa_filter(table, emb, prompt_ids=ids, k=10, keep_count=3)
    with pytest.raises(ValueError, match="exactly one of keep_count and keep_fraction"):
        prefops.fifa_filter(table, emb, prompt_ids=ids)
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        prefops.fifa_filter(table, emb, prompt_ids=ids, keep_fraction=1.5)
    with pytest.raises(ValueError, match="prompt_ids"):
        prefops.fifa_filter(table, emb, keep_count=3)
    with pytest.raises(ValueError, match="prompt_ids has 3 ids for 10"):
        prefops.fifa_filter(table, emb, prompt_ids=ids[:3], keep_count=3)


def test_fifa_on_real_sample_and_chaining(shared_data):
    pairs = prefops.prep(shared_data / "imagereward_test.json", strategy="best_vs_each")
    ids = sorted(set(pairs.table.column("prompt_id").to_pylist()))
    emb = np.random.default_rng(0).standard_normal((len(ids), 32)).astype(np.float32)
    r = prefops.fifa_filter(pairs, emb, prompt_ids=ids, alpha=0.5, k=5, keep_fraction=0.2)
    assert r.stats["kept"] == r.table.num_rows == round(0.2 * pairs.table.num_rows)
    assert r.table.column_names == pairs.table.column_names + ["importance", "knn_distance"]
    staged = prefops.curriculum(r)  # a StepResult chains into the next step
    assert staged.table.num_rows == r.table.num_rows
    assert "fifa" in r.summary() and "kept" in r.summary()


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def run(*args):
    return subprocess.run([sys.executable, "-m", "prefops.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_fifa(tmp_path):
    rows, ids, emb = pairs_and_embeddings(dup=False)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"prompt_id": ids, "vec": [list(map(float, v)) for v in emb]}), tmp_path / "emb.parquet")
    out, stats = tmp_path / "kept.jsonl", tmp_path / "stats.json"
    r = run("fifa", tmp_path / "pairs.parquet", "--embeddings", tmp_path / "emb.parquet", "--embedding-column", "vec",
            "-o", out, "--alpha", "0.5", "--gamma", "2", "--quality-column", "quality", "--k", "3", "--metric", "l2",
            "--keep-fraction", "0.4", "--stats", stats, "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "kept 120" in r.stderr and "exact l2, k = 3" in r.stderr
    got = read_jsonl(out)
    want, want_imp, _ = fifa_reference(rows, dict(zip(ids, emb)), alpha=0.5, gamma=2.0, k=3, metric="l2", keep=120,
                                       quality="quality")
    assert [x["id"] for x in got] == [x["id"] for x in want]
    np.testing.assert_allclose([x["importance"] for x in got], want_imp, rtol=1e-10)
    report = json.loads(stats.read_text())
    assert report["step"] == "fifa" and report["outputs"] == [str(out)] and report["kept"] == len(got) == 120
    assert report["rows"] == 300 and report["dropped"] == 180 and report["embedding_column"] == "vec"

    # A prompt without an embedding: exit 1, the error names it, and no output appears.
    bad = tmp_path / "bad.jsonl"
    r = run("fifa", tmp_path / "pairs.parquet", "--embeddings", tmp_path / "emb.parquet", "-o", bad,
            "--embedding-column", "vec", "--keep-count", "5", "--k", "70")
    assert r.returncode == 1 and "need at least 71 prompts" in r.stderr and not bad.exists()
    pq.write_table(pa.table({"prompt_id": ids[1:], "vec": [list(map(float, v)) for v in emb[1:]]}),
                   tmp_path / "emb2.parquet")
    r = run("fifa", tmp_path / "pairs.parquet", "--embeddings", tmp_path / "emb2.parquet", "-o", bad,
            "--embedding-column", "vec", "--keep-count", "5")
    assert r.returncode == 1 and "no embedding for prompt 'p000'" in r.stderr and not bad.exists()
    assert list(tmp_path.glob("*.partial")) == [] and list(tmp_path.glob(".bad*")) == []
    r = run("fifa", tmp_path / "pairs.parquet", "-o", bad)
    assert r.returncode == 2 and "--keep-count" in r.stderr
