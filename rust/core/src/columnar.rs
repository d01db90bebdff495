//! Pairs and lists made straight from a batch's Arrow columns (UltraFeedback and Nectar
//! layouts), with no `Group` per row: each prompt's responses are ordered, paired or cut on
//! their scores alone, and the output's text columns are gathered from the input's in one
//! pass per column. Building a `Group` per row and copying every response into Arrow builders
//! one by one was most of a run on an Arrow table.
//!
//! The pair and list rules are the row path's (`pairs::pairs_of_order`,
//! `lists::list_of_order`). A chunk this path is not sure of (a row the group reader would
//! decline, given prompt ids, label "score" on ranks, a carried column whose type the row
//! path might change) gives None, and the caller runs the row path on it: the results, stats
//! and error messages are that path's.

use std::borrow::Cow;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, NullArray, RecordBatch, StringArray, UInt32Array,
};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field};

use crate::arrow_groups::{text, GroupReader, Layout, Num};
use crate::list_output::{is_list_column, ListColumns};
use crate::model::{pair_hash, push_hex16, Content};
use crate::lists::{gain, list_of_order, LabelKind, ListOptions};
use crate::output::{is_pair_column, BatchColumns, PairColumns, TYPE_HINTS};
use crate::pairs::{count_pairs, order_by_preference, pairs_of_order, PairOptions};
use crate::stats::Stats;
use crate::steps::gather::gather;

/// The columns of a batch in the rated layout, checked for this path.
struct Rated<'r> {
    prompt: &'r StringArray,
    list: &'r ListArray,
    items: &'r arrow_array::StructArray,
    texts: &'r StringArray,
    rating: Num<'r>,
    is_rank: bool,
    model: Option<&'r StringArray>,
    /// Carried columns, under their names after the column map, that the output keeps.
    carried: Vec<(&'r str, &'r ArrayRef)>,
}

impl<'r> Rated<'r> {
    fn new(reader: &'r GroupReader<'_>, is_made: impl Fn(&str) -> bool) -> Option<Rated<'r>> {
        let Layout::Rated { prompt, list, items, text: texts, rating, is_rank, model, .. } = &reader.layout else {
            return None;
        };
        if reader.prompt_id.is_some() {
            return None;
        }
        // Carried columns the row path keeps with their type: text, integers, finite floats
        // and booleans without nulls, under names it gives no type of its own.
        let carried: Vec<(&str, &ArrayRef)> = if reader.drop_extra {
            Vec::new()
        } else {
            reader.carried.iter().map(|(_, c)| (c.name.as_ref(), c.array)).filter(|(name, _)| !is_made(name)).collect()
        };
        for (name, array) in &carried {
            let kept_type = match array.data_type() {
                DataType::Utf8 | DataType::Int64 | DataType::Boolean => true,
                // Lists of text (UltraFeedback's `models`), as the row path types them when
                // the rows it writes hold at least one (see `push_carried`).
                DataType::List(item) => item.data_type() == &DataType::Utf8 && array.as_list::<i32>().values().null_count() == 0,
                DataType::Float64 => {
                    array.as_any().downcast_ref::<Float64Array>().is_some_and(|a| a.values().iter().all(|x| x.is_finite()))
                }
                _ => false,
            };
            if !kept_type || array.null_count() > 0 || TYPE_HINTS.iter().any(|(hint, _)| hint == name) {
                return None;
            }
        }
        Some(Rated { prompt, list, items, texts, rating: *rating, is_rank: *is_rank, model: *model, carried })
    }

    /// Calls `each(row, prompt, first item, preferences)` for each of the `n` rows in order,
    /// or returns None at the first row `GroupReader::group` would decline or `accept` (on
    /// each rating) refuses. Counts rows read, prompts and responses as the row path does.
    fn for_each_row(
        &self,
        n: usize,
        stats: &mut Stats,
        accept: impl Fn(f64) -> bool,
        mut each: impl FnMut(usize, &'r str, usize, &[f64], &mut Stats),
    ) -> Option<()> {
        let offsets = self.list.value_offsets();
        let mut pref: Vec<f64> = Vec::new();
        for i in 0..n {
            let p = text(self.prompt, i)?;
            if self.list.is_null(i) {
                return None;
            }
            let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
            if end - start < 2 {
                return None;
            }
            pref.clear();
            for j in start..end {
                if self.items.is_null(j) {
                    return None;
                }
                let value = self.rating.get(j).filter(|x| x.is_finite() && accept(*x))?;
                text(self.texts, j)?;
                pref.push(if self.is_rank { -value } else { value });
            }
            stats.rows_read += 1;
            stats.prompts += 1;
            stats.responses += (end - start) as u64;
            each(i, p, start, &pref, stats);
        }
        Some(())
    }

    fn same(&self, start: usize) -> impl Fn(usize, usize) -> bool + '_ {
        move |a, b| self.texts.value(start + a) == self.texts.value(start + b)
    }

    /// The ratings of the given items as floats.
    fn ratings(&self, items: &[(usize, usize)]) -> ArrayRef {
        Arc::new(Float64Array::from(items.iter().map(|&(_, j)| self.rating.get(j).expect("validated")).collect::<Vec<_>>()))
    }

    /// Scores where the layout rates by score, else nulls; ranks the other way round.
    fn scores(&self, items: &[(usize, usize)]) -> ArrayRef {
        if self.is_rank { all_null(items.len()) } else { self.ratings(items) }
    }

    fn ranks(&self, items: &[(usize, usize)]) -> ArrayRef {
        if self.is_rank { self.ratings(items) } else { all_null(items.len()) }
    }

    fn models(&self, items: &[(usize, usize)]) -> Option<ArrayRef> {
        match self.model {
            Some(m) => gather(&[m], items).ok(),
            None => Some(Arc::new(StringArray::new_null(items.len()))),
        }
    }

    /// Rows `rows` of a column: the column itself when that is all of its n rows.
    fn rows_of(array: &dyn Array, rows: &[(usize, usize)], n: usize) -> Option<ArrayRef> {
        if is_identity(rows, n) && array.len() == n {
            Some(array.slice(0, n))
        } else {
            gather(&[array], rows).ok()
        }
    }

    /// The carried columns for output rows from input rows `rows` (none when no row is
    /// written, as the row path, which types them from the rows it writes).
    fn push_carried(&self, out: &mut BatchColumns, rows: &[(usize, usize)], n: usize) -> Option<()> {
        if rows.is_empty() {
            return Some(());
        }
        for &(name, array) in &self.carried {
            let column = match array.data_type() {
                DataType::List(_) => {
                    let list = array.as_list::<i32>();
                    // The row path types a list column from its items: none, and it is not text.
                    if rows.iter().all(|&(_, i)| list.value_length(i) == 0) {
                        return None;
                    }
                    let taken = if is_identity(rows, n) && list.len() == n {
                        list.slice(0, n)
                    } else {
                        let indices = UInt32Array::from(rows.iter().map(|&(_, i)| i as u32).collect::<Vec<_>>());
                        arrow_select::take::take(list, &indices, None).ok()?.as_list::<i32>().clone()
                    };
                    // Its items are named "item", whatever the input named them.
                    let (_, offsets, values, nulls) = taken.into_parts();
                    Arc::new(ListArray::new(Arc::new(Field::new("item", DataType::Utf8, true)), offsets, values, nulls))
                }
                _ => Self::rows_of(array.as_ref(), rows, n)?,
            };
            out.push(name, column);
        }
        Some(())
    }
}

/// A text column of the output: with no rows, a null column, as the row path's content
/// builders give before their first value.
fn content(array: Option<ArrayRef>) -> Option<ArrayRef> {
    let array = array?;
    Some(if array.is_empty() { Arc::new(NullArray::new(0)) } else { array })
}

/// Rows 0..n in order.
fn is_identity(rows: &[(usize, usize)], n: usize) -> bool {
    rows.len() == n && rows.iter().enumerate().all(|(k, &(_, i))| k == i)
}

fn all_null(len: usize) -> ArrayRef {
    Arc::new(Float64Array::new(vec![0.0; len].into(), Some(NullBuffer::new_null(len))))
}

/// Ids of 16 hex digits each, one after the other.
fn hex_ids(bytes: Vec<u8>) -> ArrayRef {
    let rows = bytes.len() / 16;
    let offsets = OffsetBuffer::new(ScalarBuffer::from((0..=rows as i32).map(|r| 16 * r).collect::<Vec<i32>>()));
    // SAFETY: 16 ASCII hex digits per row, offsets 16 apart from 0 to the buffer's end.
    Arc::new(unsafe { StringArray::new_unchecked(offsets, bytes.into(), None) })
}

/// The default prompt id of a text prompt, appended to `ids`; returns it. A text's fingerprint
/// is its bytes, so this is `model::default_prompt_id` without the owned string.
fn push_prompt_id<'b>(ids: &'b mut Vec<u8>, prompt: &str) -> &'b str {
    let start = ids.len();
    push_hex16(ids, xxhash_rust::xxh3::xxh3_64(prompt.as_bytes()));
    std::str::from_utf8(&ids[start..]).expect("hex digits are ASCII")
}

/// The list batch of every row of the reader's batch and the stats of making it, or None when
/// the row path must make it (see the module comment). `n` is the batch's row count.
pub(crate) fn lists_batch(reader: &GroupReader<'_>, n: usize, opts: &ListOptions, cols: ListColumns) -> Option<(RecordBatch, Stats)> {
    let r = Rated::new(reader, is_list_column)?;
    if r.is_rank && opts.label == LabelKind::Score {
        return None; // check_labels' error
    }
    let score_label = opts.label == LabelKind::Score;
    let mut stats = Stats::default();
    let mut kept_rows: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut members: Vec<(usize, usize)> = Vec::new();
    let mut labels: Vec<f64> = Vec::new();
    let mut list_offsets: Vec<i32> = vec![0];
    let mut prompt_ids: Vec<u8> = Vec::with_capacity(16 * n);
    r.for_each_row(
        n,
        &mut stats,
        |x| !score_label || gain(x).is_finite(), // else check_labels' error
        |i, p, start, pref, stats| {
            let before = prompt_ids.len();
            let prompt_id = push_prompt_id(&mut prompt_ids, p);
            let order = order_by_preference(pref, opts.dedupe, r.same(start), stats);
            let score = |a: usize| (!r.is_rank).then(|| pref[a]);
            let Some(l) = list_of_order(pref, order, score, prompt_id, opts, stats) else {
                prompt_ids.truncate(before);
                return;
            };
            stats.rows_written += 1;
            kept_rows.push((0, i));
            members.extend(l.members.iter().map(|&a| (0, start + a)));
            labels.extend_from_slice(&l.labels);
            list_offsets.push(members.len() as i32);
        },
    )?;

    let offsets = OffsetBuffer::new(ScalarBuffer::from(list_offsets));
    let as_list = |child: ArrayRef| -> ArrayRef {
        let item = Arc::new(Field::new("item", child.data_type().clone(), true));
        Arc::new(ListArray::new(item, offsets.clone(), child, None))
    };
    let mut out = BatchColumns::default();
    out.push("prompt_id", hex_ids(prompt_ids));
    out.push("prompt", content(Rated::rows_of(r.prompt, &kept_rows, n))?);
    out.push("responses", as_list(content(gather(&[r.texts], &members).ok())?));
    let gains: Vec<f64> = labels.iter().map(|&l| gain(l)).collect();
    out.push("labels", as_list(Arc::new(Float64Array::from(labels))));
    out.push("gains", as_list(Arc::new(Float64Array::from(gains))));
    out.push("scores", as_list(r.scores(&members)));
    if cols.ranks {
        out.push("ranks", as_list(r.ranks(&members)));
    }
    if cols.models {
        out.push("models", as_list(r.models(&members)?));
    }
    let sizes: Vec<i64> = offsets.windows(2).map(|w| (w[1] - w[0]) as i64).collect();
    out.push("list_size", Arc::new(Int64Array::from(sizes)));
    r.push_carried(&mut out, &kept_rows, n)?;
    Some((out.finish(kept_rows.len()), stats))
}

/// The pair batch of every row of the reader's batch and the stats of making it, or None when
/// the row path must make it (see the module comment). `n` is the batch's row count.
pub(crate) fn pairs_batch(reader: &GroupReader<'_>, n: usize, opts: &PairOptions, cols: PairColumns) -> Option<(RecordBatch, Stats)> {
    let r = Rated::new(reader, is_pair_column)?;
    if cols.hallucinated {
        return None; // the rated layouts carry no factuality labels
    }
    let mut stats = Stats::default();
    let mut rows: Vec<(usize, usize)> = Vec::new();
    let mut chosen: Vec<(usize, usize)> = Vec::new();
    let mut rejected: Vec<(usize, usize)> = Vec::new();
    let mut margins: Vec<f64> = Vec::new();
    let mut ties: Vec<bool> = Vec::new();
    let mut prompt_ids: Vec<u8> = Vec::new();
    let mut pair_ids: Vec<u8> = Vec::new();
    let mut id = Vec::with_capacity(16);
    r.for_each_row(
        n,
        &mut stats,
        |_| true,
        |i, p, start, pref, stats| {
            id.clear();
            let prompt_id = push_prompt_id(&mut id, p);
            let order = order_by_preference(pref, opts.dedupe, r.same(start), stats);
            let pairs = pairs_of_order(pref, &order, prompt_id, opts, stats);
            count_pairs(stats, &pairs);
            for pair in &pairs {
                let (c, j) = (start + pair.chosen, start + pair.rejected);
                let text = |k: usize| Content::Text(Cow::Borrowed(r.texts.value(k)));
                push_hex16(&mut pair_ids, pair_hash(prompt_id, &text(c), &text(j)));
                prompt_ids.extend_from_slice(prompt_id.as_bytes());
                rows.push((0, i));
                chosen.push((0, c));
                rejected.push((0, j));
                margins.push(pair.margin);
                ties.push(pair.tie);
            }
        },
    )?;

    let mut out = BatchColumns::default();
    out.push("prompt_id", hex_ids(prompt_ids));
    out.push("pair_id", hex_ids(pair_ids));
    out.push("prompt", content(Rated::rows_of(r.prompt, &rows, n))?);
    out.push("chosen", content(gather(&[r.texts], &chosen).ok())?);
    out.push("rejected", content(gather(&[r.texts], &rejected).ok())?);
    out.push("score_chosen", r.scores(&chosen));
    out.push("score_rejected", r.scores(&rejected));
    out.push("margin", Arc::new(Float64Array::from(margins)));
    if cols.tie {
        out.push("tie", Arc::new(BooleanArray::from(ties)));
    }
    if cols.ranks {
        out.push("rank_chosen", r.ranks(&chosen));
        out.push("rank_rejected", r.ranks(&rejected));
    }
    if cols.models {
        out.push("chosen_model", r.models(&chosen)?);
        out.push("rejected_model", r.models(&rejected)?);
    }
    r.push_carried(&mut out, &rows, n)?;
    Some((out.finish(rows.len()), stats))
}
