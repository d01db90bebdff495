"""The ``prefops`` command line.

    prefops prep INPUT -o OUTPUT [options]   rated data -> TRL pairs (JSONL or Parquet)
    prefops curriculum PAIRS -o OUTPUT       Curry-DPO easy->hard order / per-prompt stages
    prefops flip PAIRS -o OUTPUT             swap chosen/rejected: F-DPO labels, reward model, random rate
    prefops augment PAIRS -o OUTPUT          reward-augmented relabeling (each pair twice, score in the prompt)
    prefops tokenize PAIRS -o OUTPUT --tokenizer tokenizer.json
                                             token ids, completion masks, LD-DPO shared lengths, TAB-PO diff masks
    prefops lists INPUT -o OUTPUT [options]  rated data -> one ranked list per prompt (LiPO / RankDPO)
    prefops fifa PAIRS -o OUTPUT             FiFA filtering: top pairs by margin + quality + kNN prompt sparsity
    prefops demo [--out DIR] [--prep-only]   prep the bundled samples, then train a tiny LM (DPO) and a
                                             tiny UNet (Diffusion-DPO) on CPU and plot the curves
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from prefops import _native
from prefops.data import FORMATS, STRATEGIES, THREADS_ENV, prep, sample_path
from prefops.steps import TEMPLATES, StepResult, convert, curriculum, flip_labels, reward_augment, tokenize_pairs
from prefops.lists import LABELS, TRUNCATE, lists
from prefops.fifa import KNN_MODES, METRICS, fifa_filter

EXIT_DATA_ERROR = 1
EXIT_INTERRUPTED = 130


def _column_mapping(text: str) -> tuple[str, str]:
    canonical, sep, yours = text.partition("=")
    if not sep or not canonical or not yours:
        raise argparse.ArgumentTypeError(f"expected CANONICAL=YOURS (e.g. prompt=question), got {text!r}")
    return canonical, yours


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _reader_arguments(p: argparse.ArgumentParser, *, group_help: str, dry_run_help: str) -> None:
    """What prep and lists share: input and output, how to read the input, run options."""
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, help=".jsonl, .jsonl.gz or .parquet (required unless --dry-run)")
    p.add_argument("--format", choices=FORMATS, help="input schema (default: detected from the first record)")
    p.add_argument("--map", dest="column_map", action="append", type=_column_mapping, default=[],
                   metavar="CANONICAL=YOURS", help="rename an input column before detection (repeatable)")
    p.add_argument("--score-field", help="UltraFeedback completion field holding the score (default overall_score)")
    p.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep identical responses")
    p.add_argument("--group-by-prompt", action="store_true", help=group_help)
    p.add_argument("--no-extra-columns", dest="extra_columns", action="store_false",
                   help="write only prefops' own columns, not the input's other ones (source, models, ...)")
    p.add_argument("--skip-invalid", action="store_true", help="count and skip bad records instead of stopping")
    p.add_argument("--threads", type=_positive_int, help=f"worker threads (default ${THREADS_ENV} or all CPUs)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--stats", type=Path, help="write the JSON stats report here")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")


def _reader_options(args: argparse.Namespace) -> Optional[dict]:
    """The keyword arguments of prep/lists that ``_reader_arguments`` parsed; None (after an
    error message) when there is no output and no --dry-run."""
    if args.output is None and not args.dry_run:
        print(f"prefops {args.command}: error: -o/--output is required (or pass --dry-run)", file=sys.stderr)
        return None
    return dict(format=args.format, column_map=dict(args.column_map), score_field=args.score_field,
                dedupe=args.dedupe, skip_invalid=args.skip_invalid, group_by_prompt=args.group_by_prompt,
                extra_columns=args.extra_columns, threads=args.threads, progress=sys.stderr.isatty(), dry_run=args.dry_run)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefops", description="Preference-data preparation and losses.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prep",
        help="turn rated preference data into training pairs",
        description="Read rated preference data (JSONL, JSONL.gz, JSON array or Parquet; any of the "
        f"formats {', '.join(FORMATS)}), make pairs and write TRL-ready JSONL or Parquet. "
        "The output appears only if the whole run succeeds.",
    )
    _reader_arguments(p, group_help="merge rows sharing a prompt before pairing",
                      dry_run_help="read and pair, write nothing")
    p.add_argument("--strategy", choices=STRATEGIES, default="best_vs_worst")
    p.add_argument("--min-margin", type=_non_negative, default=0.0,
                   help="drop pairs with a smaller preference margin (score units; rank steps for ranked data)")
    p.add_argument("--ties", choices=["drop", "keep"], default="drop")
    p.add_argument("--max-pairs-per-prompt", type=_positive_int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["pairs", "unpaired", "grouped"],
                   help="output rows (default: pairs; unpaired for KTO input)")

    _add_step_parsers(sub)
    _add_lists_parser(sub)

    d = sub.add_parser("demo", help="prep the bundled samples, train a tiny LM and UNet, plot (no downloads)")
    d.add_argument("--out", type=Path, default=Path("prefops-demo"),
                   help="directory for the outputs: pairs, reference log-probs, curves.png (default: prefops-demo)")
    d.add_argument("--prep-only", action="store_true", help="only the data preparation part (no torch needed)")
    d.add_argument("--lm-steps", type=_positive_int, default=30, help="DPO steps on the tiny LM (default 30)")
    d.add_argument("--lm-pairs", type=_positive_int, default=64, help="HH pairs to train on (default 64)")
    d.add_argument("--unet-steps", type=_positive_int, default=15, help="Diffusion-DPO steps (default 15)")
    d.add_argument("--seed", type=int, default=0)
    return parser


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _step_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="a pairs table (what prefops prep writes): .jsonl, .jsonl.gz, .json, .parquet")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help=".jsonl, .jsonl.gz or .parquet; appears only if the whole run succeeds")
    p.add_argument("--threads", type=_positive_int, help=f"worker threads (default ${THREADS_ENV} or all CPUs)")
    p.add_argument("--stats", type=Path, help="write the JSON stats report here")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")


def _add_step_parsers(sub) -> None:
    c = sub.add_parser(
        "curriculum",
        help="order pairs easy->hard (Curry-DPO), globally or as per-prompt stages",
        description="Curry-DPO curriculum over a pairs table. Difficulty is a numeric column (default margin, "
        "the score gap: large = easy). Stages schedule (default): a 0-based 'stage' column, stage i = the i-th "
        "easiest pair of every prompt; rows ordered by stage, then easy->hard. Global schedule: all pairs "
        "easy->hard. Ties are broken by pair_id.",
    )
    _step_common(c)
    c.add_argument("--by", default="margin", metavar="COLUMN",
                   help="numeric difficulty column (default: margin), e.g. a reward-model margin column")
    order = c.add_mutually_exclusive_group()
    order.add_argument("--descending-is-easy", dest="descending_is_easy", action="store_true", default=True,
                       help="larger values are easier: the column sorted descending runs easy->hard "
                            "(default; right for margins and reward gaps)")
    order.add_argument("--ascending-is-easy", dest="descending_is_easy", action="store_false",
                       help="smaller values are easier (a loss, a difficulty score)")
    c.add_argument("--schedule", choices=["stages", "global"], default="stages")
    c.add_argument("--split-stages", action="store_true",
                   help="write one file per stage, OUTPUT with .stageN before the extension "
                        "(pairs.stage0.parquet, ...): all of them or none")

    f = sub.add_parser(
        "flip",
        help="swap chosen/rejected: F-DPO factuality rule, reward-model disagreement, seeded random rate",
        description="Swap chosen and rejected in selected pairs (every *chosen*/*rejected* column pair, margin "
        "negated, pair_id kept) and record it in a boolean 'flipped' column. Rules run in the order factual, "
        "reward, random.",
    )
    _step_common(f)
    f.add_argument("--factual", action="store_true",
                   help="F-DPO: swap pairs whose chosen is hallucinated and rejected is not; label columns "
                        "chosen_hallucinated/rejected_hallucinated (1 = hallucinated) or chosen_factual/"
                        "rejected_factual (1 = factual), found automatically")
    labels = f.add_mutually_exclusive_group()
    labels.add_argument("--hallucinated-columns", nargs=2, metavar=("CHOSEN_COL", "REJECTED_COL"),
                        help="factuality label columns where 1/true = hallucinated (implies --factual)")
    labels.add_argument("--factual-columns", nargs=2, metavar=("CHOSEN_COL", "REJECTED_COL"),
                        help="factuality label columns where 1/true = factual (implies --factual)")
    f.add_argument("--reward-chosen", metavar="COLUMN", help="reward-model score of the chosen response")
    f.add_argument("--reward-rejected", metavar="COLUMN", help="reward-model score of the rejected response")
    f.add_argument("--reward-min-gap", type=_non_negative, default=0.0,
                   help="swap only when reward_rejected - reward_chosen exceeds this (default 0)")
    f.add_argument("--rate", type=_rate, help="swap each pair with this probability, decided from (seed, pair_id)")
    f.add_argument("--seed", type=int, default=0)

    a = sub.add_parser(
        "augment",
        help="reward-augmented relabeling: each pair twice, prompt conditioned on the chosen's / rejected's score",
        description="Each pair becomes two rows: the prompt conditioned on the chosen response's score (order "
        "kept) and on the rejected response's score (chosen and rejected swapped). New columns source_pair_id, "
        "conditioned_on, target_score; pair_id gets a :c / :r suffix.",
    )
    _step_common(a)
    tmpl = a.add_mutually_exclusive_group()
    tmpl.add_argument("--template", default="default",
                      help="a template with {prompt} and {score}, or a name: "
                           + ", ".join(f"{k} ({v!r})" if k == "default" else k for k, v in TEMPLATES.items()))
    tmpl.add_argument("--template-file", type=Path, help="read the template from this file (UTF-8, used as is)")
    a.add_argument("--score-columns", nargs=2, metavar=("CHOSEN_COL", "REJECTED_COL"),
                   default=["score_chosen", "score_rejected"],
                   help="where the two scores come from (default score_chosen score_rejected)")

    t = sub.add_parser(
        "tokenize",
        help="token ids, completion masks, LD-DPO shared lengths and TAB-PO differing-token masks",
        description="Tokenize text prompt/chosen/rejected columns with a local tokenizer.json (nothing is "
        "downloaded). Adds prompt_ids, chosen_ids, rejected_ids (int32 lists, what TRL's "
        "DataCollatorForPreference takes), chosen/rejected_completion_mask (int8, aligned with prompt_ids + "
        "completion ids), shared_length (LD-DPO: min of the two completion lengths) and "
        "chosen/rejected_diff_mask (TAB-PO: 1 where the aligned completion tokens differ). By default prompt and "
        "prompt + completion + EOS text are encoded (with the tokenizer's special tokens, e.g. BOS) and split at "
        "their common prefix, as TRL 1.16's DPOTrainer does; --split separate encodes them apart.",
    )
    _step_common(t)
    t.add_argument("--tokenizer", type=Path, required=True, help="a local tokenizer.json (Hugging Face tokenizers)")
    eos = t.add_mutually_exclusive_group()
    eos.add_argument("--eos-token", default="auto",
                     help="token appended to each completion; default auto: eos_token of the tokenizer_config.json "
                          "beside the tokenizer, none without one")
    eos.add_argument("--no-eos", action="store_true", help="append no EOS token")
    t.add_argument("--split", choices=["joint", "separate"], default="joint",
                   help="joint (default): encode prompt and prompt + completion + EOS text and split at their common "
                        "prefix, TRL 1.16's rule (a prompt whose end merges with the completion, or ends with a "
                        "special token such as [SEP], loses that end; the summary counts such rows); separate: "
                        "encode prompt and completion apart, EOS id appended (no merge, but ids can differ from TRL's)")
    t.add_argument("--no-special-tokens", action="store_true",
                   help="encode without the tokenizer's special tokens (no BOS)")
    t.add_argument("--max-prompt-length", type=_positive_int, help="keep the last N prompt tokens")
    t.add_argument("--max-completion-length", type=_positive_int, help="keep the first N tokens of each completion")

    v = sub.add_parser(
        "convert",
        help="rewrite a table as .jsonl, .jsonl.gz or .parquet, every column kept",
        description="Convert between JSONL, JSONL.gz, JSON arrays and Parquet, every column kept. Tables that "
        "prefops writes round-trip byte for byte (JSONL -> Parquet -> JSONL).",
    )
    _step_common(v)

    _add_fifa_parser(sub)


def _finite(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _add_fifa_parser(sub) -> None:
    f = sub.add_parser(
        "fifa",
        help="FiFA filtering: keep the top pairs by margin + gamma*quality + alpha*log(kNN distance of the prompt)",
        description="FiFA data filtering. importance = margin + gamma*quality + alpha*ln max(rho_k, floor), rho_k = "
        "distance from the pair's prompt embedding to its k-th nearest other prompt embedding. Keeps the "
        "--keep-count / --keep-fraction most important pairs (ties by pair_id), in input order, with "
        "'importance' and 'knn_distance' columns added.",
    )
    _step_common(f)
    f.add_argument("--embeddings", type=Path, metavar="FILE",
                   help="prompt embeddings: Parquet/JSONL with prompt_id and the embedding column, one row per "
                        "prompt (default: the embedding column of the pairs table itself)")
    f.add_argument("--embedding-column", default="embedding", metavar="COL",
                   help="list/fixed-size-list column holding the embedding (default: embedding)")
    f.add_argument("--alpha", type=_finite, default=1.0, help="weight of ln(rho_k) (default 1)")
    f.add_argument("--gamma", type=_finite, default=1.0, help="weight of the quality column (default 1)")
    f.add_argument("--k", type=_positive_int, default=5, help="rho_k is the distance to the k-th neighbour (default 5)")
    f.add_argument("--metric", choices=METRICS, default="cosine")
    f.add_argument("--knn", choices=KNN_MODES, default="exact",
                   help="exact: every pair of prompts; ivf: seeded k-means index for millions of prompts")
    f.add_argument("--nlist", type=_positive_int, help="IVF clusters (default round(4*sqrt(prompts)))")
    f.add_argument("--nprobe", type=_positive_int, help="IVF clusters searched per prompt (default min(nlist, 16))")
    f.add_argument("--seed", type=int, default=0, help="seeds the IVF k-means")
    budget = f.add_mutually_exclusive_group(required=True)
    budget.add_argument("--keep-count", type=int, metavar="N", help="keep this many pairs")
    budget.add_argument("--keep-fraction", type=_rate, metavar="F", help="keep round(F * rows) pairs")
    f.add_argument("--margin-column", default="margin", metavar="COL", help="margin term (default: margin)")
    f.add_argument("--quality-column", metavar="COL", help="quality term (default: none, i.e. 0)")
    f.add_argument("--distance-floor", type=float, default=1e-6,
                   help="rho_k below this counts as this in the log (duplicate prompts; default 1e-6)")


def _run_fifa(args: argparse.Namespace) -> int:
    result = fifa_filter(
        args.input, args.embeddings, output=args.output, alpha=args.alpha, gamma=args.gamma, k=args.k,
        metric=args.metric, knn=args.knn, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed,
        keep_count=args.keep_count, keep_fraction=args.keep_fraction, margin_column=args.margin_column,
        quality_column=args.quality_column, embedding_column=args.embedding_column,
        distance_floor=args.distance_floor, threads=args.threads,
    )
    return _finish_step(args, result)


def _report(args: argparse.Namespace, result, run_info: dict) -> int:
    """The end of every data command: ``--stats`` JSON (run info, then the result's stats) and
    the human summary on stderr unless ``-q``."""
    if args.stats:
        _write_json_atomic(args.stats, {"input": str(args.input), **run_info, "threads": result.threads,
                                        "seconds": result.seconds, **result.stats})
    if not args.quiet:
        print(f"prefops {args.command}: {args.input}", file=sys.stderr)
        print(result.summary(), file=sys.stderr)
    return 0


def _finish_step(args: argparse.Namespace, result: StepResult) -> int:
    return _report(args, result, {"outputs": [str(p) for p in result.outputs], "step": result.step})


def _run_curriculum(args: argparse.Namespace) -> int:
    result = curriculum(args.input, args.output, by=args.by, descending_is_easy=args.descending_is_easy,
                        schedule=args.schedule, split_stages=args.split_stages, threads=args.threads)
    return _finish_step(args, result)


def _run_flip(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if (args.reward_chosen is None) != (args.reward_rejected is None):
        parser.error("flip: give both --reward-chosen and --reward-rejected")
    factual = args.factual or args.hallucinated_columns is not None or args.factual_columns is not None
    if not factual and args.reward_chosen is None and args.rate is None:
        parser.error("flip: choose at least one rule: --factual, --reward-chosen/--reward-rejected, or --rate")
    result = flip_labels(
        args.input, args.output,
        factual=factual,
        hallucinated_columns=args.hallucinated_columns,
        factual_columns=args.factual_columns,
        reward_columns=None if args.reward_chosen is None else (args.reward_chosen, args.reward_rejected),
        reward_min_gap=args.reward_min_gap,
        rate=args.rate,
        seed=args.seed,
        threads=args.threads,
    )
    return _finish_step(args, result)


def _run_augment(args: argparse.Namespace) -> int:
    template = args.template_file.read_text(encoding="utf-8") if args.template_file else args.template
    result = reward_augment(args.input, args.output, template=template, score_columns=args.score_columns,
                            threads=args.threads)
    return _finish_step(args, result)


def _run_tokenize(args: argparse.Namespace) -> int:
    result = tokenize_pairs(args.input, args.tokenizer, output=args.output, add_special_tokens=not args.no_special_tokens,
                            eos_token=None if args.no_eos else args.eos_token, split=args.split,
                            max_prompt_length=args.max_prompt_length,
                            max_completion_length=args.max_completion_length, threads=args.threads)
    return _finish_step(args, result)


def _run_prep(args: argparse.Namespace) -> int:
    reader = _reader_options(args)
    if reader is None:
        return 2
    result = prep(args.input, args.output, strategy=args.strategy, min_margin=args.min_margin, ties=args.ties,
                  max_pairs_per_prompt=args.max_pairs_per_prompt, seed=args.seed, kind=args.kind, **reader)
    return _report(args, result, {"output": None if args.dry_run else str(args.output), "format": result.format,
                                  "kind": result.kind, "strategy": args.strategy, "seed": args.seed})


def _add_lists_parser(sub) -> None:
    p = sub.add_parser(
        "lists",
        help="turn rated data into one ranked list of responses per prompt (LiPO / RankDPO)",
        description="Read rated preference data (the same inputs as prep) and write one row per prompt: its "
        "responses best first with labels (larger = better, ties equal), gains 2^label - 1, scores/ranks and "
        "list_size. The output appears only if the whole run succeeds.",
    )
    _reader_arguments(p, group_help="merge rows sharing a prompt into one list",
                      dry_run_help="read and build lists, write nothing")
    p.add_argument("--list-size", type=_positive_int, metavar="K",
                   help="at most K responses per list (default: keep all); must be >= 2")
    p.add_argument("--label", choices=LABELS, default="dense_rank",
                   help="dense_rank: worst distinct preference 0, next 1, ... (default); score: the raw score")
    p.add_argument("--truncate", choices=TRUNCATE, default="top",
                   help="over K responses: keep the best K (ties at the cut drawn with the seed) or K at random")
    p.add_argument("--min-size", type=_positive_int, default=2,
                   help="prompts with fewer responses (after dedupe) make no list (default 2)")
    p.add_argument("--seed", type=int, default=0)


def _run_lists(args: argparse.Namespace) -> int:
    reader = _reader_options(args)
    if reader is None:
        return 2
    if args.list_size is not None and args.list_size < 2:
        print("prefops lists: error: --list-size must be at least 2", file=sys.stderr)
        return 2
    result = lists(args.input, args.output, list_size=args.list_size, label=args.label, truncate=args.truncate,
                   min_size=args.min_size, seed=args.seed, **reader)
    return _report(args, result, {"output": None if args.dry_run else str(args.output), "format": result.format,
                                  "kind": result.kind, "list_size": args.list_size, "label": args.label,
                                  "truncate": args.truncate, "min_size": args.min_size, "seed": args.seed})


DEMO_RUNS = [
    ("hh", "HH-RLHF harmless (implicit prompt), bad rows skipped and counted",
     dict(strategy="best_vs_worst", skip_invalid=True), "hh_pairs.parquet"),
    ("llamafactory_dpo", "LLaMA-Factory DPO demo (ShareGPT)", dict(strategy="best_vs_worst"), "sharegpt_pairs.jsonl"),
    ("imagereward", "ImageReward ranked lists, Curry-DPO best-vs-each", dict(strategy="best_vs_each"),
     "imagereward_pairs.parquet"),
    ("imagereward", "ImageReward ranked lists, all pairs, margin >= 2 ranks", dict(strategy="all_pairs", min_margin=2),
     "imagereward_all_pairs.parquet"),
    ("llamafactory_kto", "LLaMA-Factory KTO demo (unpaired)", dict(), "kto_unpaired.jsonl"),
]


def _run_demo(args: argparse.Namespace) -> int:
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    print("prefops demo: preparing the bundled sample data (no downloads)\n")
    for sample, title, options, out_name in DEMO_RUNS:
        result = prep(sample_path(sample), out_dir / out_name, **options)
        print(f"== {title}: {sample_path(sample).name}")
        print(result.summary())
        print()
    import pyarrow.parquet as pq

    table = pq.read_table(out_dir / "hh_pairs.parquet")
    row = table.slice(0, 1).to_pylist()[0]
    print("first HH pair (TRL format):")
    for key in ("prompt_id", "pair_id", "prompt", "chosen", "rejected", "margin"):
        text = str(row[key]).replace("\n", "\\n")
        print(f"  {key:<10} {text[:100]}{'...' if len(text) > 100 else ''}")
    if args.prep_only:
        print(f"\noutputs in {out_dir}")
        return 0
    try:
        from prefops import demo
        import torch  # noqa: F401
    except ImportError as e:
        raise ValueError(f"the training part of the demo needs the training extras ({e.name} is missing): "
                         "pip install 'prefops[train]', or run with --prep-only") from None
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    started = time.perf_counter()
    print(f"\n== DPO on a tiny causal LM (fused loss, CPU), {args.lm_pairs} HH pairs")
    rows = table.slice(0, args.lm_pairs).to_pylist()
    lm = demo.train_lm_dpo(rows, steps=args.lm_steps, seed=args.seed, work_dir=out_dir)
    print("\n== Diffusion-DPO on a tiny UNet2DConditionModel (random latents)")
    unet = demo.train_diffusion_dpo(steps=args.unet_steps, seed=args.seed)
    plot = demo.plot_history(lm, unet, out_dir / "curves.png")
    print(f"\nLM: loss {lm['loss'][0]:.3f} -> {lm['loss'][-1]:.3f}, reward accuracy "
          f"{lm['accuracy'][0]:.2f} -> {lm['accuracy'][-1]:.2f}; "
          f"UNet: loss {unet['loss'][0]:.3f} -> {unet['loss'][-1]:.3f}")
    print(f"training took {time.perf_counter() - started:.0f} s; curves in {plot}; outputs in {out_dir}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prep":
            return _run_prep(args)
        if args.command == "curriculum":
            return _run_curriculum(args)
        if args.command == "flip":
            return _run_flip(args, parser)
        if args.command == "augment":
            return _run_augment(args)
        if args.command == "tokenize":
            return _run_tokenize(args)
        if args.command == "convert":
            return _finish_step(args, convert(args.input, args.output, threads=args.threads))
        if args.command == "lists":
            return _run_lists(args)
        if args.command == "fifa":
            return _run_fifa(args)
        return _run_demo(args)
    except KeyboardInterrupt:
        print("prefops: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (_native.DataError, ValueError, OSError) as e:
        print(f"prefops: error: {e}", file=sys.stderr)
        return EXIT_DATA_ERROR


if __name__ == "__main__":
    sys.exit(main())
