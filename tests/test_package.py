"""The installed wheel: its three parts, a cheap import, and the thread-count variable."""

import subprocess
import sys
from importlib.metadata import files


def test_installed_wheel_has_extension_python_package_and_kernels():
    names = {str(f) for f in files("prefops")}
    assert any(n.startswith("prefops/_native") and n.endswith((".so", ".pyd")) for n in names), names
    assert "prefops/__init__.py" in names and "prefops/cli.py" in names and "prefops/data.py" in names
    assert "prefops/kernels/__init__.py" in names and "prefops/kernels/token_logprobs.py" in names
    assert "prefops/ops/token_logprobs.py" in names and "prefops/ops/token_logprobs_torch.py" in names
    assert "prefops/samples/hh_harmless_sample.jsonl.gz" in names


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

    exe = shutil.which("prefops", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None
    r = subprocess.run([exe, "prep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--strategy" in r.stdout and "--skip-invalid" in r.stdout


def test_allocator_purge_delay_is_lengthened_unless_the_user_set_it():
    """The extension asks mimalloc to keep freed memory for 1 s (fewer page faults per batch).
    A user's MIMALLOC_PURGE_DELAY wins; reading it back through the same option index proves
    the index is mimalloc's purge delay."""
    import os

    code = "import prefops._native as n; print(n._allocator_purge_delay_ms())"
    env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
    ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**env, "MIMALLOC_PURGE_DELAY": "777"})
    assert (ours.stdout.strip(), theirs.stdout.strip()) == ("1000", "777")
