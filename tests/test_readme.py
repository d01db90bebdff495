"""The README's examples run as written."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_python_examples_run(tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "README has no python examples"
    monkeypatch.chdir(tmp_path)
    namespace = {}  # shared, as a reader runs them top to bottom in one session
    for block in code:
        exec(compile(block, "README.md", "exec"), namespace)


def test_cli_example_runs(tmp_path):
    [example] = [b for b in blocks("bash") if b.startswith("prefops prep python/")]
    args = shlex.split(example.replace("\\\n", " "))
    args[2] = str(ROOT / args[2])
    exe = Path(sys.executable).parent / "prefops"
    r = subprocess.run([str(exe), *args[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pairs.parquet").exists() and (tmp_path / "stats.json").exists()
