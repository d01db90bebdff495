"""Distributed behaviour on 2 gloo ranks (CPU): vocab-parallel token_logprobs equals the unsharded op;
KTO and BCO batch statistics are synchronised."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefops.ops import token_logprobs  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vocab_parallel_worker as worker  # noqa: E402
from launch_ranks import run_ranks  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_equals_unsharded(tmp_path, backend):
    run_ranks("vocab_parallel_worker.py", tmp_path, backend, timeout=240)

    x, w, b, t, upstream = worker.problem()
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    full = token_logprobs(x, w, t, bias=b, temperature=0.9, return_entropy=True, return_log_sum_p2=True,
                          return_mean_logits=True, return_is_top1=True, backend="torch")
    z = (x @ w.T + b) / 0.9
    assert torch.equal(full.is_top1, (z.argmax(-1) == t) & (t != -100))
    # Targets tied with an earlier id in the other shard: the MAX all-reduce decides them.
    tied = (t >= worker.BOUNDS[1]) & (z.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1) == z.max(-1).values)
    assert full.is_top1.any() and (tied & ~full.is_top1).any()
    (full.logps * upstream).sum().backward()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        torch.testing.assert_close(got["logps"], full.logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"], full.entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["log_sum_p2"], full.log_sum_p2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mean_logits"], full.mean_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(got["is_top1"], full.is_top1)
        torch.testing.assert_close(got["dx"], x.grad, atol=1e-5, rtol=1e-5)  # all-reduced over shards
    lo_hi = list(zip(worker.BOUNDS[:-1], worker.BOUNDS[1:]))
    for got, (lo, hi) in zip(ranks, lo_hi):
        torch.testing.assert_close(got["dw"], w.grad[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["db"], b.grad[lo:hi], atol=1e-5, rtol=1e-5)


def test_kto_kl_and_bco_delta_are_the_same_on_every_rank(tmp_path):
    import json

    import unpaired_sync_worker as uw

    run_ranks("unpaired_sync_worker.py", tmp_path / "out", timeout=240)
    got = [json.loads((tmp_path / f"out.rank{r}").read_text()) for r in range(2)]
    data = [uw.rank_data(r) for r in range(2)]
    # KTO: the mean over ranks of each rank's mean KL estimate (TRL's gather-then-mean), clamped at 0.
    kl = max(sum(float((d["KS"] - d["KR"]).mean()) for d in data) / 2, 0.0)
    # BCO: the mean of every reward of every rank.
    rewards = torch.cat([0.1 * (d["S"] - d["R"]) for d in data])
    # Diffusion-KTO: the mean over ranks of each rank's batch mean of g = mse_ref − mse_model.
    mse = lambda a, t: ((a - t) ** 2).flatten(1).mean(1)  # noqa: E731
    dkl = max(sum(float((mse(d["ref"], d["target"]) - mse(d["model"], d["target"])).mean()) for d in data) / 2, 0.0)
    for g in got:
        assert g["kl"] == pytest.approx(kl, rel=1e-12)
        assert g["delta"] == pytest.approx(float(rewards.mean()), rel=1e-12)
        assert g["diffusion_kl"] == pytest.approx(dkl, rel=1e-9, abs=1e-12)
