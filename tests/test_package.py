"""The installed wheel: its three parts, a cheap import, and the thread-count variable."""

import os
import subprocess
import sys
from importlib.metadata import files
from pathlib import Path

import pytest


def test_installed_wheel_has_extension_python_package_and_kernels():
    names = {str(f) for f in files("prefops")}
    assert any(n.startswith("prefops/_native") and n.endswith((".so", ".pyd")) for n in names), names
    assert "prefops/__init__.py" in names and "prefops/cli.py" in names and "prefops/data.py" in names
    assert "prefops/kernels/__init__.py" in names and "prefops/kernels/token_logprobs.py" in names
    assert "prefops/ops/token_logprobs.py" in names and "prefops/ops/token_logprobs_torch.py" in names
    assert "prefops/samples/hh_harmless_sample.jsonl.gz" in names


def test_checkout_kernels_dir_does_not_shadow_an_installed_kernels_package(tmp_path):
    """Scripts and `python -m pytest` run from a checkout have it first on sys.path. Its
    top-level kernels/ must not be a regular package there, or it shadows PyPI's `kernels`
    (which transformers >= 5.25 requires and imports: `from kernels import CUDAProperties`)."""
    root = Path(__file__).resolve().parents[1]
    assert (root / "kernels" / "token_logprobs.py").is_file()
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'installed'\n")
    code = "import sys; sys.path.insert(0, ''); from kernels import CUDAProperties; print(CUDAProperties)"
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(site)},
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip()) == (0, "installed"), r.stderr


def test_import_is_cheap_and_gpu_free():
    code = ("import sys, prefops, prefops.kernels; "
            "bad = [m for m in ('torch', 'triton', 'numpy', 'polars') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_ops_import_torch_but_not_triton():
    code = ("import sys, prefops.ops; "
            "print('torch' in sys.modules, 'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True False"


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("prefops", path=str(Path(sys.executable).parent))
    assert exe is not None
    r = subprocess.run([exe, "prep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--strategy" in r.stdout and "--skip-invalid" in r.stdout


def test_allocator_purge_delay_is_lengthened_unless_the_user_set_it():
    """The extension asks mimalloc to keep freed memory for 10 s (fewer page faults per batch).
    A user's MIMALLOC_PURGE_DELAY wins; reading it back through the same option index proves
    the index is mimalloc's purge delay."""
    import os

    code = "import prefops._native as n; print(n._allocator_purge_delay_ms())"
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**env, "MIMALLOC_PURGE_DELAY": "777"})
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("10000", "777")


_RSS_CHILD = r"""
import resource, sys, time, prefops
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
src, dst = sys.argv[1], sys.argv[2]
before, f0 = status("VmRSS"), faults()
prefops.prep(src, dst, strategy="best_vs_each")
f1 = faults()
prefops.prep(src, dst, strategy="best_vs_each")
f2, ended = faults(), time.perf_counter()
peak = status("VmHWM")
while status("VmRSS") - before > 0.25 * (peak - before) and time.perf_counter() - ended < 10:
    time.sleep(0.05)
print(f1 - f0, f2 - f1, before, peak, status("VmRSS"), time.perf_counter() - ended)
"""


def _ultrafeedback_table(n_prompts: int, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    k = 6
    corpus = rng.integers(97, 123, 1 << 16, dtype=np.uint8).tobytes().decode()
    starts = rng.integers(0, len(corpus) - 200, n_prompts * k).tolist()
    completions = pa.StructArray.from_arrays(
        [pa.array([corpus[s : s + 150] for s in starts]), pa.array(rng.random(n_prompts * k))],
        names=["response", "overall_score"],
    )
    offsets = pa.array(np.arange(0, n_prompts * k + 1, k, dtype=np.int32))
    return pa.table({
        "instruction": pa.array([corpus[s : s + 80] for s in starts[::k]]),
        "completions": pa.ListArray.from_arrays(offsets, completions),
    })


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_freed_memory_is_kept_between_calls_and_handed_back_when_idle(tmp_path):
    """mimalloc holds what a run frees (10 s purge delay) but only purges inside allocator calls.
    The extension hands it back from a background thread once no call has run for a second:
    a second call right after the first reuses the cache (handing it back as each call returned
    made it fault its working set in again), and an idle process gives it back (holding it
    left a finished run's cache resident)."""
    import pyarrow.parquet as pq

    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(_ultrafeedback_table(150_000), src)
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(dst)],
                       capture_output=True, text=True, check=True)
    first_faults, second_faults, before, peak, after, waited = map(float, r.stdout.split())
    assert peak - before > 200 * 2**20, r.stdout  # the calls did hold a large working set
    assert second_faults <= first_faults / 4, r.stdout
    assert after - before < 0.25 * (peak - before), r.stdout
    assert waited < 5, r.stdout


_FORK_CHILD = r"""
import os, sys, time, prefops, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
def has_thread():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return "prefops-give-ba" in names
def call_and_check():
    made = prefops.prep(table).stats["pairs_made"]
    t = time.perf_counter()  # the new thread names itself as it starts
    while not has_thread() and time.perf_counter() - t < 0.5:
        time.sleep(0.01)
    return made > 0 and has_thread()
def fork(work):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if work() else 3)
    return os.waitpid(pid, 0)[1]
def child():
    # A child's own fork, right after its first call has started its thread.
    return call_and_check() and fork(call_and_check) == 0
# First right after the call that starts the thread, then around the moment it collects.
for pause in [0, 0.95, 0.99, 1.03, 1.07, 1.11]:
    prefops.prep(table)
    time.sleep(pause)
    status = fork(child)
    assert status == 0, status
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc/self/task")
def test_forks_while_memory_is_handed_back_leave_working_children(tmp_path):
    """The hand-back thread starts with the first call and collects about a second after each.
    A fork at either moment (a DataLoader worker, a Pool), and a fork in the child, must give
    processes whose calls work and which start their own hand-back thread; a deadlock would be
    a hang, so the process has a timeout."""
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(_ultrafeedback_table(20_000), src)
    r = subprocess.run([sys.executable, "-c", _FORK_CHILD, str(src)], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
