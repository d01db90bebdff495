//! Curry-DPO curriculum: order pairs easy→hard by a difficulty column, globally or as the
//! iterative schedule (stage i = the i-th easiest pair of every prompt).
//!
//! Difficulty comes from one numeric column, by default `margin` (the score gap: a large gap
//! is easy). With `descending_is_easy` (the default) larger values are easier, so the column
//! sorted descending runs easy→hard; without it smaller values are easier (a loss, a
//! difficulty score). Ties are broken by `pair_id` (byte order), then by input position, so the
//! order is total and does not depend on batching or threads.

use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{Field, Schema};
use serde::Serialize;

use super::gather::prefetch;
use super::{make_batch, numeric_column, par_map, row_error, set_column, text_column, Table, SLICE_ROWS};
use crate::error::{PrepError, Problem, Result};
use crate::pipeline::resolve_threads;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// All pairs in one easy→hard order.
    Global,
    /// A 0-based `stage` column: stage i holds the i-th easiest pair of every prompt that has
    /// more than i pairs; rows ordered by stage, then easy→hard.
    Stages,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Global => "global",
            Schedule::Stages => "stages",
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "global" => Ok(Schedule::Global),
            "stages" => Ok(Schedule::Stages),
            _ => Err(format!("unknown curriculum schedule '{s}'; expected stages or global")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CurriculumOptions {
    /// Numeric difficulty column.
    pub by: String,
    /// Larger values are easier (true: margins, reward gaps) or harder (false: losses).
    pub descending_is_easy: bool,
    pub schedule: Schedule,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

impl Default for CurriculumOptions {
    fn default() -> Self {
        CurriculumOptions { by: "margin".into(), descending_is_easy: true, schedule: Schedule::Stages, threads: 0 }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CurriculumStats {
    pub rows: u64,
    /// Distinct prompt ids (stages schedule only).
    pub prompts: Option<u64>,
    pub by: String,
    pub descending_is_easy: bool,
    pub schedule: &'static str,
    /// Number of stages (0 for the global schedule).
    pub stages: usize,
    /// Pairs (= prompts) in each stage, stage 0 first.
    pub pairs_per_stage: Vec<u64>,
    pub difficulty_min: Option<f64>,
    pub difficulty_max: Option<f64>,
    pub difficulty_mean: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct CurriculumResult {
    pub table: Table,
    /// Batches of each stage (stages schedule; a batch never spans two stages).
    pub stage_batches: Vec<Range<usize>>,
    pub stats: CurriculumStats,
}

impl CurriculumResult {
    /// One table per stage, stage 0 first.
    pub fn stage_tables(&self) -> Vec<Table> {
        self.stage_batches
            .iter()
            .map(|r| Table {
                source: self.table.source.clone(),
                schema: self.table.schema.clone(),
                batches: self.table.batches[r.clone()].to_vec(),
            })
            .collect()
    }
}

/// Per-batch sort keys.
struct Keys {
    difficulty: Float64Array,
    pair_id: StringArray,
    prompt_id: Option<StringArray>,
}

/// One row to sort: difficulty as an order-preserving integer (easy first), then the first 8
/// bytes of its pair id (big-endian, zero-padded: same order as the bytes), compared as one
/// u128 ([`Item::key`]); and its position. Two u64 fields rather than a u128 one (16-byte
/// aligned) keep it at 24 bytes instead of 32, which the sort moves less of; the prompt index
/// of the stages schedule lives apart for the same reason.
#[derive(Clone, Copy)]
struct Item {
    difficulty: u64,
    pair_prefix: u64,
    batch: u32,
    row: u32,
}

/// The order of two rows with equal keys: by whole pair id, then by position.
#[cold]
#[inline(never)]
fn tie_break(keys: &[Keys], a: &Item, b: &Item) -> Ordering {
    let pair_id = |it: &Item| keys[it.batch as usize].pair_id.value(it.row as usize);
    pair_id(a).cmp(pair_id(b)).then_with(|| (a.batch, a.row).cmp(&(b.batch, b.row)))
}

impl Item {
    /// Difficulty, then pair-id prefix, as one integer: a branch-free compare.
    #[inline(always)]
    fn key(&self) -> u128 {
        (self.difficulty as u128) << 64 | self.pair_prefix as u128
    }
}

/// f64 → u64 with the same order (finite values; -0.0 taken as 0.0).
fn ordered_bits(x: f64) -> u64 {
    let bits = (x + 0.0).to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

fn prefix_u64(s: &str) -> u64 {
    let mut b = [0u8; 8];
    let n = s.len().min(8);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    u64::from_be_bytes(b)
}

pub fn curriculum(table: &Table, opts: &CurriculumOptions) -> Result<CurriculumResult> {
    let threads = resolve_threads(opts.threads);
    let source = table.source.as_str();
    let stages = opts.schedule == Schedule::Stages;
    let di = table.column_index(&opts.by, "the difficulty of each pair")?;
    let pi = table.column_index("pair_id", "ties in difficulty are broken by pair id")?;
    let qi = if stages {
        Some(table.column_index("prompt_id", "the stage schedule takes the i-th easiest pair of every prompt")?)
    } else {
        None
    };
    if table.batches.iter().any(|b| b.num_rows() > u32::MAX as usize) || table.batches.len() > u32::MAX as usize {
        return Err(PrepError::Config(format!("{source}: a batch is too large (more than 2^32 rows)")));
    }

    let mut first_rows = Vec::with_capacity(table.batches.len());
    let mut acc = 0u64;
    for b in &table.batches {
        first_rows.push(acc);
        acc += b.num_rows() as u64;
    }
    let work: Vec<(u64, &RecordBatch)> = first_rows.iter().copied().zip(&table.batches).collect();
    let by = opts.by.as_str();
    let keys: Vec<Keys> = par_map(&work, threads, |&(first, b)| {
        let difficulty = numeric_column(b, di, source, &format!("the curriculum difficulty (by '{by}')"))?;
        for i in 0..difficulty.len() {
            let row = first + i as u64;
            if difficulty.is_null(i) {
                return Err(row_error(source, row, by, Problem::MissingField, "no difficulty value (null)"));
            }
            let x = difficulty.value(i);
            if !x.is_finite() {
                return Err(row_error(source, row, by, Problem::NonFiniteScore, format!("difficulty must be finite, got {x}")));
            }
        }
        let ids = |index: usize, name: &str| -> Result<StringArray> {
            let a = text_column(b, index, source, "an id")?;
            if let Some(i) = (0..a.len()).find(|&i| a.is_null(i)) {
                return Err(row_error(source, first + i as u64, name, Problem::MissingField, format!("{name} is null")));
            }
            Ok(a)
        };
        let pair_id = ids(pi, "pair_id")?;
        let prompt_id = qi.map(|q| ids(q, "prompt_id")).transpose()?;
        Ok(Keys { difficulty, pair_id, prompt_id })
    })?;

    let n = table.num_rows();
    // Prompt ids → dense indices, in input order (rows of a prompt usually sit together, so
    // most rows reuse the previous row's index without hashing). The table holds each id's
    // hash beside its index, so growing it never rereads the ids.
    let mut prompt_index: hashbrown::HashTable<(u64, u32)> = hashbrown::HashTable::new();
    let mut prompt_ids: Vec<&str> = Vec::new();
    let mut last: Option<(&str, u32)> = None;
    let mut items: Vec<Item> = Vec::with_capacity(n);
    // Prompt index of each row, by position in the input (stages schedule).
    let mut prompt_of: Vec<u32> = Vec::with_capacity(if stages { n } else { 0 });
    let (mut dmin, mut dmax, mut dsum) = (f64::INFINITY, f64::NEG_INFINITY, 0.0);
    for (bi, k) in keys.iter().enumerate() {
        for (ri, &x) in k.difficulty.values().iter().enumerate() {
            dmin = dmin.min(x);
            dmax = dmax.max(x);
            dsum += x;
            let asc = ordered_bits(x);
            if let Some(ids) = &k.prompt_id {
                prompt_of.push({
                    let id = ids.value(ri);
                    match last {
                        Some((prev, p)) if prev == id => p,
                        _ => {
                            let h = xxhash_rust::xxh3::xxh3_64(id.as_bytes());
                            let same = |&(eh, ei): &(u64, u32)| eh == h && prompt_ids[ei as usize] == id;
                            let p = match prompt_index.entry(h, same, |&(eh, _)| eh) {
                                hashbrown::hash_table::Entry::Occupied(e) => e.get().1,
                                hashbrown::hash_table::Entry::Vacant(e) => {
                                    let p = prompt_ids.len() as u32;
                                    e.insert((h, p));
                                    prompt_ids.push(id);
                                    p
                                }
                            };
                            last = Some((id, p));
                            p
                        }
                    }
                });
            }
            items.push(Item {
                difficulty: if opts.descending_is_easy { !asc } else { asc },
                pair_prefix: prefix_u64(k.pair_id.value(ri)),
                batch: bi as u32,
                row: ri as u32,
            });
        }
    }
    let prompts_seen = prompt_ids.len();
    drop(prompt_index);
    drop(prompt_ids);
    // Kept small so that the sort inlines it; equal keys are rare (same difficulty and pair-id
    // prefix) and go out of line.
    let cmp = |a: &Item, b: &Item| match a.key().cmp(&b.key()) {
        Ordering::Equal => tie_break(&keys, a, b),
        unequal => unequal,
    };
    sort_parallel(&mut items, threads, &cmp);

    // Stage of each row: its position among its prompt's rows in the easy→hard order.
    // The rows in output order as (batch, row), and the output batches as (stage, range of them).
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut chunks: Vec<(Option<i64>, Range<usize>)> = Vec::new();
    let mut pairs_per_stage: Vec<u64> = Vec::new();
    let mut prompts = None;
    if stages {
        let mut seen: Vec<u32> = vec![0; prompts_seen];
        let mut stage_of: Vec<u32> = Vec::with_capacity(n);
        let position = |it: &Item| first_rows[it.batch as usize] as usize + it.row as usize;
        // Items are in sorted order, so both lookups are random: fetch a row's prompt index
        // 32 items ahead and its count 16 ahead, so that the misses overlap.
        for (i, it) in items.iter().enumerate() {
            if let Some(ahead) = items.get(i + 32) {
                prefetch(prompt_of[position(ahead)..].as_ptr() as *const u8);
            }
            if let Some(ahead) = items.get(i + 16) {
                prefetch(seen[prompt_of[position(ahead)] as usize..].as_ptr() as *const u8);
            }
            let c = &mut seen[prompt_of[position(it)] as usize];
            stage_of.push(*c);
            if *c as usize == pairs_per_stage.len() {
                pairs_per_stage.push(0);
            }
            pairs_per_stage[*c as usize] += 1;
            *c += 1;
        }
        prompts = Some(prompts_seen as u64);
        // Stable counting sort by stage keeps the easy→hard order inside each stage.
        let mut next: Vec<usize> = Vec::with_capacity(pairs_per_stage.len());
        let mut start = 0;
        for (s, &count) in pairs_per_stage.iter().enumerate() {
            next.push(start);
            let end = start + count as usize;
            chunks.extend((start..end).step_by(SLICE_ROWS).map(|lo| (Some(s as i64), lo..(lo + SLICE_ROWS).min(end))));
            start = end;
        }
        order.resize(n, (0, 0));
        for (it, &s) in items.iter().zip(&stage_of) {
            order[next[s as usize]] = (it.batch as usize, it.row as usize);
            next[s as usize] += 1;
        }
    } else {
        order.extend(items.iter().map(|it| (it.batch as usize, it.row as usize)));
        chunks.extend((0..n).step_by(SLICE_ROWS).map(|lo| (None, lo..(lo + SLICE_ROWS).min(n))));
    }
    drop(items);

    let mut fields: Vec<Field> = table.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut probe: Vec<ArrayRef> = table.schema.fields().iter().map(|f| arrow_array::new_empty_array(f.data_type())).collect();
    if stages {
        set_column(&mut fields, &mut probe, "stage", Arc::new(Int64Array::from(Vec::<i64>::new())));
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, table.schema.metadata().clone()));
    let stage_index = schema.index_of("stage").ok();
    let ncols = table.schema.fields().len();
    let columns: Vec<Vec<&dyn Array>> =
        (0..ncols).map(|c| table.batches.iter().map(|b| b.column(c).as_ref()).collect()).collect();
    let batches = par_map(&chunks, threads, |(stage, rows)| {
        let idx = &order[rows.clone()];
        let mut cols = super::gather::gather_columns(&columns, idx)
            .map_err(|e| PrepError::Config(format!("{source}: reordering rows: {e}")))?;
        if let (Some(s), Some(si)) = (stage, stage_index) {
            let col: ArrayRef = Arc::new(Int64Array::from(vec![*s; idx.len()]));
            if si < cols.len() {
                cols[si] = col;
            } else {
                cols.push(col);
            }
        }
        make_batch(schema.clone(), cols, idx.len())
    })?;

    let mut stage_batches = Vec::new();
    if stages {
        let mut start = 0;
        for i in 0..=chunks.len() {
            if i == chunks.len() || (i > start && chunks[i].0 != chunks[start].0) {
                if i > start {
                    stage_batches.push(start..i);
                }
                start = i;
            }
        }
    }
    let stats = CurriculumStats {
        rows: n as u64,
        prompts,
        by: opts.by.clone(),
        descending_is_easy: opts.descending_is_easy,
        schedule: opts.schedule.name(),
        stages: pairs_per_stage.len(),
        pairs_per_stage,
        difficulty_min: (n > 0).then_some(dmin),
        difficulty_max: (n > 0).then_some(dmax),
        difficulty_mean: (n > 0).then(|| dsum / n as f64),
    };
    Ok(CurriculumResult { table: Table { source: table.source.clone(), schema, batches }, stage_batches, stats })
}

/// Sort on `threads` threads: sort equal parts in parallel, then merge neighbouring runs
/// until one is left. Each merge is split in two that run at once: one half takes the
/// smaller elements from the runs' fronts, the other the larger ones from their backs. The
/// comparison is a total order (equal only for the same element), so each half is exactly
/// determined and the result is the same for any thread count.
fn sort_parallel<T: Copy + Send + Sync>(v: &mut Vec<T>, threads: usize, cmp: &(impl Fn(&T, &T) -> Ordering + Sync)) {
    let parts = threads.min(v.len() / 16384).max(1);
    if parts == 1 {
        v.sort_unstable_by(cmp);
        return;
    }
    let size = v.len().div_ceil(parts);
    crate::threads::scope(|s| {
        for part in v.chunks_mut(size) {
            s.spawn(move || part.sort_unstable_by(cmp));
        }
    });
    // Run boundaries in `src`; merged into `dst`, then the two swap.
    let mut bounds: Vec<usize> = (0..v.len()).step_by(size).chain([v.len()]).collect();
    let mut src = std::mem::take(v);
    let mut dst = src.clone();
    while bounds.len() > 2 {
        crate::threads::scope(|s| {
            let mut rest: &mut [T] = &mut dst;
            for w in bounds.chunks(2).zip(bounds[1..].chunks(2)) {
                let (lo, mid, hi) = match w {
                    ([lo, mid], [_, hi]) => (*lo, *mid, *hi),
                    ([lo, _], [hi]) | ([lo], [hi]) => (*lo, *hi, *hi),
                    _ => unreachable!("chunks of two boundaries and their successors"),
                };
                let (out, tail) = std::mem::take(&mut rest).split_at_mut(hi - lo);
                rest = tail;
                let (a, b) = (&src[lo..mid], &src[mid..hi]);
                if b.is_empty() {
                    out.copy_from_slice(a);
                    continue;
                }
                let (front, back) = out.split_at_mut(out.len() / 2);
                s.spawn(move || merge_front(a, b, front, cmp));
                s.spawn(move || merge_back(a, b, back, cmp));
            }
        });
        bounds = bounds.iter().copied().step_by(2).chain(bounds.last().copied()).collect();
        bounds.dedup();
        std::mem::swap(&mut src, &mut dst);
    }
    *v = src;
}

/// The `out.len()` smallest elements of the sorted runs `a` and `b`, in order.
fn merge_front<T: Copy>(a: &[T], b: &[T], out: &mut [T], cmp: &impl Fn(&T, &T) -> Ordering) {
    let (mut i, mut j) = (0, 0);
    for slot in out.iter_mut() {
        let take_b = i == a.len() || (j < b.len() && cmp(&b[j], &a[i]) == Ordering::Less);
        if take_b {
            *slot = b[j];
            j += 1;
        } else {
            *slot = a[i];
            i += 1;
        }
    }
}

/// The `out.len()` largest elements of the sorted runs `a` and `b`, in order.
fn merge_back<T: Copy>(a: &[T], b: &[T], out: &mut [T], cmp: &impl Fn(&T, &T) -> Ordering) {
    let (mut i, mut j) = (a.len(), b.len());
    for slot in out.iter_mut().rev() {
        let take_a = j == 0 || (i > 0 && cmp(&a[i - 1], &b[j - 1]) == Ordering::Greater);
        if take_a {
            i -= 1;
            *slot = a[i];
        } else {
            j -= 1;
            *slot = b[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};
    use arrow_schema::DataType;

    fn table(rows: &[(&str, &str, f64)], batch: usize) -> Table {
        super::super::pairs_table("t", rows, batch)
    }

    fn col(t: &Table, name: &str) -> Vec<String> {
        let i = t.schema.index_of(name).unwrap();
        t.batches
            .iter()
            .flat_map(|b| {
                let a = b.column(i);
                (0..a.len())
                    .map(|r| match a.data_type() {
                        DataType::Utf8 => a.as_string::<i32>().value(r).to_string(),
                        DataType::Int64 => a.as_primitive::<Int64Type>().value(r).to_string(),
                        _ => a.as_primitive::<Float64Type>().value(r).to_string(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    const ROWS: &[(&str, &str, f64)] = &[
        ("a", "a1", 1.0),
        ("a", "a2", 3.0),
        ("b", "b1", 2.0),
        ("a", "a3", 2.0),
        ("b", "b0", 2.0),
        ("c", "c1", 0.5),
    ];

    #[test]
    fn global_order_is_easy_to_hard_with_pair_id_ties() {
        let r = curriculum(&table(ROWS, 2), &CurriculumOptions { schedule: Schedule::Global, ..Default::default() }).unwrap();
        assert_eq!(col(&r.table, "pair_id"), ["a2", "a3", "b0", "b1", "a1", "c1"]);
        assert!(r.table.schema.index_of("stage").is_err());
        let asc = CurriculumOptions { schedule: Schedule::Global, descending_is_easy: false, ..Default::default() };
        let r = curriculum(&table(ROWS, 4), &asc).unwrap();
        assert_eq!(col(&r.table, "pair_id"), ["c1", "a1", "a3", "b0", "b1", "a2"]);
    }

    #[test]
    fn stages_take_the_ith_easiest_pair_of_every_prompt() {
        for (batch, threads) in [(1, 1), (2, 2), (6, 3)] {
            let opts = CurriculumOptions { threads, ..Default::default() };
            let r = curriculum(&table(ROWS, batch), &opts).unwrap();
            assert_eq!(col(&r.table, "pair_id"), ["a2", "b0", "c1", "a3", "b1", "a1"]);
            assert_eq!(col(&r.table, "stage"), ["0", "0", "0", "1", "1", "2"]);
            assert_eq!(r.stats.pairs_per_stage, [3, 2, 1]);
            assert_eq!(r.stats.prompts, Some(3));
            let stages = r.stage_tables();
            assert_eq!(stages.iter().map(|t| t.num_rows()).collect::<Vec<_>>(), [3, 2, 1]);
        }
    }

    #[test]
    fn errors_name_the_column_and_row() {
        let mut t = table(ROWS, 6);
        let e = curriculum(&t, &CurriculumOptions { by: "rm_margin".into(), ..Default::default() }).unwrap_err();
        assert!(e.to_string().starts_with("t: missing column 'rm_margin'"), "{e}");
        assert!(e.to_string().contains("prompt_id, pair_id, margin"), "{e}");
        let nan = Float64Array::from(vec![1.0, 2.0, f64::NAN, 1.0, 1.0, 1.0]);
        let b = &t.batches[0];
        t.batches[0] = RecordBatch::try_new(b.schema(), vec![b.column(0).clone(), b.column(1).clone(), Arc::new(nan)]).unwrap();
        let e = curriculum(&t, &CurriculumOptions::default()).unwrap_err();
        assert_eq!(e.to_string(), "t: row 2, field 'margin': difficulty must be finite, got NaN");
        let e = curriculum(&t, &CurriculumOptions { by: "pair_id".into(), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("column 'pair_id' is Utf8"), "{e}");
    }

    #[test]
    fn parallel_sort_matches_sequential() {
        // 1 to 7 runs (odd counts leave a run without a partner), uneven run lengths, many
        // equal keys: (key, position) pairs must come out as a stable sort by key leaves them.
        for (len, threads) in [(100_000u64, 3), (100_000, 2), (70_001, 4), (131_073, 5), (131_073, 7), (40_000, 1)] {
            let mut v: Vec<(u64, u64)> = (0..len).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1000, i)).collect();
            let mut w = v.clone();
            sort_parallel(&mut v, threads, &|a: &(u64, u64), b: &(u64, u64)| a.cmp(b));
            w.sort_by_key(|x| x.0);
            assert_eq!(v, w, "len {len}, threads {threads}");
        }
        assert!(ordered_bits(-1.0) < ordered_bits(-0.5) && ordered_bits(-0.0) == ordered_bits(0.0));
        assert!(ordered_bits(0.0) < ordered_bits(1e-300) && ordered_bits(2.0) < ordered_bits(f64::MAX));
    }
}
