"""Arrow input is read exactly as JSONL input. Arrow rows of the common layouts (UltraFeedback
completions, Nectar answers, TRL text pairs) skip the generic record tree and go straight to
groups, declining any row they are unsure of; JSONL records always take the generic path. So for
the same records, pairs, lists, stats and skip reports must agree, whatever the nulls, blanks,
non-finite scores, integer ids and carried fields."""

import json
import math
import re

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefops

TEXT = st.sampled_from(["a", "b", "dup", "é ü", "line\nbreak", 'quote"d', "x" * 40, "", " \t", "\u3000", None])
SCORE = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 2.25, -0.0, 1e300, None, math.inf, math.nan]))
RATING = st.one_of(st.integers(1, 4).map(float), st.sampled_from([1.5, None]))


@st.composite
def prompt_ids(draw):
    """A column of string ids or of integer ids (one type per table, as Arrow needs), with nulls."""
    ids = st.integers(0, 3) if draw(st.booleans()) else st.sampled_from(["id-a", "id-b"])
    return st.one_of(st.none(), ids)


def mostly(strategy, good):
    """Usually a good value (so that most rows are taken), sometimes anything from `strategy`."""
    return st.one_of(good, good, good, good, strategy)


@st.composite
def ultrafeedback(draw):
    rows, ids = [], draw(prompt_ids())
    for _ in range(draw(st.integers(1, 10))):
        completions = [
            {"response": draw(mostly(TEXT, st.sampled_from(["a", "b", "dup", "é ü", "x" * 40]))),
             "overall_score": draw(mostly(SCORE, st.integers(0, 5).map(float))),
             "model": draw(st.sampled_from(["m1", "m2", None])),
             "annotation": draw(st.sampled_from(["ok", None]))}
            for _ in range(draw(st.integers(0, 5)))]
        rows.append({"source": draw(st.sampled_from(["s", None])),
                     "instruction": draw(mostly(TEXT, st.sampled_from(["q1", "q2", "q3"]))),
                     "completions": draw(st.sampled_from([completions, completions, completions, None])),
                     "prompt_id": draw(ids)})
    return "ultrafeedback", rows


@st.composite
def nectar(draw):
    rows = []
    for _ in range(draw(st.integers(1, 10))):
        answers = [{"answer": draw(mostly(TEXT, st.sampled_from(["a", "b", "dup"]))),
                    "rank": draw(mostly(RATING, st.integers(1, 4).map(float))),
                    "model": draw(st.sampled_from(["m1", None]))}
                   for _ in range(draw(st.integers(1, 5)))]
        rows.append({"prompt": draw(mostly(TEXT, st.sampled_from(["q1", "q2"]))), "answers": answers,
                     "turns": draw(st.integers(1, 3))})
    return "nectar", rows


@st.composite
def text_pairs(draw):
    rows, ids = [], draw(prompt_ids())
    with_ranks = draw(st.booleans())
    for _ in range(draw(st.integers(1, 10))):
        scored = draw(st.booleans())
        good = st.integers(0, 5).map(float) if scored else st.none()
        row = {"prompt": draw(mostly(TEXT, st.sampled_from(["q1", "q2"]))),
               "chosen": draw(mostly(TEXT, st.sampled_from(["a", "b"]))),
               "rejected": draw(mostly(TEXT, st.sampled_from(["dup", "é ü"]))),
               "score_chosen": draw(mostly(SCORE, good)), "score_rejected": draw(mostly(SCORE, good)),
               "prompt_id": draw(ids)}
        if with_ranks:
            row["rank_chosen"] = draw(RATING)
            row["rank_rejected"] = draw(RATING)
        rows.append(row)
    return "trl", rows


def to_jsonl(path, rows):
    # allow_nan: NaN/Infinity are not JSON, so a record holding one fails to parse (malformed
    # JSON) where the Arrow row fails its score check; such draws are compared on Arrow alone.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def has_non_finite(rows):
    return "NaN" in json.dumps(rows) or "Infinity" in json.dumps(rows)


def strip_location(examples):
    """'line 3, ...' (JSONL) and 'row 2, ...' (Arrow) name the same record one apart."""
    return [re.sub(r"^(line|row) \d+", "", e) for e in examples]


def run(make, source, fmt, **options):
    try:
        result = make(source, format=fmt, threads=1, **options)
    except prefops.DataError as e:
        return "error", re.sub(r"(line|row) \d+", "", str(e).split(": ", 1)[1])
    stats = dict(result.stats)
    stats["skipped_examples"] = strip_location(stats["skipped_examples"])
    for key in ("source", "seconds", "rows_per_second", "input", "output"):
        stats.pop(key, None)
    return result.table.to_pylist(), stats


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(ultrafeedback(), nectar(), text_pairs()),
       kind=st.sampled_from(["pairs", "lists"]), skip_invalid=st.booleans())
def test_arrow_rows_read_as_jsonl_records(tmp_path_factory, data, kind, skip_invalid):
    fmt, rows = data
    if has_non_finite(rows):
        rows = [r for r in rows if not has_non_finite([r])] or rows[:0]
    if not rows:
        return
    src = to_jsonl(tmp_path_factory.mktemp("in") / "in.jsonl", rows)
    table = pa.Table.from_pylist(rows)
    if kind == "pairs":
        make, options = prefops.prep, dict(strategy="all_pairs", ties="keep", skip_invalid=skip_invalid)
    else:
        make, options = prefops.lists, dict(list_size=3, skip_invalid=skip_invalid)
    assert run(make, table, fmt, **options) == run(make, src, fmt, **options)
