#!/usr/bin/env python3
"""FiFA benchmark: the exact kNN radius (distance to the k-th nearest other row) of an
[N, D] float32 matrix, prefops vs a numpy brute force, and the whole FiFA step on a pairs
table vs a numpy + polars reference. Same process, same input, medians.

kNN contenders (L2 by default):
  prefops     prefops.knn_radius(x, k, metric, threads)
  numpy       blocked brute force: for each block of 2048 rows, G = X_b @ X.T (OpenBLAS),
              d2 = |y|^2 - 2 G, self masked, np.partition for the k-th smallest, then
              sqrt(d2 + |x|^2)
  numpy_gemm  the BLAS floor of that: the X_b @ X.T products alone, nothing selected
  prefops_ivf prefops.knn_search(x, k, knn="ivf") (default nlist, nprobe), with recall@k on
              500 sampled rows against a numpy brute force for those rows, and (when the exact
              contender ran) the share of rows whose radius equals the exact one

--data gaussian (default) draws i.i.d. rows: no structure, the worst case for IVF. --data
clustered draws N/100 topic centres and rows = centre + 0.35·noise, closer to real prompt
embeddings; there IVF is the option for millions of rows:

    python benches/bench_fifa.py --data clustered --n 1000000 --metric cosine --repeats 1 \
        --contenders prefops_ivf --skip-step

Step contenders (--pairs rows, --prompts prompts of dimension --step-dim, ~pairs/prompts pairs
per prompt, margin + quality columns):
  prefops     prefops.fifa_filter(table, matrix, prompt_ids=..., keep_fraction=...)
  numpy_polars  numpy radii (the blocked brute force above) + a polars join, the importance
              expression, sort by (importance desc, pair_id) and head(keep), back to input order

    python benches/bench_fifa.py --n 20000 --repeats 3            # ~2 minutes on 2 cores
    python benches/bench_fifa.py --n 100000 --repeats 1 --contenders prefops numpy_gemm --skip-step

Appends to benches/results/fifa_cpu.csv (--out), one row per case and contender.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from _common import cpu_model, timed, write_csv

import numpy as np

HERE = Path(__file__).resolve().parent
CSV_COLUMNS = ["case", "contender", "n", "dim", "k", "metric", "median_s", "repeats", "speedup_vs_numpy",
               "speedup_vs_numpy_gemm", "verified", "threads", "cpu_model", "notes"]
BLOCK = 2048


def numpy_radius(x: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Blocked brute force, BLAS for the products."""
    n = len(x)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True).astype(np.float32)
    sq = np.einsum("ij,ij->i", x, x)
    out = np.empty(n)
    for s in range(0, n, BLOCK):
        g = x[s:s + BLOCK] @ x.T
        rows = np.arange(g.shape[0])
        if metric == "l2":
            g *= -2.0
            g += sq[None, :]
        else:
            np.negative(g, out=g)
        g[rows, rows + s] = np.inf
        kth = np.partition(g, k - 1, axis=1)[:, k - 1].astype(np.float64)
        if metric == "l2":
            out[s:s + BLOCK] = np.sqrt(np.maximum(kth + sq[s:s + BLOCK], 0.0))
        else:
            out[s:s + BLOCK] = 1.0 + kth
    return out


def numpy_gemm_only(x: np.ndarray) -> None:
    for s in range(0, len(x), BLOCK):
        x[s:s + BLOCK] @ x.T


def step_input(n_pairs: int, n_prompts: int, dim: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    ids = [f"{x:016x}" for x in rng.integers(0, 2**63, size=n_prompts)]
    emb = rng.standard_normal((n_prompts, dim)).astype(np.float32)
    prompt_of = np.sort(rng.integers(0, n_prompts, size=n_pairs))
    table = pa.table({
        "prompt_id": pa.array([ids[p] for p in prompt_of]),
        "pair_id": pa.array([f"{x:016x}" for x in rng.integers(0, 2**63, size=n_pairs)]),
        "margin": rng.integers(1, 10, size=n_pairs).astype(np.float64),
        "quality": rng.random(n_pairs),
    })
    return table, ids, emb


def polars_step(pl, table, ids, emb, *, alpha, gamma, k, metric, keep_fraction, floor=1e-6):
    radius = numpy_radius(emb, k, metric)
    radii = pl.DataFrame({"prompt_id": ids, "knn_distance": radius})
    df = pl.from_arrow(table).with_row_index("__row")
    keep = int(math.floor(keep_fraction * df.height + 0.5))
    return (df.join(radii, on="prompt_id", how="left")
            .with_columns(importance=pl.col("margin") + gamma * pl.col("quality")
                          + alpha * pl.col("knn_distance").clip(lower_bound=floor).log())
            .sort(["importance", "pair_id", "__row"], descending=[True, False, False])
            .head(keep)
            .sort("__row"))


def make_matrix(data: str, n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if data == "gaussian":
        return rng.standard_normal((n, dim)).astype(np.float32)
    centres = rng.standard_normal((max(n // 100, 1), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x += 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x


def sampled_recall(x: np.ndarray, indices: np.ndarray, k: int, metric: str, seed: int, queries: int = 500) -> float:
    """recall@k of `indices` on sampled rows, against a brute force for those rows (float64;
    float32 above 200k rows, to keep the copy small)."""
    rng = np.random.default_rng(seed + 1)
    sample = rng.choice(len(x), min(queries, len(x)), replace=False)
    y = x.astype(np.float64 if len(x) <= 200_000 else np.float32)
    if metric == "cosine":
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    sq = np.einsum("ij,ij->i", y, y)
    hits = 0
    for s in range(0, len(sample), 100):
        q = sample[s:s + 100]
        d = sq[None, :] - 2.0 * (y[q] @ y.T)  # squared distance up to a per-row constant: same order
        d[np.arange(len(q)), q] = np.inf
        truth = np.argpartition(d, k - 1, axis=1)[:, :k]
        hits += sum(len(set(indices[r]) & set(truth[j])) for j, r in enumerate(q))
    return hits / (len(sample) * k)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="rows of the kNN matrix (default 100,000)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    p.add_argument("--data", default="gaussian", choices=["gaussian", "clustered"], help="kNN matrix (see above)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="prefops threads (numpy: OpenBLAS default)")
    p.add_argument("--contenders", nargs="*", default=["prefops", "numpy", "numpy_gemm", "prefops_ivf"])
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--prompts", type=int, default=50_000)
    p.add_argument("--step-dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "fifa_cpu.csv")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("POLARS_MAX_THREADS", str(args.threads))

    import prefops

    model = cpu_model()
    rows = []

    def row(case, contender, n, dim, t, reps, verified, speed_np="", speed_gemm="", notes=""):
        rows.append({"case": case, "contender": contender, "n": n, "dim": dim, "k": args.k, "metric": args.metric,
                     "median_s": f"{t:.3f}", "repeats": reps, "speedup_vs_numpy": speed_np,
                     "speedup_vs_numpy_gemm": speed_gemm, "verified": verified, "threads": args.threads,
                     "cpu_model": model, "notes": "; ".join(x for x in (args.note, notes) if x)})

    if not args.skip_knn:
        x = make_matrix(args.data, args.n, args.dim, args.seed)
        print(f"== kNN radius, {args.n:,} x {args.dim} {args.data}, k = {args.k}, {args.metric}", flush=True)
        res = {}
        if "prefops" in args.contenders:
            res["prefops"] = timed(lambda: prefops.knn_radius(x, args.k, metric=args.metric, threads=args.threads),
                                   args.repeats)
            print(f"  prefops     {res['prefops'][0]:8.2f} s", flush=True)
        if "numpy" in args.contenders:
            res["numpy"] = timed(lambda: numpy_radius(x, args.k, args.metric), args.repeats)
            print(f"  numpy       {res['numpy'][0]:8.2f} s", flush=True)
        if "numpy_gemm" in args.contenders:
            res["numpy_gemm"] = timed(lambda: numpy_gemm_only(x), args.repeats)
            print(f"  numpy_gemm  {res['numpy_gemm'][0]:8.2f} s (products only)", flush=True)
        if "prefops_ivf" in args.contenders:
            t_ivf, (dist, idx) = timed(lambda: prefops.knn_search(x, args.k, metric=args.metric, knn="ivf",
                                                                  threads=args.threads), args.repeats)
            res["prefops_ivf"] = (t_ivf, dist[:, -1].astype(np.float64))
            ivf_recall = sampled_recall(x, idx, args.k, args.metric, args.seed)
            print(f"  prefops_ivf {t_ivf:8.2f} s  recall@{args.k} {ivf_recall:.3f} (500 sampled rows)", flush=True)
        for name in ("prefops", "prefops_ivf"):
            if name not in res:
                continue
            t, radius = res[name]
            verified, notes = "", ""
            if name == "prefops" and "numpy" in res:
                rel = np.abs(radius - res["numpy"][1]) / np.maximum(res["numpy"][1], 1e-12)
                verified = bool(rel.max() < 1e-3)
                notes = f"max relative difference to numpy (float32 products) {rel.max():.2e}"
            if name == "prefops_ivf":
                verified = "approximate"
                notes = f"{args.data} data; recall@{args.k} {ivf_recall:.3f} on 500 sampled rows"
                if "prefops" in res:
                    exact = res["prefops"][1]
                    same = np.mean(np.abs(radius - exact) <= 1e-6 * exact)
                    notes += f"; radius exact for {same:.1%} of rows; never below exact: {bool((radius >= exact - 1e-9).all())}"
            sp = f"{res['numpy'][0] / t:.2f}" if "numpy" in res else ""
            sg = f"{res['numpy_gemm'][0] / t:.2f}" if "numpy_gemm" in res else ""
            row("knn_radius", name, args.n, args.dim, t, args.repeats, verified, sp, sg, notes)
            print(f"  {name}: speedup vs numpy {sp or '-'}, vs numpy GEMM alone {sg or '-'}  {notes}", flush=True)
        for name in ("numpy", "numpy_gemm"):
            if name in res:
                row("knn_radius", name, args.n, args.dim, res[name][0], args.repeats, "reference" if name == "numpy"
                    else "", notes="OpenBLAS threads: default")
        del x, res

    if not args.skip_step:
        import polars as pl

        table, ids, emb = step_input(args.pairs, args.prompts, args.step_dim, args.seed)
        opts = dict(alpha=0.5, gamma=1.0, k=args.k, metric=args.metric, keep_fraction=0.1)
        print(f"\n== FiFA step, {args.pairs:,} pairs, {args.prompts:,} prompts x {args.step_dim}", flush=True)
        t_ours, ours = timed(lambda: prefops.fifa_filter(table, emb, prompt_ids=ids, quality_column="quality",
                                                        threads=args.threads, **opts),
                             args.repeats)
        t_ref, ref = timed(lambda: polars_step(pl, table, ids, emb, **opts), args.repeats)
        same = ours.table.column("pair_id").to_pylist() == ref["pair_id"].to_list()
        print(f"  prefops       {t_ours:8.2f} s  (kNN {ours.stats['knn_seconds']:.2f} s)  -> {ours.table.num_rows:,} rows",
              flush=True)
        print(f"  numpy_polars  {t_ref:8.2f} s  same kept pairs: {same}", flush=True)
        row("fifa_step", "prefops", args.pairs, args.step_dim, t_ours, args.repeats, same, f"{t_ref / t_ours:.2f}",
            notes=f"{args.prompts} prompts; kNN {ours.stats['knn_seconds']:.2f} s")
        row("fifa_step", "numpy_polars", args.pairs, args.step_dim, t_ref, args.repeats, "reference",
            notes=f"{args.prompts} prompts")

    write_csv(args.out, CSV_COLUMNS, rows, append=True)
    print(f"\nappended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
