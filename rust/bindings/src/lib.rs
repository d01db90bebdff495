//! Python bindings of prefops-core. Only conversions live here: the work is in the core,
//! run with the GIL released.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

mod give_back;

use pyo3::create_exception;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3_arrow::input::AnyRecordBatch;
use pyo3_arrow::PyTable;
use pyo3_arrow::PyArray;
use arrow_array::Array as _;

use prefops_core::steps::{self, augment, curriculum as cur, flip, tokenize as tok, Table};
use prefops_core::knn as knn_core;
use prefops_core::steps::fifa as fifa_core;
use prefops_core::{
    pipeline, Format, Input, Output, OutputKind, PairOptions, PrepError, PrepOptions, ReadOptions, Strategy,
    TiePolicy,
};
use prefops_core::{LabelKind, ListOptions, Truncate as ListTruncate};

// Prep allocates many small objects from several threads; mimalloc is markedly faster than
// glibc malloc there. Only Rust allocations use it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(_native, DataError, PyValueError, "Bad input data: names the source, line or row, and field.");

fn to_py_err(e: PrepError) -> PyErr {
    match e {
        PrepError::Io { .. } => PyOSError::new_err(e.to_string()),
        PrepError::Interrupted => PyKeyboardInterrupt::new_err(e.to_string()),
        PrepError::Config(_) => PyValueError::new_err(e.to_string()),
        PrepError::Record { .. } | PrepError::Schema { .. } | PrepError::Parquet { .. } | PrepError::Column { .. } => {
            DataError::new_err(e.to_string())
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// The first panic of a detached run, with its location. A panic in a nested worker thread
/// reaches `run_detached` only as "a scoped thread panicked" (std re-panics on join), so the
/// root cause is recorded by a panic hook as it happens.
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn record_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
            if first.is_none() {
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                *first = Some(format!("{}{at}", panic_message(info.payload())));
            }
            drop(first);
            previous(info); // still printed on stderr as before
        }));
    });
}

/// A Rust panic must not take the Python process down or escape as PanicException (a
/// BaseException that `except Exception` misses): it becomes a RuntimeError naming the
/// first panic's message and location.
fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let recorded = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    PyRuntimeError::new_err(format!(
        "prefops internal error (a bug; please report it with the input that caused it): {}; no output was written",
        recorded.unwrap_or_else(|| panic_message(payload.as_ref()))
    ))
}

/// Run `work` without the GIL on a worker thread while this thread watches for Ctrl-C: on
/// SIGINT the step's cancellation flag is set, the step stops within one slice, writes
/// nothing, and KeyboardInterrupt is raised. Panics become RuntimeError.
fn run_detached<T: Send>(py: Python<'_>, work: impl FnOnce() -> Result<T, PrepError> + Send) -> PyResult<T> {
    record_panics();
    FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    let flag = Arc::new(AtomicBool::new(false));
    let _running = give_back::call();
    let outcome = py.detach(|| {
        prefops_core::threads::scope(|s| {
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let worker_flag = flag.clone();
            let handle = s.spawn(move || {
                let r = steps::cancel::scope(worker_flag, work);
                let _ = done_tx.send(());
                r
            });
            // Returns at once when the work ends (or its sender is dropped by a panic).
            while let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(Duration::from_millis(50)) {
                if Python::attach(|py| py.check_signals().is_err()) {
                    flag.store(true, Ordering::Relaxed);
                }
            }
            handle.join()
        })
    });
    match outcome {
        Ok(r) => r.map_err(to_py_err),
        Err(payload) => Err(panic_error(payload)),
    }
}

/// Test hook: panics inside a worker thread of a detached run, as a bug in a step would.
#[pyfunction]
fn _panic_for_tests(py: Python<'_>) -> PyResult<()> {
    run_detached(py, || {
        prefops_core::threads::scope(|s| {
            s.spawn(|| panic!("deliberate test panic"));
        });
        Ok(())
    })
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> PyResult<T> {
    s.parse().map_err(PyValueError::new_err)
}

/// Run prep. `source` is a path or any Arrow table/stream (PyCapsule interface); `output` a
/// .jsonl/.jsonl.gz/.parquet path, or None to get a pyarrow.Table back.
/// Returns (table or None, report as JSON text).
#[pyfunction]
#[pyo3(signature = (
    source, output=None, *, format=None, column_map=Vec::new(), score_field=None,
    strategy="best_vs_worst", min_margin=0.0, ties="drop", dedupe=true, max_pairs_per_prompt=None,
    seed=0, kind=None, skip_invalid=false, group_by_prompt=false, threads=0, progress=false,
    dry_run=false, chunk_bytes=4194304, batch_rows=8192,
    list_size=None, label="dense_rank", truncate="top", min_size=2, extra_columns=true
))]
#[allow(clippy::too_many_arguments)]
fn prep<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    format: Option<&str>,
    column_map: Vec<(String, String)>,
    score_field: Option<String>,
    strategy: &str,
    min_margin: f64,
    ties: &str,
    dedupe: bool,
    max_pairs_per_prompt: Option<usize>,
    seed: u64,
    kind: Option<&str>,
    skip_invalid: bool,
    group_by_prompt: bool,
    threads: usize,
    progress: bool,
    dry_run: bool,
    chunk_bytes: usize,
    batch_rows: usize,
    list_size: Option<usize>,
    label: &str,
    truncate: &str,
    min_size: usize,
    extra_columns: bool,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let lists = ListOptions {
        list_size,
        label: parse::<LabelKind>(label)?,
        truncate: parse::<ListTruncate>(truncate)?,
        min_size,
        dedupe,
        seed,
    };
    lists.validate(None).map_err(PyValueError::new_err)?;
    if !min_margin.is_finite() || min_margin < 0.0 {
        return Err(PyValueError::new_err(format!("min_margin must be a finite number >= 0, got {min_margin}")));
    }
    if max_pairs_per_prompt == Some(0) {
        return Err(PyValueError::new_err("max_pairs_per_prompt must be at least 1"));
    }
    let opts = PrepOptions {
        read: ReadOptions {
            format: format.map(parse::<Format>).transpose()?,
            column_map,
            score_field,
            drop_extra: !extra_columns,
        },
        pairs: PairOptions {
            strategy: parse::<Strategy>(strategy)?,
            min_margin,
            ties: parse::<TiePolicy>(ties)?,
            dedupe,
            max_pairs_per_prompt,
            seed,
        },
        lists,
        kind: kind.map(parse::<OutputKind>).transpose()?,
        skip_invalid,
        group_by_prompt,
        threads,
        progress,
        chunk_bytes: chunk_bytes.max(1),
        batch_rows: batch_rows.max(1),
    };
    let input = if let Ok(path) = source.extract::<PathBuf>() {
        Input::File(path)
    } else {
        let any: AnyRecordBatch = source.extract().map_err(|_| {
            PyValueError::new_err(format!(
                "source must be a path or an Arrow table/stream (pyarrow, polars, datasets...), got {}",
                source.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        let reader = any.into_reader()?;
        let batches = reader.map(|b| b.map_err(|e| PrepError::Config(format!("<arrow>: {e}"))));
        Input::Batches { name: "<arrow>".to_string(), batches: Box::new(batches), total_rows: None }
    };
    let out = match (dry_run, output) {
        (true, _) => Output::Discard,
        (false, Some(p)) => Output::File(p),
        (false, None) => Output::Memory,
    };
    let memory = matches!(out, Output::Memory);
    // Ctrl-C sets the run's cancellation flag (run_detached), which the pipeline polls between chunks.
    let report = run_detached(py, move || pipeline::prep(input, &out, &opts, &|| steps::cancel::check().is_err()))?;
    let summary = serde_json::json!({
        "format": report.format.name(),
        "kind": report.kind.name(),
        "threads": report.threads,
        "seconds": report.seconds,
        "stats": report.stats,
    });
    let table = if memory {
        let schema = report.schema.clone().expect("memory output has a schema");
        Some(PyTable::try_new(report.batches, schema)?.into_pyarrow(py)?)
    } else {
        None
    };
    Ok((table, summary.to_string()))
}

/// The format detected for a record given as JSON text (for tools and tests).
#[pyfunction]
fn detect_format(record_json: &str) -> PyResult<String> {
    let v: prefops_core::Value = serde_json::from_str(record_json).map_err(|e| PyValueError::new_err(e.to_string()))?;
    Format::detect(&v).map(|f| f.name().to_string()).map_err(PyValueError::new_err)
}

/// A path (read by the core) or any Arrow table/stream, as a step's input table.
enum StepInput {
    Path(PathBuf),
    Reader(Box<dyn arrow_array::RecordBatchReader + Send>),
}

fn step_input(source: &Bound<'_, PyAny>) -> PyResult<StepInput> {
    if let Ok(path) = source.extract::<PathBuf>() {
        return Ok(StepInput::Path(path));
    }
    let any: AnyRecordBatch = source.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "source must be a path or an Arrow table/stream (pyarrow, polars, datasets...), got {}",
            source.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    Ok(StepInput::Reader(any.into_reader()?))
}

/// Runs without the GIL.
fn load(input: StepInput, threads: usize) -> Result<Table, PrepError> {
    load_noting(input, threads).map(|(table, _)| table)
}

/// [`load`], and the JSON columns read as text because their values mix kinds.
fn load_noting(input: StepInput, threads: usize) -> Result<(Table, Vec<steps::MixedColumn>), PrepError> {
    match input {
        StepInput::Path(p) => steps::read_table_noting(&p, threads),
        StepInput::Reader(reader) => {
            let schema = reader.schema();
            let batches = reader
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| PrepError::Config(format!("<arrow>: reading the input stream: {e}")))?;
            Ok((Table::new("<arrow>", schema, batches)?, Vec::new()))
        }
    }
}

/// What a step returns to Python: the table (when not written) and a JSON report.
fn step_result<'py>(
    py: Python<'py>,
    step: &str,
    table: Option<Table>,
    outputs: &[PathBuf],
    threads: usize,
    seconds: f64,
    stats: serde_json::Value,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let report = serde_json::json!({
        "step": step,
        "threads": threads,
        "seconds": seconds,
        "outputs": outputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "stats": stats,
    });
    let table = match table {
        Some(t) => Some(PyTable::try_new(t.batches, t.schema)?.into_pyarrow(py)?),
        None => None,
    };
    Ok((table, report.to_string()))
}

/// What a step's work gives back: its table, the files to write (path, table), its stats.
type StepOutput = (Table, Vec<(PathBuf, Table)>, serde_json::Value);
/// run_step's result: the table (when no file was written), the files, threads, seconds, stats.
type StepRun = (Option<Table>, Vec<PathBuf>, usize, f64, serde_json::Value);

fn run_step(
    py: Python<'_>,
    source: &Bound<'_, PyAny>,
    threads: usize,
    work: impl FnOnce(Table, usize) -> Result<StepOutput, PrepError> + Send,
) -> PyResult<StepRun> {
    let input = step_input(source)?;
    let threads = pipeline::resolve_threads(threads);
    let start = std::time::Instant::now();
    let (table, files, stats) = run_detached(py, move || {
        let (table, mixed) = load_noting(input, threads)?;
        let (out, files, mut stats) = work(table, threads)?;
        // Every step reports them: any step reading JSON may have read a column as text.
        if let serde_json::Value::Object(map) = &mut stats {
            map.insert("mixed_type_columns".into(), to_json(&mixed));
        }
        if files.is_empty() {
            return Ok((Some(out), Vec::new(), stats));
        }
        let refs: Vec<(PathBuf, &Table)> = files.iter().map(|(p, t)| (p.clone(), t)).collect();
        steps::write_tables(&refs, threads)?;
        Ok::<_, PrepError>((None, files.into_iter().map(|(p, _)| p).collect(), stats))
    })?;
    Ok((table, files, threads, start.elapsed().as_secs_f64(), stats))
}

/// The step's one output file, when a path was given (else the table goes back to Python).
fn one_file(output: Option<PathBuf>, table: &Table) -> Vec<(PathBuf, Table)> {
    output.map(|p| vec![(p, table.clone())]).unwrap_or_default()
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("stats serialise")
}

/// Curry-DPO curriculum order / stages. Returns (table or None, report JSON).
#[pyfunction]
#[pyo3(signature = (source, output=None, *, by="margin", descending_is_easy=true, schedule="stages",
                    split_stages=false, threads=0))]
#[allow(clippy::too_many_arguments)]
fn curriculum<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    by: &str,
    descending_is_easy: bool,
    schedule: &str,
    split_stages: bool,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let schedule = parse::<cur::Schedule>(schedule)?;
    if split_stages && (output.is_none() || schedule != cur::Schedule::Stages) {
        return Err(PyValueError::new_err("split_stages needs an output path and schedule='stages'"));
    }
    let opts = cur::CurriculumOptions { by: by.to_string(), descending_is_easy, schedule, threads };
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let r = cur::curriculum(&t, &cur::CurriculumOptions { threads, ..opts })?;
        let files = match output {
            None => Vec::new(),
            Some(p) if split_stages => {
                r.stage_tables().into_iter().enumerate().map(|(i, t)| (steps::stage_path(&p, i), t)).collect()
            }
            Some(p) => vec![(p, r.table.clone())],
        };
        Ok((r.table, files, to_json(&r.stats)))
    })?;
    step_result(py, "curriculum", table, &files, threads, seconds, stats)
}

/// Label flipping (F-DPO factuality rule, reward disagreement, seeded random). Returns
/// (table or None, report JSON).
#[pyfunction]
#[pyo3(signature = (source, output=None, *, factual_columns=None, factual_one_means="hallucinated",
                    detect_factual=false, reward_columns=None, reward_min_gap=0.0, rate=None, seed=0, threads=0))]
#[allow(clippy::too_many_arguments)]
fn flip_labels<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    factual_columns: Option<(String, String)>,
    factual_one_means: &str,
    detect_factual: bool,
    reward_columns: Option<(String, String)>,
    reward_min_gap: f64,
    rate: Option<f64>,
    seed: u64,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let one_means = match factual_one_means {
        "hallucinated" => flip::LabelMeaning::Hallucinated,
        "factual" => flip::LabelMeaning::Factual,
        other => return Err(PyValueError::new_err(format!("factual_one_means must be 'hallucinated' or 'factual', got '{other}'"))),
    };
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let factual = match (factual_columns, detect_factual) {
            (Some((c, r)), _) => Some(flip::FactualRule { chosen: c, rejected: r, one_means }),
            (None, true) => Some(flip::FactualRule::detect(&t)?),
            (None, false) => None,
        };
        let opts = flip::FlipOptions {
            factual,
            reward: reward_columns.map(|(c, r)| flip::RewardRule { chosen: c, rejected: r, min_gap: reward_min_gap }),
            random: rate.map(|rate| flip::RandomFlip { rate, seed }),
            threads,
        };
        let (out, stats) = flip::flip_labels(&t, &opts)?;
        let files = one_file(output, &out);
        Ok((out, files, to_json(&stats)))
    })?;
    step_result(py, "flip", table, &files, threads, seconds, stats)
}

/// Reward-augmented relabeling. Returns (table or None, report JSON).
#[pyfunction]
#[pyo3(signature = (source, output=None, *, template=None, score_columns=None, threads=0))]
fn reward_augment<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    template: Option<String>,
    score_columns: Option<(String, String)>,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let mut opts = augment::AugmentOptions::default();
    if let Some(t) = template {
        augment::Template::parse(&t).map_err(PyValueError::new_err)?;
        opts.template = t;
    }
    if let Some((c, r)) = score_columns {
        opts.score_chosen = c;
        opts.score_rejected = r;
    }
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let (out, stats) = augment::reward_augment(&t, &augment::AugmentOptions { threads, ..opts })?;
        let files = one_file(output, &out);
        Ok((out, files, to_json(&stats)))
    })?;
    step_result(py, "augment", table, &files, threads, seconds, stats)
}

/// Token ids, completion masks, LD-DPO shared lengths and TAB-PO differing-token masks from a
/// local tokenizer.json. `eos`: "auto" (tokenizer_config.json beside it), "off", or "token"
/// with `eos_token`; `split`: "joint" (TRL 1.16) or "separate". Returns (table or None, report
/// JSON).
#[pyfunction]
#[pyo3(signature = (source, output=None, *, tokenizer, add_special_tokens=true, eos="auto", eos_token=None,
                    split="joint", max_prompt_length=None, max_completion_length=None, threads=0))]
#[allow(clippy::too_many_arguments)]
fn tokenize<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    tokenizer: PathBuf,
    add_special_tokens: bool,
    eos: &str,
    eos_token: Option<String>,
    split: &str,
    max_prompt_length: Option<usize>,
    max_completion_length: Option<usize>,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let split = parse::<tok::Split>(split)?;
    let eos = match (eos, eos_token) {
        ("auto", None) => tok::Eos::Auto,
        ("off", None) => tok::Eos::Off,
        ("token", Some(t)) => tok::Eos::Token(t),
        (mode, t) => return Err(PyValueError::new_err(format!("bad EOS choice: {mode} with token {t:?}"))),
    };
    let opts = tok::TokenizeOptions {
        add_special_tokens,
        eos,
        split,
        max_prompt_length,
        max_completion_length,
        threads,
        ..tok::TokenizeOptions::new(tokenizer)
    };
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let (out, stats) = tok::tokenize_pairs(&t, &tok::TokenizeOptions { threads, ..opts })?;
        let files = one_file(output, &out);
        Ok((out, files, to_json(&stats)))
    })?;
    step_result(py, "tokenize", table, &files, threads, seconds, stats)
}

/// Rewrite a table as JSONL / JSONL.gz / Parquet, every column kept. Returns (table or None,
/// report JSON).
#[pyfunction]
#[pyo3(signature = (source, output=None, *, threads=0))]
fn convert<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    output: Option<PathBuf>,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, _| {
        let stats = to_json(&steps::TableStats::of(&t));
        let files = one_file(output, &t);
        Ok((t, files, stats))
    })?;
    step_result(py, "convert", table, &files, threads, seconds, stats)
}

/// A score as reward augmentation prints it (for tests and tools).
#[pyfunction]
fn format_score(x: f64) -> String {
    augment::format_score(x)
}

fn knn_search_mode(mode: &str, nlist: usize, nprobe: usize, seed: u64) -> PyResult<knn_core::Search> {
    match mode {
        "exact" => Ok(knn_core::Search::Exact),
        "ivf" => Ok(knn_core::Search::Ivf(knn_core::IvfOptions { nlist, nprobe, seed })),
        other => Err(PyValueError::new_err(format!("unknown kNN search '{other}'; expected exact or ivf"))),
    }
}

/// FiFA filtering. `embeddings`: a path or Arrow table with prompt_id + embedding column, or
/// None to read the embedding column of the pairs. Returns (table or None, report JSON).
#[pyfunction]
#[pyo3(signature = (source, embeddings=None, output=None, *, alpha=1.0, gamma=1.0, k=5, metric="cosine",
                    knn="exact", nlist=0, nprobe=0, seed=0, keep_count=None, keep_fraction=None,
                    margin_column="margin".to_string(), quality_column=None, embedding_column="embedding".to_string(),
                    distance_floor=1e-6, threads=0))]
#[allow(clippy::too_many_arguments)]
fn fifa<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    embeddings: Option<&Bound<'py, PyAny>>,
    output: Option<PathBuf>,
    alpha: f64,
    gamma: f64,
    k: usize,
    metric: &str,
    knn: &str,
    nlist: usize,
    nprobe: usize,
    seed: u64,
    keep_count: Option<u64>,
    keep_fraction: Option<f64>,
    margin_column: String,
    quality_column: Option<String>,
    embedding_column: String,
    distance_floor: f64,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let keep = match (keep_count, keep_fraction) {
        (Some(c), None) => fifa_core::Keep::Count(c),
        (None, Some(f)) => fifa_core::Keep::Fraction(f),
        _ => return Err(PyValueError::new_err("give exactly one of keep_count and keep_fraction")),
    };
    let opts = fifa_core::FifaOptions {
        alpha,
        gamma,
        k,
        metric: parse::<knn_core::Metric>(metric)?,
        search: knn_search_mode(knn, nlist, nprobe, seed)?,
        keep,
        margin_column,
        quality_column,
        embedding_column,
        distance_floor,
        threads,
    };
    let embeddings = embeddings.map(step_input).transpose()?;
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let emb = embeddings.map(|e| load(e, threads)).transpose()?;
        let (out, stats) = fifa_core::fifa(&t, emb.as_ref(), &fifa_core::FifaOptions { threads, ..opts })?;
        let files = one_file(output, &out);
        Ok((out, files, to_json(&stats)))
    })?;
    step_result(py, "fifa", table, &files, threads, seconds, stats)
}

/// Global part of FiFA for batch engines: ρ_k of every prompt embedding, as a table
/// (`prompt_id`, `knn_distance`, `log_distance`) small enough to broadcast. `from_pairs`: the
/// table is a pairs table's prompt ids and embeddings (a prompt may repeat with the same vector).
/// Returns (table, report JSON).
#[pyfunction]
#[pyo3(signature = (embeddings, *, from_pairs=false, k=5, metric="cosine", knn="exact", nlist=0, nprobe=0, seed=0,
                    embedding_column="embedding".to_string(), distance_floor=1e-6, threads=0))]
#[allow(clippy::too_many_arguments)]
fn fifa_radii<'py>(
    py: Python<'py>,
    embeddings: &Bound<'py, PyAny>,
    from_pairs: bool,
    k: usize,
    metric: &str,
    knn: &str,
    nlist: usize,
    nprobe: usize,
    seed: u64,
    embedding_column: String,
    distance_floor: f64,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let opts = fifa_core::FifaOptions {
        k,
        metric: parse::<knn_core::Metric>(metric)?,
        search: knn_search_mode(knn, nlist, nprobe, seed)?,
        embedding_column,
        distance_floor,
        ..Default::default()
    };
    let (table, files, threads, seconds, stats) = run_step(py, embeddings, threads, move |t, threads| {
        let opts = fifa_core::FifaOptions { threads, ..opts };
        let emb = if from_pairs {
            fifa_core::PromptEmbeddings::from_pairs(&t, &opts.embedding_column, opts.metric)?
        } else {
            fifa_core::PromptEmbeddings::from_table(&t, &opts.embedding_column, opts.metric)?
        };
        let radii = fifa_core::prompt_radii(&emb, &opts)?;
        let stats = serde_json::json!({
            "prompts": emb.ids.len(),
            "embedding_dim": emb.dim,
            "duplicate_embeddings": radii.duplicates,
            "floored_prompts": radii.floored,
            "knn": radii.info,
        });
        Ok((fifa_core::radii_table(&emb, &radii)?, Vec::new(), stats))
    })?;
    step_result(py, "fifa_radii", table, &files, threads, seconds, stats)
}

/// Per-batch part of FiFA: every row with `importance` and `knn_distance` added, given the
/// radii table of `fifa_radii`. Returns (table, report JSON).
#[pyfunction]
#[pyo3(signature = (source, radii, *, alpha=1.0, gamma=1.0, margin_column="margin".to_string(), quality_column=None,
                    threads=0))]
#[allow(clippy::too_many_arguments)]
fn fifa_scores<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    radii: &Bound<'py, PyAny>,
    alpha: f64,
    gamma: f64,
    margin_column: String,
    quality_column: Option<String>,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let opts = fifa_core::FifaOptions { alpha, gamma, margin_column, quality_column, ..Default::default() };
    let radii = step_input(radii)?;
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let radii = fifa_core::PromptRadii::from_table(&load(radii, threads)?)?;
        let out = fifa_core::score_table(&t, &radii, &fifa_core::FifaOptions { threads, ..opts })?;
        Ok((out, Vec::new(), serde_json::json!({ "rows": t.num_rows() })))
    })?;
    step_result(py, "fifa_scores", table, &files, threads, seconds, stats)
}

/// Global selection of FiFA: the cut keeping the top rows of a scores table (`importance`,
/// `pair_id`) by count or fraction, ties by pair id. Returns JSON {rows, kept, cut} with cut
/// null (nothing kept) or {importance, pair_id}.
#[pyfunction]
#[pyo3(signature = (scores, *, keep_count=None, keep_fraction=None, threads=0))]
fn fifa_cut(
    py: Python<'_>,
    scores: &Bound<'_, PyAny>,
    keep_count: Option<u64>,
    keep_fraction: Option<f64>,
    threads: usize,
) -> PyResult<String> {
    let keep = match (keep_count, keep_fraction) {
        (Some(c), None) => fifa_core::Keep::Count(c),
        (None, Some(f)) => fifa_core::Keep::Fraction(f),
        _ => return Err(PyValueError::new_err("give exactly one of keep_count and keep_fraction")),
    };
    let input = step_input(scores)?;
    let threads = pipeline::resolve_threads(threads);
    run_detached(py, move || {
        let t = load(input, threads)?;
        let source = t.source.as_str();
        let ii = t.column_index("importance", "made by the per-batch FiFA scores")?;
        let pi = t.column_index("pair_id", "ties in importance are broken by pair id")?;
        let mut importance = Vec::with_capacity(t.num_rows());
        let mut ids = Vec::with_capacity(t.num_rows());
        for b in &t.batches {
            let imp = steps::numeric_array(b.column(ii), "importance", source, "the FiFA importance")?;
            if imp.null_count() > 0 {
                return Err(PrepError::Config(format!("{source}: column 'importance' has nulls")));
            }
            importance.extend_from_slice(imp.values());
            let pid = steps::text_array(b.column(pi), "pair_id", source, "ties in importance are broken by pair id")?;
            ids.extend(pid.iter().map(|x| x.map(str::to_string)));
        }
        let n = importance.len();
        let kept = keep.rows(n)?;
        let cut = fifa_core::top_cut(&importance, &arrow_array::StringArray::from(ids), kept, source)?;
        Ok(serde_json::json!({ "rows": n, "kept": kept, "cut": cut }).to_string())
    })
}

/// Per-batch filter of FiFA: the rows a cut keeps (cut = (importance, pair_id) or None for
/// none), in input order. Returns (table, report JSON).
#[pyfunction]
#[pyo3(signature = (source, cut, *, threads=0))]
fn fifa_keep<'py>(
    py: Python<'py>,
    source: &Bound<'py, PyAny>,
    cut: Option<(f64, Option<String>)>,
    threads: usize,
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    let cut = cut.map(|(importance, pair_id)| fifa_core::Cut { importance, pair_id });
    let (table, files, threads, seconds, stats) = run_step(py, source, threads, move |t, threads| {
        let out = fifa_core::keep_rows(&t, cut.as_ref(), threads)?;
        let stats = serde_json::json!({ "rows": t.num_rows(), "kept": out.num_rows() });
        Ok((out, Vec::new(), stats))
    })?;
    step_result(py, "fifa_keep", table, &files, threads, seconds, stats)
}

/// k nearest neighbours of every row of a matrix (an Arrow fixed-size list of float32, one
/// list per row) among the other rows. Returns (distances, indices) as flat Arrow arrays of
/// rows * k values (float64, uint32), nearest first, and the search info as JSON.
#[pyfunction]
#[pyo3(signature = (matrix, k, *, metric="cosine", knn="exact", nlist=0, nprobe=0, seed=0, threads=0))]
#[allow(clippy::too_many_arguments)]
fn knn_search(
    py: Python<'_>,
    matrix: PyArray,
    k: usize,
    metric: &str,
    knn: &str,
    nlist: usize,
    nprobe: usize,
    seed: u64,
    threads: usize,
) -> PyResult<(Py<PyAny>, Py<PyAny>, String)> {
    let opts = knn_core::KnnOptions {
        k,
        metric: parse::<knn_core::Metric>(metric)?,
        search: knn_search_mode(knn, nlist, nprobe, seed)?,
        threads,
    };
    let (array, _) = matrix.into_inner();
    let nn = run_detached(py, move || {
        let m = knn_core::Matrix::from_arrow(array.as_ref())?;
        knn_core::knn(&m, &opts)
    })?;
    let info = serde_json::to_string(&nn.info).expect("search info serialises");
    let distances = PyArray::from_array_ref(Arc::new(arrow_array::Float64Array::from(nn.distances)));
    let indices = PyArray::from_array_ref(Arc::new(arrow_array::UInt32Array::from(nn.indices)));
    let distances = distances.to_pyarrow(py)?.unbind();
    let indices = indices.to_pyarrow(py)?.unbind();
    Ok((distances, indices, info))
}

/// Kozachenko–Leonenko kNN entropy estimate (nats) of the rows of a matrix (as for knn_search).
#[pyfunction]
#[pyo3(signature = (matrix, k=3, *, threads=0))]
fn knn_entropy(py: Python<'_>, matrix: PyArray, k: usize, threads: usize) -> PyResult<f64> {
    let (array, _) = matrix.into_inner();
    run_detached(py, move || {
        let m = knn_core::Matrix::from_arrow(array.as_ref())?;
        knn_core::entropy::kl_entropy(&m, k, threads)
    })
}

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3; the sys crate has no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory for 10 s before mimalloc hands it back to the OS (the linked mimalloc v3
/// defaults to 1 s; v2 to 10 ms).
/// A run frees and allocates multi-megabyte Arrow buffers every batch; handed back at once,
/// each one comes back as fresh pages that the kernel must fault in and zero (with
/// transparent huge pages, 2 MiB at a time). Parquet -> Parquet best_vs_each, 1M prompts,
/// 2 threads, delay 1 s -> 10 s: 88k page faults and 2.7 s of system time -> 4k and 0.7 s,
/// wall 5.8 -> 4.7 s. The memory is not kept while the extension is idle: see give_back.
/// A user's own MIMALLOC_PURGE_DELAY wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options on use and allows this at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

const PURGE_DELAY_MS: std::os::raw::c_long = 10_000;

/// The allocator's purge delay in milliseconds (for the test that pins the option index).
#[pyfunction]
fn _allocator_purge_delay_ms() -> i64 {
    // SAFETY: reads one integer option.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    tune_allocator();
    m.add_function(wrap_pyfunction!(_allocator_purge_delay_ms, m)?)?;
    m.add_function(wrap_pyfunction!(prep, m)?)?;
    m.add_function(wrap_pyfunction!(detect_format, m)?)?;
    m.add_function(wrap_pyfunction!(curriculum, m)?)?;
    m.add_function(wrap_pyfunction!(flip_labels, m)?)?;
    m.add_function(wrap_pyfunction!(reward_augment, m)?)?;
    m.add_function(wrap_pyfunction!(tokenize, m)?)?;
    m.add_function(wrap_pyfunction!(format_score, m)?)?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(_panic_for_tests, m)?)?;
    m.add_function(wrap_pyfunction!(fifa, m)?)?;
    m.add_function(wrap_pyfunction!(fifa_radii, m)?)?;
    m.add_function(wrap_pyfunction!(fifa_scores, m)?)?;
    m.add_function(wrap_pyfunction!(fifa_cut, m)?)?;
    m.add_function(wrap_pyfunction!(fifa_keep, m)?)?;
    m.add_function(wrap_pyfunction!(knn_search, m)?)?;
    m.add_function(wrap_pyfunction!(knn_entropy, m)?)?;
    m.add("AUGMENT_DEFAULT_TEMPLATE", augment::DEFAULT_TEMPLATE)?;
    m.add("AUGMENT_ULTRAFEEDBACK_TEMPLATE", augment::ULTRAFEEDBACK_TEMPLATE)?;
    m.add("DataError", m.py().get_type::<DataError>())?;
    m.add("THREADS_ENV", prefops_core::THREADS_ENV)?;
    m.add("FORMATS", prefops_core::formats::ALL_FORMATS.iter().map(|f| f.name()).collect::<Vec<_>>())?;
    m.add("STRATEGIES", Strategy::ALL.iter().map(|s| s.name()).collect::<Vec<_>>())?;
    Ok(())
}
