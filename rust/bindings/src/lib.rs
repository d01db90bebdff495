//! Python bindings of prefops-core. Only conversions live here: the work is in the core,
//! run with the GIL released.

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3_arrow::input::AnyRecordBatch;
use pyo3_arrow::PyTable;

use prefops_core::{
    pipeline, Format, Input, Output, OutputKind, PairOptions, PrepError, PrepOptions, ReadOptions, Strategy,
    TiePolicy,
};

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
        PrepError::Record { .. } | PrepError::Schema { .. } | PrepError::Parquet { .. } => {
            DataError::new_err(e.to_string())
        }
    }
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
    dry_run=false, chunk_bytes=4194304, batch_rows=8192
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
) -> PyResult<(Option<Bound<'py, PyAny>>, String)> {
    if !min_margin.is_finite() || min_margin < 0.0 {
        return Err(PyValueError::new_err(format!("min_margin must be a finite number >= 0, got {min_margin}")));
    }
    if max_pairs_per_prompt == Some(0) {
        return Err(PyValueError::new_err("max_pairs_per_prompt must be at least 1"));
    }
    let opts = PrepOptions {
        read: ReadOptions { format: format.map(parse::<Format>).transpose()?, column_map, score_field },
        pairs: PairOptions {
            strategy: parse::<Strategy>(strategy)?,
            min_margin,
            ties: parse::<TiePolicy>(ties)?,
            dedupe,
            max_pairs_per_prompt,
            seed,
        },
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
    // Ctrl-C: the run polls this between chunks; Python runs its signal handlers here.
    let interrupted = || Python::attach(|py| py.check_signals().is_err());
    let report = py.detach(|| pipeline::prep(input, &out, &opts, &interrupted)).map_err(to_py_err)?;
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

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(prep, m)?)?;
    m.add_function(wrap_pyfunction!(detect_format, m)?)?;
    m.add("DataError", m.py().get_type::<DataError>())?;
    m.add("THREADS_ENV", prefops_core::THREADS_ENV)?;
    m.add("FORMATS", prefops_core::formats::ALL_FORMATS.iter().map(|f| f.name()).collect::<Vec<_>>())?;
    m.add("STRATEGIES", Strategy::ALL.iter().map(|s| s.name()).collect::<Vec<_>>())?;
    Ok(())
}
