//! Lists made straight from a batch's Arrow columns (UltraFeedback and Nectar layouts), with
//! no `Group` per row: each prompt's responses are ordered and cut on their scores alone, and
//! the output's text columns are gathered from the input's in one pass per column. Building a
//! `Group` per row and copying every response into Arrow builders one by one was most of a
//! lists run on an Arrow table.
//!
//! The list rules are `lists::list_of_order`, shared with the row path. A chunk this path is
//! not sure of (a row the group reader would decline, given prompt ids, label "score" on
//! ranks, a carried column whose type the row path might change) gives None, and the caller
//! runs the row path on it: the results, stats and error messages are that path's.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, ListArray, RecordBatch, StringArray};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field};

use crate::arrow_groups::{text, GroupReader, Layout};
use crate::lists::{gain, list_of_order, LabelKind, ListOptions};
use crate::list_output::{is_list_column, ListColumns};
use crate::output::{BatchColumns, TYPE_HINTS};
use crate::pairs::order_by_preference;
use crate::stats::Stats;
use crate::steps::gather::gather;

/// The list batch of every row of the reader's batch and the stats of making it, or None when
/// the row path must make it (see the module comment). `n` is the batch's row count.
pub(crate) fn lists_batch(reader: &GroupReader<'_>, n: usize, opts: &ListOptions, cols: ListColumns) -> Option<(RecordBatch, Stats)> {
    let Layout::Rated { prompt, list, items, text: texts, rating, is_rank, model, .. } = &reader.layout else {
        return None;
    };
    let is_rank = *is_rank;
    if reader.prompt_id.is_some() || (is_rank && opts.label == LabelKind::Score) {
        return None;
    }
    // Carried columns the row path keeps with their type: text, integers, finite floats and
    // booleans without nulls, under names it gives no type of its own.
    let carried: Vec<(&str, &ArrayRef)> = if reader.drop_extra {
        Vec::new()
    } else {
        reader.carried.iter().map(|(_, c)| (c.name.as_ref(), c.array)).filter(|(name, _)| !is_list_column(name)).collect()
    };
    for (name, array) in &carried {
        let kept_type = match array.data_type() {
            DataType::Utf8 | DataType::Int64 | DataType::Boolean => true,
            DataType::Float64 => array.as_any().downcast_ref::<Float64Array>().is_some_and(|a| a.values().iter().all(|x| x.is_finite())),
            _ => false,
        };
        if !kept_type || array.null_count() > 0 || TYPE_HINTS.iter().any(|(hint, _)| hint == name) {
            return None;
        }
    }

    let mut stats = Stats::default();
    let offsets = list.value_offsets();
    let mut kept_rows: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut members: Vec<(usize, usize)> = Vec::with_capacity(offsets[n] as usize - offsets[0] as usize);
    let mut labels: Vec<f64> = Vec::with_capacity(members.capacity());
    let mut list_offsets: Vec<i32> = Vec::with_capacity(n + 1);
    list_offsets.push(0);
    let mut prompt_ids: Vec<u8> = Vec::with_capacity(16 * n);
    let mut pref: Vec<f64> = Vec::new();
    for i in 0..n {
        // What `GroupReader::group` takes, and nothing else.
        let p = text(prompt, i)?;
        if list.is_null(i) {
            return None;
        }
        let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
        if end - start < 2 {
            return None;
        }
        pref.clear();
        for j in start..end {
            if items.is_null(j) {
                return None;
            }
            let value = rating.get(j).filter(|x| x.is_finite())?;
            text(texts, j)?;
            if opts.label == LabelKind::Score && !gain(value).is_finite() {
                return None; // check_labels' error
            }
            pref.push(if is_rank { -value } else { value });
        }
        stats.rows_read += 1;
        stats.prompts += 1;
        stats.responses += (end - start) as u64;
        let start_id = prompt_ids.len();
        push_hex16(&mut prompt_ids, xxhash_rust::xxh3::xxh3_64(p.as_bytes()));
        let prompt_id = std::str::from_utf8(&prompt_ids[start_id..]).expect("hex digits are ASCII");
        let same = |a: usize, b: usize| texts.value(start + a) == texts.value(start + b);
        let order = order_by_preference(&pref, opts.dedupe, same, &mut stats);
        let score = |a: usize| (!is_rank).then(|| pref[a]);
        let Some(l) = list_of_order(&pref, order, score, prompt_id, opts, &mut stats) else {
            prompt_ids.truncate(start_id);
            continue;
        };
        stats.rows_written += 1;
        kept_rows.push((0, i));
        members.extend(l.members.iter().map(|&a| (0, start + a)));
        labels.extend_from_slice(&l.labels);
        list_offsets.push(members.len() as i32);
    }

    let rows = kept_rows.len();
    let all_rows = rows == n;
    let by_row = |array: &dyn Array| -> Option<ArrayRef> {
        if all_rows && array.len() == n {
            Some(array.slice(0, n))
        } else {
            gather(&[array], &kept_rows).ok()
        }
    };
    let by_member = |array: &dyn Array| gather(&[array], &members).ok();
    let offsets = OffsetBuffer::new(ScalarBuffer::from(list_offsets));
    let as_list = |child: ArrayRef| -> ArrayRef {
        let item = Arc::new(Field::new("item", child.data_type().clone(), true));
        Arc::new(ListArray::new(item, offsets.clone(), child, None))
    };
    let floats = |values: Vec<f64>| -> ArrayRef { Arc::new(Float64Array::from(values)) };
    let nulls = |len: usize| -> ArrayRef { Arc::new(Float64Array::new(vec![0.0; len].into(), Some(NullBuffer::new_null(len)))) };
    let ratings = || floats(members.iter().map(|&(_, j)| rating.get(j).expect("validated above")).collect());

    let mut out = BatchColumns::default();
    let id_offsets = OffsetBuffer::new(ScalarBuffer::from((0..=rows as i32).map(|r| 16 * r).collect::<Vec<i32>>()));
    // SAFETY: 16 ASCII hex digits per row, offsets 16 apart from 0 to the buffer's end.
    let ids = unsafe { StringArray::new_unchecked(id_offsets, prompt_ids.into(), None) };
    out.push("prompt_id", Arc::new(ids));
    out.push("prompt", by_row(*prompt)?);
    out.push("responses", as_list(by_member(*texts)?));
    let gains = floats(labels.iter().map(|&l| gain(l)).collect());
    out.push("labels", as_list(floats(labels)));
    out.push("gains", as_list(gains));
    out.push("scores", as_list(if is_rank { nulls(members.len()) } else { ratings() }));
    if cols.ranks {
        out.push("ranks", as_list(if is_rank { ratings() } else { nulls(members.len()) }));
    }
    if cols.models {
        let models = match model {
            Some(m) => by_member(*m)?,
            None => Arc::new(StringArray::new_null(members.len())),
        };
        out.push("models", as_list(models));
    }
    let sizes: Vec<i64> = offsets.windows(2).map(|w| (w[1] - w[0]) as i64).collect();
    out.push("list_size", Arc::new(Int64Array::from(sizes)));
    for (name, array) in carried {
        out.push(name, by_row(array.as_ref())?);
    }
    Some((out.finish(rows), stats))
}

fn push_hex16(buf: &mut Vec<u8>, x: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buf.extend((0..16).rev().map(|i| DIGITS[((x >> (4 * i)) & 0xf) as usize]));
}
