"""The data steps on batches, for Arrow batch engines (Ray Data, Spark, HF datasets, ...).

``process(table, steps)`` runs a list of step specs on one Arrow table or record batch and
returns a ``pyarrow.Table``; it is picklable and needs no state, so it serves unchanged as

- Ray: ``ds.map_batches(process, fn_kwargs={"steps": steps}, batch_format="pyarrow")``, or
  ``ds.groupby("prompt_id").map_groups(process, fn_kwargs=..., batch_format="pyarrow")``;
- Spark: ``df.mapInArrow(lambda it: process_batches(it, steps), schema)``;
- HF datasets: ``ds.with_format("arrow").map(process, batched=True, fn_kwargs=...)``.

Per-row steps (``Prep``, ``Lists``, ``FlipLabels``, ``RewardAugment``) decide each row from its
own values and the seed, so their rows do not depend on batch boundaries. The two global steps
are split into per-batch parts and a small global part that runs once on collected columns:

- curriculum: ``CurriculumScores`` per batch (with ``stages=True`` inside ``map_groups`` by
  prompt, the stage too) → either sort by ``CURRICULUM_SORT_KEY`` (staged groups), or collect
  ``prompt_id, pair_id, curriculum_key`` → ``curriculum_order`` → ``ApplyCurriculum`` per batch →
  sort by ``curriculum_position``;
- FiFA: ``fifa_radii`` once over the prompt embeddings (one per prompt) → ``FifaScores`` per
  batch → collect ``importance, pair_id`` → ``fifa_cut`` → ``FifaKeep`` per batch.

Either way the rows and values equal the single-process ``prefops.curriculum`` /
``prefops.fifa_filter`` (given unique pair ids, as prep writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from prefops import _native
from prefops.fifa import _check_keep
from prefops.steps import _threads

__all__ = [
    "Step", "Prep", "Lists", "FlipLabels", "RewardAugment", "CurriculumScores", "ApplyCurriculum",
    "FifaScores", "FifaKeep", "FifaCut", "CURRICULUM_SORT_KEY", "process", "process_batches",
    "curriculum_order", "fifa_radii", "fifa_cut",
]

#: With ``CurriculumScores(stages=True)`` run per prompt group, sorting by these columns gives the
#: order of ``prefops.curriculum(schedule="stages")``; ``("curriculum_key", "pair_id")`` that
#: of ``schedule="global"``.
CURRICULUM_SORT_KEY = ("stage", "curriculum_key", "pair_id")


def _table(data: Any):
    """One batch as a pyarrow.Table: pyarrow tables and record batches as they are, anything
    with the Arrow PyCapsule interface (polars, ...) through it."""
    import pyarrow as pa

    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data).read_all()
    if hasattr(data, "__arrow_c_array__"):
        return pa.Table.from_batches([pa.record_batch(data)])
    hint = ""
    if isinstance(data, dict):
        hint = " (HF datasets: ds.with_format('arrow').map(process, batched=True, ...))"
    elif type(data).__module__.startswith("pandas"):
        hint = " (Ray: map_batches(..., batch_format='pyarrow'))"
    raise TypeError(f"process() takes an Arrow table or record batch, got {type(data).__name__}{hint}")


class Step:
    """A step spec: a small frozen, picklable description of one step; ``apply`` runs it on
    one batch."""

    def apply(self, table: Any, threads: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Prep(Step):
    """``prefops.prep`` on each batch (rated records in, pairs out); arguments as there. A
    prompt's records must sit in one batch (one record per prompt, as most formats have; else
    ``map_groups`` by prompt with ``group_by_prompt=True``)."""

    format: Optional[str] = None
    column_map: Optional[Mapping[str, str]] = None
    score_field: Optional[str] = None
    strategy: str = "best_vs_worst"
    min_margin: float = 0.0
    ties: str = "drop"
    dedupe: bool = True
    max_pairs_per_prompt: Optional[int] = None
    seed: int = 0
    kind: Optional[str] = None
    skip_invalid: bool = False
    group_by_prompt: bool = False

    def apply(self, table, threads):
        from prefops.data import prep

        return prep(table, threads=threads or None, **_kwargs(self)).table


@dataclass(frozen=True)
class Lists(Step):
    """``prefops.lists`` on each batch (one ranked list per prompt); arguments as there."""

    list_size: Optional[int] = None
    label: str = "dense_rank"
    truncate: str = "top"
    min_size: int = 2
    seed: int = 0
    format: Optional[str] = None
    column_map: Optional[Mapping[str, str]] = None
    score_field: Optional[str] = None
    dedupe: bool = True
    skip_invalid: bool = False
    group_by_prompt: bool = False

    def apply(self, table, threads):
        from prefops.lists import lists

        return lists(table, threads=threads or None, **_kwargs(self)).table


@dataclass(frozen=True)
class FlipLabels(Step):
    """``prefops.flip_labels`` on each batch (random flips are seeded per pair id)."""

    factual: bool = False
    hallucinated_columns: Optional[Tuple[str, str]] = None
    factual_columns: Optional[Tuple[str, str]] = None
    reward_columns: Optional[Tuple[str, str]] = None
    reward_min_gap: float = 0.0
    rate: Optional[float] = None
    seed: int = 0

    def apply(self, table, threads):
        from prefops.steps import flip_labels

        return flip_labels(table, threads=threads or None, **_kwargs(self)).table


@dataclass(frozen=True)
class RewardAugment(Step):
    """``prefops.reward_augment`` on each batch. Each batch gives its first rows, then its
    second rows, so the rows equal the single-process run's, in another order."""

    template: str = "default"
    score_columns: Tuple[str, str] = ("score_chosen", "score_rejected")

    def apply(self, table, threads):
        from prefops.steps import reward_augment

        return reward_augment(table, threads=threads or None, **_kwargs(self)).table


@dataclass(frozen=True)
class CurriculumScores(Step):
    """Per-batch part of ``prefops.curriculum``: checks the difficulty column (as the step
    does) and adds ``curriculum_key`` (the difficulty, smaller = easier). ``stages=True`` also
    adds ``stage`` (the pair's rank among its prompt's pairs, easy first), which is right only
    when every pair of a prompt is in the batch: use it in ``groupby("prompt_id").map_groups``."""

    by: str = "margin"
    descending_is_easy: bool = True
    stages: bool = False

    def apply(self, table, threads):
        import pyarrow as pa
        import pyarrow.compute as pc

        # The single-process step on this batch: same checks, and per prompt the same stages.
        out, _ = _native.curriculum(table, None, by=self.by, descending_is_easy=self.descending_is_easy,
                                    schedule="stages" if self.stages else "global", threads=threads)
        difficulty = pc.cast(out.column(self.by), pa.float64())
        key = pc.negate(difficulty) if self.descending_is_easy else difficulty
        key = pc.add(key, 0.0)  # -0.0 → 0.0: the step sorts them as equal
        return _set_column(out, "curriculum_key", key)


@dataclass(frozen=True)
class ApplyCurriculum(Step):
    """Per-batch part after ``curriculum_order``: looks each row's pair id up in ``order`` and
    sets ``curriculum_position`` (0 = easiest of all, the single-process row order) and, for
    the stages schedule, ``stage``; drops ``curriculum_key``. Sort by ``curriculum_position``
    afterwards for the order itself."""

    order: Any = None

    def apply(self, table, threads):
        import pyarrow.compute as pc

        if self.order is None:
            raise ValueError("ApplyCurriculum needs order=prefops.data.curriculum_order(collected scores)")
        ids = self.order.column("pair_id")
        where = pc.index_in(table.column("pair_id"), value_set=ids)
        if where.null_count:
            missing = table.column("pair_id").filter(pc.is_null(where))[0].as_py()
            raise ValueError(f"pair_id {missing!r} is not in the curriculum order: collect the scores of every "
                             "batch before curriculum_order")
        if "curriculum_key" in table.column_names:
            table = table.drop_columns(["curriculum_key"])
        for name in ("stage", "curriculum_position"):
            if name in self.order.column_names:
                table = _set_column(table, name, pc.take(self.order.column(name), where))
        return table


@dataclass(frozen=True)
class FifaScores(Step):
    """Per-batch part of ``prefops.fifa_filter``: adds ``importance`` and ``knn_distance`` to
    every row, given ``radii = fifa_radii(...)`` (computed once over all prompt embeddings and
    broadcast with the step). Weights and columns as for ``fifa_filter``."""

    radii: Any = None
    alpha: float = 1.0
    gamma: float = 1.0
    margin_column: str = "margin"
    quality_column: Optional[str] = None

    def apply(self, table, threads):
        if self.radii is None:
            raise ValueError("FifaScores needs radii=prefops.data.fifa_radii(embeddings, k=...): the kNN over "
                             "the prompt embeddings is global and runs once, before the batches")
        out, _ = _native.fifa_scores(table, self.radii, alpha=float(self.alpha), gamma=float(self.gamma),
                                     margin_column=self.margin_column, quality_column=self.quality_column,
                                     threads=threads)
        return out


@dataclass(frozen=True)
class FifaCut:
    """The global FiFA selection as a rule: a row is kept when its (importance, pair_id) ranks
    at or above (``importance``, ``pair_id``): higher importance first, then the smaller pair id
    (null first). ``keep_nothing`` when the budget is 0."""

    importance: Optional[float]
    pair_id: Optional[str]
    keep_nothing: bool
    rows: int
    kept: int


@dataclass(frozen=True)
class FifaKeep(Step):
    """Per-batch part after ``fifa_cut``: the rows the cut keeps, in batch order."""

    cut: Optional[FifaCut] = None

    def apply(self, table, threads):
        if self.cut is None:
            raise ValueError("FifaKeep needs cut=prefops.data.fifa_cut(collected scores, keep_count=...|keep_fraction=...)")
        rule = None if self.cut.keep_nothing else (self.cut.importance, self.cut.pair_id)
        out, _ = _native.fifa_keep(table, rule, threads=threads)
        return out


def _kwargs(step: Step) -> dict:
    out = {f.name: getattr(step, f.name) for f in fields(step)}
    if out.get("column_map") is not None:
        out["column_map"] = dict(out["column_map"])
    return out


def _set_column(table, name: str, values):
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


_GLOBAL_STEPS = {
    "curriculum": "prefops.curriculum orders all pairs at once: per batch use CurriculumScores (with "
                  "stages=True inside groupby('prompt_id').map_groups), then sort by CURRICULUM_SORT_KEY, or "
                  "collect prompt_id/pair_id/curriculum_key, call curriculum_order and apply ApplyCurriculum",
    "fifa_filter": "prefops.fifa_filter selects over all pairs at once: fifa_radii once, FifaScores per batch, "
                   "fifa_cut on the collected importance/pair_id columns, then FifaKeep per batch",
}


def _check_step(step: Any) -> Step:
    if isinstance(step, Step):
        return step
    name = getattr(step, "__name__", step if isinstance(step, str) else None)
    if name in _GLOBAL_STEPS:
        raise ValueError(f"{name} is a global step and cannot run batch by batch: {_GLOBAL_STEPS[name]}")
    raise TypeError(f"steps must be step specs from prefops.data (Prep, FlipLabels, CurriculumScores, ...), "
                    f"got {step!r}")


def process(table: Any, steps: Sequence[Step], *, threads: Optional[int] = None):
    """Run ``steps`` in order on one batch: any Arrow table or record batch (pyarrow, polars, an
    HF datasets arrow batch). Returns a ``pyarrow.Table``. Threads per call: ``threads``, else
    ``$PREFOPS_NUM_THREADS``, else the CPU count (no pool is kept, so forked workers are safe)."""
    checked = [_check_step(s) for s in steps]
    n = _threads(threads)
    out = _table(table)
    for step in checked:
        out = step.apply(out, n)
    return out


def process_batches(batches: Iterable[Any], steps: Sequence[Step], *, schema: Any = None,
                    threads: Optional[int] = None) -> Iterator[Any]:
    """``process`` over an iterator of batches, yielding ``pyarrow.RecordBatch``es (Spark's
    ``mapInArrow``). ``schema`` (a ``pyarrow.Schema``): cast every output batch to it."""
    checked = [_check_step(s) for s in steps]
    for batch in batches:
        out = process(batch, checked, threads=threads)
        if schema is not None:
            out = out.select(schema.names).cast(schema)
        yield from out.to_batches()


def _collected(scores: Any, columns: Sequence[str], what: str):
    import pyarrow as pa

    if isinstance(scores, (list, tuple)):
        scores = pa.concat_tables([_table(s) for s in scores])
    table = _table(scores)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{what} needs the columns {', '.join(columns)}; missing {', '.join(missing)} "
                         f"(the table has: {', '.join(table.column_names)})")
    return table.select(list(columns))


def _check_unique_pair_ids(table, what: str) -> None:
    import pyarrow.compute as pc

    ids = table.column("pair_id")
    if len(ids) > 1 and pc.count_distinct(ids, mode="all").as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
        raise ValueError(f"pair_id {dup!r} appears more than once; {what} maps results back by pair id "
                         "(prep writes unique ones)")


def curriculum_order(scores: Any, *, schedule: str = "stages", threads: Optional[int] = None):
    """Global part of the curriculum: from the collected ``prompt_id, pair_id, curriculum_key``
    columns of every batch (a table, or a list of them), the single-process order as a table of
    ``pair_id``, ``stage`` (stages schedule) and ``curriculum_position``, easiest first. Ties in
    difficulty are broken by pair id, as ``prefops.curriculum`` does."""
    import pyarrow as pa

    table = _collected(scores, ("prompt_id", "pair_id", "curriculum_key"), "curriculum_order")
    _check_unique_pair_ids(table, "the curriculum order")
    out, _ = _native.curriculum(table, None, by="curriculum_key", descending_is_easy=False, schedule=schedule,
                                threads=_threads(threads))
    keep = ["pair_id"] + (["stage"] if "stage" in out.column_names else [])
    out = out.select(keep)
    return out.append_column("curriculum_position", pa.array(range(out.num_rows), pa.int64()))


def fifa_radii(
    embeddings: Any,
    *,
    k: int = 5,
    metric: str = "cosine",
    knn: str = "exact",
    nlist: Optional[int] = None,
    nprobe: Optional[int] = None,
    seed: int = 0,
    prompt_ids: Optional[Sequence[Any]] = None,
    embedding_column: str = "embedding",
    distance_floor: float = 1e-6,
    from_pairs: bool = False,
    threads: Optional[int] = None,
):
    """Global part of FiFA: ρ_k of every prompt embedding, as a small table (``prompt_id``,
    ``knn_distance``, ``log_distance``) to pass to ``FifaScores(radii=...)``. ``embeddings`` as
    for ``fifa_filter`` (a numpy matrix with ``prompt_ids``, a path or Arrow table with one row
    per prompt); ``from_pairs=True`` takes a table of pairs' ``prompt_id`` and embedding columns
    where a prompt may repeat with the same vector (``fifa_filter(embeddings=None)``)."""
    from prefops.fifa import METRICS, _embeddings_source, _ivf_args

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    nl, npb = _ivf_args(knn, nlist, nprobe)
    source = _embeddings_source(embeddings, prompt_ids, embedding_column)
    if source is None:
        raise ValueError("fifa_radii needs embeddings: a [P, D] matrix with prompt_ids, a path or an Arrow table")
    out, _ = _native.fifa_radii(source, from_pairs=bool(from_pairs), k=int(k), metric=metric, knn=knn, nlist=nl,
                                nprobe=npb, seed=int(seed), embedding_column=embedding_column,
                                distance_floor=float(distance_floor), threads=_threads(threads))
    return out


def fifa_cut(scores: Any, *, keep_count: Optional[int] = None, keep_fraction: Optional[float] = None,
             threads: Optional[int] = None) -> FifaCut:
    """Global selection of FiFA: from the collected ``importance, pair_id`` columns of every
    scored batch (a table, or a list of them), the cut that keeps the ``keep_count`` (or
    round(``keep_fraction`` · rows)) most important rows, ties by pair id, exactly as
    ``fifa_filter`` keeps them. Pass it to ``FifaKeep(cut=...)``."""
    _check_keep(keep_count, keep_fraction)
    table = _collected(scores, ("importance", "pair_id"), "fifa_cut")
    report = json.loads(_native.fifa_cut(
        table,
        keep_count=None if keep_count is None else int(keep_count),
        keep_fraction=None if keep_fraction is None else float(keep_fraction),
        threads=_threads(threads),
    ))
    cut = report["cut"]
    return FifaCut(
        importance=None if cut is None else float(cut["importance"]),
        pair_id=None if cut is None else cut["pair_id"],
        keep_nothing=cut is None,
        rows=report["rows"],
        kept=report["kept"],
    )
