"""Listwise preparation (LiPO-λ, RankDPO): rated data → one ranked list of responses per prompt,
with graded labels ψ (larger is better, ties equal) and gains G = 2^ψ − 1, ready for
``prefops.losses.listwise_loss`` and ``rank_dpo_loss``.

Lists come from the same readers as ``prefops.prep`` (every input format, the same prompt ids,
the same error reporting); only the output differs: one row per prompt instead of pairs.

>>> import prefops
>>> result = prefops.lists(prefops.sample_path("imagereward"), list_size=4)
>>> result.table.column("labels")[0].as_py()
[3.0, 2.0, 1.0, 0.0]
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from prefops.data import PrepResult, _arrow_source, _dropped_and_skipped_lines, _run_prep

__all__ = ["LABELS", "TRUNCATE", "ListResult", "ListTensors", "lists", "list_tensors"]

#: Label definitions: "dense_rank" (worst distinct preference 0, next 1, ...) or the raw "score".
LABELS = ("dense_rank", "score")
#: What to keep from a prompt with more than ``list_size`` responses.
TRUNCATE = ("top", "random")


@dataclass(frozen=True)
class ListResult(PrepResult):
    """What a lists run made: ``stats["lists"]`` holds the list counters."""

    def summary(self) -> str:
        s = self.stats
        ls = s.get("lists") or {}
        lines = [
            f"format {self.format} -> lists" + (f" -> {self.output}" if self.output else "")
            + f"  ({self.seconds:.2f} s, {self.threads} threads)",
            f"  rows read        {s['rows_read']:>10,}   skipped invalid {s['rows_skipped']:,}",
            f"  prompts          {s['prompts']:>10,}   lists made {ls.get('lists_made', 0):,}"
            f" (truncated {ls.get('lists_truncated', 0):,}, with ties {ls.get('lists_with_ties', 0):,})",
            f"  responses        {s['responses']:>10,}   listed {ls.get('responses_listed', 0):,}"
            f", tied pairs kept {s['ties_kept']:,}",
        ]
        sizes = ls.get("sizes") or {}
        if sizes:
            shown = sorted(sizes.items(), key=lambda kv: int(kv[0]))
            lines.append("  list sizes       " + ", ".join(f"{k}: {v:,}" for k, v in shown))
        lines += _dropped_and_skipped_lines(s)
        return "\n".join(lines)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def lists(
    source: Union[str, os.PathLike, Any],
    output: Union[str, os.PathLike, None] = None,
    *,
    list_size: Optional[int] = None,
    label: str = "dense_rank",
    truncate: str = "top",
    min_size: int = 2,
    seed: int = 0,
    format: Optional[str] = None,
    column_map: Optional[Mapping[str, str]] = None,
    score_field: Optional[str] = None,
    dedupe: bool = True,
    skip_invalid: bool = False,
    group_by_prompt: bool = False,
    extra_columns: bool = True,
    threads: Optional[int] = None,
    progress: bool = False,
    dry_run: bool = False,
) -> ListResult:
    """Turn rated preference data into one ranked list of responses per prompt.

    Per prompt: responses are ordered by preference (score, else −rank; ties in input order),
    repeated texts dropped (``dedupe``); prompts with fewer than ``min_size`` responses make no
    list; lists longer than ``list_size`` keep the best K (``truncate="top"``; when a tied block
    straddles the cut, which of its members stay is drawn from (seed, prompt_id)) or K drawn
    uniformly (``"random"``). Lists shorter than K stay short: ``list_tensors(..., pad_to=K)``
    pads them with masked entries at batch time.

    Output columns (one row per prompt): ``prompt_id``, ``prompt``, ``responses`` (best first),
    ``labels``, ``gains``, ``scores`` (null where the input ranks), ``ranks`` (ranked formats),
    ``models`` (formats that name them), ``list_size``, then the record's other columns.

    Args:
        label: ``"dense_rank"``: ψ = the number of distinct preference values in the list below
            the response's (worst 0, ties equal), from scores or ranks alike; ``"score"``: ψ = the
            raw score (scored input only; negative scores give gains in (−1, 0)). Labels are
            computed over the list as written (after truncation). Gains G = 2^ψ − 1.
        seed: randomness is drawn per prompt from (seed, prompt_id): results do not depend on
            batching or thread count.
        Other arguments as for ``prefops.prep``.

    Raises:
        prefops.DataError: a bad record, or a response without a score under ``label="score"``
            (the message names the source, line/row and field).
        ValueError: bad options (``list_size`` < 2, ``min_size`` > ``list_size``, label="score"
            on a format that only ranks, ...).
    """
    if list_size is not None:
        _check_int("list_size", list_size, 2)
    _check_int("min_size", min_size, 1)
    if list_size is not None and min_size > list_size:
        raise ValueError(f"min_size ({min_size}) must not exceed list_size ({list_size})")
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    if truncate not in TRUNCATE:
        raise ValueError(f"truncate must be one of {TRUNCATE}, got {truncate!r}")
    return _run_prep(
        source,
        output,
        ListResult,
        kind="lists",
        list_size=list_size,
        label=label,
        truncate=truncate,
        min_size=min_size,
        seed=seed,
        format=format,
        column_map=column_map,
        score_field=score_field,
        dedupe=dedupe,
        skip_invalid=skip_invalid,
        group_by_prompt=group_by_prompt,
        extra_columns=extra_columns,
        threads=threads,
        progress=progress,
        dry_run=dry_run,
    )


@dataclass(frozen=True)
class ListTensors:
    """A lists table as loss inputs. Flat tensors hold every list's entries back to back (list
    p is ``flat[offsets[p]:offsets[p+1]]``); padded ones are [P, K] with ``mask`` True on real
    entries and 0 elsewhere."""

    offsets: Any  # [P+1] int64
    sizes: Any  # [P] int64
    mask: Any  # [P, K] bool
    labels: Any  # [P, K]
    gains: Any  # [P, K]
    flat_labels: Any  # [N]
    flat_gains: Any  # [N]
    responses: Optional[list] = field(default=None, repr=False)  # [N] when asked for

    def pad(self, flat_values, pad_value: float = 0.0):
        """Flat [N] per-response values (e.g. summed log-probs, in the order of ``responses``)
        → [P, K] in this batch's layout; padding holds ``pad_value``."""
        import torch

        flat_values = torch.as_tensor(flat_values)
        if flat_values.shape[:1] != self.flat_labels.shape:
            raise ValueError(f"expected {self.flat_labels.numel()} values (one per listed response), "
                             f"got {tuple(flat_values.shape)}")
        out = flat_values.new_full((*self.mask.shape, *flat_values.shape[1:]), pad_value)
        out[self.mask.to(flat_values.device)] = flat_values
        return out


def _read_lists_table(source: Any):
    import pyarrow as pa

    if isinstance(source, PrepResult):
        if source.table is not None:
            return source.table
        if source.output is None:
            raise ValueError("this result has neither a table nor an output file")
        source = source.output
    src = _arrow_source(source)
    if isinstance(src, Path):
        name = src.name.lower()
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(src)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(src, "rt", encoding="utf-8") as f:
            return pa.Table.from_pylist([json.loads(line) for line in f if line.strip()])
    if isinstance(src, pa.RecordBatchReader):
        return src.read_all()
    if isinstance(src, pa.RecordBatch):
        return pa.Table.from_batches([src])
    return src


def _flat(table, name: str):
    """A list column's values back to back and its [P+1] offsets (from 0), as numpy."""
    import numpy as np
    import pyarrow as pa

    if name not in table.column_names:
        raise ValueError(f"column {name!r} not found (columns: {', '.join(table.column_names)}); "
                         "is this the output of prefops.lists?")
    column = table.column(name)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise ValueError(f"column {name!r} must be a list column, got {arr.type}")
    if arr.null_count:
        raise ValueError(f"column {name!r}: row {arr.is_null().index(True).as_py()} has no list")
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = arr.flatten()
    if values.null_count:
        raise ValueError(f"column {name!r} holds nulls inside its lists")
    return values, offsets - offsets[0]


def list_tensors(
    source: Any,
    *,
    pad_to: Optional[int] = None,
    dtype: Any = None,
    device: Any = None,
    with_responses: bool = False,
) -> ListTensors:
    """Loss inputs from a lists table (``prefops.lists`` output: a result, a pyarrow/polars
    table or batch, or a .parquet/.jsonl/.jsonl.gz path).

    ``pad_to=K`` fixes the padded width (an error if a list is longer); by default it is the
    longest list. ``dtype`` (default float32) applies to labels and gains. ``with_responses``
    also returns the flat responses (Python objects) in the same order.

        lt = prefops.list_tensors(batch_table)
        logps = lt.pad(policy_logps_flat)          # [P, K]
        loss, metrics = listwise_loss(logps, lt.pad(ref_logps_flat), lt.labels, list_mask=lt.mask)
    """
    import numpy as np
    import torch

    table = _read_lists_table(source)
    labels, offsets = _flat(table, "labels")
    gains, gain_offsets = _flat(table, "gains")
    if not np.array_equal(offsets, gain_offsets):
        raise ValueError("columns 'labels' and 'gains' have lists of different lengths")
    sizes = np.diff(offsets)
    longest = int(sizes.max()) if len(sizes) else 0
    if pad_to is not None:
        if isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1:
            raise ValueError(f"pad_to must be an integer >= 1, got {pad_to!r}")
        if pad_to < longest:
            raise ValueError(f"pad_to={pad_to} but row {int(np.argmax(sizes))} has a list of {longest}")
    width = longest if pad_to is None else pad_to
    dtype = dtype or torch.float32
    # torch.tensor copies: Arrow buffers are read-only.
    flat_labels = torch.tensor(labels.to_numpy(zero_copy_only=False), dtype=dtype, device=device)
    flat_gains = torch.tensor(gains.to_numpy(zero_copy_only=False), dtype=dtype, device=device)
    sizes_t = torch.as_tensor(sizes, dtype=torch.int64, device=device)
    mask = torch.arange(width, device=device)[None, :] < sizes_t[:, None]

    def padded(flat):
        out = flat.new_zeros(mask.shape)
        out[mask] = flat
        return out

    responses = None
    if with_responses:
        responses, resp_offsets = _flat(table, "responses")
        if not np.array_equal(resp_offsets, offsets):
            raise ValueError("columns 'responses' and 'labels' have lists of different lengths")
        responses = responses.to_pylist()
    return ListTensors(
        offsets=torch.as_tensor(offsets, dtype=torch.int64, device=device),
        sizes=sizes_t,
        mask=mask,
        labels=padded(flat_labels),
        gains=padded(flat_gains),
        flat_labels=flat_labels,
        flat_gains=flat_gains,
        responses=responses,
    )
