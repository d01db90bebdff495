"""Preference-data preparation: the Python face of the Rust core.

>>> import prefops
>>> result = prefops.prep(prefops.sample_path("hh"), strategy="best_vs_worst")
>>> result.table.column_names[:5]
['prompt_id', 'pair_id', 'prompt', 'chosen', 'rejected']
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from prefops import _native

FORMATS: tuple[str, ...] = tuple(_native.FORMATS)
STRATEGIES: tuple[str, ...] = tuple(_native.STRATEGIES)
THREADS_ENV: str = _native.THREADS_ENV

_SAMPLES = {
    "hh": "hh_harmless_sample.jsonl.gz",
    "imagereward": "imagereward_sample.json",
    "llamafactory_dpo": "llamafactory_dpo_sample.json",
    "llamafactory_kto": "llamafactory_kto_sample.json",
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample: ``hh`` (HH-RLHF harmless, 400 pairs), ``imagereward``
    (466 ranked image lists), ``llamafactory_dpo`` (120 ShareGPT pairs), ``llamafactory_kto``
    (120 unpaired rows)."""
    try:
        file = _SAMPLES[name]
    except KeyError:
        raise ValueError(f"unknown sample {name!r}; choose from {sorted(_SAMPLES)}") from None
    return Path(__file__).with_name("samples") / file


def _dropped_and_skipped_lines(stats: dict) -> list:
    """Summary lines for what a run dropped and skipped (counts by reason, a few examples)."""
    lines = []
    if stats["dropped"]:
        lines.append("  dropped          " + ", ".join(f"{k} {v:,}" for k, v in stats["dropped"].items()))
    if stats["skipped"]:
        lines.append("  skipped          " + ", ".join(f"{k} {v:,}" for k, v in stats["skipped"].items()))
        for example in stats["skipped_examples"][:3]:
            lines.append(f"    e.g. {example}")
    return lines


@dataclass(frozen=True)
class PrepResult:
    """What a prep run made. ``table`` is set when no output path was given."""

    format: str
    kind: str
    stats: dict
    seconds: float
    threads: int
    output: Optional[Path] = None
    table: Any = field(default=None, repr=False)

    def summary(self) -> str:
        """A few lines for people: counts, drop reasons and the margin distribution."""
        s = self.stats
        lines = [
            f"format {self.format} -> {self.kind}"
            + (f" -> {self.output}" if self.output else "")
            + f"  ({self.seconds:.2f} s, {self.threads} threads)",
            f"  rows read        {s['rows_read']:>10,}   skipped invalid {s['rows_skipped']:,}",
            f"  prompts          {s['prompts']:>10,}   with pairs {s['prompts_with_pairs']:,}",
            f"  rows written     {s['rows_written']:>10,}   pairs made {s['pairs_made']:,}"
            + (f", ties kept {s['ties_kept']:,}" if s["ties_kept"] else ""),
        ]
        if s.get("pairs_reordered_by_score"):
            lines.append(f"  warning          {s['pairs_reordered_by_score']:,} given pairs score the rejected response "
                         "higher: written with the higher-scored one as chosen (labels and scores disagree)")
        lines += _dropped_and_skipped_lines(s)
        h = s["margin_histogram"]
        if h["mean"] is not None:
            lines.append(f"  margin           min {h['min']:.4g}  mean {h['mean']:.4g}  max {h['max']:.4g}")
            edges = h["edges"] + [float("inf")]
            total = max(sum(h["counts"]), 1)
            for lo, hi, n in zip(edges, edges[1:], h["counts"]):
                if n:
                    bar = "#" * max(1, round(30 * n / total))
                    lines.append(f"    [{lo:>6g}, {hi:>6g})  {n:>9,}  {bar}")
        return "\n".join(lines)


def _arrow_source(source: Any) -> Any:
    """Accept paths and anything that speaks the Arrow PyCapsule interface, plus a few
    common containers that do not (HF datasets, pandas, lists of dicts)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return path
    import pyarrow as pa

    if isinstance(source, (pa.Table, pa.RecordBatch, pa.RecordBatchReader)):
        return source
    if hasattr(source, "__arrow_c_stream__"):
        # Other producers (polars, duckdb, ...) go through pyarrow's stream reader: no copy,
        # still streaming, and pyarrow re-exports layouts that arrow-rs is strict about
        # (e.g. polars' Null columns carry a buffer).
        return pa.RecordBatchReader.from_stream(source)
    if hasattr(source, "__arrow_c_array__"):
        return pa.record_batch(source)
    data = getattr(source, "data", None)  # datasets.Dataset -> its pyarrow table
    if data is not None and hasattr(getattr(data, "table", None), "__arrow_c_stream__"):
        return data.table

    if isinstance(source, list):
        return pa.Table.from_pylist(source)
    if type(source).__module__.startswith("pandas"):
        return pa.Table.from_pandas(source, preserve_index=False)
    raise TypeError(
        f"cannot read {type(source).__name__}: pass a path, a pyarrow/polars table, a record batch "
        "reader, a datasets.Dataset, a pandas DataFrame or a list of dicts"
    )


def prep(
    source: Union[str, os.PathLike, Any],
    output: Union[str, os.PathLike, None] = None,
    *,
    format: Optional[str] = None,
    column_map: Optional[Mapping[str, str]] = None,
    score_field: Optional[str] = None,
    strategy: str = "best_vs_worst",
    min_margin: float = 0.0,
    ties: str = "drop",
    dedupe: bool = True,
    max_pairs_per_prompt: Optional[int] = None,
    seed: int = 0,
    kind: Optional[str] = None,
    skip_invalid: bool = False,
    group_by_prompt: bool = False,
    extra_columns: bool = True,
    threads: Optional[int] = None,
    progress: bool = False,
    dry_run: bool = False,
) -> PrepResult:
    """Turn rated preference data into training pairs.

    Args:
        source: a .jsonl / .jsonl.gz / .json / .parquet path, or an Arrow table or stream
            (pyarrow, polars, datasets.Dataset, anything with ``__arrow_c_stream__``).
        output: a .jsonl, .jsonl.gz or .parquet path (written atomically), or None to get a
            ``pyarrow.Table`` back in ``result.table``.
        format: input schema (one of ``prefops.FORMATS``); detected from the first record when None.
        column_map: ``{canonical_name: your_column}``, applied before detection.
        score_field: UltraFeedback completion field holding the score (default overall_score).
        strategy: one of ``prefops.STRATEGIES``.
        min_margin: drop pairs whose preference margin is below this (score units, or rank
            steps for ranked data).
        ties: ``"drop"`` or ``"keep"`` (kept ties get ``tie = True``).
        dedupe: drop responses identical to a better one of the same prompt.
        max_pairs_per_prompt: keep at most this many pairs per prompt (seeded random subset).
        seed: randomness is seeded per prompt from (seed, prompt_id): results do not depend
            on batching or thread count.
        kind: ``"pairs"``, ``"unpaired"`` (KTO) or ``"grouped"``; default pairs, or unpaired
            for unpaired input.
        skip_invalid: count and skip bad records instead of raising on the first.
        group_by_prompt: merge rows sharing a prompt id before pairing (holds the data in memory).
        extra_columns: carry the record's other columns (``source``, ``models``, ...) and, in
            unpaired and grouped output, the responses' other fields, to the output. False writes
            only prefops' own columns: smaller files, and faster (Parquet best_vs_each on
            UltraFeedback: about a quarter less time).
        threads: worker threads; default ``$PREFOPS_NUM_THREADS`` or the CPU count.
        progress: progress bar on stderr (only drawn when stderr is a terminal).
        dry_run: do everything but write.

    Raises:
        prefops.DataError: a bad record (message names the source, line/row and field).
        FileNotFoundError / OSError: unreadable input or unwritable output.
        ValueError: bad options.
    """
    return _run_prep(
        source,
        output,
        PrepResult,
        format=format,
        column_map=column_map,
        score_field=score_field,
        strategy=strategy,
        min_margin=float(min_margin),
        ties=ties,
        dedupe=dedupe,
        max_pairs_per_prompt=max_pairs_per_prompt,
        seed=seed,
        kind=kind,
        skip_invalid=skip_invalid,
        group_by_prompt=group_by_prompt,
        extra_columns=extra_columns,
        threads=threads,
        progress=progress,
        dry_run=dry_run,
    )


def _run_prep(source, output, result_type, *, column_map=None, seed=0, threads=None, dry_run=False, **options):
    """One native prep run (pairs, unpaired, grouped or lists): argument checks and conversion
    shared by ``prep`` and ``prefops.lists``; ``result_type`` is built from the report."""
    src = _arrow_source(source)
    out = Path(output) if output is not None else None
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    table, report_json = _native.prep(
        src,
        None if dry_run else out,
        column_map=list((column_map or {}).items()),
        seed=int(seed),
        threads=threads or 0,
        dry_run=dry_run,
        **options,
    )
    report = json.loads(report_json)
    return result_type(
        format=report["format"],
        kind=report["kind"],
        stats=report["stats"],
        seconds=report["seconds"],
        threads=report["threads"],
        output=None if dry_run else out,
        table=table,
    )


def __getattr__(name: str) -> Any:
    # The batch-engine API (process, the step specs, the global parts) lives in prefops.batched,
    # which imports the steps, which import this module: served from here on first access.
    from prefops import batched

    if name in batched.__all__:
        return getattr(batched, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
