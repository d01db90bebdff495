#!/usr/bin/env python3
"""Pair-table steps benchmark: prefops (Rust) vs the pure-Python reference vs the obvious
polars query, on generated pairs tables held in memory (Arrow in, Arrow out).

Cases: curriculum (stages schedule and global order), flip (F-DPO factuality rule; seeded
random rate), reward augmentation. Each contender gets the same input in its native form
(prefops: a pyarrow.Table; polars: a DataFrame; pure Python: a list of row dicts, converted
outside the timing, which favours Python) and returns its native output. Outputs are checked
against prefops (pure Python: equal rows; polars: the key columns), except polars' random flip,
which uses polars' own hash (same cost, different decisions).

    python benches/bench_steps.py --rows 20000      # smoke test
    python benches/bench_steps.py                   # 1,000,000 pairs

Writes benches/results/steps_cpu.csv (rows/s medians and ratios).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _common import cpu_model, timed, write_csv

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))  # the pure-Python reference lives beside the tests

CSV_COLUMNS = ["case", "contender", "rows_in", "rows_out", "median_s", "rows_per_s", "speedup_vs_python",
               "speedup_vs_polars", "verified", "threads", "repeats", "cpu_model", "notes"]


def generate(n: int, seed: int):
    """A pairs table like `prefops prep` writes, n rows, ~4 pairs per prompt."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    n_prompts = max(1, n // 4)
    prompt_of = np.sort(rng.integers(0, n_prompts, size=n))
    words = np.array(["alpha", "beta", "gamma", "delta", "café", "naïve", "quote\"d", "line\nbreak", "omega",
                      "theta", "kappa", "sigma"])
    pick = rng.integers(0, len(words), size=(n_prompts, 8))
    prompts = [" ".join(words[row]) + f" #{i}?" for i, row in enumerate(pick)]
    prompt_ids = [f"{x:016x}" for x in rng.integers(0, 2**63, size=n_prompts)]
    sc = rng.integers(1, 11, size=n).astype(float)
    sr = np.minimum(sc, rng.integers(1, 11, size=n)).astype(float)
    resp = rng.integers(0, len(words), size=(n, 2, 12))
    table = pa.table({
        "prompt_id": pa.array([prompt_ids[p] for p in prompt_of]),
        "pair_id": pa.array([f"{x:016x}" for x in rng.integers(0, 2**63, size=n)]),
        "prompt": pa.array([prompts[p] for p in prompt_of]),
        "chosen": pa.array([" ".join(words[r[0]]) + f" c{i}" for i, r in enumerate(resp)]),
        "rejected": pa.array([" ".join(words[r[1]]) + f" r{i}" for i, r in enumerate(resp)]),
        "score_chosen": sc,
        "score_rejected": sr,
        "margin": sc - sr,
        "chosen_model": pa.array(rng.choice(["gpt-4", "llama-2-70b", "vicuna-33b"], size=n)),
        "rejected_model": pa.array(rng.choice(["gpt-4", "llama-2-70b", "vicuna-33b"], size=n)),
        "chosen_hallucinated": rng.random(n) < 0.3,
        "rejected_hallucinated": rng.random(n) < 0.3,
    })
    return table


# --------------------------------------------------------------------------------------------
# polars: the obvious query for each step
# --------------------------------------------------------------------------------------------

PAIRED = [("chosen", "rejected"), ("score_chosen", "score_rejected"), ("chosen_model", "rejected_model"),
          ("chosen_hallucinated", "rejected_hallucinated")]


def polars_swap(pl, mask):
    exprs = []
    for a, b in PAIRED:
        exprs.append(pl.when(mask).then(pl.col(b)).otherwise(pl.col(a)).alias(a))
        exprs.append(pl.when(mask).then(pl.col(a)).otherwise(pl.col(b)).alias(b))
    exprs.append(pl.when(mask).then(-pl.col("margin")).otherwise(pl.col("margin")).alias("margin"))
    return exprs


def polars_cases(pl):
    def curriculum_stages(df):
        return (df.sort(["margin", "pair_id"], descending=[True, False], maintain_order=True)
                .with_columns(stage=pl.int_range(pl.len()).over("prompt_id"))
                .sort(["stage", "margin", "pair_id"], descending=[False, True, False], maintain_order=True))

    def curriculum_global(df):
        return df.sort(["margin", "pair_id"], descending=[True, False], maintain_order=True)

    def flip_factual(df):
        mask = pl.col("chosen_hallucinated") & ~pl.col("rejected_hallucinated")
        return df.with_columns(*polars_swap(pl, mask), flipped=mask)

    def flip_random(df):
        mask = (pl.col("pair_id").hash(0) // 2048).cast(pl.Float64) / float(1 << 53) < 0.1
        return df.with_columns(*polars_swap(pl, mask), flipped=mask)

    def augment(df):
        fmt = lambda col: pl.col(col).cast(pl.Int64).cast(pl.Utf8)  # integral scores in this data
        a = df.with_columns(
            prompt=pl.format("Target score: {}.\n\n{}", fmt("score_chosen"), pl.col("prompt")),
            pair_id=pl.col("pair_id") + ":c", source_pair_id=pl.col("pair_id"),
            conditioned_on=pl.lit("chosen"), target_score=pl.col("score_chosen"))
        # One with_columns: every expression sees the input columns (before the swap).
        b = df.with_columns(
            *polars_swap(pl, pl.lit(True)),
            prompt=pl.format("Target score: {}.\n\n{}", fmt("score_rejected"), pl.col("prompt")),
            pair_id=pl.col("pair_id") + ":r", source_pair_id=pl.col("pair_id"),
            conditioned_on=pl.lit("rejected"), target_score=pl.col("score_rejected"))
        return pl.concat([a, b])

    return {
        "curriculum_stages": curriculum_stages,
        "curriculum_global": curriculum_global,
        "flip_factual": flip_factual,
        "flip_random": flip_random,
        "augment": augment,
    }


def prefops_cases(prefops, threads):
    return {
        "curriculum_stages": lambda t: prefops.curriculum(t, threads=threads).table,
        "curriculum_global": lambda t: prefops.curriculum(t, schedule="global", threads=threads).table,
        "flip_factual": lambda t: prefops.flip_labels(t, factual=True, threads=threads).table,
        "flip_random": lambda t: prefops.flip_labels(t, rate=0.1, seed=0, threads=threads).table,
        "augment": lambda t: prefops.reward_augment(t, threads=threads).table,
    }


def python_cases(ref):
    template = "Target score: {score}.\n\n{prompt}"
    return {
        "curriculum_stages": lambda rows: ref.curriculum(rows),
        "curriculum_global": lambda rows: ref.curriculum(rows, schedule="global"),
        "flip_factual": lambda rows: ref.flip(rows, factual=("chosen_hallucinated", "rejected_hallucinated",
                                                             "hallucinated"))[0],
        "flip_random": lambda rows: ref.flip(rows, rate=0.1, seed=0)[0],
        "augment": lambda rows: ref.augment(rows, template),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="pairs in the generated table (default 1,000,000)")
    p.add_argument("--python-rows", type=int, default=None,
                   help="run pure Python on the first N rows only (rows/s compared); default all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="runs per prefops/polars case (median; default 5)")
    p.add_argument("--python-repeats", type=int, default=1, help="runs per pure-Python case (default 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for prefops and polars (default 2)")
    p.add_argument("--cases", nargs="*", default=None, help="subset of cases")
    p.add_argument("--skip-python", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "steps_cpu.csv")
    p.add_argument("--note", default="", help="free text for the notes column")
    args = p.parse_args(argv)

    os.environ["POLARS_MAX_THREADS"] = str(args.threads)  # before polars is imported
    import polars as pl
    import pyarrow as pa

    import prefops
    import reference_steps as ref

    t0 = time.perf_counter()
    table = generate(args.rows, args.seed)
    print(f"generated {table.num_rows:,} pairs in {time.perf_counter() - t0:.1f} s "
          f"({table.nbytes / 2**20:.0f} MiB in Arrow)", flush=True)
    df = pl.from_arrow(table)
    py_n = min(args.python_rows or args.rows, args.rows)
    rows = None
    if not args.skip_python:
        t0 = time.perf_counter()
        rows = table.slice(0, py_n).to_pylist()
        print(f"converted {py_n:,} rows to Python dicts in {time.perf_counter() - t0:.1f} s (not timed)", flush=True)

    ours, theirs, plain = prefops_cases(prefops, args.threads), polars_cases(pl), python_cases(ref)
    cases = args.cases or list(ours)
    results = []
    for case in cases:
        print(f"\n== {case}", flush=True)
        t_ours, out = timed(ours[case], args.repeats, table)
        rps_ours = table.num_rows / t_ours
        print(f"  prefops  {t_ours:8.3f} s  {rps_ours:>12,.0f} rows/s  -> {out.num_rows:,} rows", flush=True)
        rec = {"ours": (t_ours, rps_ours, out.num_rows)}

        t_pl, out_pl = timed(theirs[case], args.repeats, df)
        rps_pl = table.num_rows / t_pl
        if case == "flip_random":
            verified_pl = "n/a (polars hash)"
        else:
            keys = [c for c in ("pair_id", "chosen", "rejected", "margin", "stage", "prompt") if c in out.column_names]
            got = out_pl.select(keys).to_arrow()
            verified_pl = all(got.column(k).to_pylist() == out.column(k).to_pylist() for k in keys)
        print(f"  polars   {t_pl:8.3f} s  {rps_pl:>12,.0f} rows/s  verified={verified_pl}", flush=True)
        rec["polars"] = (t_pl, rps_pl, out_pl.height, verified_pl)
        del out_pl

        if rows is not None:
            t_py, out_py = timed(plain[case], args.python_repeats, rows)
            rps_py = py_n / t_py
            mine = out if py_n == args.rows else ours[case](table.slice(0, py_n))
            verified_py = mine.to_pylist() == out_py
            print(f"  python   {t_py:8.3f} s  {rps_py:>12,.0f} rows/s  verified={verified_py}"
                  + (f" (first {py_n:,} rows)" if py_n != args.rows else ""), flush=True)
            rec["python"] = (t_py, rps_py, len(out_py), verified_py)
            del out_py, mine
        del out
        results.append((case, rec))

    model = cpu_model()
    note = args.note
    out_rows = []
    for case, rec in results:
        rps_ours = rec["ours"][1]
        vs_py = f"{rps_ours / rec['python'][1]:.2f}" if "python" in rec else ""
        vs_pl = f"{rps_ours / rec['polars'][1]:.2f}"
        out_rows.append({"case": case, "contender": "prefops", "rows_in": args.rows, "rows_out": rec["ours"][2],
                         "median_s": f"{rec['ours'][0]:.4f}", "rows_per_s": f"{rps_ours:.0f}",
                         "speedup_vs_python": vs_py, "speedup_vs_polars": vs_pl, "verified": "reference",
                         "threads": args.threads, "repeats": args.repeats, "cpu_model": model, "notes": note})
        t, rps, n_out, ver = rec["polars"]
        out_rows.append({"case": case, "contender": "polars", "rows_in": args.rows, "rows_out": n_out,
                         "median_s": f"{t:.4f}", "rows_per_s": f"{rps:.0f}", "speedup_vs_python": "",
                         "speedup_vs_polars": "", "verified": ver, "threads": args.threads,
                         "repeats": args.repeats, "cpu_model": model, "notes": note})
        if "python" in rec:
            t, rps, n_out, ver = rec["python"]
            out_rows.append({"case": case, "contender": "python", "rows_in": py_n, "rows_out": n_out,
                             "median_s": f"{t:.4f}", "rows_per_s": f"{rps:.0f}", "speedup_vs_python": "",
                             "speedup_vs_polars": "", "verified": ver, "threads": 1,
                             "repeats": args.python_repeats, "cpu_model": model,
                             "notes": (note + "; " if note else "") + "step only: dict rows made before timing"})
    write_csv(args.out, CSV_COLUMNS, out_rows)
    print(f"\nwrote {args.out}")
    print("\ncase                prefops rows/s   vs python   vs polars")
    for r in out_rows:
        if r["contender"] == "prefops":
            print(f"{r['case']:<20}{int(r['rows_per_s']):>14,}   {r['speedup_vs_python']:>9}   {r['speedup_vs_polars']:>9}")


if __name__ == "__main__":
    main()
