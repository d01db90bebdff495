"""One rank of the data-parallel tests (gloo, CPU): each rank computes the loss on its half of the
pairs through a DDP- or FSDP2-wrapped tiny LM and saves the synchronised (full) gradients.
Launched twice by the test: ``ddp_worker.py OUT_DIR MODE``, MODE one of ddp, fsdp1, fsdp2,
fsdp1_sharded_ref, fsdp1_sharded_ref_bf16, fsdp2_sharded_ref (the reference model sharded too)."""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from prefops.demo import tiny_causal_lm
from prefops.training import causal_lm_preference_loss, reference_logps

VOCAB = 61
PAIRS_PER_RANK = 3


def batch_of(pair_ids, seed=0):
    """Pairs with different prompt and completion lengths (right-padded), chosen rows first."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for side in range(2):
        for i in pair_ids:
            n_prompt, n_completion = 3 + i % 3, 2 + (5 * i + side) % 4
            ids = torch.randint(3, VOCAB, (n_prompt + n_completion,), generator=torch.Generator().manual_seed(
                1000 * i + side + seed))
            rows.append(ids)
            masks.append(torch.tensor([0] * n_prompt + [1] * n_completion))
    T = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for r, (ids, m) in enumerate(zip(rows, masks)):
        input_ids[r, :len(ids)] = ids
        attention[r, :len(ids)] = 1
        completion[r, :len(ids)] = m
    return dict(input_ids=input_ids, attention_mask=attention, completion_mask=completion)


def models():
    return tiny_causal_lm(VOCAB, seed=0, hidden_size=32), tiny_causal_lm(VOCAB, seed=1, hidden_size=32).eval()


LOSS = dict(beta=0.2, loss_type=["sigmoid", "nll_mean"], loss_weights=[1.0, 0.3])


def main(out_dir, mode):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy, ref = models()
    if mode == "ddp":
        wrapped = DistributedDataParallel(policy)
    elif mode.startswith("fsdp1"):  # FullyShardedDataParallel, one unit per decoder layer + the root
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FullyShardedDataParallel(policy, auto_wrap_policy=ModuleWrapPolicy({type(policy.model.layers[0])}),
                                           use_orig_params=True, device_id=torch.device("cpu"))
    else:  # FSDP2: each decoder layer and the root sharded over the 2 ranks
        from torch.distributed.fsdp import fully_shard

        for layer in policy.model.layers:
            fully_shard(layer)
        wrapped = fully_shard(policy)
    if "_sharded_ref" in mode:  # the reference sharded too, as TRL's prepare_fsdp does
        if mode.startswith("fsdp1"):
            from torch.distributed.fsdp import MixedPrecision

            # bf16: the reference runs in bf16 while summon_full_params gives fp32 parameters
            mp = MixedPrecision(param_dtype=torch.bfloat16) if mode.endswith("_bf16") else None
            ref = FullyShardedDataParallel(ref, auto_wrap_policy=ModuleWrapPolicy({type(ref.model.layers[0])}),
                                           use_orig_params=True, device_id=torch.device("cpu"), mixed_precision=mp)
        else:
            ref = fully_shard(ref)  # the whole model in one root group, as TRL shards a reference
    pairs = list(range(rank * PAIRS_PER_RANK, (rank + 1) * PAIRS_PER_RANK))
    loss, _ = causal_lm_preference_loss(wrapped, batch_of(pairs), ref_model=ref, **LOSS)
    loss.backward()
    if mode.startswith("fsdp1"):
        with wrapped.summon_full_params(wrapped, with_grads=True):
            grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in policy.named_parameters()}
    else:
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for n, p in policy.named_parameters()}
    if "_sharded_ref" in mode:  # the precompute path reads the sharded head too
        grads["reference_logps"] = torch.stack(reference_logps(ref, batch_of(pairs)))
    torch.save(grads, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo + FSDP2 threads can abort at exit after the work is done


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
