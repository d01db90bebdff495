"""Ctrl-C: a long prep or step stops promptly, raises KeyboardInterrupt (the CLI exits 130) and
leaves no output, not even a temporary file. Rust panics surface as RuntimeError."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import prefops
from prefops import _native

ROWS = 1_000_000


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """~345 MB of TRL rows with scores, margins and pair ids: prep, convert and curriculum take
    0.66, 1.2 and 0.8 s on the 2-core VM, 6x or more the 0.1 s before the signal."""
    path = tmp_path_factory.mktemp("big") / "pairs.jsonl"
    # margin and pair_id, so that curriculum has real work after reading instead of an early error.
    head = json.dumps({"prompt": "p" * 60, "chosen": "c" * 80, "rejected": "r" * 80,
                       "score_chosen": 2.5, "score_rejected": 1.0, "margin": 1.5})[:-1]
    with open(path, "w") as f:
        for block in range(ROWS // 1000):
            f.write("".join(f'{head}, "pair_id": "{block * 1000 + j}"}}\n' for j in range(1000)))
    return path


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def sigint_raises():
    """Python's own SIGINT handler for the test, even when the suite was started with SIGINT
    ignored (a background job of a non-interactive shell inherits SIG_IGN, and Python then
    installs no handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_default():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the child's Python then installs its handler


@pytest.mark.parametrize("step", ["prep", "convert", "curriculum"])
def test_sigint_in_process_raises_keyboard_interrupt_and_writes_nothing(big_input, tmp_path, step, sigint_raises):
    out = tmp_path / "out.parquet"
    run = {
        "prep": lambda: prefops.prep(big_input, out),
        "convert": lambda: prefops.convert(big_input, out),
        "curriculum": lambda: prefops.curriculum(big_input, out, schedule="global"),
    }[step]
    delay = 0.1  # early in the run (see big_input)
    timer = threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGINT))
    started = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        timer.cancel()
    elapsed = time.perf_counter() - started
    assert elapsed < delay + 1.0, f"took {elapsed:.2f} s to stop"
    assert _entries(tmp_path) == []
    # The next run is not affected by the earlier interrupt.
    assert prefops.convert(prefops.sample_path("llamafactory_dpo"), tmp_path / "ok.jsonl").stats["rows"] == 120


def test_cli_prep_stops_on_sigint_with_exit_130_and_no_partial_file(big_input, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefops.cli", "prep", str(big_input), "-o", str(out_dir / "pairs.parquet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
    )
    # Signal once the run has started writing: its temporary file appears next to the output.
    deadline = time.monotonic() + 60
    while not _entries(out_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "prep finished before it could be interrupted: make the input larger"
    assert _entries(out_dir), "no temporary output appeared"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 1.5
    assert proc.returncode == 130, err
    assert "interrupted; no output was written" in err
    assert _entries(out_dir) == []


def test_panic_in_a_worker_thread_is_a_runtime_error_not_a_crash():
    with pytest.raises(RuntimeError, match="prefops internal error") as caught:
        _native._panic_for_tests()
    # The worker's own message and location, not std's "a scoped thread panicked".
    assert re.search(r"deliberate test panic at \S*lib\.rs:\d+", str(caught.value)), caught.value
    assert "scoped thread" not in str(caught.value)
    # The process and the module still work.
    assert prefops.convert(prefops.sample_path("llamafactory_dpo")).stats["rows"] == 120
