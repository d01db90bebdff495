#!/usr/bin/env python3
"""token_logprobs benchmark: forward + backward of per-token target log-probs from hidden states.

Contenders (each computes log p(target) for N tokens and back-propagates a random upstream
gradient into hidden and weight):

  prefops_triton   prefops.ops.token_logprobs(backend="triton")            (GPU)
  prefops_torch    prefops.ops.token_logprobs(backend="torch"): chunked torch
  full_logits      TRL-style: logits = hidden @ Wᵀ materialised, gather - logsumexp in fp32
  cce              cut_cross_entropy.linear_cross_entropy(reduction="none") (GPU, if installed)

Timing runs in one process, contenders interleaved round by round; medians and ratios are
reported. Peak extra memory: on a GPU, torch.cuda.max_memory_allocated above the inputs, in
the same process; on CPU, each contender's peak RSS above its inputs in a fresh subprocess
(RSS never goes down, so one process cannot measure several). Achieved TFLOP/s counts the
4 GEMMs of 2·N·H·V flops that any exact method needs (forward logits, recompute, dX, dW).

    python benches/bench_token_logprobs.py                 # CPU sizes (GPU part needs a GPU)
    python benches/bench_token_logprobs.py --device cuda   # the issue's three GPU shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_model, write_csv

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GPU_SHAPES = [(8 * 1024, 4096, 128256), (4 * 4096, 4096, 128256), (16 * 512, 2048, 32000)]
CPU_SHAPES = [(1024, 1024, 32000), (4096, 256, 32000), (2048, 512, 50257)]
CSV_COLUMNS = ["benchmark", "device", "contender", "tokens", "hidden", "vocab", "dtype", "median_ms",
               "peak_extra_mib", "tflops", "time_vs_full_logits", "mem_vs_full_logits", "time_vs_cce",
               "mem_vs_cce"]


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h**0.5).to(device, dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    up = torch.randn(n, generator=g).to(device)
    return x, w, t, up


def contender_fn(name):
    if name.startswith("prefops_"):
        from prefops.ops import token_logprobs

        backend = name.split("_", 1)[1]
        return lambda x, w, t: token_logprobs(x, w, t, backend=backend).logps
    if name == "full_logits":
        def full(x, w, t):
            logits = (x @ w.T).float()
            return logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        return full
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda x, w, t: -linear_cross_entropy(x, w, t, reduction="none")
    raise ValueError(name)


def available(name, device):
    if name in ("prefops_triton", "cce") and device != "cuda":
        return False
    if name == "cce":
        try:
            import cut_cross_entropy  # noqa: F401
        except ImportError:
            return False
    return True


def step(fn, x, w, t, up):
    x.grad = None
    w.grad = None
    logp = fn(x, w, t)
    (logp.float() * up).sum().backward()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float:
    return status_mib("VmRSS")


def worker(args) -> None:
    """Fresh process: one contender, one step; print its peak RSS above the inputs."""
    torch.set_num_threads(args.threads)
    x, w, t, up = make_inputs(args.n, args.h, args.v, getattr(torch, args.dtype), "cpu")
    fn = contender_fn(args.worker)
    step(fn, *make_inputs(64, 64, 256, getattr(torch, args.dtype), "cpu", seed=1))  # library start-up costs
    base = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the RSS high-water mark (VmHWM): input creation must not count
    step(fn, x, w, t, up)
    print(json.dumps({"peak_extra_mib": status_mib("VmHWM") - base}))


def cpu_peak(name, n, h, v, dtype, threads) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--n", str(n), "--h", str(h), "--v", str(v),
                          "--dtype", dtype, "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def device_name(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def run_shape(n, h, v, dtype_name, device, repeats, contenders, threads):
    dtype = getattr(torch, dtype_name)
    x, w, t, up = make_inputs(n, h, v, dtype, device)
    fns = {c: contender_fn(c) for c in contenders}
    times = {c: [] for c in contenders}
    peaks = {}
    for c in contenders:  # warm-up (compilation, autotuning) and the GPU memory peak
        sync(device)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step(fns[c], x, w, t, up)
        sync(device)
        if device == "cuda":
            peaks[c] = (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(repeats):
        for c in contenders:
            sync(device)
            t0 = time.perf_counter()
            step(fns[c], x, w, t, up)
            sync(device)
            times[c].append(time.perf_counter() - t0)
    if device != "cuda":
        peaks = {c: cpu_peak(c, n, h, v, dtype_name, threads) for c in contenders}
    rows = []
    flops = 8.0 * n * h * v
    med = {c: statistics.median(times[c]) for c in contenders}
    for c in contenders:
        row = dict(benchmark="token_logprobs_fwd_bwd", device=device_name(device), contender=c, tokens=n, hidden=h,
                   vocab=v, dtype=dtype_name, median_ms=round(med[c] * 1e3, 2),
                   peak_extra_mib=round(peaks[c], 1), tflops=round(flops / med[c] / 1e12, 3))
        for peer in ("full_logits", "cce"):
            if peer in med:
                row[f"time_vs_{peer}"] = round(med[c] / med[peer], 3)
                row[f"mem_vs_{peer}"] = round(peaks[c] / peaks[peer], 3) if peaks[peer] > 0 else ""
        rows.append(row)
        print(f"  {c:16s} {row['median_ms']:10.1f} ms  {row['peak_extra_mib']:9.1f} MiB extra  "
              f"{row['tflops']:7.3f} TFLOP/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shapes", default=None, help="N,H,V;N,H,V;... (default: the device's set)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--h", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.dtype = args.dtype or "float32"
        worker(args)
        return
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shapes = ([tuple(int(p) for p in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    contenders = [c for c in ("prefops_triton", "prefops_torch", "full_logits", "cce") if available(c, args.device)]
    rows = []
    for n, h, v in shapes:
        print(f"N={n} H={h} V={v} {dtype} on {device_name(args.device)}", flush=True)
        rows += run_shape(n, h, v, dtype, args.device, args.repeats, contenders, args.threads)
    out = Path(args.out) if args.out else RESULTS / f"token_logprobs_{args.device}.csv"
    write_csv(out, CSV_COLUMNS, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
