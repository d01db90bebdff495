"""Fuzzing the Python API with messy input (the Rust readers have their own proptest harness in
rust/core/tests/fuzz.rs): any JSON made of the keys the schemas use, damaged bytes, Arrow tables
of wrong types. Every call ends in a result or a DataError/ValueError/OSError — never a
RuntimeError (a caught Rust panic) or a crash — and a failed call writes nothing."""

import gzip
import json
import math

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import prefops

KEYS = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "instruction", "completions",
        "response", "overall_score", "answers", "answer", "rank", "generations", "ranking", "caption",
        "label_0", "label_1", "conversations", "from", "value", "messages", "role", "content", "label",
        "completion", "responses", "score", "prompt_id", "id"]

EXPECTED = (prefops.DataError, ValueError, OSError)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.sampled_from(["\n\nHuman: hi\n\nAssistant: yo", "", " ", "x" * 50_000]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20,
)
records = st.lists(st.dictionaries(st.sampled_from(KEYS), json_value, max_size=7), max_size=10)


def _dump(value) -> str:
    # NaN and ±inf written the way some exporters do (not valid JSON; must be a clear error).
    return json.dumps(value, allow_nan=True, ensure_ascii=False)


@st.composite
def damaged_file(draw):
    rows = draw(records)
    data = "".join(_dump(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        how = draw(st.sampled_from(["cut", "insert", "flip"]))
        if how == "cut":
            data = data[:at]
        elif how == "insert":
            data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80\x80", b"\n", b"{", b"\x00"])) + data[at:]
        else:
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    gz = draw(st.booleans())
    if gz:
        data = gzip.compress(data)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]  # truncated gzip
    return ("in.jsonl.gz" if gz else "in.jsonl"), data


OPTIONS = st.fixed_dictionaries({
    "format": st.one_of(st.none(), st.sampled_from(prefops.FORMATS)),
    "kind": st.sampled_from(["pairs", "unpaired", "grouped", "lists"]),
    "skip_invalid": st.booleans(),
    "strategy": st.sampled_from(prefops.STRATEGIES),
    "threads": st.integers(1, 3),
})


def _rows_in(path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_metadata(path).num_rows
    return path.read_bytes().count(b"\n")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(file=damaged_file(), options=OPTIONS, parquet_out=st.booleans())
def test_prep_on_messy_files_gives_a_result_or_a_clear_error(tmp_path_factory, file, options, parquet_out):
    d = tmp_path_factory.mktemp("fuzz")
    name, data = file
    (d / name).write_bytes(data)
    out_dir = d / "out"
    out_dir.mkdir()
    out = out_dir / ("o.parquet" if parquet_out else "o.jsonl")
    try:
        result = prefops.prep(d / name, out, **options)
    except EXPECTED as e:
        assert str(e)
        assert list(out_dir.iterdir()) == [], f"{e} left {list(out_dir.iterdir())}"
        return
    assert list(out_dir.iterdir()) == [out]
    assert _rows_in(out) == result.stats["rows_written"]
    assert result.stats["rows_read"] >= result.stats["rows_skipped"]


@settings(max_examples=150, deadline=None)
@given(rows=records, options=OPTIONS)
def test_prep_on_arrow_tables_of_any_types(rows, options):
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        assume(False)
    try:
        result = prefops.prep(table, **options)
    except EXPECTED as e:
        assert str(e)
        return
    assert result.table.num_rows == result.stats["rows_written"]


@pytest.mark.parametrize("bad,fragment", [
    (float("nan"), "score must be finite"),
    (float("inf"), "score must be finite"),
    (-math.inf, "score must be finite"),
])
def test_non_finite_scores_name_line_and_field(tmp_path, bad, fragment):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0},
            {"prompt": "q", "chosen": "a", "rejected": "b", "score_chosen": bad, "score_rejected": 0.0}]
    src = tmp_path / "in.parquet"
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), src)
    with pytest.raises(prefops.DataError, match=rf"row 1, field 'score_chosen': {fragment}"):
        prefops.prep(src, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()
    skipped = prefops.prep(src, skip_invalid=True)
    assert skipped.stats["rows_skipped"] == 1 and skipped.table.num_rows == 1


def test_a_prompt_id_shared_by_different_prompts_is_an_error_or_a_counted_skip(tmp_path):
    # Grouping by prompt id would otherwise merge the two and silently lose one prompt.
    rows = [{"prompt_id": "same", "prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt_id": "other", "prompt": "p", "chosen": "e", "rejected": "f"},
            {"prompt_id": "same", "prompt": "q", "chosen": "c", "rejected": "d"},
            {"prompt_id": "same", "prompt": "p", "chosen": "g", "rejected": "h"}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(prefops.DataError,
                       match=r"line 3, field 'prompt_id': prompt id 'same' was used at line 1 for a different prompt"):
        prefops.prep(src, tmp_path / "out.jsonl", group_by_prompt=True)
    assert not (tmp_path / "out.jsonl").exists()
    result = prefops.prep(src, group_by_prompt=True, skip_invalid=True, strategy="all_pairs")
    assert result.stats["skipped"] == {"prompt_id_conflict": 1}
    assert result.stats["rows_read"] == 4 and result.stats["rows_skipped"] == 1
    # Line 4 has the same id and prompt as line 1: merged with it, as grouping promises.
    got = sorted((r["prompt_id"], r["chosen"], r["rejected"]) for r in result.table.to_pylist())
    assert ("same", "c", "d") not in got and ("other", "e", "f") in got
    assert {r for r in got if r[0] == "same"} >= {("same", "a", "b"), ("same", "g", "h")}
