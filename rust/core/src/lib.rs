//! prefops-core: preference-data preparation with no Python types.
//!
//! Read rated preference data in any of the common schemas, normalise it into one grouped
//! layout (a prompt and its rated responses), make training pairs, and write TRL-ready
//! JSONL or Parquet — streaming, in parallel, deterministic for a seed.

pub mod arrow_groups;
pub mod arrow_in;
pub mod arrow_out;
pub mod error;
pub mod formats;
pub mod io;
pub mod json;
pub mod knn;
pub mod model;
pub mod output;
pub mod pairs;
pub mod parquet_out;
pub mod pipeline;
pub mod rng;
pub mod stats;
pub mod steps;
pub mod threads;
pub mod value;

pub use error::{Loc, PrepError, Problem, RecordError};
pub use formats::{Format, ReadOptions};
pub use io::Output;
pub use output::OutputKind;
pub use pairs::{PairOptions, Strategy, TiePolicy};
pub use pipeline::{prep, Input, PrepOptions, PrepReport, THREADS_ENV};
pub use stats::Stats;
pub use value::Value;

mod columnar;
pub mod list_output;
pub mod lists;
pub use lists::{LabelKind, ListOptions, Truncate};
