"""What every benchmark script shares: timing a call, the CPU's name for the results, and writing
the CSV."""

from __future__ import annotations

import csv
import gc
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence


def timed(fn: Callable, repeats: int, *args):
    """Median wall time of `repeats` calls of fn(*args), garbage collected before each (the
    previous output dropped first), and the last call's output."""
    times, out = [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


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
