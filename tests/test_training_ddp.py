"""The causal-LM helper under DistributedDataParallel, FSDP1 and FSDP2 (fully_shard), 2 gloo ranks
on CPU, gives the gradients of one process on the combined batch; also with the reference model
sharded, whose lm_head weight FSDP frees right after its no-grad forward."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker as worker  # noqa: E402
from launch_ranks import run_ranks  # noqa: E402

from prefops.training import causal_lm_preference_loss, reference_logps  # noqa: E402


@pytest.mark.parametrize("mode", ["ddp", "fsdp1", "fsdp2", "fsdp1_sharded_ref", "fsdp1_sharded_ref_bf16",
                                  "fsdp2_sharded_ref"])
def test_data_parallel_gradients_equal_single_process_on_combined_batch(tmp_path, mode):
    run_ranks("ddp_worker.py", tmp_path, mode)

    policy, ref = worker.models()
    combined = worker.batch_of(list(range(2 * worker.PAIRS_PER_RANK)))
    loss, _ = causal_lm_preference_loss(policy, combined, ref_model=ref, **worker.LOSS)
    loss.backward()
    expected = {n: p.grad for n, p in policy.named_parameters()}
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # a bf16 reference shifts the loss by bf16 rounding: only that case gets a looser bound
    rel = 5e-2 if mode.endswith("_bf16") else 1e-5
    if "_sharded_ref" in mode:
        for r, got in enumerate(ranks):
            pairs = list(range(r * worker.PAIRS_PER_RANK, (r + 1) * worker.PAIRS_PER_RANK))
            want = torch.stack(reference_logps(ref, worker.batch_of(pairs)))
            got = got.pop("reference_logps").float()
            assert torch.allclose(got, want, atol=1e-5, rtol=rel), (r, got, want)
    assert ranks[0].keys() == expected.keys()
    for name, g in expected.items():
        for got in ranks:
            err = (got[name] - g).abs().max().item()
            assert err <= rel * g.abs().max().item() + 1e-8, (name, err, g.abs().max().item())
    # and the two ranks did see different data: their local losses differ
    half = [worker.batch_of(list(range(r * worker.PAIRS_PER_RANK, (r + 1) * worker.PAIRS_PER_RANK))) for r in range(2)]
    with torch.no_grad():
        l0, _ = causal_lm_preference_loss(policy, half[0], ref_model=ref, **worker.LOSS)
        l1, _ = causal_lm_preference_loss(policy, half[1], ref_model=ref, **worker.LOSS)
    assert abs(l0.item() - l1.item()) > 1e-3
