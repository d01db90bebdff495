"""One rank of the vocab-parallel token_logprobs test (launched twice by the test, gloo on CPU).

Every rank builds the same full problem from a fixed seed, keeps its rows of the vocabulary,
runs token_logprobs with the process group, back-propagates, and saves what it got.
"""

import sys

import torch
import torch.distributed as dist

from prefops.ops import token_logprobs

N, H, V = 37, 19, 123
BOUNDS = [0, 62, 123]  # uneven shards on purpose


def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / 4
    b = torch.randn(V, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    # Vocabulary rows 70..109 (shard 1) copy rows 0..39 (shard 0): argmax ties across the shards.
    w[70:110] = w[0:40]
    b[70:110] = b[0:40]
    t[::7] = -100
    # Some targets are the (first) argmax, some its later copy in the other shard (a tie: not top-1).
    top = ((x @ w.T + b) / 0.9).argmax(-1)
    t[1::3] = top[1::3]
    later = torch.where(top < 40, top + 70, top)
    t[2::3] = later[2::3]
    t[1::7] = -100
    upstream = torch.randn(N, generator=g)
    return x, w, b, t, upstream


def main(out_dir: str, backend: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, w, b, t, upstream = problem()
    lo, hi = BOUNDS[rank], BOUNDS[rank + 1]
    xs = x.clone().requires_grad_()
    ws = w[lo:hi].clone().requires_grad_()
    bs = b[lo:hi].clone().requires_grad_()
    out = token_logprobs(xs, ws, t, bias=bs, temperature=0.9, return_entropy=True, return_log_sum_p2=True,
                         return_mean_logits=True, return_is_top1=True,
                         process_group=dist.group.WORLD, vocab_start_index=lo, backend=backend)
    (out.logps * upstream).sum().backward()
    torch.save(dict(logps=out.logps, entropy=out.entropy, log_sum_p2=out.log_sum_p2,
                    mean_logits=out.mean_logits, is_top1=out.is_top1,
                    dx=xs.grad, dw=ws.grad, db=bs.grad), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
