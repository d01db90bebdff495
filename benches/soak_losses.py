"""Soak: many random-shape calls of the fused op and losses against a float64 full-logits oracle.

    python benches/soak_losses.py [--calls 1000] [--seed 0] [--device cpu|cuda]

Each call draws a random case (tokens, hidden size, vocabulary, ignored fraction, bias,
temperature, soft-cap, logit scale up to ±1e4, all-ignored rows, dtype, backend, loss type) and
compares values and gradients (hidden, weight, bias) with float64 autograd of full logits; the
same full-logits computation in fp32 (what a plain implementation does) is measured beside it. A
call is a mismatch when an error exceeds its tolerance (fp32: 1e-4 relative to the largest entry
+ 1e-5; bf16 inputs: 2^-7 relative + 1e-3) and is also more than 4x the error of full fp32
logits (with logits near ±1e4, fp32 rounding of the logits themselves sets the floor); any
non-finite output is a mismatch. Writes one row per
(kind, dtype, backend) with call counts, mismatches and worst errors to
benches/results/soak_losses_<device>.csv. Without a GPU the Triton path runs under
TRITON_INTERPRET=1 at small shapes (a tenth of the calls); on a GPU natively.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prefops.losses import dpo_loss, dpo_loss_from_hidden  # noqa: E402
from prefops.ops import token_logprobs  # noqa: E402

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sigmoid_norm", "exo_pair", "bco_pair"]


def full_logits_token_logps(x, w, b, t, temperature, softcap):
    """Per-token log-probs from full logits, in the dtype of the inputs (float64: the oracle;
    float32: what a plain full-logits implementation computes)."""
    z = x @ w.T
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lp = torch.log_softmax(z / temperature, dim=-1)
    valid = t != -100
    picked = lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def draw_case(rng: random.Random, device: str, triton_small: bool):
    small = triton_small
    n = rng.randint(1, 40 if small else 300)
    h = rng.choice([8, 16, 24] if small else [7, 16, 33, 64, 96])
    v = rng.randint(5, 90 if small else 700)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    scale = rng.choice([0.1, 1.0, 1.0, 5.0, 100.0, 3000.0])  # 3000: logits around ±1e4
    loss = rng.random() < 0.5
    return dict(n=max(n, 2) if loss else n, h=h, v=v, dtype=dtype, scale=scale, bias=rng.random() < 0.4,
                temperature=rng.choice([1.0, 1.0, 0.7, 1.5]), softcap=rng.choice([None, None, 30.0]),
                ignore=rng.choice([0.0, 0.2, 0.7, 1.0]), loss=loss,
                loss_type=rng.choice(LOSS_TYPES), device=device)


def tensors(case, gen):
    n, h, v, dev = case["n"], case["h"], case["v"], case["device"]
    x = torch.randn(n, h, generator=gen) * case["scale"]
    w = torch.randn(v, h, generator=gen) / math.sqrt(h)
    b = torch.randn(v, generator=gen) if case["bias"] else None
    t = torch.randint(0, v, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < case["ignore"]] = -100
    cast = lambda a: None if a is None else a.to(dev, case["dtype"]).requires_grad_()  # noqa: E731
    return cast(x), cast(w), cast(b), t.to(dev)


def _leaf(a, dtype):
    return None if a is None else a.detach().to(dtype).requires_grad_()


def run_case(case, backend, gen):
    """(worst relative error, worst error of full fp32 logits, mismatch?) for one random case."""
    x, w, b, t = tensors(case, gen)
    common = dict(temperature=case["temperature"], logit_softcap=case["softcap"])
    B = max(1, case["n"] // 8)
    T = max(1, case["n"] // (2 * B))
    ref = torch.randn(2, B, generator=gen, dtype=torch.float64) - 10 * T
    upstream = torch.randn(case["n"], generator=gen, dtype=torch.float64)
    kw = dict(beta=0.1, loss_type=case["loss_type"])
    if case["loss_type"] in ("exo_pair", "robust"):
        kw["label_smoothing"] = 0.1

    def full_logits(x, w, b):  # the same computation through full logits, in x's dtype
        if case["loss"]:  # a DPO batch: [2B, T] rows, chosen first
            rows = 2 * B * T
            lp = full_logits_token_logps(x[:rows], w, b, t[:rows], case["temperature"], case["softcap"])
            seq = lp.reshape(2 * B, T).double().sum(1)
            lengths = (t[:rows].reshape(2 * B, T) != -100).sum(1).double()
            r = ref.to(seq.device)
            loss, _ = dpo_loss(seq[:B], seq[B:], r[0], r[1], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
                               **kw)
            return loss
        return full_logits_token_logps(x, w, b, t, case["temperature"], case["softcap"])

    if case["loss"]:
        rows = 2 * B * T
        r = ref.to(x.device)
        got, _ = dpo_loss_from_hidden(x[:rows].reshape(2 * B, T, -1), w, t[:rows].reshape(2 * B, T), bias=b,
                                      ref_chosen_logps=r[0], ref_rejected_logps=r[1], backend=backend, **common, **kw)
    else:
        got = token_logprobs(x, w, t, bias=b, backend=backend, **common).logps
    results = []
    for inputs, value in (((x, w, b), got),
                          ((_leaf(x, torch.float64), _leaf(w, torch.float64), _leaf(b, torch.float64)), None),
                          ((_leaf(x, torch.float32), _leaf(w, torch.float32), _leaf(b, torch.float32)), None)):
        if value is None:
            value = full_logits(*inputs)
        g = upstream[:value.numel()].reshape(value.shape).to(value.device)
        (value.double() * g).sum().backward()
        results.append([value.detach().double()] + [a.grad.double() if a.grad is not None else torch.zeros(a.shape)
                                                    for a in inputs if a is not None])
    ours, oracle, fp32 = results
    rel = 2 ** -7 if case["dtype"] == torch.bfloat16 else 1e-4
    worst = worst_fp32 = 0.0
    bad = False
    for a, d, n in zip(ours, oracle, fp32):
        if not torch.isfinite(a).all():
            return float("inf"), 0.0, True
        scale = d.abs().max().item() if d.numel() else 0.0
        err = (a - d).abs().max().item() if a.numel() else 0.0
        err_fp32 = (n - d).abs().max().item() if n.numel() else 0.0
        worst = max(worst, err / max(scale, 1e-6))  # relative, or absolute where the oracle is ~0
        worst_fp32 = max(worst_fp32, err_fp32 / max(scale, 1e-6))
        # within tolerance, or no worse than 4x full fp32 logits (large logits: fp32 rounding of
        # the logits themselves dominates, whatever computes them)
        bad |= err > rel * scale + (1e-5 if case["dtype"] == torch.float32 else 1e-3) and err > 4 * err_fp32
    return worst, worst_fp32, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    native = args.device == "cuda"
    stats = defaultdict(lambda: dict(calls=0, mismatches=0, worst_rel=0.0, worst_fp32=0.0))
    start = time.perf_counter()
    for i in range(args.calls):
        backend = "triton" if (native and i % 2) or (not native and i % 10 == 9) else "torch"
        case = draw_case(rng, args.device, triton_small=backend == "triton" and not native)
        if backend == "triton" and not native:
            case["dtype"] = torch.float32 if rng.random() < 0.7 else torch.bfloat16
        worst, worst_fp32, bad = run_case(case, backend, gen)
        key = ("dpo_loss_from_hidden" if case["loss"] else "token_logprobs", str(case["dtype"]).split(".")[-1], backend)
        s = stats[key]
        s["calls"] += 1
        s["mismatches"] += int(bad)
        s["worst_rel"] = max(s["worst_rel"], worst)
        s["worst_fp32"] = max(s["worst_fp32"], worst_fp32)
        if bad:
            print(f"MISMATCH call {i}: {key} {case} worst relative error {worst:.3g}", file=sys.stderr)
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{args.calls} calls, {sum(v['mismatches'] for v in stats.values())} mismatches, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    device_name = torch.cuda.get_device_name() if native else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak_losses_{'cuda' if native else 'cpu'}.csv"
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["kind", "dtype", "backend", "calls", "mismatches", "worst_relative_error",
                     "worst_relative_error_full_fp32_logits", "device", "seed"])
        for (kind, dtype, backend), s in sorted(stats.items()):
            wr.writerow([kind, dtype, backend, s["calls"], s["mismatches"], f"{s['worst_rel']:.3g}", f"{s['worst_fp32']:.3g}", device_name,
                         args.seed])
    total = sum(s["mismatches"] for s in stats.values())
    print(f"{args.calls} calls, {total} mismatches beyond tolerance; {path}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
