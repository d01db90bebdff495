"""Vocab-parallel token_logprobs (weight sharded over 2 gloo ranks on CPU) equals the unsharded op."""

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
