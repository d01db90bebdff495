"""Stress run: N generated rows streamed JSONL → Parquet by `prefops prep`, with peak RSS.

Prep streams: chunks are parsed and paired in parallel and written in input order, so peak
memory should stay flat as the input grows. This runs prep at several sizes (each in a fresh
process that reports its own peak RSS), checks the output row count against the stats report
and the number of generated pairs, and writes benches/results/stress_prep_<device>.csv.

    python benches/stress_prep.py                  # 1M and 10M rows (about 1.3 GB of JSONL)
    python benches/stress_prep.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_csv

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, resource, sys, time
import prefops
src, out = sys.argv[1], sys.argv[2]
t = time.perf_counter()
r = prefops.prep(src, out, strategy="best_vs_worst")
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "threads": r.threads, "stats": r.stats,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def generate(path: Path, rows: int) -> int:
    """UltraFeedback-binarized-like rows: every 4th row a conversational prompt, non-ASCII text,
    scores varying by row. Returns the file size."""
    with open(path, "w", encoding="utf-8") as f:
        block = 10_000
        for start in range(0, rows, block):
            lines = []
            for i in range(start, min(start + block, rows)):
                if i % 4 == 0:
                    prompt = [{"role": "user", "content": f"Question {i}: what is {i % 97} × 3? ünïcode"}]
                    chosen = [{"role": "assistant", "content": f"It is {3 * (i % 97)}."}]
                    rejected = [{"role": "assistant", "content": f"It is {3 * (i % 97) + 1}, I think."}]
                else:
                    prompt, chosen, rejected = f"Prompt {i} about topic {i % 1013}", f"Good answer {i}", f"Bad answer {i}"
                lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                         "score_chosen": 5.0 + (i % 5), "score_rejected": float(i % 5),
                                         "source": "stress"}, ensure_ascii=False))
            f.write("\n".join(lines) + "\n")
    return path.stat().st_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--tmp", type=Path, default=None, help="where to put the generated files (default: system temp)")
    ap.add_argument("--device", default="cpu", help="label for the CSV file name")
    args = ap.parse_args()

    RESULTS.mkdir(exist_ok=True)
    out_csv = RESULTS / f"stress_prep_{args.device}.csv"
    records = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        for rows in args.rows:
            src, dst = Path(d) / f"in-{rows}.jsonl", Path(d) / f"out-{rows}.parquet"
            t = time.perf_counter()
            size = generate(src, rows)
            gen_s = time.perf_counter() - t
            proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            import pyarrow.parquet as pq
            written = pq.read_metadata(dst).num_rows
            stats = res["stats"]
            ok = written == stats["rows_written"] == rows and stats["rows_read"] == rows and stats["rows_skipped"] == 0
            rec = {
                "rows": rows,
                "input_mb": round(size / 2**20, 1),
                "generate_s": round(gen_s, 1),
                "prep_s": round(res["seconds"], 2),
                "rows_per_s": round(rows / res["seconds"]),
                "input_mb_per_s": round(size / 2**20 / res["seconds"], 1),
                "peak_rss_mb": round(res["peak_rss_kib"] / 1024, 1),
                "output_rows": written,
                "counts_reconcile": ok,
                "threads": res["threads"],
                "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            }
            records.append(rec)
            print(json.dumps(rec))
            src.unlink()
            dst.unlink()
            if not ok:
                print(f"row counts do not reconcile: {stats}", file=sys.stderr)
                return 1
    write_csv(out_csv, list(records[0]), records)
    print(f"wrote {out_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
