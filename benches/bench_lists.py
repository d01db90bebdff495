#!/usr/bin/env python3
"""Listwise preparation benchmark: prefops.lists (Rust) vs a plain pure-Python loop vs the
obvious polars query, on generated UltraFeedback-style records held in memory (Arrow in, Arrow
out): one instruction and 4–8 scored completions per prompt.

Cases: all responses per prompt (list_size=None) and the top 4 (list_size=4, truncate="top"),
both with dense-rank labels and gains 2^ψ − 1, dedupe on. Each contender gets the input in its
native form (prefops: a pyarrow.Table; polars: a DataFrame; pure Python: a list of record dicts,
converted outside the timing, which favours Python) and returns its native output. Outputs are
compared with prefops: pure Python on every column it makes; polars on prompt, labels, gains and
list sizes (polars' top-K keeps tied responses at the cut in input order, prefops draws them with
the seed, so the responses can differ there but the labels cannot).

    python benches/bench_lists.py --n 20000      # smoke test
    python benches/bench_lists.py                # 1,000,000 prompts

Writes benches/results/lists_cpu.csv (prompts/s medians and ratios).
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
sys.path.insert(0, str(ROOT / "tests"))  # SplitMix64 of the pure-Python reference

CSV_COLUMNS = ["case", "contender", "prompts_in", "lists_out", "median_s", "prompts_per_s", "speedup_vs_python",
               "speedup_vs_polars", "verified", "threads", "repeats", "cpu_model", "notes"]

CASES = {"lists_all": None, "lists_top4": 4}


def generate(n: int, seed: int):
    """UltraFeedback raw layout: instruction, completions[{response, overall_score, model}]."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    sizes = rng.integers(4, 9, size=n)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    total = int(offsets[-1])
    words = np.array(["alpha", "beta", "gamma", "delta", "café", "naïve", "quote\"d", "line\nbreak", "omega",
                      "theta", "kappa", "sigma"])
    pick = rng.integers(0, len(words), size=(n, 6))
    instructions = [" ".join(words[row]) + f" #{i}?" for i, row in enumerate(pick)]
    resp_words = rng.integers(0, len(words), size=(total, 10))
    # ~2% of completions repeat the previous one of their prompt (the dedupe path).
    repeat = rng.random(total) < 0.02
    texts = []
    for j, row in enumerate(resp_words):
        texts.append(texts[-1] if repeat[j] and j > 0 else " ".join(words[row]) + f" r{j}")
    scores = rng.choice(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.5, 8.0, 9.0, 10.0]), size=total)
    models = rng.choice(np.array(["gpt-4", "llama-2-70b", "vicuna-33b", "wizardlm-13b"]), size=total)
    def array(values):  # pyarrow chunks very long conversions
        arr = pa.array(values)
        return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr

    completions = pa.StructArray.from_arrays(
        [array(texts), array(scores), array(models)], names=["response", "overall_score", "model"])
    return pa.table({
        "source": pa.array(rng.choice(np.array(["evol", "sharegpt", "flan"]), size=n)),
        "instruction": pa.array(instructions),
        "completions": pa.ListArray.from_arrays(pa.array(offsets), completions),
    })


# --------------------------------------------------------------------------------------------
# pure Python: a plain loop over record dicts, prefops's rules
# --------------------------------------------------------------------------------------------

def python_lists(records, list_size, seed=0):
    import xxhash
    from reference_prep import SplitMix64

    out = []
    for rec in records:
        prompt = rec["instruction"]
        completions = sorted(rec["completions"], key=lambda c: -c["overall_score"])  # stable
        seen, kept = set(), []
        for c in completions:
            if c["response"] not in seen:
                seen.add(c["response"])
                kept.append(c)
        if len(kept) < 2:
            continue
        prompt_id = f"{xxhash.xxh3_64_intdigest(prompt.encode()):016x}"
        if list_size is not None and len(kept) > list_size:
            cut = kept[list_size - 1]["overall_score"]
            above = [c for c in kept if c["overall_score"] > cut]
            block = [c for c in kept if c["overall_score"] == cut]
            if len(above) + len(block) <= list_size:
                kept = kept[:list_size]
            else:
                rng = SplitMix64.for_prompt(seed, prompt_id)
                kept = above + [block[i] for i in rng.choose_sorted(len(block), list_size - len(above))]
        labels, level = [], 0
        distinct = len({c["overall_score"] for c in kept})
        for a, c in enumerate(kept):
            if a and c["overall_score"] != kept[a - 1]["overall_score"]:
                level += 1
            labels.append(float(distinct - 1 - level))
        out.append({
            "prompt_id": prompt_id,
            "prompt": prompt,
            "responses": [c["response"] for c in kept],
            "labels": labels,
            "gains": [2.0 ** x - 1.0 for x in labels],
            "scores": [c["overall_score"] for c in kept],
            "models": [c["model"] for c in kept],
            "list_size": len(kept),
            "source": rec["source"],
        })
    return out


# --------------------------------------------------------------------------------------------
# polars: the obvious query
# --------------------------------------------------------------------------------------------

def polars_lists(pl, df, list_size):
    q = (df.lazy()
         .with_row_index("row")
         .explode("completions")
         .unnest("completions")
         .sort(["row", "overall_score"], descending=[False, True], maintain_order=True)
         .unique(["row", "response"], keep="first", maintain_order=True))
    if list_size is not None:
        q = q.filter(pl.int_range(pl.len()).over("row") < list_size)
    q = (q.with_columns(labels=(pl.col("overall_score").rank("dense").over("row") - 1).cast(pl.Float64))
         .with_columns(gains=2.0 ** pl.col("labels") - 1.0)
         .group_by("row", maintain_order=True)
         .agg(pl.col("instruction").first().alias("prompt"), pl.col("source").first(),
              pl.col("response").alias("responses"), pl.col("labels"), pl.col("gains"),
              pl.col("overall_score").alias("scores"), pl.col("model").alias("models"),
              pl.len().alias("list_size"))
         .filter(pl.col("list_size") >= 2)
         .drop("row"))
    return q.collect()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="prompts in the generated input (default 1,000,000)")
    p.add_argument("--python-n", type=int, default=200_000,
                   help="run pure Python on the first N prompts only (prompts/s compared; default 200,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per prefops/polars case (median; default 3)")
    p.add_argument("--python-repeats", type=int, default=1, help="runs per pure-Python case (default 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for prefops and polars (default 2)")
    p.add_argument("--cases", nargs="*", default=None, choices=list(CASES), help="subset of cases")
    p.add_argument("--skip-python", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lists_cpu.csv")
    p.add_argument("--note", default="", help="free text for the notes column")
    args = p.parse_args(argv)

    os.environ["POLARS_MAX_THREADS"] = str(args.threads)  # before polars is imported
    import polars as pl
    import pyarrow.compute as pc

    import prefops

    t0 = time.perf_counter()
    table = generate(args.n, args.seed)
    n_responses = pc.sum(pc.list_value_length(table.column("completions"))).as_py()
    print(f"generated {table.num_rows:,} prompts, {n_responses:,} completions in {time.perf_counter() - t0:.1f} s "
          f"({table.nbytes / 2**20:.0f} MiB in Arrow)", flush=True)
    df = pl.from_arrow(table)
    py_n = min(args.python_n or args.n, args.n)
    records = None
    if not args.skip_python:
        t0 = time.perf_counter()
        records = table.slice(0, py_n).to_pylist()
        print(f"converted {py_n:,} records to Python dicts in {time.perf_counter() - t0:.1f} s (not timed)",
              flush=True)

    results = []
    for case in args.cases or list(CASES):
        k = CASES[case]
        print(f"\n== {case} (list_size={k})", flush=True)
        ours = lambda t: prefops.lists(t, list_size=k, threads=args.threads).table  # noqa: E731
        t_ours, out = timed(ours, args.repeats, table)
        rec = {"ours": (t_ours, args.n / t_ours, out.num_rows)}
        print(f"  prefops  {t_ours:8.3f} s  {args.n / t_ours:>12,.0f} prompts/s  -> {out.num_rows:,} lists", flush=True)

        t_pl, out_pl = timed(lambda d: polars_lists(pl, d, k), args.repeats, df)
        keys = ["prompt", "labels", "gains", "list_size"] + (["responses", "scores", "models"] if k is None else [])
        got = out_pl.select(keys).to_arrow()
        verified_pl = out_pl.height == out.num_rows and all(
            got.column(c).to_pylist() == out.column(c).to_pylist() for c in keys)
        print(f"  polars   {t_pl:8.3f} s  {args.n / t_pl:>12,.0f} prompts/s  verified={verified_pl}", flush=True)
        rec["polars"] = (t_pl, args.n / t_pl, out_pl.height, verified_pl)
        del out_pl, got

        if records is not None:
            t_py, out_py = timed(lambda r: python_lists(r, k), args.python_repeats, records)
            mine = out if py_n == args.n else prefops.lists(table.slice(0, py_n), list_size=k).table
            cols = list(out_py[0]) if out_py else []
            verified_py = mine.select(cols).to_pylist() == out_py
            print(f"  python   {t_py:8.3f} s  {py_n / t_py:>12,.0f} prompts/s  verified={verified_py}"
                  + (f" (first {py_n:,} prompts)" if py_n != args.n else ""), flush=True)
            rec["python"] = (t_py, py_n / t_py, len(out_py), verified_py)
            del out_py, mine
        del out
        results.append((case, rec))

    model, note = cpu_model(), args.note
    out_rows = []
    for case, rec in results:
        pps = rec["ours"][1]
        out_rows.append({"case": case, "contender": "prefops", "prompts_in": args.n, "lists_out": rec["ours"][2],
                         "median_s": f"{rec['ours'][0]:.4f}", "prompts_per_s": f"{pps:.0f}",
                         "speedup_vs_python": f"{pps / rec['python'][1]:.2f}" if "python" in rec else "",
                         "speedup_vs_polars": f"{pps / rec['polars'][1]:.2f}", "verified": "reference",
                         "threads": args.threads, "repeats": args.repeats, "cpu_model": model, "notes": note})
        t, rate, n_out, ver = rec["polars"]
        out_rows.append({"case": case, "contender": "polars", "prompts_in": args.n, "lists_out": n_out,
                         "median_s": f"{t:.4f}", "prompts_per_s": f"{rate:.0f}", "speedup_vs_python": "",
                         "speedup_vs_polars": "", "verified": ver, "threads": args.threads,
                         "repeats": args.repeats, "cpu_model": model, "notes": note})
        if "python" in rec:
            t, rate, n_out, ver = rec["python"]
            out_rows.append({"case": case, "contender": "python", "prompts_in": py_n, "lists_out": n_out,
                             "median_s": f"{t:.4f}", "prompts_per_s": f"{rate:.0f}", "speedup_vs_python": "",
                             "speedup_vs_polars": "", "verified": ver, "threads": 1,
                             "repeats": args.python_repeats, "cpu_model": model,
                             "notes": (note + "; " if note else "") + "dict records made before timing"})
    write_csv(args.out, CSV_COLUMNS, out_rows)
    print(f"\nwrote {args.out}")
    print("\ncase            prefops prompts/s   vs python   vs polars")
    for r in out_rows:
        if r["contender"] == "prefops":
            print(f"{r['case']:<16}{int(r['prompts_per_s']):>18,}   {r['speedup_vs_python']:>9}   "
                  f"{r['speedup_vs_polars']:>9}")


if __name__ == "__main__":
    main()
