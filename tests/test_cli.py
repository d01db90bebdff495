"""The prefops CLI as a user runs it: exit codes, stderr, stats report, atomic outputs."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from conftest import write_jsonl


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "prefops.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_prep_writes_parquet_and_stats(shared_data, tmp_path):
    out, stats = tmp_path / "pairs.parquet", tmp_path / "stats.json"
    r = run("prep", shared_data / "imagereward_test.json", "-o", out, "--strategy", "best_vs_each",
            "--min-margin", "1", "--seed", "3", "--threads", "2", "--stats", stats)
    assert r.returncode == 0, r.stderr
    report = json.loads(stats.read_text())
    table = pq.read_table(out)
    assert report["pairs_made"] == report["rows_written"] == table.num_rows > 0
    assert report["format"] == "ranked_list" and report["strategy"] == "best_vs_each"
    assert report["rows_read"] == 466
    assert sum(report["margin_histogram"]["counts"]) == table.num_rows
    assert report["dropped"]["tie"] > 0
    assert "pairs made" in r.stderr and "tie" in r.stderr


def test_prep_no_extra_columns(shared_data, tmp_path):
    """ImageReward lists carry an `id` column; --no-extra-columns leaves it out and nothing else."""
    for flags, name in [((), "full.parquet"), (("--no-extra-columns",), "lean.parquet")]:
        r = run("prep", shared_data / "imagereward_test.json", "-o", tmp_path / name, "-q", *flags)
        assert r.returncode == 0, r.stderr
    full, lean = pq.read_table(tmp_path / "full.parquet"), pq.read_table(tmp_path / "lean.parquet")
    assert "id" in full.column_names
    assert lean.column_names == [c for c in full.column_names if c != "id"]
    assert lean.equals(full.select(lean.column_names))


def test_bad_input_exit_code_and_message(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "a", "rejected": 3}])
    r = run("prep", src, "-o", tmp_path / "o.jsonl")
    assert r.returncode == 1
    assert f"{src}: line 2, field 'rejected': must be text or a list of messages, got integer 3" in r.stderr
    assert not (tmp_path / "o.jsonl").exists()
    r = run("prep", src, "-o", tmp_path / "o.jsonl", "--skip-invalid")
    assert r.returncode == 0 and "wrong_type 1" in r.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 1


def test_dry_run_writes_nothing_and_usage_errors(tmp_path, shared_data):
    r = run("prep", shared_data / "llamafactory_dpo_en_demo.json", "--dry-run", "--stats", tmp_path / "s.json")
    assert r.returncode == 0
    assert json.loads((tmp_path / "s.json").read_text())["pairs_made"] == 300
    assert sorted(os.listdir(tmp_path)) == ["s.json"]
    assert run("prep", shared_data / "llamafactory_dpo_en_demo.json").returncode == 2
    r = run("prep", shared_data / "llamafactory_dpo_en_demo.json", "--dry-run", "--map", "oops")
    assert r.returncode == 2 and "CANONICAL=YOURS" in r.stderr
    assert run("prep", shared_data / "llamafactory_dpo_en_demo.json", "--dry-run", "--threads", "0").returncode == 2


def test_column_map_and_threads_env(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    env = {**os.environ, "PREFOPS_NUM_THREADS": "3"}
    r = subprocess.run([sys.executable, "-m", "prefops.cli", "prep", str(src), "-o", str(tmp_path / "o.jsonl"),
                        "--map", "prompt=question", "--map", "chosen=good", "--map", "rejected=bad"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "3 threads" in r.stderr
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("q", "a", "b")
