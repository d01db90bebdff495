"""Distributed behaviour on 2 gloo ranks (CPU): vocab-parallel token_logprobs equals the unsharded op;
KTO and BCO batch statistics are synchronised."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prefops.ops import token_logprobs  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import vocab_parallel_worker as worker  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocab_parallel_equals_unsharded(tmp_path, backend):
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "vocab_parallel_worker.py"), str(tmp_path), backend],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out

    x, w, b, t, upstream = worker.problem()
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    full = token_logprobs(x, w, t, bias=b, temperature=0.9, return_entropy=True, return_log_sum_p2=True,
                          backend="torch")
    (full.logps * upstream).sum().backward()

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for got in ranks:
        torch.testing.assert_close(got["logps"], full.logps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["entropy"], full.entropy, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["log_sum_p2"], full.log_sum_p2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["dx"], x.grad, atol=1e-5, rtol=1e-5)  # all-reduced over shards
    lo_hi = list(zip(worker.BOUNDS[:-1], worker.BOUNDS[1:]))
    for got, (lo, hi) in zip(ranks, lo_hi):
        torch.testing.assert_close(got["dw"], w.grad[lo:hi], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["db"], b.grad[lo:hi], atol=1e-5, rtol=1e-5)


def test_kto_kl_and_bco_delta_are_the_same_on_every_rank(tmp_path):
    import json

    import unpaired_sync_worker as uw

    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable, str(HERE / "unpaired_sync_worker.py"), str(tmp_path / "out")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    got = [json.loads((tmp_path / f"out.rank{r}").read_text()) for r in range(2)]
    data = [uw.rank_data(r) for r in range(2)]
    # KTO: the mean over ranks of each rank's mean KL estimate (TRL's gather-then-mean), clamped at 0.
    kl = max(sum(float((d["KS"] - d["KR"]).mean()) for d in data) / 2, 0.0)
    # BCO: the mean of every reward of every rank.
    rewards = torch.cat([0.1 * (d["S"] - d["R"]) for d in data])
    for g in got:
        assert g["kl"] == pytest.approx(kl, rel=1e-12)
        assert g["delta"] == pytest.approx(float(rewards.mean()), rel=1e-12)
