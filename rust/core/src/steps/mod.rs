//! Steps over the pairs table that `prep` writes (Arrow in → Arrow out), chainable and
//! deterministic for a seed:
//!
//! - [`curriculum`]: Curry-DPO easy→hard order and the iterative per-prompt stage schedule;
//! - [`flip`]: F-DPO factuality flips, reward-model disagreement flips, seeded random flips;
//! - [`augment`]: reward-augmented relabeling (each pair twice, prompt conditioned on a score);
//! - [`fifa`]: FiFA filtering (top pairs by margin + quality + kNN prompt sparsity);
//! - [`tokenize`]: token ids, completion masks, LD-DPO shared lengths, TAB-PO differing tokens.
//!
//! Every decision depends only on a row's own values (and the seed), never on batch boundaries
//! or the thread count; work is split into slices of at most [`SLICE_ROWS`] rows and run on
//! `resolve_threads(threads)` threads, results kept in input order.

pub mod augment;
pub mod cancel;
pub mod curriculum;
pub mod flip;
pub mod gather;
pub mod table;
pub mod tokenize;
pub mod fifa;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type};
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};

use crate::arrow_out::merge;
use crate::error::{Loc, PrepError, Problem, RecordError, Result};

pub use table::{read_table, read_table_noting, stage_path, write_tables, MixedColumn, Table, TableStats};

/// Rows per work slice and per output batch.
pub const SLICE_ROWS: usize = 64 * 1024;

pub(crate) fn column_error(source: &str, message: impl Into<String>) -> PrepError {
    PrepError::Column { source: source.to_string(), message: message.into() }
}

pub(crate) fn row_error(source: &str, row: u64, field: &str, problem: Problem, message: impl Into<String>) -> PrepError {
    PrepError::Record {
        source: source.to_string(),
        error: RecordError::new(problem, Some(field.to_string()), message).at(Loc::Row(row)),
    }
}

/// Run `f` over `items` on up to `threads` threads; results in input order. When several
/// items fail, the error of the first in input order is returned, whatever the thread count.
pub(crate) fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let n = items.len();
    // Checked before each item: a cancelled run stops within one item.
    let f = |x: &T| cancel::check().and_then(|_| f(x));
    if threads <= 1 || n <= 1 {
        return items.iter().map(f).collect();
    }
    let flag = cancel::current().unwrap_or_default();
    let next = AtomicUsize::new(0);
    let first_failure = AtomicUsize::new(usize::MAX);
    let slots: Vec<Mutex<Option<Result<R>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    crate::threads::scope(|s| {
        for _ in 0..threads.min(n) {
            let flag = flag.clone();
            let (next, first_failure, slots, f) = (&next, &first_failure, &slots, &f);
            s.spawn(move || cancel::scope(flag, || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || i > first_failure.load(Ordering::Relaxed) {
                    break;
                }
                let r = f(&items[i]);
                if r.is_err() {
                    first_failure.fetch_min(i, Ordering::Relaxed);
                }
                *slots[i].lock().expect("no worker panics while holding a slot") = Some(r);
            }));
        }
    });
    let mut out = Vec::with_capacity(n);
    for slot in slots {
        match slot.into_inner().expect("no worker panicked") {
            Some(r) => out.push(r?),
            None => unreachable!("an item is skipped only after an earlier one failed"),
        }
    }
    Ok(out)
}

/// The column a `*chosen*` column pairs with: every `_`-separated token `chosen` replaced by
/// `rejected` (`score_chosen` ↔ `score_rejected`, `chosen_model` ↔ `rejected_model`,
/// `ref_chosen_logps` ↔ `ref_rejected_logps`).
pub fn counterpart(name: &str) -> Option<String> {
    let tokens: Vec<&str> = name.split('_').collect();
    if !tokens.contains(&"chosen") {
        return None;
    }
    Some(tokens.iter().map(|t| if *t == "chosen" { "rejected" } else { t }).collect::<Vec<_>>().join("_"))
}

/// Columns that hold chosen-minus-rejected quantities and change sign when a pair is swapped.
pub fn is_margin_column(name: &str) -> bool {
    name == "margin" || name.ends_with("_margin")
}

/// Swaps chosen and rejected in selected rows: every paired column (see [`counterpart`])
/// exchanges its values and every margin column (see [`is_margin_column`]) changes sign.
/// Paired columns of different types are both cast to the type holding both. `extra` adds
/// pairs that the naming rule does not find (e.g. factuality labels `h_w`/`h_l`).
#[derive(Debug, Clone)]
pub struct Swapper {
    pairs: Vec<(usize, usize)>,
    negate: Vec<usize>,
    /// Target type of each column (differs from the input only for mismatched pairs).
    types: Vec<DataType>,
    pub schema: SchemaRef,
}

impl Swapper {
    pub fn new(schema: &SchemaRef, source: &str, extra: &[(&str, &str)]) -> Result<Swapper> {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut types: Vec<DataType> = schema.fields().iter().map(|f| f.data_type().clone()).collect();
        let mut found: Vec<(usize, usize)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let Some(other) = counterpart(name) {
                if let Some(j) = names.iter().position(|n| *n == other) {
                    found.push((i, j));
                }
            }
        }
        for (a, b) in extra {
            if a == b {
                return Err(column_error(source, format!("column '{a}' is given as both the chosen and the rejected side")));
            }
            if let (Some(i), Some(j)) = (names.iter().position(|n| n == a), names.iter().position(|n| n == b)) {
                let taken = |k: usize| found.iter().any(|&(x, y)| x == k || y == k);
                if !found.contains(&(i, j)) && !found.contains(&(j, i)) {
                    if taken(i) || taken(j) {
                        return Err(column_error(
                            source,
                            format!("columns '{a}' and '{b}' cannot be swapped as a pair: one of them already pairs with another column"),
                        ));
                    }
                    found.push((i, j));
                }
            }
        }
        let mut pairs = Vec::new();
        for (i, j) in found {
            let t = merge(&types[i], &types[j]);
            types[i] = t.clone();
            types[j] = t;
            pairs.push((i, j));
        }
        let mut negate = Vec::new();
        for (i, f) in schema.fields().iter().enumerate() {
            if is_margin_column(f.name()) {
                match f.data_type() {
                    DataType::Float64 | DataType::Float32 | DataType::Int64 | DataType::Int32 | DataType::Int16
                    | DataType::Int8 | DataType::Null => negate.push(i),
                    other => {
                        return Err(column_error(
                            source,
                            format!(
                                "column '{}' is {other}; a margin column (chosen minus rejected) must be a signed \
                                 number so that it can change sign when chosen and rejected are swapped",
                                f.name()
                            ),
                        ))
                    }
                }
            }
        }
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .zip(&types)
            .map(|(f, t)| if f.data_type() == t { f.as_ref().clone() } else { Field::new(f.name(), t.clone(), true) })
            .collect();
        Ok(Swapper { pairs, negate, types, schema: Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())) })
    }

    /// Names of the swapped column pairs, for reports.
    pub fn pair_names(&self) -> Vec<(String, String)> {
        self.pairs
            .iter()
            .map(|&(a, b)| (self.schema.field(a).name().clone(), self.schema.field(b).name().clone()))
            .collect()
    }

    /// The batch's columns cast to the swapper's types.
    pub fn columns(&self, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
        batch
            .columns()
            .iter()
            .zip(&self.types)
            .enumerate()
            .map(|(i, (c, t))| {
                if c.data_type() == t {
                    Ok(c.clone())
                } else {
                    arrow_cast::cast(c, t).map_err(|e| {
                        PrepError::Config(format!("column '{}': cannot cast to {t}: {e}", self.schema.field(i).name()))
                    })
                }
            })
            .collect()
    }

    /// Swap the rows where `mask` is true (no nulls in `mask`).
    pub fn apply(&self, columns: &mut [ArrayRef], mask: &BooleanArray) -> Result<()> {
        let n = mask.true_count();
        if n == 0 {
            return Ok(());
        }
        let all = n == mask.len();
        let arrow = |e: arrow_schema::ArrowError| PrepError::Config(format!("swapping chosen and rejected: {e}"));
        for &(a, b) in &self.pairs {
            if all {
                columns.swap(a, b);
            } else {
                let (ca, cb) = (columns[a].clone(), columns[b].clone());
                columns[a] = gather::zip(mask, cb.as_ref(), ca.as_ref()).map_err(arrow)?;
                columns[b] = gather::zip(mask, ca.as_ref(), cb.as_ref()).map_err(arrow)?;
            }
        }
        for &i in &self.negate {
            let negated = negate(&columns[i]);
            columns[i] = if all { negated } else { arrow_select::zip::zip(mask, &negated, &columns[i]).map_err(arrow)? };
        }
        Ok(())
    }
}

fn negate(a: &ArrayRef) -> ArrayRef {
    macro_rules! neg {
        ($t:ty, $f:expr) => {
            Arc::new(a.as_primitive::<$t>().unary::<_, $t>($f)) as ArrayRef
        };
    }
    match a.data_type() {
        DataType::Float64 => neg!(Float64Type, |x: f64| -x),
        DataType::Float32 => neg!(Float32Type, |x: f32| -x),
        DataType::Int64 => neg!(Int64Type, |x: i64| x.wrapping_neg()),
        DataType::Int32 => neg!(Int32Type, |x: i32| x.wrapping_neg()),
        DataType::Int16 => neg!(Int16Type, |x: i16| x.wrapping_neg()),
        DataType::Int8 => neg!(Int8Type, |x: i8| x.wrapping_neg()),
        _ => a.clone(), // Null: all null, nothing to negate
    }
}

/// A column as Float64 for reading numbers (integers, floats, decimals); an error naming the
/// column when it is not numeric.
pub fn numeric_array(col: &ArrayRef, name: &str, source: &str, purpose: &str) -> Result<Float64Array> {
    let ok = col.data_type().is_numeric() || matches!(col.data_type(), DataType::Null);
    if !ok {
        return Err(column_error(source, format!("column '{name}' is {}; {purpose} needs a numeric column", col.data_type())));
    }
    let cast = arrow_cast::cast(col, &DataType::Float64).map_err(|e| column_error(source, format!("column '{name}': {e}")))?;
    Ok(cast.as_primitive::<Float64Type>().clone())
}

/// A column as Utf8 text (ids); integer ids are written in decimal.
pub fn text_array(col: &ArrayRef, name: &str, source: &str, purpose: &str) -> Result<StringArray> {
    let ok = matches!(
        col.data_type(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null | DataType::Dictionary(..)
    ) || col.data_type().is_integer();
    let cast = if ok { arrow_cast::cast(col, &DataType::Utf8).ok() } else { None };
    match cast {
        Some(c) => Ok(c.as_string::<i32>().clone()),
        None => Err(column_error(
            source,
            format!("column '{name}' is {}; {purpose} needs a text (or integer) column", col.data_type()),
        )),
    }
}

pub(crate) fn numeric_column(batch: &RecordBatch, index: usize, source: &str, purpose: &str) -> Result<Float64Array> {
    numeric_array(batch.column(index), batch.schema_ref().field(index).name(), source, purpose)
}

pub(crate) fn text_column(batch: &RecordBatch, index: usize, source: &str, purpose: &str) -> Result<StringArray> {
    text_array(batch.column(index), batch.schema_ref().field(index).name(), source, purpose)
}

/// Replace the column named `name` or append it.
pub(crate) fn set_column(fields: &mut Vec<Field>, columns: &mut Vec<ArrayRef>, name: &str, array: ArrayRef) {
    let field = Field::new(name, array.data_type().clone(), true);
    match fields.iter().position(|f| f.name() == name) {
        Some(i) => {
            fields[i] = field;
            columns[i] = array;
        }
        None => {
            fields.push(field);
            columns.push(array);
        }
    }
}

pub(crate) fn make_batch(schema: SchemaRef, columns: Vec<ArrayRef>, rows: usize) -> Result<RecordBatch> {
    RecordBatch::try_new_with_options(
        schema,
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(rows)),
    )
    .map_err(|e| PrepError::Config(format!("internal: building an output batch: {e}")))
}

/// Test tables of (prompt_id, pair_id, margin) rows cut into batches of `batch` rows.
#[cfg(test)]
pub(crate) fn pairs_table(source: &str, rows: &[(&str, &str, f64)], batch: usize) -> Table {
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt_id", DataType::Utf8, true),
        Field::new("pair_id", DataType::Utf8, true),
        Field::new("margin", DataType::Float64, true),
    ]));
    let batches = rows
        .chunks(batch)
        .map(|c| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(c.iter().map(|r| r.0).collect::<Vec<_>>())),
                    Arc::new(StringArray::from(c.iter().map(|r| r.1).collect::<Vec<_>>())),
                    Arc::new(Float64Array::from(c.iter().map(|r| r.2).collect::<Vec<_>>())),
                ],
            )
            .unwrap()
        })
        .collect();
    Table::new(source, schema, batches).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counterparts() {
        assert_eq!(counterpart("chosen").as_deref(), Some("rejected"));
        assert_eq!(counterpart("score_chosen").as_deref(), Some("score_rejected"));
        assert_eq!(counterpart("chosen_model").as_deref(), Some("rejected_model"));
        assert_eq!(counterpart("ref_chosen_logps").as_deref(), Some("ref_rejected_logps"));
        assert_eq!(counterpart("chosenness"), None);
        assert_eq!(counterpart("rejected"), None);
        assert!(is_margin_column("margin") && is_margin_column("rm_margin") && !is_margin_column("margins"));
    }

    #[test]
    fn par_map_keeps_order_and_reports_first_error() {
        let items: Vec<u32> = (0..100).collect();
        for threads in [1, 2, 7] {
            let out = par_map(&items, threads, |x| Ok(x * 2)).unwrap();
            assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
            let err = par_map(&items, threads, |x| if x % 30 == 29 { Err(PrepError::Config(format!("bad {x}"))) } else { Ok(*x) })
                .unwrap_err();
            assert_eq!(err.to_string(), "bad 29");
        }
    }
}
