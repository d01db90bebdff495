"""What every benchmark script shares: the CPU's name for the results, and writing the CSV."""

from __future__ import annotations

import csv
import platform
from pathlib import Path
from typing import Iterable, Mapping, Sequence


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping], *, append: bool = False) -> None:
    """Write (or append to) a results CSV, creating its folder; the header is written once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            w.writeheader()
        w.writerows(rows)
