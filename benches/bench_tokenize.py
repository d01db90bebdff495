#!/usr/bin/env python3
"""Token-level preparation benchmark: ``prefops.tokenize_pairs`` (Rust, tokenizers crate) vs the
Python ``tokenizers`` package's batch encoders (Rust inside, Rayon-parallel) followed by the same
assembly in Python (prefops' default joint split: prompt and prompt + completion + EOS text
encoded, split at the common prefix; completion masks, LD-DPO shared length, TAB-PO
differing-token masks, an Arrow table out), and TRL 1.16's own DPO tokenization
(``datasets.map``, on fewer rows).

Input: generated pairs from the bundled HH-RLHF sample's texts (prompts, chosen and rejected
drawn independently, so lengths are realistic); tokenizer: a byte-level BPE (GPT-2-like, 8k
vocabulary) trained on the same texts, EOS ``<|endoftext|>``. Both contenders get a
pyarrow.Table and return one; outputs are checked equal to prefops'.

    python benches/bench_tokenize.py --rows 5000     # smoke test
    python benches/bench_tokenize.py                 # 100,000 pairs

Writes benches/results/tokenize_cpu.csv (pairs/s medians and ratios).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import cpu_model, timed, write_csv

HERE = Path(__file__).resolve().parent
CSV_COLUMNS = ["contender", "pairs", "median_s", "pairs_per_s", "speedup_of_prefops", "verified", "threads",
               "repeats", "tokens", "cpu_model", "notes"]
EOS = "<|endoftext|>"


def generate(n: int, seed: int):
    import numpy as np
    import pyarrow as pa

    import prefops

    hh = prefops.prep(prefops.sample_path("hh"), skip_invalid=True).table
    prompts, chosen, rejected = (hh.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))
    rng = np.random.default_rng(seed)
    pick = lambda texts: [texts[i] for i in rng.integers(0, len(texts), size=n)]
    return pa.table({"pair_id": [f"p{i}" for i in range(n)], "prompt": pick(prompts), "chosen": pick(chosen),
                     "rejected": pick(rejected)}), prompts + chosen + rejected


def train_tokenizer(texts, path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=[EOS], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def python_tokenizers(table, path: Path):
    """The Python tokenizers package's batch encoders, then the assembly in Python: the joint
    split (prefops' default), so both contenders encode the same texts."""
    import pyarrow as pa
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.no_truncation()
    prompt_texts = table.column("prompt").to_pylist()
    full_prompts = [e.ids for e in tok.encode_batch_fast(prompt_texts, add_special_tokens=True)]
    joint = []
    for side in ("chosen", "rejected"):
        texts = [p + (t if t.endswith(EOS) else t + EOS) for p, t in zip(prompt_texts, table.column(side).to_pylist())]
        joint.append([e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=True)])
    prompts, chosen, rejected = [], [], []
    for p, jc, jr in zip(full_prompts, *joint):
        n = min(common_prefix(p, jc), common_prefix(p, jr))
        prompts.append(p[:n])
        chosen.append(jc[n:])
        rejected.append(jr[n:])
    cm, rm, cd, rd, shared = [], [], [], [], []
    for p, c, r in zip(prompts, chosen, rejected):
        zeros = [0] * len(p)
        cm.append(zeros + [1] * len(c))
        rm.append(zeros + [1] * len(r))
        cd.append(zeros + [int(k >= len(r) or c[k] != r[k]) for k in range(len(c))])
        rd.append(zeros + [int(k >= len(c) or r[k] != c[k]) for k in range(len(r))])
        shared.append(min(len(c), len(r)))
    ids, mask = pa.list_(pa.int32()), pa.list_(pa.int8())
    new = {"prompt_ids": pa.array(prompts, ids), "chosen_ids": pa.array(chosen, ids),
           "rejected_ids": pa.array(rejected, ids), "chosen_completion_mask": pa.array(cm, mask),
           "rejected_completion_mask": pa.array(rm, mask), "shared_length": pa.array(shared, pa.int32()),
           "chosen_diff_mask": pa.array(cd, mask), "rejected_diff_mask": pa.array(rd, mask)}
    for name, col in new.items():
        table = table.append_column(name, col)
    return table


def trl_path(table, path: Path):
    """TRL 1.16's DPO tokenization (``DPOTrainer._prepare_dataset``: EOS text appended, prompt and
    prompt+completion tokenized, split at the common prefix), ids only."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl.trainer.dpo_trainer import DPOTrainer

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS)
    ds = Dataset.from_dict({c: table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")})
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    stub = SimpleNamespace(_tokenizer=tok, _is_vision_dataset=False)
    return DPOTrainer._prepare_dataset(stub, ds, tok, args, "train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--trl-rows", type=int, default=2_000, help="TRL's path is slow: timed on this many pairs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "tokenize_cpu.csv")
    args = ap.parse_args()

    import datasets

    datasets.disable_progress_bars()
    import prefops

    table, texts = generate(args.rows, args.seed)
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        path = train_tokenizer(texts, Path(d) / "tokenizer.json")
        results = []
        ref_s, ref = timed(lambda: prefops.tokenize_pairs(table, path, eos_token=EOS).table, args.repeats)
        tokens = sum(len(x) for c in ("prompt_ids", "chosen_ids", "rejected_ids") for x in ref.column(c).to_pylist())
        results.append(("prefops", args.rows, ref_s, True, threads, ""))
        one_s, one = timed(lambda: prefops.tokenize_pairs(table, path, eos_token=EOS, threads=1).table, args.repeats)
        results.append(("prefops (1 thread)", args.rows, one_s, one.equals(ref), 1, ""))
        py_s, py = timed(lambda: python_tokenizers(table, path), args.repeats)
        results.append(("tokenizers (Python) + assembly", args.rows, py_s, py.equals(ref), threads,
                        "encode_batch_fast (Rayon) of prompt and prompt+completion+EOS, split at the common "
                        "prefix, then masks/diff/shared in Python"))
        small = table.slice(0, min(args.trl_rows, args.rows))
        trl_s, trl = timed(lambda: trl_path(small, path), 1)
        ours = ref.slice(0, small.num_rows)
        same = all(a["prompt_ids"] == b and a["chosen_ids"] == c and a["rejected_ids"] == r for a, b, c, r in
                   zip(trl, *(ours.column(x).to_pylist() for x in ("prompt_ids", "chosen_ids", "rejected_ids"))))
        results.append(("TRL 1.16 _prepare_dataset", small.num_rows, trl_s, same, 1,
                        "ids only, no masks/weights; datasets.map, 1 process; timed once"))

    prefops_rate = args.rows / ref_s
    rows = []
    for name, n, s, ok, th, notes in results:
        rate = n / s
        rows.append({"contender": name, "pairs": n, "median_s": f"{s:.4f}", "pairs_per_s": f"{rate:.0f}",
                     "speedup_of_prefops": f"{prefops_rate / rate:.2f}", "verified": ok, "threads": th,
                     "repeats": 1 if name.startswith("TRL") else args.repeats, "tokens": tokens,
                     "cpu_model": cpu_model(), "notes": notes})
        print(f"{name:<34} {n:>8,} pairs  {s:8.3f} s  {rate:>10,.0f} pairs/s  prefops x{prefops_rate / rate:5.2f}"
              f"  verified={ok}")
    write_csv(args.out, CSV_COLUMNS, rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
