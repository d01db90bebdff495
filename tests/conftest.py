import json
import os
from pathlib import Path

import pytest


def _use_triton_interpreter_without_gpu() -> None:
    # Must happen before anything imports triton: kernels then run on CPU tensors.
    if "TRITON_INTERPRET" in os.environ:
        return
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_use_triton_interpreter_without_gpu()

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public samples (HH-RLHF, ImageReward, LLaMA-Factory) beside the repo."""
    if not (SHARED_DATA / "hh_harmless_test.jsonl.gz").exists():
        pytest.fail(f"real sample data not found at {SHARED_DATA} (expected ../shared/data beside the repo)")
    return SHARED_DATA


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
