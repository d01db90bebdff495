"""One rank of the KTO/BCO synchronisation test (gloo, launched twice by the test)."""

import json
import sys

import torch
import torch.distributed as dist

from prefops.losses import BCOLoss, diffusion_kto_loss, kto_loss


def rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    n = 4 + 3 * rank  # ranks hold different batch sizes
    out = {k: torch.randn(n, generator=g, dtype=torch.float64) - 20 for k in ("S", "R", "KS", "KR")}
    # Diffusion-KTO: [n, 3, 4] model / reference predictions and targets.
    out.update({k: torch.randn(n, 3, 4, generator=g, dtype=torch.float64) for k in ("model", "ref", "target")})
    return out


def main(out_path):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    d = rank_data(rank)
    des = torch.arange(d["S"].numel()) % 2 == 0
    _, kto_m = kto_loss(d["S"], d["R"], des, kl_logps=d["KS"], ref_kl_logps=d["KR"], beta=0.1)
    bco = BCOLoss(beta=0.1)
    bco(d["S"], d["R"], des)
    _, dkto_m = diffusion_kto_loss(d["model"], d["ref"], d["target"], des, backend="torch")
    with open(f"{out_path}.rank{rank}", "w") as f:
        json.dump({"kl": float(kto_m["kl"]), "delta": bco.running.mean, "diffusion_kl": float(dkto_m["kl"])}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
