"""Bad input: clear errors naming file, line/row and field; nothing half-written; counted skips."""

import gzip
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prefops
from conftest import write_jsonl

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
UF = {"instruction": "q", "completions": [{"response": "a", "overall_score": 7.0},
                                          {"response": "b", "overall_score": 3.0}]}


def uf(**changes):
    row = json.loads(json.dumps(UF))
    for path, value in changes.items():
        i, key = path.split("__")
        row["completions"][int(i)][key] = value
    return row


CASES = [
    # (rows, expected substrings, skip key)
    ([GOOD, '{"prompt": "p", "chosen": "a", "rejected": }', GOOD], ["line 2", "malformed JSON"], "malformed_json"),
    ([GOOD, GOOD, {"prompt": "p", "chosen": "a"}], ["line 3", "field 'rejected'", "missing"], "missing_field"),
    ([UF, uf(**{"1__overall_score": "7"})], ["line 2", "field 'completions[1].overall_score'", "must be a number"],
     "wrong_type"),
    ([UF, '{"instruction": "q", "completions": [{"response": "a", "overall_score": NaN}, '
          '{"response": "b", "overall_score": 1}]}'], ["line 2", "NaN"], "malformed_json"),
    ([UF, uf(**{"0__response": "   "})], ["line 2", "field 'completions[0].response'", "empty response"],
     "empty_response"),
    ([UF, {"instruction": "q", "completions": [{"response": "a", "overall_score": 1}]}],
     ["line 2", "1 response(s)"], "single_response"),
    ([UF, {"instruction": "q", "completions": "nope"}], ["line 2", "field 'completions'", "must be a list"],
     "wrong_type"),
]


@pytest.mark.parametrize("rows,expected,skip_key", CASES)
@pytest.mark.parametrize("out_name", ["out.jsonl", "out.parquet"])
def test_bad_record_errors_and_leaves_no_output(tmp_path, rows, expected, skip_key, out_name):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(prefops.DataError) as err:
        prefops.prep(src, out_dir / out_name)
    message = str(err.value)
    assert str(src) in message
    for part in expected:
        assert part in message, message
    assert list(out_dir.iterdir()) == [], "a failed run must leave nothing behind"

    result = prefops.prep(src, out_dir / out_name, skip_invalid=True)
    assert result.stats["skipped"] == {skip_key: 1}
    assert result.stats["rows_skipped"] == 1
    assert any(expected[0] in e for e in result.stats["skipped_examples"])
    assert result.stats["rows_read"] == len(rows)
    assert (out_dir / out_name).exists()


def test_non_finite_score_in_parquet_names_row_and_field(tmp_path):
    table = pa.Table.from_pylist([
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0},
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": math.nan, "score_rejected": 0.0},
    ])
    pq.write_table(table, tmp_path / "in.parquet")
    with pytest.raises(prefops.DataError, match=r"in\.parquet: row 1, field 'score_chosen': score must be finite"):
        prefops.prep(tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_truncated_gzip_is_an_error_without_output(tmp_path):
    data = gzip.compress(("\n".join(json.dumps(GOOD) for _ in range(5000)) + "\n").encode())
    (tmp_path / "in.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="in.jsonl.gz"):
        prefops.prep(tmp_path / "in.jsonl.gz", tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl.gz"]


def test_existing_output_survives_a_failed_run(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, "{broken"])
    with pytest.raises(prefops.DataError):
        prefops.prep(src, out)
    assert out.read_text() == "precious\n"


def test_first_error_in_input_order_is_reported_whatever_the_threads(tmp_path):
    rows = [GOOD] * 3000 + ['{"bad": '] + [GOOD] * 3000 + ["{also bad"]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    from prefops import _native

    for threads in (1, 2, 4):
        with pytest.raises(prefops.DataError, match="line 3001"):
            _native.prep(src, tmp_path / "o.jsonl", threads=threads, chunk_bytes=4096)


def test_undetectable_format_and_bad_options(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"cannot detect.*--format.*--map"):
        prefops.prep(src)
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        prefops.prep(good, strategy="best")
    with pytest.raises(ValueError, match="min_margin"):
        prefops.prep(good, min_margin=-1)
    with pytest.raises(ValueError, match="unknown output type"):
        prefops.prep(good, tmp_path / "out.csv")
    with pytest.raises(ValueError, match="output directory does not exist"):
        prefops.prep(good, tmp_path / "missing" / "out.jsonl")
    with pytest.raises(FileNotFoundError):
        prefops.prep(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="empty"):
        prefops.prep(write_jsonl(tmp_path / "empty.jsonl", []))


def test_binary_image_columns_are_refused_with_a_hint():
    table = pa.table({"caption": ["c"], "jpg_0": [b"\x89PNG"], "jpg_1": [b"\x89PNG"],
                      "label_0": [1.0], "label_1": [0.0]})
    with pytest.raises(ValueError, match="binary data.*--map image_0_url"):
        prefops.prep(table)


def test_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    old = os.umask(0o022)
    try:
        for name in ("o.jsonl", "o.parquet", "o.jsonl.gz"):
            prefops.prep(src, tmp_path / name)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        from prefops.cli import main

        assert main(["prep", str(src), "-o", str(tmp_path / "c.jsonl"), "--stats", str(tmp_path / "s.json"), "-q"]) == 0
        assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o644
    finally:
        os.umask(old)
