"""FiFA data filtering and the kNN tools under it.

``fifa_filter`` keeps the most important pairs under a budget, importance per pair

    importance = margin + gamma * quality + alpha * ln max(rho_k(prompt), distance_floor)

where rho_k is the distance from the pair's prompt embedding to its k-th nearest other prompt
embedding (sparse prompts score higher). ALGORITHMS.md marks the paper's weights as unverified,
so alpha, gamma, k and the budget are yours to set.

``knn_search`` / ``knn_radius`` / ``knn_entropy`` work on a float32 [N, D] numpy matrix (zero
copy into Rust when it is C-contiguous float32) and return numpy arrays; the work runs in Rust
with the GIL released and gives the same result for any thread count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

from prefops import _native
from prefops.steps import Source, StepResult, _result, _step_source, _threads

KNN_MODES = ("exact", "ivf")
METRICS = ("cosine", "l2")


def _matrix_array(matrix: Any):
    """An [N, D] matrix as an Arrow fixed-size list of float32 (no copy when the matrix is
    already C-contiguous float32)."""
    import numpy as np
    import pyarrow as pa

    m = np.ascontiguousarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D [rows, dim] matrix, got shape {m.shape}")
    if m.shape[1] == 0:
        raise ValueError("the matrix has 0 columns")
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1])


def _ivf_args(knn: str, nlist: Optional[int], nprobe: Optional[int]) -> Tuple[int, int]:
    if knn not in KNN_MODES:
        raise ValueError(f"knn must be one of {KNN_MODES}, got {knn!r}")
    for name, v in (("nlist", nlist), ("nprobe", nprobe)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    return nlist or 0, nprobe or 0


def knn_search(
    matrix: Any,
    k: int,
    *,
    metric: str = "cosine",
    knn: str = "exact",
    nlist: Optional[int] = None,
    nprobe: Optional[int] = None,
    seed: int = 0,
    threads: Optional[int] = None,
):
    """The k nearest neighbours of every row among the other rows.

    Returns ``(distances, indices)``, both [N, k] (float64, int64), nearest first; ties in
    distance by index. ``metric``: ``"cosine"`` (1 - cos, rows must be non-zero) or ``"l2"``.
    ``knn="exact"`` compares every pair (f32 GEMM tiles, the shortlist re-ranked with f64
    distances, so duplicates come out at exactly 0); ``knn="ivf"`` searches the ``nprobe``
    nearest of ``nlist`` seeded k-means clusters (defaults round(4·sqrt(N)) and min(nlist, 16)).
    """
    import numpy as np

    nl, npb = _ivf_args(knn, nlist, nprobe)
    array = _matrix_array(matrix)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    d, i, _ = _native.knn_search(array, int(k), metric=metric, knn=knn, nlist=nl, nprobe=npb, seed=int(seed),
                                 threads=_threads(threads))
    n = len(array)
    return (d.to_numpy(zero_copy_only=True).reshape(n, k),
            i.to_numpy(zero_copy_only=True).astype(np.int64).reshape(n, k))


def knn_radius(matrix: Any, k: int, **options: Any):
    """Distance from every row to its k-th nearest other row ([N] float64); options as for
    ``knn_search``."""
    return knn_search(matrix, k, **options)[0][:, k - 1].copy()


def knn_entropy(matrix: Any, k: int = 3, *, threads: Optional[int] = None) -> float:
    """Kozachenko–Leonenko estimate of the differential entropy (nats) of the distribution the
    rows are samples of: psi(N) - psi(k) + ln V_d + (d/N)·sum ln rho_k, V_d the volume of the unit
    d-ball, rho_k the exact Euclidean k-th-neighbour distance. Repeated rows (rho_k = 0) are an
    error."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _native.knn_entropy(_matrix_array(matrix), int(k), threads=_threads(threads))


def _check_keep(keep_count: Optional[int], keep_fraction: Optional[float]) -> None:
    """Exactly one budget: a count >= 0 or a fraction in [0, 1]."""
    if (keep_count is None) == (keep_fraction is None):
        raise ValueError("give exactly one of keep_count and keep_fraction")
    if keep_count is not None and keep_count < 0:
        raise ValueError(f"keep_count must be >= 0, got {keep_count}")
    if keep_fraction is not None and not 0.0 <= float(keep_fraction) <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")


def _embeddings_source(embeddings: Any, prompt_ids: Optional[Sequence[Any]], embedding_column: str) -> Any:
    """A path or Arrow table as is; a numpy matrix (with ``prompt_ids``) as an Arrow table."""
    if embeddings is None or isinstance(embeddings, (str, os.PathLike)):
        if prompt_ids is not None:
            raise ValueError("prompt_ids goes with a matrix of embeddings")
        return None if embeddings is None else Path(embeddings)
    if hasattr(embeddings, "__array__") and not hasattr(embeddings, "__arrow_c_stream__") \
            and not hasattr(embeddings, "__arrow_c_array__"):
        import pyarrow as pa

        if prompt_ids is None:
            raise ValueError("a matrix of embeddings needs prompt_ids=[...] (one id per row)")
        array = _matrix_array(embeddings)
        ids = [str(x) for x in prompt_ids]
        if len(ids) != len(array):
            raise ValueError(f"prompt_ids has {len(ids)} ids for {len(array)} embedding rows")
        return pa.table({"prompt_id": pa.array(ids, pa.string()), embedding_column: array})
    if prompt_ids is not None:
        raise ValueError("prompt_ids goes with a matrix of embeddings")
    return _step_source(embeddings)


def fifa_filter(
    pairs: Source,
    embeddings: Any = None,
    *,
    alpha: float = 1.0,
    gamma: float = 1.0,
    k: int = 5,
    metric: str = "cosine",
    knn: str = "exact",
    nlist: Optional[int] = None,
    nprobe: Optional[int] = None,
    keep_count: Optional[int] = None,
    keep_fraction: Optional[float] = None,
    margin_column: str = "margin",
    quality_column: Optional[str] = None,
    embedding_column: str = "embedding",
    prompt_ids: Optional[Sequence[Any]] = None,
    distance_floor: float = 1e-6,
    output: Union[str, os.PathLike, None] = None,
    threads: Optional[int] = None,
    seed: int = 0,
) -> StepResult:
    """FiFA filtering: keep the ``keep_count`` (or ``keep_fraction`` of the) pairs with the
    highest ``margin + gamma·quality + alpha·ln max(rho_k, distance_floor)``.

    Args:
        pairs: a pairs table (path, Arrow table/stream, ``PrepResult``/``StepResult``) with
            ``prompt_id``, the margin column and, optionally, ``pair_id`` (ties) and the quality
            column.
        embeddings: where the prompt embeddings come from: None (the pairs' own
            ``embedding_column``, every row of a prompt carrying the same embedding); a numpy
            [P, D] matrix with ``prompt_ids``; or a path / Arrow table with ``prompt_id`` and
            ``embedding_column`` (list or fixed-size list of numbers), one row per prompt.
            The kNN runs over all given embeddings (the prompt population); every pair's prompt
            must have one.
        alpha, gamma: weights of ln rho_k and of the quality column (0 without one).
        k: which neighbour's distance (rho_k); needs at least k + 1 prompts.
        metric: ``"cosine"`` (1 - cos) or ``"l2"``. knn / nlist / nprobe / seed: as for
            ``knn_search``.
        keep_count / keep_fraction: exactly one; a fraction keeps ⌊fraction · rows + 0.5⌋ rows (halves round up, unlike Python's round).
        distance_floor: rho_k below it (duplicate prompts: rho_k = 0) counts as the floor in the
            logarithm; ``stats["floored_prompts"]`` counts them.
        output: .jsonl/.jsonl.gz/.parquet path (atomic), or None for a table.

    Kept rows come in input order with ``importance`` and ``knn_distance`` (rho_k, not
    floored) added. Ties in importance are broken by ``pair_id``, then input position.
    """
    _check_keep(keep_count, keep_fraction)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    nl, npb = _ivf_args(knn, nlist, nprobe)
    table, report = _native.fifa(
        _step_source(pairs),
        _embeddings_source(embeddings, prompt_ids, embedding_column),
        None if output is None else Path(output),
        alpha=float(alpha),
        gamma=float(gamma),
        k=int(k),
        metric=metric,
        knn=knn,
        nlist=nl,
        nprobe=npb,
        seed=int(seed),
        keep_count=None if keep_count is None else int(keep_count),
        keep_fraction=None if keep_fraction is None else float(keep_fraction),
        margin_column=margin_column,
        quality_column=quality_column,
        embedding_column=embedding_column,
        distance_floor=float(distance_floor),
        threads=_threads(threads),
    )
    return _result(table, report)


__all__ = ["fifa_filter", "knn_search", "knn_radius", "knn_entropy", "KNN_MODES", "METRICS"]
