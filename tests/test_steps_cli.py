"""`prefops curriculum | flip | augment` as a user runs them: exit codes, summaries, stats
reports, atomic (all-or-nothing) outputs, errors naming the missing column."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefops
from conftest import read_jsonl


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "prefops.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture()
def ir_pairs(tmp_path, shared_data):
    """ImageReward best-vs-each pairs as prep writes them (Parquet)."""
    out = tmp_path / "ir_pairs.parquet"
    r = run("prep", shared_data / "imagereward_test.json", "-o", out, "--strategy", "best_vs_each", "-q")
    assert r.returncode == 0, r.stderr
    return out


def test_curriculum_writes_output_stats_and_summary(ir_pairs, tmp_path):
    out, stats = tmp_path / "cur.jsonl", tmp_path / "cur.json"
    r = run("curriculum", ir_pairs, "-o", out, "--stats", stats, "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "pairs per stage" in r.stderr and "schedule stages" in r.stderr
    rows = read_jsonl(out)
    report = json.loads(stats.read_text())
    assert report["step"] == "curriculum" and report["outputs"] == [str(out)] and report["input"] == str(ir_pairs)
    assert report["rows"] == len(rows) == pq.read_table(ir_pairs).num_rows
    assert sum(report["pairs_per_stage"]) == len(rows) and report["by"] == "margin"
    assert [x["stage"] for x in rows] == sorted(x["stage"] for x in rows)
    # Same rows as the Python API.
    api = prefops.curriculum(ir_pairs).table.to_pylist()
    assert rows == api


def test_curriculum_split_stages_all_files_and_same_rows(ir_pairs, tmp_path):
    out = tmp_path / "out" / "cur.parquet"
    out.parent.mkdir()
    r = run("curriculum", ir_pairs, "-o", out, "--split-stages", "--stats", tmp_path / "s.json", "-q")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    names = sorted(os.listdir(out.parent))
    want = sorted(f"cur.stage{i}.parquet" for i in range(report["stages"]))
    assert names == want and report["outputs"] == [str(out.parent / f"cur.stage{i}.parquet")
                                                  for i in range(report["stages"])]
    parts = [pq.read_table(out.parent / f"cur.stage{i}.parquet") for i in range(report["stages"])]
    assert [p.num_rows for p in parts] == report["pairs_per_stage"]
    assert all(set(p.column("stage").to_pylist()) == {i} for i, p in enumerate(parts))
    assert pa.concat_tables(parts).equals(prefops.curriculum(ir_pairs).table)


def test_split_stages_is_all_or_nothing(ir_pairs, tmp_path):
    # stage1's destination is a directory: its rename fails after stage0's succeeded.
    (tmp_path / "cur.stage1.parquet").mkdir()
    r = run("curriculum", ir_pairs, "-o", tmp_path / "cur.parquet", "--split-stages")
    assert r.returncode == 1 and "cur.stage1.parquet" in r.stderr
    left = sorted(os.listdir(tmp_path))
    assert left == ["cur.stage1.parquet", "ir_pairs.parquet"], left  # no stage file, no temporary


def test_missing_column_is_named_and_nothing_is_written(ir_pairs, tmp_path):
    r = run("curriculum", ir_pairs, "-o", tmp_path / "c.parquet", "--by", "rm_margin")
    assert r.returncode == 1
    assert f"prefops: error: {ir_pairs}: missing column 'rm_margin' (the difficulty of each pair); " \
           "the table has: prompt_id, pair_id, prompt" in r.stderr
    r = run("augment", ir_pairs, "-o", tmp_path / "a.parquet")
    assert r.returncode == 1
    assert f"{ir_pairs}: row 0, field 'score_chosen': reward augmentation needs a finite score, got null" in r.stderr
    r = run("flip", ir_pairs, "-o", tmp_path / "f.parquet", "--factual")
    assert r.returncode == 1 and "missing factuality label columns" in r.stderr
    r = run("flip", ir_pairs, "-o", tmp_path / "f.parquet", "--reward-chosen", "rm_c", "--reward-rejected", "rm_r")
    assert r.returncode == 1 and "missing column 'rm_c'" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ir_pairs.parquet"]


def test_usage_errors_exit_2(ir_pairs, tmp_path):
    assert run("flip", ir_pairs, "-o", tmp_path / "f.jsonl").returncode == 2  # no rule
    r = run("flip", ir_pairs, "-o", tmp_path / "f.jsonl", "--reward-chosen", "a")
    assert r.returncode == 2 and "--reward-rejected" in r.stderr
    assert run("flip", ir_pairs, "-o", tmp_path / "f.jsonl", "--rate", "1.5").returncode == 2
    assert run("curriculum", ir_pairs).returncode == 2  # -o is required
    assert run("curriculum", ir_pairs, "-o", tmp_path / "c.jsonl", "--schedule", "random").returncode == 2
    assert run("curriculum", ir_pairs, "-o", tmp_path / "c.jsonl", "--ascending-is-easy",
               "--descending-is-easy").returncode == 2
    assert not any(p.name.startswith(("f.", "c.")) for p in tmp_path.iterdir())


def test_bad_input_paths_exit_1(tmp_path, ir_pairs):
    r = run("flip", tmp_path / "nope.jsonl", "-o", tmp_path / "f.jsonl", "--rate", "0.1")
    assert r.returncode == 1 and "nope.jsonl: no such file" in r.stderr
    r = run("flip", ir_pairs, "-o", tmp_path / "missing_dir" / "f.jsonl", "--rate", "0.1")
    assert r.returncode == 1 and "output directory does not exist" in r.stderr
    r = run("flip", ir_pairs, "-o", tmp_path / "f.csv", "--rate", "0.1")
    assert r.returncode == 1 and "unknown output type" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"pair_id": "a", "chosen": "x", "rejected": "y"}\n{"pair_id": \n')
    r = run("flip", bad, "-o", tmp_path / "f.jsonl", "--rate", "0.1")
    assert r.returncode == 1 and f"{bad}: line 2" in r.stderr


def test_flip_and_augment_jsonl_round_trip(tmp_path, shared_data):
    pairs = tmp_path / "hh.jsonl.gz"
    assert run("prep", shared_data / "hh_harmless_test.jsonl.gz", "-o", pairs, "--skip-invalid", "-q").returncode == 0
    flipped, stats = tmp_path / "hh_flipped.jsonl", tmp_path / "flip.json"
    r = run("flip", pairs, "-o", flipped, "--rate", "0.3", "--seed", "9", "--stats", stats)
    assert r.returncode == 0, r.stderr
    assert "random rate" in r.stderr and "negated: margin" in r.stderr
    report = json.loads(stats.read_text())
    rows = read_jsonl(flipped)
    assert report["flipped_random"] == report["flipped_total"] == sum(x["flipped"] for x in rows)
    orig = prefops.prep(shared_data / "hh_harmless_test.jsonl.gz", skip_invalid=True).table.to_pylist()
    for a, b in zip(orig, rows):
        assert (b["chosen"], b["rejected"]) == ((a["rejected"], a["chosen"]) if b["flipped"] else (a["chosen"], a["rejected"]))
        assert b["pair_id"] == a["pair_id"]
    # Flipping the JSONL back with the same seed restores the pairs.
    back = tmp_path / "back.parquet"
    assert run("flip", flipped, "-o", back, "--rate", "0.3", "--seed", "9", "-q").returncode == 0
    t = pq.read_table(back)
    assert t.column("chosen").to_pylist() == [x["chosen"] for x in orig]
    assert not any(t.column("flipped").to_pylist())

    # Augment with rank columns as scores, a custom template from a file.
    ir = tmp_path / "ir.jsonl"
    assert run("prep", shared_data / "imagereward_test.json", "-o", ir, "--strategy", "best_vs_each", "-q").returncode == 0
    template = tmp_path / "t.txt"
    template.write_text("{prompt}, rank {score} of 9")
    out = tmp_path / "ir_aug.parquet"
    r = run("augment", ir, "-o", out, "--score-columns", "rank_chosen", "rank_rejected", "--template-file", template)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out)
    src = read_jsonl(ir)
    assert t.num_rows == 2 * len(src) and "rows out" in r.stderr
    # All pairs conditioned on the chosen's rank, then all conditioned on the rejected's.
    first, second = t.slice(0, 1).to_pylist()[0], t.slice(len(src), 1).to_pylist()[0]
    assert first["prompt"] == f"{src[0]['prompt']}, rank {int(src[0]['rank_chosen'])} of 9"
    assert second["prompt"] == f"{src[0]['prompt']}, rank {int(src[0]['rank_rejected'])} of 9"
    assert (second["chosen"], second["rank_chosen"]) == (src[0]["rejected"], src[0]["rank_rejected"])
    assert (first["pair_id"], second["pair_id"]) == (src[0]["pair_id"] + ":c", src[0]["pair_id"] + ":r")


def test_help_lists_the_step_commands():
    r = run("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("curriculum", "flip", "augment"))
    r = run("curriculum", "--help")
    assert "--descending-is-easy" in r.stdout and "--split-stages" in r.stdout
