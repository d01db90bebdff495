"""prefops.data.process on Arrow batch engines: a real local Ray cluster (map_batches and
groupby().map_groups), HF datasets (batched map, num_proc=2), Spark mapInArrow, forked workers
(multiprocessing, torch DataLoader); and the split curriculum / FiFA paths against the
single-process steps on random tables with random batch boundaries."""

import multiprocessing
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prefops
from prefops.data import (
    CURRICULUM_SORT_KEY, ApplyCurriculum, CurriculumScores, FifaKeep, FifaScores, FlipLabels, Prep, RewardAugment,
    curriculum_order, fifa_cut, fifa_radii, process, process_batches,
)

ROOT = Path(__file__).resolve().parents[1]
ROW_STEPS = [Prep(skip_invalid=True), FlipLabels(rate=0.3, seed=7)]  # the HH sample has a few bad records
IDENTITY = ["pair_id", "chosen", "rejected"]  # HH has repeated records: sort on the content too


def canonical(table: pa.Table, columns=None) -> list:
    """Rows as dicts sorted by pair id and content, columns in a fixed order."""
    columns = columns or sorted(table.column_names)
    return table.select(columns).sort_by([(c, "ascending") for c in IDENTITY]).to_pylist()


@pytest.fixture(scope="module")
def hh_raw() -> pa.Table:
    return prefops.convert(prefops.sample_path("hh")).table


@pytest.fixture(scope="module")
def hh_pairs(hh_raw) -> pa.Table:
    """The single-process run of ROW_STEPS."""
    return prefops.flip_labels(prefops.prep(hh_raw, skip_invalid=True), rate=0.3, seed=7).table


def blocks(table: pa.Table, n: int) -> list:
    size = -(-table.num_rows // n)
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


def worker_env() -> dict:
    """Child processes of Ray/Spark import prefops from this source tree when it is not
    installed (a pip-installed prefops needs nothing)."""
    here = Path(prefops.__file__).resolve().parent.parent
    if (here / "prefops" / "__init__.py").exists() and here == ROOT / "python":
        return {"PYTHONPATH": os.pathsep.join(p for p in [str(here), os.environ.get("PYTHONPATH")] if p)}
    return {}


# ------------------------------------------------------------------------------------------
# the batch function itself
# ------------------------------------------------------------------------------------------

def test_process_per_row_steps_ignore_batch_boundaries(hh_raw, hh_pairs):
    parts = [process(b, ROW_STEPS) for b in blocks(hh_raw, 7)]
    assert canonical(pa.concat_tables(parts)) == canonical(hh_pairs)
    # Record batches and polars frames in, pyarrow tables out.
    batch = hh_raw.slice(0, 40).to_batches()[0]
    assert isinstance(process(batch, ROW_STEPS), pa.Table)
    pl = pytest.importorskip("polars")
    assert process(pl.from_arrow(hh_raw.slice(0, 40)), ROW_STEPS).equals(process(batch, ROW_STEPS))
    # Augmented rows (ranked ImageReward lists): each batch gives its first rows, then its
    # second rows: the same rows as one run.
    ir_raw = prefops.convert(prefops.sample_path("imagereward")).table
    augment = [Prep(strategy="best_vs_each"), RewardAugment(score_columns=("rank_chosen", "rank_rejected"))]
    parts = pa.concat_tables([process(b, augment) for b in blocks(ir_raw, 3)])
    single = prefops.reward_augment(prefops.prep(ir_raw, strategy="best_vs_each"),
                                    score_columns=("rank_chosen", "rank_rejected")).table
    assert parts.num_rows == single.num_rows and canonical(parts) == canonical(single)


def test_process_errors_say_what_to_do(hh_raw):
    with pytest.raises(ValueError, match=r"curriculum is a global step .* CurriculumScores"):
        process(hh_raw, [Prep(skip_invalid=True), prefops.curriculum])
    with pytest.raises(ValueError, match=r"fifa_filter is a global step .* fifa_radii once"):
        process(hh_raw, ["fifa_filter"])
    with pytest.raises(ValueError, match=r"FifaScores needs radii=prefops.data.fifa_radii"):
        process(hh_raw, [Prep(skip_invalid=True), FifaScores()])
    with pytest.raises(TypeError, match=r"with_format\('arrow'\)"):
        process({"chosen": ["a"]}, ROW_STEPS)
    with pytest.raises(TypeError, match="step specs"):
        process(hh_raw, [{"step": "prep"}])


def test_process_batches_yields_record_batches(hh_raw, hh_pairs):
    out = list(process_batches(iter(hh_raw.to_batches(max_chunksize=64)), ROW_STEPS))
    assert all(isinstance(b, pa.RecordBatch) for b in out)
    assert canonical(pa.Table.from_batches(out)) == canonical(hh_pairs)
    schema = pa.schema([("pair_id", pa.large_string()), ("chosen", pa.large_string()), ("rejected", pa.large_string()),
                        ("margin", pa.float32())])
    cast = list(process_batches(hh_raw.to_batches(max_chunksize=100), ROW_STEPS, schema=schema))
    assert all(b.schema == schema for b in cast)


def test_global_parts_refuse_duplicate_pair_ids():
    scores = pa.table({"prompt_id": ["a", "a"], "pair_id": ["x", "x"], "curriculum_key": [1.0, 2.0]})
    with pytest.raises(ValueError, match="pair_id 'x' appears more than once"):
        curriculum_order(scores)
    with pytest.raises(ValueError, match="needs the columns importance, pair_id; missing importance"):
        fifa_cut(scores, keep_count=1)
    tied = pa.table({"importance": [1.0, 1.0, 0.5], "pair_id": ["x", "x", "y"]})
    with pytest.raises(ValueError, match=r'2 rows share pair_id "x" .* keeps 1 of them'):
        fifa_cut(tied, keep_count=1)
    assert fifa_cut(tied, keep_count=2).pair_id == "x"


# ------------------------------------------------------------------------------------------
# split global steps vs the single-process functions, batch boundaries drawn by hypothesis
# ------------------------------------------------------------------------------------------

MARGINS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0, 2.0, -1.0, 1e-9, 7.25, 3])


@st.composite
def pairs_and_cuts(draw, max_rows=40):
    n = draw(st.integers(0, max_rows))
    ids = draw(st.lists(st.text("abcé", min_size=1, max_size=4), min_size=n, max_size=n, unique=True))
    table = pa.table({
        "prompt_id": pa.array([f"p{draw(st.integers(0, 5))}" for _ in range(n)], pa.string()),
        "pair_id": pa.array(ids, pa.string()),
        "margin": pa.array([float(draw(MARGINS)) for _ in range(n)], pa.float64()),
        "quality": pa.array([draw(st.sampled_from([0.0, 0.25, 1.0])) for _ in range(n)], pa.float64()),
    })
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=5))))
    bounds = [0, *cuts, n]
    return table, [table.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


def group_by_prompt(table: pa.Table) -> list:
    """What map_groups hands over: one table per prompt (in some order)."""
    return [table.filter(pc.equal(table.column("prompt_id"), p)) for p in sorted(set(table.column("prompt_id").to_pylist()))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_and_cuts(), st.booleans())
def test_split_curriculum_equals_single_process(data, descending_is_easy):
    table, batches = data
    for schedule in ("stages", "global"):
        expected = prefops.curriculum(table, descending_is_easy=descending_is_easy, schedule=schedule).table
        scored = [process(b, [CurriculumScores(descending_is_easy=descending_is_easy)]) for b in batches]
        order = curriculum_order([s.select(["prompt_id", "pair_id", "curriculum_key"]) for s in scored],
                                 schedule=schedule)
        applied = pa.concat_tables([process(s, [ApplyCurriculum(order)]) for s in scored])
        got = applied.sort_by("curriculum_position").drop_columns(["curriculum_position"])
        assert got.to_pylist() == expected.to_pylist()
    # Stages inside groups by prompt, then one engine-side sort.
    if table.num_rows:
        groups = [process(g, [CurriculumScores(descending_is_easy=descending_is_easy, stages=True)])
                  for g in group_by_prompt(table)]
        got = pa.concat_tables(groups).sort_by([(c, "ascending") for c in CURRICULUM_SORT_KEY])
        expected = prefops.curriculum(table, descending_is_easy=descending_is_easy).table
        assert got.drop_columns(["curriculum_key"]).to_pylist() == expected.to_pylist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs_and_cuts(), st.integers(0, 45), st.floats(0, 1), st.booleans(), st.sampled_from(["l2", "cosine"]))
def test_split_fifa_equals_single_process(data, keep_count, keep_fraction, by_fraction, metric):
    table, batches = data
    rng = np.random.default_rng(keep_count)
    prompts = [f"p{i}" for i in range(6)]
    emb = rng.integers(-2, 3, size=(6, 3)).astype(np.float32)
    emb[emb.sum(1) == 0, 0] = 5  # no zero rows under cosine
    emb[3] = emb[1]  # duplicate prompts: radius 0, floored
    keep = {"keep_fraction": keep_fraction} if by_fraction else {"keep_count": keep_count}
    options = dict(alpha=0.5, gamma=2.0, quality_column="quality")
    expected = prefops.fifa_filter(table, emb, prompt_ids=prompts, k=2, metric=metric, **keep, **options).table

    radii = fifa_radii(emb, prompt_ids=prompts, k=2, metric=metric)
    scored = [process(b, [FifaScores(radii=radii, **options)]) for b in batches]
    cut = fifa_cut([s.select(["importance", "pair_id"]) for s in scored], **keep)
    assert cut.kept == expected.num_rows
    got = pa.concat_tables([process(s, [FifaKeep(cut)]) for s in scored])
    assert got.to_pylist() == expected.to_pylist()  # batch order = input order


# ------------------------------------------------------------------------------------------
# fork safety: worker threads are kept between calls (prefops_core::threads), but a forked
# child has none of them and starts its own set; the parent has run steps on its workers first
# ------------------------------------------------------------------------------------------

def _run_in_child(args):
    table, threads_env = args
    if threads_env is not None:
        os.environ[prefops.THREADS_ENV] = threads_env
    result = prefops.flip_labels(prefops.prep(table, skip_invalid=True), rate=0.3, seed=7)
    return result.threads, process(table, ROW_STEPS)


def test_fork_safe_in_multiprocessing_and_dataloader_workers(hh_raw, hh_pairs):
    parts = blocks(hh_raw, 4)
    parent = [process(p, ROW_STEPS) for p in parts]  # the parent runs first: its threads have run
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        children = pool.map(_run_in_child, [(p, "3") for p in parts])
    assert [t for t, _ in children] == [3] * len(parts)  # PREFOPS_NUM_THREADS read at each call
    assert all(c.equals(p) for (_, c), p in zip(children, parent))

    pytest.importorskip("torch")
    from torch.utils.data import DataLoader, Dataset

    class Blocks(Dataset):
        def __len__(self):
            return len(parts)

        def __getitem__(self, i):
            return process(parts[i], ROW_STEPS).to_pylist()

    loader = DataLoader(Blocks(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    rows = [row for block in loader for row in block]
    assert canonical(pa.Table.from_pylist(rows)) == canonical(hh_pairs)


# ------------------------------------------------------------------------------------------
# HF datasets: batched map on the arrow format, in process and with num_proc=2 (forked)
# ------------------------------------------------------------------------------------------

def test_hf_datasets_batched_map(hh_raw, hh_pairs):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset(hh_raw).with_format("arrow")
    for num_proc in (None, 2):
        out = ds.map(process, batched=True, batch_size=64, fn_kwargs={"steps": ROW_STEPS},
                     remove_columns=ds.column_names, num_proc=num_proc)
        assert canonical(out.data.table) == canonical(hh_pairs)


# ------------------------------------------------------------------------------------------
# Ray: a real local cluster on loopback
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_ray_map_batches_and_map_groups(ray_cluster, hh_raw, hh_pairs):
    ray = ray_cluster
    ds = ray.data.from_arrow(blocks(hh_raw, 4))
    pairs = ds.map_batches(process, fn_kwargs={"steps": ROW_STEPS}, batch_format="pyarrow", batch_size=64)
    got = pa.Table.from_pylist(pairs.take_all())
    assert canonical(got) == canonical(hh_pairs)

    # Curriculum: stages per prompt group, then Ray's distributed sort = prefops.curriculum.
    # 60 ImageReward prompts with up to 8 pairs each: several stages, few groups to schedule.
    ir_pairs = prefops.prep(prefops.convert(prefops.sample_path("imagereward")).table.slice(0, 60),
                            strategy="best_vs_each").table
    staged = (ray.data.from_arrow(blocks(ir_pairs, 3)).groupby("prompt_id")
              .map_groups(process, fn_kwargs={"steps": [CurriculumScores(stages=True)]}, batch_format="pyarrow")
              .sort(list(CURRICULUM_SORT_KEY)))
    expected = prefops.curriculum(ir_pairs).table
    assert max(expected.column("stage").to_pylist()) >= 3
    got = pa.Table.from_pylist(staged.take_all()).drop_columns(["curriculum_key"])
    assert got.select(expected.column_names).to_pylist() == expected.to_pylist()


def test_ray_fifa_and_curriculum_order(ray_cluster, hh_pairs):
    ray = ray_cluster
    pairs = ray.data.from_arrow(blocks(hh_pairs, 4))
    prompts = sorted(set(hh_pairs.column("prompt_id").to_pylist()))
    emb = np.random.default_rng(0).standard_normal((len(prompts), 8)).astype(np.float32)
    expected = prefops.fifa_filter(hh_pairs, emb, prompt_ids=prompts, k=3, keep_fraction=0.25, alpha=0.5).table

    radii = fifa_radii(emb, prompt_ids=prompts, k=3)  # global, small: broadcast with the step
    scored = pairs.map_batches(process, fn_kwargs={"steps": [FifaScores(radii=radii, alpha=0.5)]},
                               batch_format="pyarrow", batch_size=50).materialize()
    collected = ray.get(scored.select_columns(["importance", "pair_id"]).to_arrow_refs())  # two narrow columns
    cut = fifa_cut(collected, keep_fraction=0.25)
    kept = scored.map_batches(process, fn_kwargs={"steps": [FifaKeep(cut)]}, batch_format="pyarrow")
    got = pa.Table.from_pylist(kept.take_all())
    assert canonical(got, expected.column_names) == canonical(expected)

    # Curriculum, global schedule, via the collected score columns.
    scores = pairs.map_batches(process, fn_kwargs={"steps": [CurriculumScores()]}, batch_format="pyarrow")
    order = curriculum_order(ray.get(scores.select_columns(["prompt_id", "pair_id", "curriculum_key"]).to_arrow_refs()),
                             schedule="global")
    ordered = (scores.map_batches(process, fn_kwargs={"steps": [ApplyCurriculum(order)]}, batch_format="pyarrow")
               .sort("curriculum_position"))
    expected = prefops.curriculum(hh_pairs, schedule="global").table
    got = pa.Table.from_pylist(ordered.take_all())
    assert got.select(expected.column_names).to_pylist() == expected.to_pylist()


# ------------------------------------------------------------------------------------------
# Spark: mapInArrow on a local[2] session
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark")
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        pytest.skip("Spark needs a Java runtime (17+): none on PATH and no JAVA_HOME")
    from pyspark.sql import SparkSession

    env = worker_env()
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PYSPARK_PYTHON")}
    os.environ.update(env)
    os.environ["PYSPARK_PYTHON"] = os.environ.get("PYSPARK_PYTHON") or sys.executable
    session = (SparkSession.builder.master("local[2]").appName("prefops-test")
               .config("spark.ui.enabled", "false").config("spark.driver.host", "127.0.0.1")
               .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_spark_map_in_arrow(spark, hh_raw, hh_pairs):
    from pyspark.sql.pandas.types import from_arrow_schema

    df = spark.createDataFrame(hh_raw).repartition(3)  # a pyarrow.Table in (Spark 4)
    schema = hh_pairs.schema
    out = df.mapInArrow(lambda it: process_batches(it, ROW_STEPS, schema=schema), from_arrow_schema(schema))
    got = out.toArrow()
    assert canonical(got.cast(schema)) == canonical(hh_pairs)


# ------------------------------------------------------------------------------------------
# README: the scale-out snippets run as written (on the cluster and session above)
# ------------------------------------------------------------------------------------------

def test_readme_scale_out_snippets(ray_cluster, spark, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Scale-out", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    assert len(code) >= 3, "the Scale-out section lost its snippets"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in code:
        exec(compile(block, "README.md (Scale-out)", "exec"), namespace)
