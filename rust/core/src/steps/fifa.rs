//! FiFA data filtering: keep the most important pairs under a budget, importance per pair
//!
//!   importance = margin + γ · quality + α · ln max(ρ_k(prompt), floor)
//!
//! with ρ_k the distance from the pair's prompt embedding to its k-th nearest other prompt
//! embedding (the kNN entropy estimator's term: sparse prompts score higher), margin a reward
//! gap (default column `margin`, as `prep` writes it) and quality an optional per-pair column.
//! The weights α, γ, k and the budget are the caller's: the paper's values are not verified.
//!
//! Three parts, so that the per-row work can run on batches elsewhere:
//!
//! 1. [`prompt_radii`] (global, over prompts): ρ_k for every prompt embedding; as a small
//!    table ([`radii_table`] / [`PromptRadii::from_table`]) it can be broadcast to batches.
//! 2. [`fifa_scores`] / [`score_table`] (per batch, given the radii): the terms and the
//!    importance of each row.
//! 3. [`select_top`] (global, O(rows) memory of scores): which rows to keep; [`top_cut`] turns
//!    the kept set into a rule ([`Cut`]) that each batch applies on its own ([`keep_rows`]).
//!
//! Ties in importance are broken by `pair_id` (byte order; when the column exists), then by
//! input position, so the kept set does not depend on batching or threads. Kept rows come out
//! in input order with two new columns, `importance` and `knn_distance` (ρ_k, not floored).

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use serde::Serialize;

use super::{make_batch, numeric_array, par_map, row_error, set_column, text_array, Table, SLICE_ROWS};
use crate::error::{PrepError, Problem, Result};
use crate::knn::{self, flatten_rows, Matrix, Metric, Search, SearchInfo};
use crate::pipeline::resolve_threads;

type IdMap = HashMap<String, u32, xxhash_rust::xxh3::Xxh3Builder>;

/// How many rows to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Keep {
    /// This many rows (all of them when the table is smaller).
    Count(u64),
    /// round(fraction · rows), half up; 0 ≤ fraction ≤ 1.
    Fraction(f64),
}

impl Keep {
    pub fn rows(self, n: usize) -> Result<usize> {
        match self {
            Keep::Count(c) => Ok((c as usize).min(n)),
            Keep::Fraction(f) if (0.0..=1.0).contains(&f) => Ok(((f * n as f64 + 0.5).floor() as usize).min(n)),
            Keep::Fraction(f) => Err(PrepError::Config(format!("keep_fraction must be in [0, 1], got {f}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FifaOptions {
    /// Weight of ln ρ_k.
    pub alpha: f64,
    /// Weight of the quality column (unused without one).
    pub gamma: f64,
    pub k: usize,
    pub metric: Metric,
    pub search: Search,
    pub keep: Keep,
    pub margin_column: String,
    pub quality_column: Option<String>,
    /// The embedding column: of the embeddings table, or of the pairs table when there is none.
    pub embedding_column: String,
    /// ρ_k below this counts as this in the logarithm (duplicate prompts have ρ_k = 0).
    pub distance_floor: f64,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

impl Default for FifaOptions {
    fn default() -> Self {
        FifaOptions {
            alpha: 1.0,
            gamma: 1.0,
            k: 5,
            metric: Metric::Cosine,
            search: Search::Exact,
            keep: Keep::Fraction(1.0),
            margin_column: "margin".into(),
            quality_column: None,
            embedding_column: "embedding".into(),
            distance_floor: 1e-6,
            threads: 0,
        }
    }
}

/// One embedding per prompt id, in order of first appearance.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    pub source: String,
    pub column: String,
    pub ids: Vec<String>,
    pub index: IdMap,
    pub data: Vec<f32>,
    pub dim: usize,
    /// Row of the source each prompt's embedding came from (for errors).
    pub rows: Vec<u64>,
}

impl PromptEmbeddings {
    /// From a table with one row per prompt: `prompt_id` and the embedding column (a list or
    /// fixed-size list of numbers). A prompt id given twice is an error.
    pub fn from_table(table: &Table, column: &str, metric: Metric) -> Result<PromptEmbeddings> {
        collect(table, column, true, metric)
    }

    /// From the pairs table's own embedding column: every row of a prompt must carry the same
    /// embedding.
    pub fn from_pairs(table: &Table, column: &str, metric: Metric) -> Result<PromptEmbeddings> {
        collect(table, column, false, metric)
    }

    pub fn matrix(&self) -> Result<Matrix<'_>> {
        Matrix::new(&self.data[..], self.ids.len(), self.dim.max(1))
    }
}

fn collect(table: &Table, column: &str, unique: bool, metric: Metric) -> Result<PromptEmbeddings> {
    let source = table.source.as_str();
    let pi = table.column_index("prompt_id", "embeddings belong to prompts")?;
    let ei = table.column_index(column, "the prompt embeddings")?;
    let mut out = PromptEmbeddings {
        source: source.to_string(),
        column: column.to_string(),
        ids: Vec::new(),
        index: IdMap::with_hasher(Default::default()),
        data: Vec::new(),
        dim: 0,
        rows: Vec::new(),
    };
    let mut dim: Option<usize> = None;
    for (first, batch) in table.slices(SLICE_ROWS) {
        let ids = text_array(batch.column(pi), "prompt_id", source, "the prompt id")?;
        let (flat, d) = flatten_rows(batch.column(ei).as_ref(), first as usize)
            .map_err(|(row, message)| row_error(source, row as u64, column, Problem::WrongType, message))?;
        match dim {
            None => dim = Some(d),
            Some(d0) if d0 != d => {
                return Err(row_error(
                    source,
                    first,
                    column,
                    Problem::LengthMismatch,
                    format!("embedding has {d} values, earlier rows have {d0}"),
                ))
            }
            _ => {}
        }
        for r in 0..batch.num_rows() {
            let row = first + r as u64;
            if ids.is_null(r) {
                return Err(row_error(source, row, "prompt_id", Problem::MissingField, "prompt_id is null"));
            }
            let id = ids.value(r);
            let emb = &flat[r * d..(r + 1) * d];
            if let Some(j) = emb.iter().position(|x| !x.is_finite()) {
                return Err(row_error(
                    source,
                    row,
                    column,
                    Problem::NonFiniteScore,
                    format!("embedding of prompt '{id}' has {} at position {j}", emb[j]),
                ));
            }
            match out.index.get(id) {
                Some(&p) => {
                    let p = p as usize;
                    let first_row = out.rows[p];
                    if unique {
                        return Err(row_error(
                            source,
                            row,
                            "prompt_id",
                            Problem::WrongType,
                            format!("prompt '{id}' has a second embedding (the first is on row {first_row}); give one row per prompt"),
                        ));
                    }
                    if out.data[p * d..(p + 1) * d] != *emb {
                        return Err(row_error(
                            source,
                            row,
                            column,
                            Problem::WrongType,
                            format!("prompt '{id}' has a different embedding than on row {first_row}; a prompt has one embedding"),
                        ));
                    }
                }
                None => {
                    out.index.insert(id.to_string(), out.ids.len() as u32);
                    out.ids.push(id.to_string());
                    out.rows.push(row);
                    out.data.extend_from_slice(emb);
                }
            }
        }
    }
    out.dim = dim.unwrap_or(0);
    if !out.ids.is_empty() {
        if let Some((p, message)) = knn::find_bad_row(&out.matrix()?, metric) {
            return Err(row_error(source, out.rows[p], column, Problem::WrongType, format!("prompt '{}': {message}", out.ids[p])));
        }
    }
    Ok(out)
}

/// ρ_k of every prompt embedding (global over prompts).
#[derive(Debug, Clone)]
pub struct Radii {
    /// ρ_k per prompt, in the order of [`PromptEmbeddings::ids`].
    pub radius: Vec<f64>,
    /// ln max(ρ_k, floor).
    pub log_radius: Vec<f64>,
    /// Prompts whose ρ_k is below the floor.
    pub floored: u64,
    /// Prompts whose embedding equals an earlier prompt's.
    pub duplicates: u64,
    pub info: SearchInfo,
}

pub fn prompt_radii(emb: &PromptEmbeddings, opts: &FifaOptions) -> Result<Radii> {
    if !(opts.distance_floor > 0.0 && opts.distance_floor.is_finite()) {
        return Err(PrepError::Config(format!("distance_floor must be a finite number > 0, got {}", opts.distance_floor)));
    }
    if emb.ids.len() < opts.k + 1 {
        return Err(PrepError::Config(format!(
            "{}: k = {} nearest neighbours need at least {} prompts with embeddings, got {}",
            emb.source,
            opts.k,
            opts.k + 1,
            emb.ids.len()
        )));
    }
    let m = emb.matrix()?;
    let nn = knn::knn(&m, &knn::KnnOptions { k: opts.k, metric: opts.metric, search: opts.search, threads: opts.threads })?;
    let radius = nn.radius();
    let log_radius = radius.iter().map(|&r| r.max(opts.distance_floor).ln()).collect();
    Ok(Radii {
        floored: radius.iter().filter(|&&r| r < opts.distance_floor).count() as u64,
        duplicates: knn::duplicate_rows(&m) as u64,
        radius,
        log_radius,
        info: nn.info,
    })
}

/// What per-batch scoring needs of the global part: each prompt's ρ_k and ln max(ρ_k, floor),
/// looked up by prompt id.
#[derive(Debug, Clone)]
pub struct PromptRadii {
    /// Where the embeddings came from (for errors).
    pub source: String,
    pub index: IdMap,
    pub radius: Vec<f64>,
    pub log_radius: Vec<f64>,
}

/// Columns of the radii table: one row per prompt.
pub const RADII_COLUMNS: [&str; 3] = ["prompt_id", "knn_distance", "log_distance"];

impl PromptRadii {
    pub fn new(emb: &PromptEmbeddings, radii: &Radii) -> PromptRadii {
        PromptRadii {
            source: emb.source.clone(),
            index: emb.index.clone(),
            radius: radii.radius.clone(),
            log_radius: radii.log_radius.clone(),
        }
    }

    /// From a table made by [`radii_table`] (`prompt_id`, `knn_distance`, `log_distance`).
    pub fn from_table(table: &Table) -> Result<PromptRadii> {
        let source = table.source.as_str();
        let why = "the FiFA radii table (prefops.fifa_radii) has one row per prompt";
        let [pi, di, li] = RADII_COLUMNS.map(|c| table.column_index(c, why));
        let (pi, di, li) = (pi?, di?, li?);
        let mut out = PromptRadii {
            source: source.to_string(),
            index: IdMap::with_hasher(Default::default()),
            radius: Vec::with_capacity(table.num_rows()),
            log_radius: Vec::with_capacity(table.num_rows()),
        };
        for (first, b) in table.slices(SLICE_ROWS) {
            let ids = text_array(b.column(pi), "prompt_id", source, "the prompt id")?;
            let dist = numeric_array(b.column(di), "knn_distance", source, "the kNN distance")?;
            let logd = numeric_array(b.column(li), "log_distance", source, "the log distance")?;
            for r in 0..b.num_rows() {
                let row = first + r as u64;
                if ids.is_null(r) || dist.is_null(r) || logd.is_null(r) {
                    return Err(row_error(source, row, "prompt_id", Problem::MissingField, "null in the radii table"));
                }
                let id = ids.value(r);
                if out.index.insert(id.to_string(), out.radius.len() as u32).is_some() {
                    return Err(row_error(source, row, "prompt_id", Problem::WrongType, format!("prompt '{id}' appears twice")));
                }
                out.radius.push(dist.value(r));
                out.log_radius.push(logd.value(r));
            }
        }
        Ok(out)
    }
}

/// The radii as a table, one row per prompt in embedding order: `prompt_id`, `knn_distance`
/// (ρ_k) and `log_distance` (ln max(ρ_k, floor), the term the importance uses).
pub fn radii_table(emb: &PromptEmbeddings, radii: &Radii) -> Result<Table> {
    let [p, d, l] = RADII_COLUMNS;
    let schema = Arc::new(Schema::new(vec![
        Field::new(p, arrow_schema::DataType::Utf8, false),
        Field::new(d, arrow_schema::DataType::Float64, false),
        Field::new(l, arrow_schema::DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(emb.ids.clone())),
        Arc::new(Float64Array::from(radii.radius.clone())),
        Arc::new(Float64Array::from(radii.log_radius.clone())),
    ];
    let batch = make_batch(schema.clone(), columns, emb.ids.len())?;
    Table::new(emb.source.clone(), schema, vec![batch])
}

/// The terms and importance of the rows of one batch.
#[derive(Debug, Clone)]
pub struct BatchScores {
    pub importance: Vec<f64>,
    pub margin: Vec<f64>,
    pub quality: Option<Vec<f64>>,
    /// Index of each row's prompt in the embeddings.
    pub prompt: Vec<u32>,
}

/// Score the rows of one batch (`first_row` = its first row's index in the table, for errors).
pub fn fifa_scores(
    batch: &RecordBatch,
    first_row: u64,
    source: &str,
    radii: &PromptRadii,
    opts: &FifaOptions,
) -> Result<BatchScores> {
    let col = |name: &str, why: &str| -> Result<&ArrayRef> {
        batch.schema_ref().index_of(name).map(|i| batch.column(i)).map_err(|_| {
            super::column_error(source, format!("missing column '{name}' ({why})"))
        })
    };
    let number = |name: &str, what: &str| -> Result<Vec<f64>> {
        let a = numeric_array(col(name, what)?, name, source, what)?;
        for i in 0..a.len() {
            let row = first_row + i as u64;
            if a.is_null(i) {
                return Err(row_error(source, row, name, Problem::MissingField, format!("no {what} (null)")));
            }
            if !a.value(i).is_finite() {
                return Err(row_error(source, row, name, Problem::NonFiniteScore, format!("{what} must be finite, got {}", a.value(i))));
            }
        }
        Ok(a.values().to_vec())
    };
    let margin = number(&opts.margin_column, "the FiFA margin")?;
    let quality = opts.quality_column.as_deref().map(|q| number(q, "the FiFA quality")).transpose()?;
    let ids = text_array(col("prompt_id", "each pair's prompt embedding is looked up by prompt id")?, "prompt_id", source, "the prompt id")?;
    let mut prompt = Vec::with_capacity(batch.num_rows());
    let mut importance = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        let row = first_row + i as u64;
        if ids.is_null(i) {
            return Err(row_error(source, row, "prompt_id", Problem::MissingField, "prompt_id is null"));
        }
        let id = ids.value(i);
        let p = *radii.index.get(id).ok_or_else(|| {
            row_error(
                source,
                row,
                "prompt_id",
                Problem::MissingField,
                format!("no embedding for prompt '{id}' in {}", radii.source),
            )
        })?;
        let q = quality.as_ref().map_or(0.0, |q| q[i]);
        // + 0.0 turns -0.0 into 0.0, so that equal importances tie.
        let x = margin[i] + opts.gamma * q + opts.alpha * radii.log_radius[p as usize] + 0.0;
        if !x.is_finite() {
            return Err(row_error(source, row, &opts.margin_column, Problem::NonFiniteScore, format!("importance overflows: {x}")));
        }
        prompt.push(p);
        importance.push(x);
    }
    Ok(BatchScores { importance, margin, quality, prompt })
}

/// Rows to keep: the `keep` largest importances, ties broken by `tie(a, b)` (then by index).
/// O(rows) memory and expected time. Returns the mask and the lowest kept importance.
pub fn select_top(
    importance: &[f64],
    keep: usize,
    tie: impl Fn(usize, usize) -> std::cmp::Ordering,
) -> (Vec<bool>, Option<f64>) {
    let n = importance.len();
    let keep = keep.min(n);
    if keep == 0 {
        return (vec![false; n], None);
    }
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        let (a, b) = (*a as usize, *b as usize);
        importance[b].total_cmp(&importance[a]).then_with(|| tie(a, b)).then(a.cmp(&b))
    };
    let (_, last, _) = idx.select_nth_unstable_by(keep - 1, cmp);
    let threshold = importance[*last as usize];
    let mut mask = vec![false; n];
    for &i in &idx[..keep] {
        mask[i as usize] = true;
    }
    (mask, Some(threshold))
}

/// The pairs' schema with `importance` and `knn_distance` set (replaced or appended).
fn scored_schema(pairs: &arrow_schema::SchemaRef) -> arrow_schema::SchemaRef {
    let mut fields: Vec<Field> = pairs.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut probe: Vec<ArrayRef> = pairs.fields().iter().map(|f| arrow_array::new_empty_array(f.data_type())).collect();
    for name in ["importance", "knn_distance"] {
        set_column(&mut fields, &mut probe, name, Arc::new(Float64Array::from(Vec::<f64>::new())));
    }
    Arc::new(Schema::new_with_metadata(fields, pairs.metadata().clone()))
}

/// A batch with its scores as the `importance` and `knn_distance` columns.
fn scored_batch(schema: &arrow_schema::SchemaRef, b: &RecordBatch, sc: &BatchScores, radii: &PromptRadii) -> Result<RecordBatch> {
    let mut f: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut cols: Vec<ArrayRef> = b.columns().to_vec();
    set_column(&mut f, &mut cols, "importance", Arc::new(Float64Array::from(sc.importance.clone())));
    let dist: Vec<f64> = sc.prompt.iter().map(|&p| radii.radius[p as usize]).collect();
    set_column(&mut f, &mut cols, "knn_distance", Arc::new(Float64Array::from(dist)));
    make_batch(schema.clone(), cols, b.num_rows())
}

fn check_weights(opts: &FifaOptions) -> Result<()> {
    if !(opts.alpha.is_finite() && opts.gamma.is_finite()) {
        return Err(PrepError::Config(format!("alpha and gamma must be finite, got {} and {}", opts.alpha, opts.gamma)));
    }
    Ok(())
}

/// Per-batch part: every row of `pairs` with `importance` and `knn_distance` added, in input
/// order (the same values as [`fifa`] gives the rows it keeps).
pub fn score_table(pairs: &Table, radii: &PromptRadii, opts: &FifaOptions) -> Result<Table> {
    check_weights(opts)?;
    let source = pairs.source.as_str();
    let schema = scored_schema(&pairs.schema);
    let slices = pairs.slices(SLICE_ROWS);
    let batches = par_map(&slices, resolve_threads(opts.threads), |(first, b)| {
        let sc = fifa_scores(b, *first, source, radii, opts)?;
        scored_batch(&schema, b, &sc, radii)
    })?;
    Ok(Table { source: pairs.source.clone(), schema, batches })
}

/// The kept set of [`select_top`] as a rule a batch can apply alone: keep a row when its
/// (importance, pair id) ranks at or above the last kept row's (higher importance first, then
/// smaller pair id, null ids first).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cut {
    pub importance: f64,
    pub pair_id: Option<String>,
}

impl Cut {
    pub fn keeps(&self, importance: f64, pair_id: Option<&str>) -> bool {
        match importance.total_cmp(&self.importance) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => pair_id.map(str::as_bytes) <= self.pair_id.as_deref().map(str::as_bytes),
        }
    }
}

/// Global part: the cut keeping the `keep` most important rows, ties by pair id, exactly as
/// [`fifa`] selects them; None when nothing is kept. An error when the cut would split rows
/// that share both importance and pair id (only input position could tell them apart, and a
/// batch does not know it).
pub fn top_cut(importance: &[f64], pair_ids: &StringArray, keep: usize, source: &str) -> Result<Option<Cut>> {
    let (mask, threshold) = select_top(importance, keep, |a, b| id_key(pair_ids, a).cmp(&id_key(pair_ids, b)));
    let Some(threshold) = threshold else { return Ok(None) };
    let last = (0..importance.len())
        .filter(|&i| mask[i] && importance[i].total_cmp(&threshold).is_eq())
        .max_by(|&a, &b| id_key(pair_ids, a).cmp(&id_key(pair_ids, b)))
        .expect("a threshold comes from a kept row");
    let cut = Cut { importance: threshold, pair_id: id_key(pair_ids, last).map(|b| String::from_utf8_lossy(b).into_owned()) };
    let same = |i: usize| importance[i].total_cmp(&threshold).is_eq() && id_key(pair_ids, i) == id_key(pair_ids, last);
    let (tied, kept) = (0..importance.len()).filter(|&i| same(i)).fold((0, 0), |(t, k), i| (t + 1, k + mask[i] as usize));
    if kept != tied {
        return Err(PrepError::Config(format!(
            "{source}: {tied} rows share pair_id {:?} and importance {threshold} and the budget keeps {kept} of them; \
             filtering batch by batch needs pair ids that tell rows apart (prep writes unique ones)",
            cut.pair_id.as_deref().unwrap_or("null")
        )));
    }
    Ok(Some(cut))
}

/// Per-batch part: the rows of `table` (with `importance` and `pair_id`) that `cut` keeps, in
/// input order; none when `cut` is None.
pub fn keep_rows(table: &Table, cut: Option<&Cut>, threads: usize) -> Result<Table> {
    let source = table.source.as_str();
    let ii = table.column_index("importance", "made by the per-batch FiFA scores")?;
    let pi = table.column_index("pair_id", "ties in importance are broken by pair id")?;
    let slices = table.slices(SLICE_ROWS);
    let batches = par_map(&slices, resolve_threads(threads), |(first, b)| {
        let imp = numeric_array(b.column(ii), "importance", source, "the FiFA importance")?;
        let ids = text_array(b.column(pi), "pair_id", source, "ties in importance are broken by pair id")?;
        if let Some(r) = (0..imp.len()).find(|&r| imp.is_null(r)) {
            return Err(row_error(source, first + r as u64, "importance", Problem::MissingField, "no importance (null)"));
        }
        let mask: BooleanArray =
            (0..b.num_rows()).map(|r| Some(cut.is_some_and(|c| c.keeps(imp.value(r), (!ids.is_null(r)).then(|| ids.value(r)))))).collect();
        arrow_select::filter::filter_record_batch(b, &mask).map_err(|e| PrepError::Config(format!("{source}: selecting rows: {e}")))
    })?;
    Table::new(table.source.clone(), table.schema.clone(), batches)
}

/// A pair id for tie-breaking; null ids sort first.
fn id_key(a: &StringArray, r: usize) -> Option<&[u8]> {
    (!a.is_null(r)).then(|| a.value(r).as_bytes())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TermStats {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl TermStats {
    fn of(values: impl Iterator<Item = f64>) -> Option<TermStats> {
        let (mut min, mut max, mut sum, mut n) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize);
        for x in values {
            min = min.min(x);
            max = max.max(x);
            sum += x;
            n += 1;
        }
        (n > 0).then(|| TermStats { min, mean: sum / n as f64, max })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FifaStats {
    pub rows: u64,
    pub kept: u64,
    pub dropped: u64,
    pub keep_count: Option<u64>,
    pub keep_fraction: Option<f64>,
    /// The lowest importance kept (None when nothing is kept).
    pub threshold_importance: Option<f64>,
    pub alpha: f64,
    pub gamma: f64,
    pub k: usize,
    pub metric: &'static str,
    pub knn: &'static str,
    pub nlist: Option<usize>,
    pub nprobe: Option<usize>,
    pub knn_exact_fallbacks: usize,
    pub margin_column: String,
    pub quality_column: Option<String>,
    pub embedding_column: String,
    pub embedding_dim: usize,
    /// Prompts with an embedding: the population of the kNN search.
    pub prompts: u64,
    /// Distinct prompts among the pairs.
    pub prompts_in_pairs: u64,
    /// Prompts whose embedding equals an earlier prompt's (ρ_k = 0 when k or more copies).
    pub duplicate_embeddings: u64,
    pub distance_floor: f64,
    /// Prompts with ρ_k below the floor.
    pub floored_prompts: u64,
    /// Per-row terms over all input rows (log_distance is the floored ln ρ_k).
    pub margin: Option<TermStats>,
    pub quality: Option<TermStats>,
    pub log_distance: Option<TermStats>,
    pub importance: Option<TermStats>,
    pub kept_importance: Option<TermStats>,
    pub knn_seconds: f64,
}

/// The whole step: radii over the prompts of `embeddings` (or of the pairs' own embedding
/// column when None), scores per slice, global top selection, kept rows in input order.
pub fn fifa(pairs: &Table, embeddings: Option<&Table>, opts: &FifaOptions) -> Result<(Table, FifaStats)> {
    let threads = resolve_threads(opts.threads);
    let opts = &FifaOptions { threads, ..opts.clone() };
    check_weights(opts)?;
    let n = pairs.num_rows();
    let keep = opts.keep.rows(n)?;
    let source = pairs.source.as_str();
    pairs.column_index(&opts.margin_column, "the FiFA margin term")?;
    if let Some(q) = &opts.quality_column {
        pairs.column_index(q, "the FiFA quality term")?;
    }
    pairs.column_index("prompt_id", "each pair's prompt embedding is looked up by prompt id")?;
    let emb = match embeddings {
        Some(t) => PromptEmbeddings::from_table(t, &opts.embedding_column, opts.metric)?,
        None => PromptEmbeddings::from_pairs(pairs, &opts.embedding_column, opts.metric)?,
    };
    let started = std::time::Instant::now();
    let radii = prompt_radii(&emb, opts)?;
    let knn_seconds = started.elapsed().as_secs_f64();

    let slices = pairs.slices(SLICE_ROWS);
    let lookup = PromptRadii::new(&emb, &radii);
    let scores = par_map(&slices, threads, |(first, b)| fifa_scores(b, *first, source, &lookup, opts))?;
    let importance: Vec<f64> = scores.iter().flat_map(|s| s.importance.iter().copied()).collect();

    // Ties by pair id when there is one: per-slice id arrays, found by global row.
    let pair_ids: Option<Vec<StringArray>> = match pairs.schema.index_of("pair_id") {
        Ok(i) => Some(
            slices
                .iter()
                .map(|(_, b)| text_array(b.column(i), "pair_id", source, "ties in importance are broken by pair id"))
                .collect::<Result<_>>()?,
        ),
        Err(_) => None,
    };
    let firsts: Vec<usize> = slices.iter().map(|(f, _)| *f as usize).collect();
    let locate = |row: usize| {
        let s = firsts.partition_point(|&f| f <= row) - 1;
        (s, row - firsts[s])
    };
    let (mask, threshold) = select_top(&importance, keep, |a, b| match &pair_ids {
        None => std::cmp::Ordering::Equal,
        Some(ids) => {
            let ((sa, ra), (sb, rb)) = (locate(a), locate(b));
            let (x, y) = (&ids[sa], &ids[sb]);
            id_key(x, ra).cmp(&id_key(y, rb))
        }
    });

    // Output: kept rows in input order, with importance and knn_distance.
    let schema = scored_schema(&pairs.schema);
    let work: Vec<usize> = (0..slices.len()).collect();
    let batches = par_map(&work, threads, |&s| {
        let (first, b) = &slices[s];
        let (first, rows) = (*first as usize, b.num_rows());
        let keep_mask = BooleanArray::from(mask[first..first + rows].to_vec());
        if keep_mask.true_count() == 0 {
            return Ok(None);
        }
        let full = scored_batch(&schema, b, &scores[s], &lookup)?;
        arrow_select::filter::filter_record_batch(&full, &keep_mask)
            .map(Some)
            .map_err(|e| PrepError::Config(format!("{source}: selecting rows: {e}")))
    })?;
    let batches: Vec<RecordBatch> = batches.into_iter().flatten().collect();

    let mut in_pairs = vec![false; emb.ids.len()];
    for s in &scores {
        for &p in &s.prompt {
            in_pairs[p as usize] = true;
        }
    }
    let all = || scores.iter().flat_map(|s| s.importance.iter().copied());
    let (nlist, nprobe) = (radii.info.nlist, radii.info.nprobe);
    let stats = FifaStats {
        rows: n as u64,
        kept: keep as u64,
        dropped: (n - keep) as u64,
        keep_count: match opts.keep {
            Keep::Count(c) => Some(c),
            _ => None,
        },
        keep_fraction: match opts.keep {
            Keep::Fraction(f) => Some(f),
            _ => None,
        },
        threshold_importance: threshold,
        alpha: opts.alpha,
        gamma: opts.gamma,
        k: opts.k,
        metric: opts.metric.name(),
        knn: opts.search.name(),
        nlist,
        nprobe,
        knn_exact_fallbacks: radii.info.exact_fallbacks,
        margin_column: opts.margin_column.clone(),
        quality_column: opts.quality_column.clone(),
        embedding_column: opts.embedding_column.clone(),
        embedding_dim: emb.dim,
        prompts: emb.ids.len() as u64,
        prompts_in_pairs: in_pairs.iter().filter(|&&x| x).count() as u64,
        duplicate_embeddings: radii.duplicates,
        distance_floor: opts.distance_floor,
        floored_prompts: radii.floored,
        margin: TermStats::of(scores.iter().flat_map(|s| s.margin.iter().copied())),
        quality: if opts.quality_column.is_some() {
            TermStats::of(scores.iter().flat_map(|s| s.quality.iter().flatten().copied()))
        } else {
            None
        },
        log_distance: TermStats::of(scores.iter().flat_map(|s| s.prompt.iter().map(|&p| radii.log_radius[p as usize]))),
        importance: TermStats::of(all()),
        kept_importance: TermStats::of(all().zip(&mask).filter(|(_, &k)| k).map(|(x, _)| x)),
        knn_seconds,
    };
    Ok((Table { source: pairs.source.clone(), schema, batches }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;
    use arrow_schema::DataType;

    fn embeddings(ids: &[&str], rows: &[[f32; 2]]) -> Table {
        let mut b = FixedSizeListBuilder::new(Float32Builder::new(), 2);
        for r in rows {
            b.values().append_slice(r);
            b.append(true);
        }
        let list = b.finish();
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt_id", DataType::Utf8, true),
            Field::new("embedding", list.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(ids.to_vec())), Arc::new(list)]).unwrap();
        Table::new("emb", schema, vec![batch]).unwrap()
    }

    fn pairs(rows: &[(&str, &str, f64)], chunk: usize) -> Table {
        super::super::pairs_table("pairs", rows, chunk)
    }

    fn column(t: &Table, name: &str) -> Vec<f64> {
        let i = t.schema.index_of(name).unwrap();
        t.batches.iter().flat_map(|b| b.column(i).as_primitive::<Float64Type>().values().to_vec()).collect()
    }

    #[test]
    fn importance_and_selection() {
        // Prompts on a line at 0, 1, 3, 7 (L2, k = 1): ρ = 1, 1, 2, 4.
        let emb = embeddings(&["a", "b", "c", "d"], &[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]]);
        let rows = [("a", "p1", 1.0), ("b", "p2", 0.5), ("c", "p3", 0.0), ("d", "p4", -1.0), ("a", "p0", 1.0)];
        let opts = FifaOptions { alpha: 1.0, k: 1, metric: Metric::L2, keep: Keep::Count(3), threads: 1, ..Default::default() };
        let (out, stats) = fifa(&pairs(&rows, 2), Some(&emb), &opts).unwrap();
        // importance: 1, 0.5, ln 2 = 0.69, ln 4 − 1 = 0.39, 1 → keep p1, p0 (tie at 1) and p3.
        let imp = column(&out, "importance");
        assert_eq!(imp.len(), 3);
        assert!((imp[0] - 1.0).abs() < 1e-12 && (imp[1] - 2f64.ln()).abs() < 1e-12 && (imp[2] - 1.0).abs() < 1e-12);
        assert_eq!(column(&out, "knn_distance"), [1.0, 2.0, 1.0]);
        assert_eq!((stats.kept, stats.dropped, stats.prompts, stats.prompts_in_pairs), (3, 2, 4, 4));
        assert!((stats.threshold_importance.unwrap() - 2f64.ln()).abs() < 1e-12);
        // A budget of 1 with a tie at the top: the smaller pair id wins.
        let (out, _) = fifa(&pairs(&rows, 5), Some(&emb), &FifaOptions { keep: Keep::Count(1), ..opts.clone() }).unwrap();
        let i = out.schema.index_of("pair_id").unwrap();
        assert_eq!(out.batches[0].column(i).as_string::<i32>().value(0), "p0");
        assert_eq!(Keep::Fraction(0.5).rows(5).unwrap(), 3);
        assert_eq!(Keep::Fraction(0.7).rows(100).unwrap(), 70);
    }

    #[test]
    fn errors_name_the_row_and_prompt() {
        let emb = embeddings(&["a", "b", "c"], &[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]]);
        let opts = FifaOptions { k: 1, metric: Metric::L2, threads: 1, ..Default::default() };
        let e = fifa(&pairs(&[("a", "p", 1.0), ("zz", "q", 1.0)], 2), Some(&emb), &opts).unwrap_err();
        assert_eq!(e.to_string(), "pairs: row 1, field 'prompt_id': no embedding for prompt 'zz' in emb");
        let e = fifa(&pairs(&[("a", "p", f64::NAN)], 2), Some(&emb), &opts).unwrap_err();
        assert_eq!(e.to_string(), "pairs: row 0, field 'margin': the FiFA margin must be finite, got NaN");
        let e = fifa(&pairs(&[("a", "p", 1.0)], 2), Some(&emb), &FifaOptions { metric: Metric::Cosine, ..opts.clone() })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "emb: row 0, field 'embedding': prompt 'a': embedding is all zeros: the cosine distance is undefined"
        );
        let nan = embeddings(&["a", "b"], &[[0.0, 0.0], [f32::NAN, 0.0]]);
        let e = fifa(&pairs(&[("a", "p", 1.0)], 2), Some(&nan), &opts).unwrap_err();
        assert_eq!(e.to_string(), "emb: row 1, field 'embedding': embedding of prompt 'b' has NaN at position 0");
        let twice = embeddings(&["a", "a"], &[[0.0, 0.0], [1.0, 0.0]]);
        let e = fifa(&pairs(&[("a", "p", 1.0)], 2), Some(&twice), &opts).unwrap_err();
        assert!(e.to_string().contains("row 1, field 'prompt_id': prompt 'a' has a second embedding"), "{e}");
        let e = fifa(&pairs(&[("a", "p", 1.0)], 2), Some(&emb), &FifaOptions { k: 3, ..opts.clone() }).unwrap_err();
        assert!(e.to_string().contains("need at least 4 prompts with embeddings, got 3"), "{e}");
    }

    #[test]
    fn split_path_keeps_the_same_rows_as_the_whole_step() {
        let emb = embeddings(&["a", "b", "c", "d"], &[[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]]);
        // Ties at importance 1 (p0, p1, p5) straddle the budget of 2 and batch boundaries.
        let rows = [("a", "p1", 1.0), ("b", "p2", 0.5), ("c", "p3", 0.0), ("d", "p4", -1.0), ("a", "p0", 1.0), ("a", "p5", 1.0)];
        let opts = FifaOptions { k: 1, metric: Metric::L2, keep: Keep::Count(2), threads: 1, ..Default::default() };
        let (whole, _) = fifa(&pairs(&rows, 6), Some(&emb), &opts).unwrap();

        let pe = PromptEmbeddings::from_table(&emb, "embedding", opts.metric).unwrap();
        let radii = PromptRadii::from_table(&radii_table(&pe, &prompt_radii(&pe, &opts).unwrap()).unwrap()).unwrap();
        let parts: Vec<Table> = [&rows[..2], &rows[2..5], &rows[5..]]
            .iter()
            .map(|part| score_table(&pairs(part, 1), &radii, &opts).unwrap())
            .collect();
        let importance: Vec<f64> = parts.iter().flat_map(|t| column(t, "importance")).collect();
        let ids = StringArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let cut = top_cut(&importance, &ids, 2, "scores").unwrap();
        assert_eq!(cut, Some(Cut { importance: 1.0, pair_id: Some("p1".into()) }));
        let kept: Vec<Table> = parts.iter().map(|t| keep_rows(t, cut.as_ref(), 1).unwrap()).collect();
        let kept_imp: Vec<f64> = kept.iter().flat_map(|t| column(t, "importance")).collect();
        assert_eq!(kept_imp, column(&whole, "importance"));
        assert_eq!(kept.iter().flat_map(|t| column(t, "knn_distance")).collect::<Vec<_>>(), column(&whole, "knn_distance"));
        assert_eq!(top_cut(&importance, &ids, 0, "scores").unwrap(), None);
        assert_eq!(keep_rows(&parts[0], None, 1).unwrap().num_rows(), 0);

        // Two rows with the same pair id and importance on both sides of the budget: an error.
        let dup = StringArray::from(vec!["x", "x", "y"]);
        let e = top_cut(&[1.0, 1.0, 0.0], &dup, 1, "scores").unwrap_err();
        assert!(e.to_string().contains("2 rows share pair_id \"x\""), "{e}");
    }
}
