"""Round trips: JSONL → Parquet → JSONL keeps every field byte for byte, output row counts
reconcile with the stats, and prep can read its own output back."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefops
from prefops.cli import main

SAMPLES = ["hh", "imagereward", "llamafactory_dpo", "llamafactory_kto"]


def _lines(path):
    return path.read_bytes().count(b"\n")


def _records(path):
    # Not splitlines(): it also splits at U+0085 and U+2028, which JSON strings may hold raw.
    return [json.loads(x) for x in path.read_text(encoding="utf-8").split("\n")[:-1]]


# KTO rows pair up (or make lists) only where a prompt has both labels: none do in that sample.
@pytest.mark.parametrize("sample,kind", [(s, k) for s in SAMPLES for k in ("pairs", "unpaired", "grouped", "lists")
                                         if not (s == "llamafactory_kto" and k in ("pairs", "lists"))])
def test_prep_output_survives_jsonl_parquet_jsonl_byte_for_byte(tmp_path, sample, kind):
    first = tmp_path / "a.jsonl"
    made = prefops.prep(prefops.sample_path(sample), first, kind=kind, strategy="all_pairs", skip_invalid=True)
    assert made.stats["rows_written"] == _lines(first) > 0

    to_parquet = prefops.convert(first, tmp_path / "b.parquet")
    back = prefops.convert(to_parquet, tmp_path / "c.jsonl")
    assert (tmp_path / "c.jsonl").read_bytes() == first.read_bytes()
    assert to_parquet.stats["rows"] == back.stats["rows"] == pq.read_metadata(tmp_path / "b.parquet").num_rows
    assert back.stats["rows"] == _lines(tmp_path / "c.jsonl")

    # Prep's own Parquet output converts to the same bytes as its JSONL output.
    prefops.prep(prefops.sample_path(sample), tmp_path / "d.parquet", kind=kind, strategy="all_pairs",
                 skip_invalid=True)
    prefops.convert(tmp_path / "d.parquet", tmp_path / "e.jsonl.gz")
    import gzip
    assert gzip.decompress((tmp_path / "e.jsonl.gz").read_bytes()) == first.read_bytes()


def test_cli_convert_round_trip_and_stats(tmp_path):
    src = tmp_path / "pairs.jsonl"
    prefops.prep(prefops.sample_path("imagereward"), src, strategy="best_vs_each")
    assert main(["convert", str(src), "-o", str(tmp_path / "p.parquet"), "-q",
                 "--stats", str(tmp_path / "s.json")]) == 0
    assert main(["convert", str(tmp_path / "p.parquet"), "-o", str(tmp_path / "back.jsonl"), "-q"]) == 0
    assert (tmp_path / "back.jsonl").read_bytes() == src.read_bytes()
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["rows"] == _lines(src)
    assert [c for c, _ in stats["columns"]] == list(_records(src)[0])


def test_mixed_type_json_column_is_reported_with_first_lines(tmp_path, capsys):
    # A number 5 and a string "5" both become the text "5": the one change convert makes to
    # values, so it is reported (stats, --stats JSON and the summary), not silent.
    src = tmp_path / "mixed.jsonl"
    rows = [{"pair_id": f"id{i}", "prompt": f"p{i}", "chosen": "a", "rejected": "b", "score": i, "ok": True}
            for i in range(6)]
    rows[3]["score"] = "3"
    rows[4]["ok"] = None
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = prefops.convert(src, tmp_path / "out.parquet")
    assert result.stats["mixed_type_columns"] == [
        {"column": "score", "kinds": [["number", "line 1"], ["string", "line 4"]]}]
    assert pq.read_table(tmp_path / "out.parquet").column("score").to_pylist() == ["0", "1", "2", "3", "4", "5"]
    assert main(["convert", str(src), "-o", str(tmp_path / "o.jsonl"), "--stats", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert "column 'score' mixes number (first at line 1) and string (first at line 4) values" in err
    assert "'ok'" not in err and "'prompt'" not in err and "'chosen'" not in err
    assert json.loads((tmp_path / "s.json").read_text())["mixed_type_columns"][0]["column"] == "score"
    # Steps other than convert report it too; a clean file reports nothing.
    assert prefops.flip_labels(src, rate=0.5).stats["mixed_type_columns"][0]["column"] == "score"
    assert prefops.convert(tmp_path / "out.parquet").stats["mixed_type_columns"] == []


def test_prep_reads_back_its_own_pairs_when_scores_are_null(tmp_path):
    # Ranked input (ImageReward) gives pairs with null scores and rank columns; reading them
    # back keeps every pair and takes the margin from the ranks.
    first = prefops.prep(prefops.sample_path("imagereward"), tmp_path / "p.jsonl", strategy="all_pairs")
    rows = _records(tmp_path / "p.jsonl")
    assert all(r["score_chosen"] is None for r in rows)
    again = prefops.prep(tmp_path / "p.jsonl", strategy="all_pairs").table.to_pylist()
    assert len(again) == first.stats["rows_written"]
    assert [(r["prompt_id"], r["chosen"], r["rejected"], r["margin"]) for r in again] == \
           [(r["prompt_id"], r["chosen"], r["rejected"], r["rank_rejected"] - r["rank_chosen"]) for r in rows]


def test_one_null_score_is_still_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b",
                                "score_chosen": 2.0, "score_rejected": None}) + "\n")
    with pytest.raises(prefops.DataError, match=r"line 1, field 'score_rejected': missing score"):
        prefops.prep(path)


# Records whose columns each hold one JSON type (what a table can keep exactly).
_scalar = {
    "text": st.text(max_size=40),
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "bool": st.booleans(),
    "texts": st.lists(st.text(max_size=8), max_size=4),
    "obj": st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=20)}),
}


@st.composite
def typed_records(draw):
    names = draw(st.lists(st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6),
                          min_size=1, max_size=5, unique=True))
    kinds = [draw(st.sampled_from(sorted(_scalar))) for _ in names]
    n = draw(st.integers(1, 12))
    rows = []
    for _ in range(n):
        row = {}
        for name, kind in zip(names, kinds):
            if draw(st.integers(0, 5)) == 0:
                row[name] = None
            else:
                row[name] = draw(_scalar[kind])
        rows.append(row)
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=typed_records())
def test_any_typed_jsonl_round_trips_to_equal_values_and_then_to_equal_bytes(tmp_path, rows):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    prefops.convert(src, tmp_path / "a.parquet")
    prefops.convert(tmp_path / "a.parquet", tmp_path / "b.jsonl")
    back = _records(tmp_path / "b.jsonl")
    assert back == rows  # values, key order included (json.loads keeps it; == on dicts ignores it)
    assert [list(r) for r in back] == [list(r) for r in rows]
    # The second trip is exact in bytes.
    prefops.convert(tmp_path / "b.jsonl", tmp_path / "c.parquet")
    prefops.convert(tmp_path / "c.parquet", tmp_path / "d.jsonl")
    assert (tmp_path / "d.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert pq.read_table(tmp_path / "c.parquet").equals(pq.read_table(tmp_path / "a.parquet"))


def test_arrow_input_keeps_nested_types(tmp_path):
    table = pa.table({
        "prompt": ["p", "q"],
        "chosen": [[{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "ü€😀"}]],
        "n": pa.array([1, None], pa.int64()),
        "big": ["y" * 1_000_000, ""],
    })
    prefops.convert(table, tmp_path / "t.jsonl")
    back = prefops.convert(tmp_path / "t.jsonl")
    assert back.table.to_pylist() == table.to_pylist()


def _rated_rows(rng, n):
    """UltraFeedback-like rows: texts short (inside an Arrow view) and long, repeated within
    and across prompts, with escapes and non-ASCII text."""
    words = ["a", "longer word", "é", "ß\u00a0", "\"quoted\"", "tab\there", "line\nbreak", "🙂", "x" * 40]
    text = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    shared = text(12)
    rows = []
    for i in range(n):
        completions = []
        for j in range(rng.randint(2, 6)):
            response = rng.choice([text(rng.randint(1, 3)), text(rng.randint(5, 30)), shared])
            completions.append({"model": f"m{j}", "response": response, "overall_score": float(rng.randint(1, 9))})
        rows.append({"instruction": text(rng.randint(1, 20)) + f" #{i % 7}", "completions": completions})
    return rows


# Parquet output holds the text columns as views into the input (a Parquet file or a sliced
# Arrow table); what is read back must equal the in-memory output, which is plain Utf8.
@pytest.mark.parametrize("strategy", ["best_vs_each", "all_pairs", "best_vs_worst"])
def test_parquet_output_from_parquet_and_arrow_input_equals_in_memory_output(tmp_path, strategy):
    import random

    # 20k rows: several 8192-row chunks, which for the table are slices of shared buffers.
    table = pa.Table.from_pylist(_rated_rows(random.Random(5), 20_000))
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=3000)
    expected = prefops.prep(table, strategy=strategy).table
    assert expected.schema.field("chosen").type == pa.string()
    assert expected.num_rows > 15_000
    for source in [tmp_path / "in.parquet", table]:
        prefops.prep(source, tmp_path / "out.parquet", strategy=strategy, threads=2)
        got = pq.read_table(tmp_path / "out.parquet")
        assert got.schema.field("chosen").type == pa.string()  # the file's schema says Utf8, not views
        assert got.equals(expected)
