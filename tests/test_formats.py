"""Every input schema, read into the same pairs."""

import json

import pyarrow as pa
import pytest

import prefops
from prefops import _native


def pairs(rows, **kw):
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    return prefops.prep(table, **kw)


def test_ultrafeedback_raw_scores_models_and_extras():
    row = {"source": "evol", "instruction": "q",
           "completions": [{"model": "m1", "response": "a", "overall_score": 6.5, "fine-grained_score": 4.0},
                           {"model": "m2", "response": "b", "overall_score": 8.0, "fine-grained_score": 3.0},
                           {"model": "m3", "response": "c", "overall_score": 2.0, "fine-grained_score": 4.5}]}
    r = pairs([row])
    [p] = r.table.to_pylist()
    assert r.format == "ultrafeedback"
    assert (p["chosen"], p["rejected"], p["margin"]) == ("b", "c", 6.0)
    assert (p["chosen_model"], p["rejected_model"], p["source"]) == ("m2", "m3", "evol")
    [p] = pairs([row], score_field="fine-grained_score").table.to_pylist()
    assert (p["chosen"], p["rejected"], p["score_chosen"]) == ("c", "b", 4.5)


@pytest.mark.parametrize("kind", ["pairs", "grouped", "unpaired", "lists"])
def test_extra_columns_false_drops_exactly_the_carried_columns(tmp_path, kind):
    """The record's other columns (source, models) and the responses' other fields
    (fine-grained_score, inside grouped rows' responses) go; everything prefops makes stays."""
    rows = [{"source": f"s{i}", "instruction": f"q{i}", "models": ["m1", "m2", "m3"],
             "completions": [{"model": f"m{j}", "response": f"r{i}{j}", "overall_score": float((i + j) % 4),
                              "fine-grained_score": j / 2} for j in range(3)]} for i in range(5)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = prefops.lists if kind == "lists" else prefops.prep
    options = {} if kind == "lists" else {"kind": kind, "strategy": "best_vs_each"}

    def without_extras(row):
        # A list's own "models" column (its responses' models) is made by prefops: it stays.
        row = {k: v for k, v in row.items() if k != "source" and (k != "models" or kind == "lists")}
        if kind == "grouped":
            row["responses"] = [{k: v for k, v in r.items() if k != "fine-grained_score"} for r in row["responses"]]
        return row

    full = run(src, **options).table.to_pylist()
    lean = run(src, extra_columns=False, **options).table.to_pylist()
    assert len(full) > 0 and all(without_extras(r) != r for r in full)
    assert lean == [without_extras(r) for r in full]
    run(src, tmp_path / "lean.jsonl", extra_columns=False, **options)
    assert [json.loads(line) for line in (tmp_path / "lean.jsonl").read_text().splitlines()] == lean


def test_ultrafeedback_binarized_conversational():
    row = {"prompt": "hi", "prompt_id": "x1",
           "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad"}],
           "score_chosen": 9.0, "score_rejected": 9.0}
    r = pairs([row, {**row, "prompt_id": "x2", "score_rejected": 4.0}])
    [p] = r.table.to_pylist()
    assert r.format == "ultrafeedback_binarized" and r.stats["dropped"] == {"tie": 1}
    assert p["prompt"] == [{"role": "user", "content": "hi"}]
    assert p["chosen"] == [{"role": "assistant", "content": "good"}]
    assert (p["prompt_id"], p["margin"]) == ("x2", 5.0)


def test_given_pairs_scored_the_other_way_are_counted_and_reordered():
    rows = [{"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 2.0, "score_rejected": 7.0},
            {"prompt": "p2", "chosen": "c", "rejected": "d", "score_chosen": 5.0, "score_rejected": 1.0},
            {"prompt": "p3", "chosen": "e", "rejected": "f", "score_chosen": 3.0, "score_rejected": 3.0}]
    r = pairs(rows)
    assert r.stats["pairs_reordered_by_score"] == 1  # not the tie, not the agreeing pair
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in r.table.to_pylist()] == [("b", "a", 5.0), ("c", "d", 4.0)]
    assert "1 given pairs score the rejected response higher" in r.summary()
    # Rated lists have no given order: nothing to count.
    assert pairs([{"instruction": "q", "completions": [{"response": "x", "overall_score": 1.0},
                                                        {"response": "y", "overall_score": 9.0}]}]
                 ).stats["pairs_reordered_by_score"] == 0


def test_nectar_rank_one_is_best():
    row = {"prompt": "\n\nHuman: q\n\nAssistant:", "answers": [
        {"answer": "third", "model": "a", "rank": 3.0}, {"answer": "first", "model": "b", "rank": 1.0},
        {"answer": "second", "model": "c", "rank": 2.0}]}
    r = pairs([row], strategy="best_vs_each")
    assert [(p["chosen"], p["rejected"], p["margin"]) for p in r.table.to_pylist()] == [
        ("first", "second", 1.0), ("first", "third", 2.0)]
    assert r.format == "nectar"


def test_pickapic_labels_and_ties():
    rows = [{"caption": "cat", "image_0_url": "u0", "image_1_url": "u1", "label_0": 0.0, "label_1": 1.0},
            {"caption": "dog", "image_0_url": "v0", "image_1_url": "v1", "label_0": 0.5, "label_1": 0.5}]
    r = pairs(rows)
    assert [(p["chosen"], p["rejected"]) for p in r.table.to_pylist()] == [("u1", "u0")]
    assert r.stats["dropped"] == {"tie": 1}
    kept = pairs(rows, ties="keep").table.to_pylist()
    assert [p["tie"] for p in kept] == [False, True]


def test_trl_standard_and_implicit_messages():
    std = pairs([{"prompt": "p", "chosen": "a", "rejected": "b", "extra": 1}]).table.to_pylist()[0]
    assert (std["prompt"], std["chosen"], std["rejected"], std["extra"]) == ("p", "a", "b", 1)
    conv = [{"role": "user", "content": "q"}]
    rows = [{"chosen": conv + [{"role": "assistant", "content": "a"}],
             "rejected": conv + [{"role": "assistant", "content": "b"}]}]
    [p] = pairs(rows).table.to_pylist()
    assert p["prompt"] == conv and p["chosen"] == [{"role": "assistant", "content": "a"}]


def test_kto_to_pairs_groups_rows_by_prompt():
    rows = [{"prompt": "p", "completion": "good", "label": True},
            {"prompt": "q", "completion": "x", "label": True},
            {"prompt": "p", "completion": "bad", "label": False}]
    r = pairs(rows, kind="pairs")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in r.table.to_pylist()] == [("p", "good", "bad")]
    assert r.stats["dropped"] == {"fewer_than_two_responses": 1}
    assert r.stats["prompts"] == 2


def test_group_by_prompt_merges_pair_rows():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3.0, "score_rejected": 2.0},
            {"prompt": "p", "chosen": "c", "rejected": "d", "score_chosen": 5.0, "score_rejected": 1.0}]
    r = pairs(rows, group_by_prompt=True, strategy="best_vs_worst")
    assert [(p["chosen"], p["rejected"]) for p in r.table.to_pylist()] == [("c", "d")]


def test_grouped_output_reads_back_to_the_same_pairs(shared_data, tmp_path):
    src = shared_data / "imagereward_test.json"
    prefops.prep(src, tmp_path / "g.parquet", kind="grouped")
    again = prefops.prep(tmp_path / "g.parquet", strategy="all_pairs").table.to_pylist()
    direct = prefops.prep(src, strategy="all_pairs").table.to_pylist()
    assert [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in again] == \
           [(r["prompt"], r["chosen"], r["rejected"], r["margin"]) for r in direct]


@pytest.mark.parametrize("record,name", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "trl"),
    ({"chosen": "a", "rejected": "b"}, "implicit"),
    ({"instruction": "p", "completions": []}, "ultrafeedback"),
    ({"prompt": "p", "answers": []}, "nectar"),
    ({"conversations": [], "chosen": {}, "rejected": {}}, "sharegpt"),
    ({"prompt": "p", "generations": [], "ranking": []}, "ranked_list"),
    ({"caption": "c", "label_0": 1}, "pickapic"),
    ({"messages": [], "label": True}, "kto"),
])
def test_detect_format(record, name):
    assert _native.detect_format(json.dumps(record)) == name
