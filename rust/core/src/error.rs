//! Errors that name the file, the line or row, and the field.

use std::fmt;
use std::path::PathBuf;

/// Where a record sits in its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    /// 1-based line of a JSONL file.
    Line(u64),
    /// 0-based element of a JSON array file.
    Record(u64),
    /// 0-based row of a Parquet file or Arrow table.
    Row(u64),
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::Line(n) => write!(f, "line {n}"),
            Loc::Record(n) => write!(f, "record {n}"),
            Loc::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// The kind of a bad record; also the key under which skipped records are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Problem {
    MalformedJson,
    MissingField,
    WrongType,
    NonFiniteScore,
    EmptyResponse,
    EmptyPrompt,
    SingleResponse,
    LengthMismatch,
    NoPromptBoundary,
    /// Two records share a prompt id but not the prompt (only when grouping by prompt).
    PromptIdConflict,
}

impl Problem {
    pub fn key(self) -> &'static str {
        match self {
            Problem::MalformedJson => "malformed_json",
            Problem::MissingField => "missing_field",
            Problem::WrongType => "wrong_type",
            Problem::NonFiniteScore => "non_finite_score",
            Problem::EmptyResponse => "empty_response",
            Problem::EmptyPrompt => "empty_prompt",
            Problem::SingleResponse => "single_response",
            Problem::LengthMismatch => "length_mismatch",
            Problem::NoPromptBoundary => "no_prompt_boundary",
            Problem::PromptIdConflict => "prompt_id_conflict",
        }
    }
}

/// One bad record: what is wrong and where.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordError {
    pub loc: Loc,
    pub field: Option<String>,
    pub problem: Problem,
    pub message: String,
}

impl RecordError {
    pub fn new(problem: Problem, field: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        RecordError { loc: Loc::Row(0), field: field.into(), problem, message: message.into() }
    }

    pub fn at(mut self, loc: Loc) -> Self {
        self.loc = loc;
        self
    }

    /// "line 12, field 'completions[1].overall_score': must be a number, got string "7""
    pub fn describe(&self) -> String {
        match &self.field {
            Some(field) => format!("{}, field '{}': {}", self.loc, field, self.message),
            None => format!("{}: {}", self.loc, self.message),
        }
    }
}

#[derive(Debug)]
pub enum PrepError {
    /// A bad record in strict mode.
    Record { source: String, error: RecordError },
    Io { path: PathBuf, error: std::io::Error },
    Parquet { path: String, message: String },
    /// Bad options, unknown format, or an output that cannot hold the data.
    Config(String),
    /// Output schema conflict found while writing (e.g. a column changed type).
    Schema { source: String, loc: Loc, message: String },
    /// A table lacks a column a step needs, or a column has the wrong type.
    Column { source: String, message: String },
    Interrupted,
}

impl fmt::Display for PrepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrepError::Record { source, error } => write!(f, "{source}: {}", error.describe()),
            PrepError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            PrepError::Parquet { path, message } => write!(f, "{path}: {message}"),
            PrepError::Config(msg) => f.write_str(msg),
            PrepError::Schema { source, loc, message } => write!(f, "{source}: {loc}: {message}"),
            PrepError::Column { source, message } => write!(f, "{source}: {message}"),
            PrepError::Interrupted => f.write_str("interrupted; no output was written"),
        }
    }
}

impl std::error::Error for PrepError {}

impl PrepError {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        PrepError::Io { path: path.into(), error }
    }
}

pub type Result<T, E = PrepError> = std::result::Result<T, E>;
