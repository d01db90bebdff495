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
