"""One rank of the KTO/BCO synchronisation test (gloo, launched twice by the test)."""

import json
import sys

import torch
import torch.distributed as dist

from prefops.losses import BCOLoss, kto_loss


def rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    n = 4 + 3 * rank  # ranks hold different batch sizes
    return {k: torch.randn(n, generator=g, dtype=torch.float64) - 20 for k in ("S", "R", "KS", "KR")}


def main(out_path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    d = rank_data(rank)
    des = torch.arange(d["S"].numel()) % 2 == 0
    _, kto_m = kto_loss(d["S"], d["R"], des, kl_logps=d["KS"], ref_kl_logps=d["KR"], beta=0.1)
    bco = BCOLoss(beta=0.1)
    bco(d["S"], d["R"], des)
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump({"kl": float(kto_m["kl"]), "delta": bco.running.mean}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
