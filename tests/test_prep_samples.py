"""prep on the real public samples in ../shared/data, checked against the source files."""

import gzip
import json
from itertools import combinations

import pyarrow.parquet as pq
import pytest

import prefops
from conftest import read_jsonl


def test_hh_rlhf_pairs_rebuild_the_original_dialogues(shared_data, tmp_path):
    src = shared_data / "hh_harmless_test.jsonl.gz"
    originals = [json.loads(line) for line in gzip.open(src, "rt")]
    out = tmp_path / "hh.jsonl"
    result = prefops.prep(src, out, skip_invalid=True)
    rows = read_jsonl(out)
    assert result.format == "implicit"
    # Rows whose chosen or rejected reply is empty after the prompt are the only ones skipped.
    empty = sum(1 for o in originals if o["chosen"].rstrip().endswith("Assistant:")
                or o["rejected"].rstrip().endswith("Assistant:"))
    assert result.stats["rows_read"] == len(originals) == 2312
    assert result.stats["skipped"] == {"empty_response": empty}
    assert empty > 0
    kept = [o for o in originals if not (o["chosen"].rstrip().endswith("Assistant:")
                                         or o["rejected"].rstrip().endswith("Assistant:"))]
    assert len(rows) == len(kept) == result.stats["pairs_made"]
    for row, orig in zip(rows, kept):
        assert row["prompt"] + row["chosen"] == orig["chosen"]
        assert row["prompt"] + row["rejected"] == orig["rejected"]
        assert row["prompt"].endswith("\n\nAssistant:")
        # The prompt ends at the last turn marker the two dialogues share.
        assert "\n\nAssistant:" not in row["chosen"] or row["chosen"] != row["rejected"]


def test_hh_strict_mode_names_file_line_and_field(shared_data, tmp_path):
    out = tmp_path / "hh.parquet"
    with pytest.raises(prefops.DataError) as err:
        prefops.prep(shared_data / "hh_harmless_test.jsonl.gz", out)
    message = str(err.value)
    assert "hh_harmless_test.jsonl.gz" in message
    assert "line 87" in message and "field 'chosen'" in message and "empty response" in message
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _imagereward_expected(lists, strategy, min_margin=0.0):
    """Independent count of the pairs a ranked list gives (rank 1 = best, ties share a rank)."""
    pairs = []
    for item in lists:
        ranks = item["ranking"]
        gens = item["generations"]
        order = sorted(range(len(ranks)), key=lambda i: ranks[i])
        if strategy == "best_vs_each":
            cands = [(order[0], j) for j in order[1:]]
        else:
            cands = [(i, j) if ranks[i] <= ranks[j] else (j, i) for i, j in combinations(range(len(ranks)), 2)]
        for c, r in cands:
            margin = ranks[r] - ranks[c]
            if margin > 0 and margin >= min_margin:
                pairs.append((item["prompt"], gens[c], gens[r], margin))
    return pairs


@pytest.mark.parametrize("strategy,min_margin", [("best_vs_each", 0.0), ("all_pairs", 0.0), ("all_pairs", 2.0)])
def test_imagereward_ranked_lists(shared_data, tmp_path, strategy, min_margin):
    src = shared_data / "imagereward_test.json"
    lists = json.loads(src.read_text())
    out = tmp_path / "ir.parquet"
    result = prefops.prep(src, out, strategy=strategy, min_margin=min_margin)
    table = pq.read_table(out)
    got = sorted(zip(*(table[c].to_pylist() for c in ("prompt", "chosen", "rejected", "margin"))))
    want = sorted(_imagereward_expected(lists, strategy, min_margin))
    assert result.format == "ranked_list"
    assert got == want
    assert all(rc < rr for rc, rr in zip(table["rank_chosen"].to_pylist(), table["rank_rejected"].to_pylist()))
    assert result.stats["prompts"] == len(lists) == 466


def test_llamafactory_sharegpt_is_conversational(shared_data, tmp_path):
    src = shared_data / "llamafactory_dpo_en_demo.json"
    originals = json.loads(src.read_text())
    out = tmp_path / "lf.parquet"
    result = prefops.prep(src, out)
    rows = pq.read_table(out).to_pylist()
    assert result.format == "sharegpt" and len(rows) == len(originals) == 300
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for row, orig in zip(rows, originals):
        assert row["prompt"] == [{"role": roles[m["from"]], "content": m["value"]} for m in orig["conversations"]]
        assert row["chosen"] == [{"role": "assistant", "content": orig["chosen"]["value"]}]
        assert row["rejected"] == [{"role": "assistant", "content": orig["rejected"]["value"]}]


def test_llamafactory_kto_unpaired_and_grouped_to_pairs(shared_data, tmp_path):
    src = shared_data / "llamafactory_kto_en_demo.json"
    originals = json.loads(src.read_text())
    result = prefops.prep(src)
    rows = result.table.to_pylist()
    assert result.kind == "unpaired" and len(rows) == len(originals)
    for row, orig in zip(rows, originals):
        assert row["label"] == orig["label"]
        assert row["completion"][0]["content"] == orig["messages"][-1]["content"]
        assert [m["content"] for m in row["prompt"]] == [m["content"] for m in orig["messages"][:-1]]
    # Pairs need two responses to the same prompt: count prompts with both labels independently.
    by_prompt = {}
    for o in originals:
        key = json.dumps(o["messages"][:-1])
        by_prompt.setdefault(key, set()).add(o["label"])
    both = sum(1 for labels in by_prompt.values() if labels == {True, False})
    pairs = prefops.prep(src, kind="pairs")
    assert pairs.stats["pairs_made"] == both
    assert pairs.stats["prompts"] == len(by_prompt)


def test_bundled_samples_are_subsets_of_the_shared_data(shared_data):
    hh = gzip.open(prefops.sample_path("hh"), "rt").read().splitlines()
    full = gzip.open(shared_data / "hh_harmless_test.jsonl.gz", "rt").read().splitlines()
    assert hh == full[: len(hh)]
    assert json.loads(prefops.sample_path("imagereward").read_text()) == json.loads(
        (shared_data / "imagereward_test.json").read_text())


def test_demo_command_runs_on_bundled_data(tmp_path, capsys):
    from prefops.cli import main

    assert main(["demo", "--out", str(tmp_path), "--prep-only"]) == 0
    out = capsys.readouterr().out
    assert "HH-RLHF" in out and "ImageReward" in out and "first HH pair" in out
    table = pq.read_table(tmp_path / "hh_pairs.parquet")
    assert table.num_rows == 399
    assert len(set(table["pair_id"].to_pylist())) == 399
