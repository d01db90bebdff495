#!/usr/bin/env python3
"""Data-prep benchmark: prefops vs a plain-Python loop vs polars (the obvious explode query
and a tuned list.eval query), raw UltraFeedback records in, DPO pairs out.

One run generates (or reuses) a synthetic UltraFeedback-style JSONL file, then runs every
contender in its own fresh subprocess, so each one's peak RSS is its own. See
benches/README.md for how to read the output.

    python benches/bench_prep.py --prompts 20000          # smoke test
    python benches/bench_prep.py                          # 1,000,000 prompts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model, write_csv

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"  # git-ignored
RESULTS = HERE / "results"
GEN_VERSION = 1  # bump when the generator changes, so cached files are not reused
STRATEGIES = ("best_vs_worst", "best_vs_each")
CSV_COLUMNS = [
    "benchmark", "contender", "strategy", "output_format", "prompts", "pairs", "median_s",
    "rows_per_s", "peak_rss_mib", "speedup_vs_python", "speedup_vs_polars", "threads", "cpu_model",
]


# --------------------------------------------------------------------------------------------
# Data generation
# --------------------------------------------------------------------------------------------

SOURCES = ["evol_instruct", "false_qa", "flan_v2_niv2", "sharegpt", "truthful_qa", "ultrachat"]
MODELS = [
    "gpt-4", "gpt-3.5-turbo", "llama-2-70b-chat", "llama-2-13b-chat", "llama-2-7b-chat",
    "wizardlm-70b", "wizardlm-13b", "vicuna-33b", "mpt-30b-chat", "falcon-40b-instruct",
    "starchat", "pythia-12b", "alpaca-7b", "ultralm-65b", "bard", "gpt-4-0613", "ultralm-13b",
]
# Tokens that force JSON escapes or multi-byte UTF-8; the rest of the vocabulary is random words.
SPECIAL_TOKENS = ["\n", "\n\n", '"', '"quoted"', "\\", "\t", "café", "naïve", "日本語", "—", "→"]


def _corpus(rng, n_words: int) -> str:
    """One long string of Zipf-ish random words; texts are slices of it, so making millions
    of distinct texts costs one join, not millions."""
    import numpy as np

    n_vocab = 4000
    lengths = rng.integers(2, 11, size=n_vocab)
    letters = rng.integers(0, 26, size=int(lengths.sum())).astype(np.uint8) + ord("a")
    flat = letters.tobytes().decode("ascii")
    ends = np.cumsum(lengths)
    words = [flat[e - l : e] for e, l in zip(ends.tolist(), lengths.tolist())]
    vocab = words + SPECIAL_TOKENS
    weights = 1.0 / np.arange(1, n_vocab + 1) ** 0.9
    weights = np.concatenate([weights / weights.sum() * 0.97, np.full(len(SPECIAL_TOKENS), 0.03 / len(SPECIAL_TOKENS))])
    idx = rng.choice(len(vocab), size=n_words, p=weights)
    return " ".join([vocab[i] for i in idx.tolist()])


def _write_chunk(fout, rng, corpus: str, n: int) -> None:
    """Write n UltraFeedback-style records. Every random draw is vectorised with numpy;
    only the dict building and json.dumps are per record."""
    import numpy as np

    clen = len(corpus)
    n_comp = rng.integers(4, 9, size=n)  # 4..8 completions
    total = int(n_comp.sum())
    # Prompts: 60-120 chars; responses: 80-200 chars, sliced at random offsets.
    p_len = rng.integers(60, 121, size=n)
    p_off = rng.integers(0, clen - 121, size=n)
    r_len = rng.integers(80, 201, size=total)
    r_off = rng.integers(0, clen - 201, size=total)
    # Scores: one decimal in 1.0..10.0 (91 values, so ties with the best happen often enough
    # to matter for best_vs_each). 3% of prompts get one score for all completions (a tie
    # that best_vs_worst must drop).
    score10 = rng.integers(10, 101, size=total)
    all_tied = rng.random(n) < 0.03
    fine4 = rng.integers(4, 21, size=total)  # fine-grained score in quarter steps, 1.0..5.0
    model_idx = rng.integers(0, len(MODELS), size=total)
    # ~2% of completions repeat an earlier completion's text of the same prompt (dedupe work).
    dup = rng.random(total) < 0.02
    src_idx = rng.integers(0, len(SOURCES), size=n)

    scores = (score10 / 10).tolist()
    fines = (fine4 / 4).tolist()
    r_off_l, r_len_l, models_l, dup_l = r_off.tolist(), r_len.tolist(), model_idx.tolist(), dup.tolist()
    dumps = json.dumps
    lines = []
    k = 0
    for i in range(n):
        m = int(n_comp[i])
        comps = []
        tied_score = scores[k] if all_tied[i] else None
        for j in range(m):
            o = r_off_l[k]
            text = corpus[o : o + r_len_l[k]]
            if dup_l[k] and j > 0:
                text = comps[(k * 7919) % j]["response"]
            comps.append({
                "model": MODELS[models_l[k]],
                "response": text,
                "overall_score": tied_score if tied_score is not None else scores[k],
                "fine-grained_score": fines[k],
            })
            k += 1
        po = int(p_off[i])
        rec = {
            "source": SOURCES[src_idx[i]],
            "instruction": corpus[po : po + int(p_len[i])],
            "models": [c["model"] for c in comps],
            "completions": comps,
        }
        lines.append(dumps(rec, ensure_ascii=False))
    fout.write("\n".join(lines))
    fout.write("\n")


def generate_jsonl(n: int, seed: int) -> Path:
    """The cached input file for (n, seed); generated on first use."""
    import numpy as np

    path = DATA / f"uf_v{GEN_VERSION}_n{n}_s{seed}.jsonl"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"generating {n:,} prompts -> {path} ...", flush=True)
    rng = np.random.default_rng(seed)
    corpus = _corpus(rng, n_words=4_000_000)
    tmp = path.with_suffix(".tmp")
    chunk = 50_000
    with open(tmp, "w", encoding="utf-8") as fout:
        for start in range(0, n, chunk):
            _write_chunk(fout, rng, corpus, min(chunk, n - start))
    tmp.rename(path)  # atomic: an interrupted run never leaves a half file under the real name
    print(f"  done in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 2**20:,.0f} MiB", flush=True)
    return path


def prefix_jsonl(src: Path, m: int) -> Path:
    """The first m records of src (cached), for the smaller runs."""
    path = src.with_name(src.stem + f"_head{m}.jsonl")
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        for i, line in enumerate(fin):
            if i == m:
                break
            fout.write(line)
    tmp.rename(path)
    return path


def parquet_copy(src: Path, row_group: int = 50_000) -> Path:
    """Parquet copy of a JSONL file (cached), read in streaming blocks with pyarrow.
    Row groups of 50k rows, like typical Hub datasets, so a reader can stream it."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = src.with_suffix(".parquet")
    if path.exists():
        return path
    print(f"writing parquet copy -> {path} ...", flush=True)
    comp = pa.struct([("model", pa.string()), ("response", pa.string()),
                      ("overall_score", pa.float64()), ("fine-grained_score", pa.float64())])
    schema = pa.schema([("source", pa.string()), ("instruction", pa.string()),
                        ("models", pa.list_(pa.string())), ("completions", pa.list_(comp))])
    tmp = path.with_suffix(".tmp")
    reader = pj.open_json(src, read_options=pj.ReadOptions(block_size=32 << 20),
                          parse_options=pj.ParseOptions(explicit_schema=schema))
    with pq.ParquetWriter(tmp, schema) as writer:
        for batch in reader:
            writer.write_table(pa.Table.from_batches([batch]), row_group_size=row_group)
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------------------------
# Contenders (each runs inside a worker process)
# --------------------------------------------------------------------------------------------

def run_prefops(src: str, dst: str, strategy: str, threads: int, extra_columns: bool = True) -> int:
    import prefops

    result = prefops.prep(src, dst, strategy=strategy, threads=threads, extra_columns=extra_columns)
    return int(result.stats["pairs_made"])


def run_prefops_no_extra(src: str, dst: str, strategy: str, threads: int) -> int:
    """prefops without the input's other columns (source, models), closer to what the polars
    queries write (they keep neither those nor prompt_id, pair_id and the two model columns)."""
    return run_prefops(src, dst, strategy, threads, extra_columns=False)


def run_python(src: str, dst: str, strategy: str, threads: int) -> int:
    """The straightforward single-process loop, with prefops's default semantics:
    stable sort by score (descending), drop responses identical to a better one,
    best vs worst (or vs each other), drop ties."""
    loads, dumps = json.loads, json.dumps
    each = strategy == "best_vs_each"
    n_pairs = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            rec = loads(line)
            prompt = rec["instruction"]
            # sorted() is stable, also with reverse=True: tied scores keep input order.
            ranked = sorted(rec["completions"], key=lambda c: c["overall_score"], reverse=True)
            seen, kept = set(), []
            for c in ranked:
                if c["response"] not in seen:
                    seen.add(c["response"])
                    kept.append(c)
            if len(kept) < 2:
                continue
            best = kept[0]
            for worse in (kept[1:] if each else kept[-1:]):
                margin = best["overall_score"] - worse["overall_score"]
                if margin == 0:
                    continue
                fout.write(dumps({
                    "prompt": prompt,
                    "chosen": best["response"],
                    "rejected": worse["response"],
                    "score_chosen": best["overall_score"],
                    "score_rejected": worse["overall_score"],
                    "margin": margin,
                }, ensure_ascii=False))
                fout.write("\n")
                n_pairs += 1
    return n_pairs


def _polars_schema():
    import polars as pl

    comp = pl.Struct({"model": pl.String, "response": pl.String,
                      "overall_score": pl.Float64, "fine-grained_score": pl.Float64})
    return pl.Schema({"source": pl.String, "instruction": pl.String,
                      "models": pl.List(pl.String), "completions": pl.List(comp)})


PAIR_COLUMNS = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin"]


def _finish_pairs(pairs):
    """Margin, then drop ties: a prompt with one surviving response, or whose best is tied
    with the other side, makes no pair."""
    import polars as pl

    return (
        pairs.with_columns((pl.col("score_chosen") - pl.col("score_rejected")).alias("margin"))
        .filter(pl.col("margin") > 0)
        .select(PAIR_COLUMNS)
    )


def polars_explode_query(lf, strategy: str):
    """The obvious lazy query: one row per completion, stable sort by score within the
    prompt, drop repeated texts (first = best kept), then pick pairs."""
    import polars as pl

    ranked = (
        lf.select("instruction", "completions")
        .with_row_index("row")  # group by row, not by text: repeated prompts stay separate, as in prefops
        .explode("completions")
        .unnest("completions")
        .select("row", "instruction", "response", "overall_score")
        .sort(["row", "overall_score"], descending=[False, True], maintain_order=True)
        .unique(subset=["row", "response"], keep="first", maintain_order=True)
    )
    if strategy == "best_vs_worst":
        pairs = ranked.group_by("row").agg(
            pl.col("instruction").first().alias("prompt"),
            pl.col("response").first().alias("chosen"),
            pl.col("response").last().alias("rejected"),
            pl.col("overall_score").first().alias("score_chosen"),
            pl.col("overall_score").last().alias("score_rejected"),
        )
    else:
        pairs = ranked.select(
            pl.col("instruction").alias("prompt"),
            pl.col("response").first().over("row").alias("chosen"),
            pl.col("response").alias("rejected"),
            pl.col("overall_score").first().over("row").alias("score_chosen"),
            pl.col("overall_score").alias("score_rejected"),
        )
    return _finish_pairs(pairs)


def polars_list_query(lf, strategy: str):
    """A tuned query: sort and dedupe inside each row's completions list (list.eval), so
    no global sort or group_by; rows stay independent and memory stays far lower."""
    import polars as pl

    score = pl.element().struct.field("overall_score")
    text = pl.element().struct.field("response")
    ranked = lf.select(
        pl.col("instruction").alias("prompt"),
        pl.col("completions")
        .list.eval(pl.element().sort_by(score, descending=True, maintain_order=True))
        .list.eval(pl.element().filter(text.is_first_distinct()))
        .alias("ranked"),
    )
    best = pl.col("ranked").list.first().alias("best")
    if strategy == "best_vs_worst":
        pairs = ranked.select("prompt", best, pl.col("ranked").list.last().alias("other"))
    else:
        pairs = ranked.select("prompt", best, pl.col("ranked").list.slice(1).alias("other")).explode("other")
    pairs = pairs.select(
        "prompt",
        pl.col("best").struct.field("response").alias("chosen"),
        pl.col("other").struct.field("response").alias("rejected"),
        pl.col("best").struct.field("overall_score").alias("score_chosen"),
        pl.col("other").struct.field("overall_score").alias("score_rejected"),
    )
    return _finish_pairs(pairs)


def _run_polars(query, src: str, dst: str, strategy: str) -> int:
    import polars as pl

    if src.endswith(".parquet"):
        lf = pl.scan_parquet(src)
    else:
        lf = pl.scan_ndjson(src, schema=_polars_schema())
    q = query(lf, strategy)
    if dst.endswith(".parquet"):
        # snappy, as prefops writes, so codec choice does not decide the comparison.
        q.sink_parquet(dst, compression="snappy")
    else:
        q.sink_ndjson(dst)
    return -1  # counted from the output file by the driver


def run_polars(src: str, dst: str, strategy: str, threads: int) -> int:
    return _run_polars(polars_explode_query, src, dst, strategy)


def run_polars_list(src: str, dst: str, strategy: str, threads: int) -> int:
    return _run_polars(polars_list_query, src, dst, strategy)


CONTENDERS = {"prefops": run_prefops, "prefops_no_extra": run_prefops_no_extra, "python": run_python,
              "polars": run_polars, "polars_list": run_polars_list}
# The module each contender needs; imported before the clock starts, and alone for import_rss.
IMPORTS = {"prefops": "prefops", "prefops_no_extra": "prefops", "python": "json", "polars": "polars",
           "polars_list": "polars"}


def peak_rss_kib() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and
    starts at the parent's RSS at fork time, so a fat driver would inflate every worker."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def worker(spec: dict) -> None:
    """Run one contender once; print timing, pair count and own peak RSS as one JSON line."""
    __import__(IMPORTS[spec["contender"]])  # before the clock: time the work, not module loading
    if spec.get("baseline"):
        seconds, pairs = 0.0, 0
    else:
        fn = CONTENDERS[spec["contender"]]
        t0 = time.perf_counter()
        pairs = fn(spec["input"], spec["output"], spec["strategy"], spec["threads"])
        seconds = time.perf_counter() - t0
    print("BENCH_RESULT " + json.dumps({"seconds": seconds, "pairs": pairs, "rss_kib": peak_rss_kib()}), flush=True)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def launch(spec: dict) -> dict:
    """One fresh interpreter per run, so peak RSS is that run's alone."""
    env = dict(os.environ)
    if spec["contender"].startswith("polars"):
        env["POLARS_MAX_THREADS"] = str(spec.get("threads", 2))  # fair on a small machine
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['contender']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def count_output_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    n = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            n += block.count(b"\n")
    return n


def pair_digest(path: Path) -> tuple:
    """Order-independent digest of (prompt, chosen, rejected, margin) over all output rows,
    so contenders can be compared without holding two outputs in memory."""
    import polars as pl

    cols = ["prompt", "chosen", "rejected", "margin"]
    if path.suffix == ".parquet":
        lf = pl.scan_parquet(path)
    else:
        schema = {"prompt": pl.String, "chosen": pl.String, "rejected": pl.String, "margin": pl.Float64}
        lf = pl.scan_ndjson(path, schema=schema)
    h = pl.struct(cols).hash(seed=7)
    row = lf.select(
        pl.len().alias("n"),
        (h // (1 << 32)).sum().alias("hi"),  # two 32-bit halves: sums of millions cannot overflow u64
        (h % (1 << 32)).sum().alias("lo"),
    ).collect().row(0)
    return tuple(int(x) for x in row)


def prefops_build() -> str:
    """Identify the installed prefops extension (version, file size, mtime). Checked at the
    start and the end: a rebuild in the middle of a run would mix two builds' numbers."""
    import importlib.util

    spec = importlib.util.find_spec("prefops")
    if spec is None or not spec.submodule_search_locations:
        return "prefops not installed"
    pkg = Path(list(spec.submodule_search_locations)[0])
    natives = sorted(pkg.glob("_native*"))
    if not natives:
        return f"{pkg} (no _native extension found)"
    st = natives[0].stat()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    try:
        from importlib.metadata import version

        ver = version("prefops")
    except Exception:
        ver = "?"
    return f"prefops {ver}, {natives[0].name} {st.st_size:,} bytes, built {stamp}"


def warm_cache(path: Path) -> None:
    """Read the input once so every contender starts with it in the page cache."""
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def default_out_dir() -> Path:
    """Outputs go to tmpfs where there is one with room, so that the disk is not what is timed:
    prefops fsyncs its output before the rename and the others do not (on a disk that made
    prefops' 3.4 GB best_vs_each JSONL run 13.9 s against 7.1 s on tmpfs, while the others'
    unflushed pages were written back during later runs)."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 16 << 30:
            return shm / "prefops-bench-out"
    except OSError:
        pass
    return DATA / "out"


class Bench:
    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.digests: dict = {}
        self.outdir = args.out_dir or default_out_dir()
        self.outdir.mkdir(parents=True, exist_ok=True)
        print(f"outputs under {self.outdir}", flush=True)
        self.cpu = cpu_model()

    def measure(self, benchmark, contender, strategy, src: Path, out_fmt, prompts, repeats, threads):
        """Run a contender `repeats` times; record median time, max peak RSS, pair count."""
        dst = self.outdir / f"{benchmark}_{contender}_{strategy}.{out_fmt}"
        spec = {"contender": contender, "input": str(src), "output": str(dst),
                "strategy": strategy, "threads": threads}
        runs = []
        for _ in range(repeats):
            dst.unlink(missing_ok=True)
            runs.append(launch(spec))
        pairs = count_output_rows(dst)
        reported = runs[-1]["pairs"]
        if reported >= 0 and reported != pairs:
            print(f"WARNING: {contender} reported {reported:,} pairs but wrote {pairs:,} rows", flush=True)
        if self.args.verify:
            self.digests[(benchmark, contender, strategy, out_fmt, prompts)] = pair_digest(dst)
        dst.unlink(missing_ok=True)  # outputs are large; only counts and digests are kept
        median_s = statistics.median(r["seconds"] for r in runs)
        row = {
            "benchmark": benchmark, "contender": contender, "strategy": strategy,
            "output_format": out_fmt, "prompts": prompts, "pairs": pairs,
            "median_s": round(median_s, 3), "rows_per_s": round(prompts / median_s) if median_s else "",
            "peak_rss_mib": round(max(r["rss_kib"] for r in runs) / 1024, 1),
            "speedup_vs_python": "", "speedup_vs_polars": "", "threads": threads, "cpu_model": self.cpu,
        }
        self.rows.append(row)
        print(f"  {benchmark:<16} {contender:<16} {strategy:<14} {out_fmt:<8} {prompts:>9,} prompts "
              f"{pairs:>9,} pairs  {median_s:8.2f} s  {row['peak_rss_mib']:8.1f} MiB", flush=True)
        return row

    def baseline(self, contender, threads):
        r = launch({"contender": contender, "baseline": True, "threads": threads})
        self.rows.append({
            "benchmark": "import_rss", "contender": contender, "strategy": "", "output_format": "",
            "prompts": 0, "pairs": 0, "median_s": "", "rows_per_s": "",
            "peak_rss_mib": round(r["rss_kib"] / 1024, 1), "speedup_vs_python": "",
            "speedup_vs_polars": "", "threads": threads, "cpu_model": self.cpu,
        })

    def fill_ratios(self):
        """Speed-ups as rows/s ratios, so a pure-Python run on a prefix still compares.
        Parquet output has no pure-Python contender, so no ratio is made for it."""
        def find(benchmark, contender, strategy, fmt):
            for r in self.rows:
                if (r["benchmark"], r["contender"], r["strategy"], r["output_format"]) == (benchmark, contender, strategy, fmt):
                    return r
            return None

        for r in self.rows:
            if not r["rows_per_s"] or r["benchmark"] == "streaming_rss":
                continue
            py = find("prep", "python", r["strategy"], r["output_format"])
            pol = find(r["benchmark"], "polars", r["strategy"], r["output_format"])
            if py and py["rows_per_s"]:
                r["speedup_vs_python"] = round(r["rows_per_s"] / py["rows_per_s"], 2)
            if pol and pol["rows_per_s"]:
                r["speedup_vs_polars"] = round(r["rows_per_s"] / pol["rows_per_s"], 2)

    def check_pairs(self):
        """Every contender must make the pairs prefops makes, for the same input and strategy."""
        problems = []
        for r in self.rows:
            if r["benchmark"] not in ("prep", "prep_parquet_in") or r["contender"] == "prefops":
                continue
            ref = [x for x in self.rows if x["benchmark"] == r["benchmark"] and x["contender"] == "prefops"
                   and x["strategy"] == r["strategy"] and x["prompts"] == r["prompts"]]
            for x in ref:
                if x["pairs"] != r["pairs"]:
                    problems.append(f"{r['contender']} {r['benchmark']} {r['strategy']} {r['output_format']}: "
                                    f"{r['pairs']:,} pairs vs prefops {x['pairs']:,} ({x['output_format']})")
        if self.args.verify:
            for key, d in self.digests.items():
                bench, contender, strategy, fmt, prompts = key
                for (b2, c2, s2, f2, p2), d2 in self.digests.items():
                    if (b2, c2, s2, p2) == (bench, "prefops", strategy, prompts) and d2 != d:
                        problems.append(f"{contender} {bench} {strategy} {fmt}: pair contents differ from prefops ({f2})")
        for p in problems:
            print("WARNING: " + p, flush=True)
        if not problems:
            what = "pair counts and contents (digests)" if self.args.verify else "pair counts"
            print(f"all contenders agree with prefops on {what}.", flush=True)
        return problems


def print_table(rows):
    head = ["benchmark", "contender", "strategy", "out", "prompts", "pairs", "median_s",
            "rows/s", "rss_MiB", "vs_python", "vs_polars", "thr"]
    keys = ["benchmark", "contender", "strategy", "output_format", "prompts", "pairs", "median_s",
            "rows_per_s", "peak_rss_mib", "speedup_vs_python", "speedup_vs_polars", "threads"]

    def fmt(k, v):
        if v == "" or v is None:
            return "-"
        if k in ("prompts", "pairs", "rows_per_s"):
            return f"{v:,}"
        if k in ("speedup_vs_python", "speedup_vs_polars"):
            return f"{v:.2f}x"
        return str(v)

    table = [head] + [[fmt(k, r[k]) for k in keys] for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    left = {0, 1, 2, 3}
    for n, t in enumerate(table):
        print("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=1_000_000, help="input prompts (default 1,000,000)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="runs per prefops/polars case; median reported (default 3)")
    p.add_argument("--python-repeats", type=int, default=1, help="runs per pure-Python case (default 1)")
    p.add_argument("--threads", type=int, default=2, help="threads for prefops and polars (default 2)")
    p.add_argument("--skip-python", action="store_true", help="do not run the pure-Python contender")
    p.add_argument("--python-prompts", type=int, default=None,
                   help="run pure Python on this many leading prompts only; speed-ups use rows/s")
    p.add_argument("--skip-polars-list", action="store_true", help="skip the tuned list.eval polars query")
    p.add_argument("--skip-parquet-input", action="store_true", help="skip the Parquet-input cases")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing pair contents (digests) with prefops; counts are always compared")
    p.add_argument("--out", type=Path, default=None, help="CSV path (default benches/results/prep_<host>.csv)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the outputs are written (and deleted after each case); default /dev/shm when it "
                        "has 16 GiB free, else benches/data/out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        worker(json.loads(args.worker))
        return 0

    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "local"
    out_csv = args.out or RESULTS / f"prep_{host}.csv"
    n, thr = args.prompts, args.threads

    src = generate_jsonl(n, args.seed)
    pq_src = None if args.skip_parquet_input else parquet_copy(src)
    py_n = min(args.python_prompts or n, n)
    py_src = src if py_n == n else prefix_jsonl(src, py_n)
    quarter = prefix_jsonl(src, max(n // 4, 1))
    for f in (src, quarter, py_src):
        warm_cache(f)

    b = Bench(args)
    build = prefops_build()
    print(f"\ncpu: {b.cpu}, {os.cpu_count()} cpus; prefops/polars threads={thr}; repeats={args.repeats}")
    print(f"{build}\n", flush=True)
    for c in ("python", "prefops", "polars"):
        b.baseline(c, 1 if c == "python" else thr)
    fast = ["prefops", "prefops_no_extra", "polars"] + ([] if args.skip_polars_list else ["polars_list"])

    # 1. Main case: raw UltraFeedback JSONL in, pairs out.
    for strategy in STRATEGIES:
        for fmt in ("jsonl", "parquet"):
            for c in fast:
                b.measure("prep", c, strategy, src, fmt, n, args.repeats, thr)
        if not args.skip_python:
            b.measure("prep", "python", strategy, py_src, "jsonl", py_n, args.python_repeats, 1)

    # 2. Parquet in, Parquet out (the Hub-dataset case).
    if pq_src is not None:
        warm_cache(pq_src)
        for strategy in STRATEGIES:
            for c in fast:
                b.measure("prep_parquet_in", c, strategy, pq_src, "parquet", n, args.repeats, thr)

    # 3. Streaming memory: a streaming pipeline's peak RSS is the same at N/4 and N.
    #    prefops JSONL out separates the pipeline from the Parquet writer; polars for contrast.
    for size, f in ((max(n // 4, 1), quarter), (n, src)):
        for c, fmt in (("prefops", "parquet"), ("prefops", "jsonl"), ("polars", "parquet")):
            b.measure("streaming_rss", c, "best_vs_worst", f, fmt, size, 1, thr)

    if prefops_build() != build:
        print(f"WARNING: prefops was rebuilt during the run (now {prefops_build()}); "
              "its rows mix two builds, rerun for clean numbers", flush=True)
    b.fill_ratios()
    b.check_pairs()
    print()
    print_table(b.rows)

    write_csv(out_csv, CSV_COLUMNS, b.rows)
    print(f"\nwrote {out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
