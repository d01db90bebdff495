#!/usr/bin/env python3
"""End-to-end DPO step: policy hidden states → loss → gradients of hidden and lm_head weight.

Contenders, all with the reference given as its own hidden states (the only form Liger takes):

  prefops            prefops.losses.dpo_loss_from_hidden(ref_hidden=...)      (Triton on a GPU, torch on CPU)
  prefops_ref_logps  the same with precomputed reference log-probs (what Liger cannot take)
  trl_full_logits    TRL-style: policy logits materialised, log_softmax + gather in fp32,
                     reference logits under no_grad, sigmoid DPO
  liger              liger_kernel LigerFusedLinearDPOLoss (compiled=True on a GPU, False on CPU)

Same protocol as bench_token_logprobs.py: one process, interleaved rounds, medians; peak extra
memory from torch.cuda on a GPU or from a fresh subprocess per contender on CPU.

    python benches/bench_dpo_step.py                   # CPU shapes
    python benches/bench_dpo_step.py --device cuda     # T=4096 and the kernel issue's shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import write_csv

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_token_logprobs import device_name, rss_mib, status_mib, sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CPU_SHAPES = [(2, 512, 512, 32000), (1, 1024, 256, 32000)]  # pairs, T, H, V
GPU_SHAPES = [(2, 4096, 4096, 128256), (4, 1024, 4096, 128256), (8, 512, 2048, 32000)]
CONTENDERS = ("prefops", "prefops_ref_logps", "trl_full_logits", "liger")
CSV_COLUMNS = ["benchmark", "device", "contender", "pairs", "seq_len", "hidden", "vocab", "dtype", "median_ms",
               "peak_extra_mib", "time_vs_liger", "mem_vs_liger", "time_vs_trl", "mem_vs_trl"]


def make_inputs(pairs, T, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(2 * pairs, T, H, generator=g) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype).requires_grad_()
    ref_hidden = (hidden.detach().float() + 0.05 * torch.randn(2 * pairs, T, H, generator=g).to(device)).to(dtype)
    targets = torch.randint(0, V, (2 * pairs, T), generator=g)
    targets[:, : T // 8] = -100  # prompt
    return hidden, weight, ref_hidden, targets.to(device)


def contender(name, device):
    if name in ("prefops", "prefops_ref_logps"):
        from prefops.losses import dpo_loss_from_hidden
        from prefops.ops import token_logprobs

        if name == "prefops":
            return lambda h, w, rh, t: dpo_loss_from_hidden(h, w, t, ref_hidden=rh, beta=0.1)[0]

        cache = {}

        def prepare(h, w, rh, t):  # precomputed once, as a dataset column would be
            with torch.no_grad():
                cache["ref"] = token_logprobs(rh, w, t, reduction="sum").seq_logps.chunk(2)

        def with_ref_logps(h, w, rh, t):
            if "ref" not in cache:
                prepare(h, w, rh, t)
            rc, rr = cache["ref"]
            return dpo_loss_from_hidden(h, w, t, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)[0]

        with_ref_logps.prepare = prepare
        return with_ref_logps
    if name == "trl_full_logits":
        import torch.nn.functional as F

        def seq_logps(h, w, t):
            logits = (h @ w.T).float()
            lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
            return (lp * (t != -100)).sum(-1)

        def trl(h, w, rh, t):
            s = seq_logps(h, w, t)
            with torch.no_grad():
                r = seq_logps(rh, w, t)
            c, rj = s.chunk(2)
            rc, rr = r.chunk(2)
            return -F.logsigmoid(0.1 * ((c - rc) - (rj - rr))).mean()

        return trl
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        fn = LigerFusedLinearDPOLoss(beta=0.1, compiled=device == "cuda", use_ref_model=True)
        return lambda h, w, rh, t: fn(w, h, t, ref_input=rh, ref_weight=w.detach())[0]
    raise ValueError(name)


def available(name):
    if name == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            return False
    return True


def step(fn, h, w, rh, t):
    h.grad = None
    w.grad = None
    fn(h, w, rh, t).backward()


def worker(args):
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    fn = contender(args.worker, "cpu")
    step(fn, *make_inputs(1, 16, 32, 128, dtype, "cpu", seed=1))  # library start-up costs
    fn = contender(args.worker, "cpu")
    inputs = make_inputs(args.pairs, args.T, args.H, args.V, dtype, "cpu")
    if hasattr(fn, "prepare"):
        fn.prepare(*inputs)  # the reference pass is precomputed data, not part of the step
    base = rss_mib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(fn, *inputs)
    print(json.dumps({"peak_extra_mib": status_mib("VmHWM") - base}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--shapes", default=None, help="pairs,T,H,V;...")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    for k in ("pairs", "T", "H", "V"):
        ap.add_argument(f"--{k}", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.worker:
        args.dtype = dtype_name
        worker(args)
        return
    torch.set_num_threads(args.threads)
    shapes = ([tuple(int(p) for p in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    names = [c for c in CONTENDERS if available(c)]
    rows = []
    for pairs, T, H, V in shapes:
        print(f"pairs={pairs} T={T} H={H} V={V} {dtype_name} on {device_name(args.device)}", flush=True)
        inputs = make_inputs(pairs, T, H, V, getattr(torch, dtype_name), args.device)
        fns = {c: contender(c, args.device) for c in names}
        peaks, times = {}, {c: [] for c in names}
        for c in names:
            step(fns[c], *inputs)  # warm-up (and the precomputed reference)
            if args.device == "cuda":
                sync("cuda")
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step(fns[c], *inputs)
                sync("cuda")
                peaks[c] = (torch.cuda.max_memory_allocated() - base) / 2**20
        for _ in range(args.repeats):
            for c in names:
                sync(args.device)
                t0 = time.perf_counter()
                step(fns[c], *inputs)
                sync(args.device)
                times[c].append(time.perf_counter() - t0)
        if args.device != "cuda":
            for c in names:
                out = subprocess.run([sys.executable, __file__, "--worker", c, "--pairs", str(pairs), "--T", str(T),
                                      "--H", str(H), "--V", str(V), "--dtype", dtype_name, "--threads",
                                      str(args.threads)], capture_output=True, text=True, check=True)
                peaks[c] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]
        med = {c: statistics.median(times[c]) for c in names}
        for c in names:
            row = dict(benchmark="dpo_step_fwd_bwd", device=device_name(args.device), contender=c, pairs=pairs,
                       seq_len=T, hidden=H, vocab=V, dtype=dtype_name, median_ms=round(med[c] * 1e3, 1),
                       peak_extra_mib=round(peaks[c], 1))
            for peer, key in (("liger", "liger"), ("trl_full_logits", "trl")):
                if peer in med:
                    row[f"time_vs_{key}"] = round(med[c] / med[peer], 3)
                    row[f"mem_vs_{key}"] = round(peaks[c] / peaks[peer], 3) if peaks[peer] > 0 else ""
            rows.append(row)
            print(f"  {c:18s} {row['median_ms']:9.1f} ms  {row['peak_extra_mib']:9.1f} MiB extra", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"dpo_step_{args.device}.csv"
    write_csv(out, CSV_COLUMNS, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
