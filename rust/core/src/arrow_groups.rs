//! Arrow rows straight to groups for the common layouts (UltraFeedback completions, Nectar
//! answers, TRL text pairs), without first building a `Value` tree per row: that tree and
//! `normalise` picking it apart were half the CPU of a lists run on an Arrow table.
//!
//! The reader only takes rows it is sure of. A row with anything unusual (a null, a blank
//! text, a non-finite score, fewer than two responses) gives None, and the caller reads it
//! through `normalise` as before, so results and error messages are the general path's. A
//! layout it does not know (messages instead of text, a score column of text, duplicate
//! names) gives no reader at all.

use std::borrow::Cow;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, ListArray, StringArray, StructArray, UInt64Array};
use arrow_schema::DataType;

use crate::arrow_in::Col;
use crate::formats::{prompt_id_value, Format, ReadOptions};
use crate::model::{is_blank, Content, Fields, Group, Response};

/// A numeric column as `normalise` reads it (`Value::as_f64`), or one that is all null.
#[derive(Clone, Copy)]
pub(crate) enum Num<'a> {
    Float(&'a Float64Array),
    Int(&'a Int64Array),
    UInt(&'a UInt64Array),
    Null,
}

impl<'a> Num<'a> {
    fn new(array: &'a ArrayRef) -> Option<Num<'a>> {
        Some(match array.data_type() {
            DataType::Float64 => Num::Float(array.as_primitive::<Float64Type>()),
            DataType::Int64 => Num::Int(array.as_primitive::<Int64Type>()),
            DataType::UInt64 => Num::UInt(array.as_primitive::<UInt64Type>()),
            DataType::Null => Num::Null,
            _ => return None,
        })
    }

    /// None for null.
    pub(crate) fn get(self, i: usize) -> Option<f64> {
        match self {
            Num::Float(a) => a.is_valid(i).then(|| a.value(i)),
            Num::Int(a) => a.is_valid(i).then(|| a.value(i) as f64),
            Num::UInt(a) => a.is_valid(i).then(|| a.value(i) as f64),
            Num::Null => None,
        }
    }
}

/// A column of text, present and not blank in row i.
pub(crate) fn text(a: &StringArray, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    let t = a.value(i);
    (!is_blank(t)).then_some(t)
}

fn utf8(array: &ArrayRef) -> Option<&StringArray> {
    (array.data_type() == &DataType::Utf8).then(|| array.as_string::<i32>())
}

/// A field that the reader passes through to the output (a carried column or a response's
/// extra field), under its name after the column map.
pub(crate) struct Carried<'a> {
    pub(crate) name: Cow<'a, str>,
    pub(crate) array: &'a ArrayRef,
    col: Col<'a>,
}

impl<'a> Carried<'a> {
    fn get(&self, i: usize) -> (Cow<'a, str>, crate::value::Value<'a>) {
        (self.name.clone(), self.col.value(i))
    }
}

pub(crate) enum Layout<'a> {
    /// A prompt column and a list of response structs, each with a text and a required
    /// score (UltraFeedback) or rank (Nectar), an optional model and extra fields.
    Rated {
        prompt: &'a StringArray,
        list: &'a ListArray,
        items: &'a StructArray,
        text: &'a StringArray,
        rating: Num<'a>,
        is_rank: bool,
        model: Option<&'a StringArray>,
        item_extra: Vec<Carried<'a>>,
    },
    /// prompt, chosen, rejected as text with optional scores, or ranks when both scores are
    /// null (TRL and ultrafeedback_binarized).
    TextPair {
        prompt: &'a StringArray,
        chosen: &'a StringArray,
        rejected: &'a StringArray,
        scores: Option<(Num<'a>, Num<'a>)>,
        /// Column indices of rank_chosen / rank_rejected: read, and not carried, only for a
        /// row without scores.
        ranks: Option<(usize, Num<'a>, usize, Num<'a>)>,
    },
}

/// Reads groups from a batch's prepared columns (see `arrow_in::prepare_batch`).
pub struct GroupReader<'a> {
    pub(crate) layout: Layout<'a>,
    pub(crate) prompt_id: Option<Col<'a>>,
    /// Columns the layout does not consume, in input order, with their indices.
    pub(crate) carried: Vec<(usize, Carried<'a>)>,
    pub(crate) drop_extra: bool,
}

/// Names after the column map, as `ReadOptions::apply_column_map` renames record keys.
fn mapped<'a>(name: &'a str, read: &ReadOptions) -> Cow<'a, str> {
    match read.column_map.iter().find(|(_, src)| src == name) {
        Some((canonical, _)) => Cow::Owned(canonical.clone()),
        None => Cow::Borrowed(name),
    }
}

fn has_duplicates(names: &[Cow<'_, str>]) -> bool {
    names.iter().enumerate().any(|(i, a)| names[..i].contains(a))
}

impl<'a> GroupReader<'a> {
    /// A reader for this layout, or None when rows must go through `normalise`.
    pub fn new(columns: &'a [(String, ArrayRef)], format: Format, read: &ReadOptions) -> Option<GroupReader<'a>> {
        let names: Vec<Cow<'a, str>> = columns.iter().map(|(n, _)| mapped(n, read)).collect();
        if has_duplicates(&names) {
            return None;
        }
        let find = |key: &str| names.iter().position(|n| n == key);
        let mut consumed: Vec<usize> = Vec::new();
        let mut take = |key: &str| -> Option<usize> {
            let i = find(key)?;
            consumed.push(i);
            Some(i)
        };
        let layout = match format {
            Format::UltraFeedback | Format::Nectar => {
                let (prompt_key, list_key, text_key, rating_key, is_rank) = if format == Format::Nectar {
                    ("prompt", "answers", "answer", "rank", true)
                } else {
                    ("instruction", "completions", "response", read.score_field.as_deref().unwrap_or("overall_score"), false)
                };
                let prompt = utf8(&columns[take(prompt_key)?].1)?;
                let list_col = &columns[take(list_key)?].1;
                let DataType::List(_) = list_col.data_type() else { return None };
                let list = list_col.as_list::<i32>();
                let DataType::Struct(fields) = list.values().data_type() else { return None };
                let items = list.values().as_struct();
                let item_names: Vec<Cow<'a, str>> = fields.iter().map(|f| Cow::Borrowed(f.name().as_str())).collect();
                if has_duplicates(&item_names) {
                    return None;
                }
                let child = |key: &str| item_names.iter().position(|n| n == key);
                let (ti, ri) = (child(text_key)?, child(rating_key)?);
                let text = utf8(items.column(ti))?;
                let rating = Num::new(items.column(ri))?;
                let mi = child("model");
                let model = match mi {
                    None => None,
                    Some(m) if items.column(m).data_type() == &DataType::Null => None,
                    Some(m) => Some(utf8(items.column(m))?),
                };
                let item_extra = item_names
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != ti && j != ri && Some(j) != mi)
                    .map(|(j, n)| Carried { name: n.clone(), array: items.column(j), col: Col::new(items.column(j)) })
                    .collect();
                Layout::Rated { prompt, list, items, text, rating, is_rank, model, item_extra }
            }
            Format::Trl | Format::UltraFeedbackBinarized => {
                let prompt = utf8(&columns[take("prompt")?].1)?;
                let chosen = utf8(&columns[take("chosen")?].1)?;
                let rejected = utf8(&columns[take("rejected")?].1)?;
                let score = |i: Option<usize>| i.map_or(Some(Num::Null), |i| Num::new(&columns[i].1));
                let scores = match (take("score_chosen"), take("score_rejected")) {
                    (None, None) => None,
                    (c, r) => Some((score(c)?, score(r)?)),
                };
                let ranks = match (find("rank_chosen"), find("rank_rejected")) {
                    (Some(c), Some(r)) => Some((c, Num::new(&columns[c].1)?, r, Num::new(&columns[r].1)?)),
                    // One rank column alone: read through normalise.
                    (None, None) => None,
                    _ => return None,
                };
                Layout::TextPair { prompt, chosen, rejected, scores, ranks }
            }
            _ => return None,
        };
        let prompt_id = match take("prompt_id") {
            None => None,
            Some(i) => match columns[i].1.data_type() {
                DataType::Null | DataType::Utf8 | DataType::Int64 | DataType::UInt64 => Some(Col::new(&columns[i].1)),
                _ => return None,
            },
        };
        let carried = names
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !consumed.contains(i))
            .map(|(i, name)| (i, Carried { name, array: &columns[i].1, col: Col::new(&columns[i].1) }))
            .collect();
        Some(GroupReader { layout, prompt_id, carried, drop_extra: read.drop_extra })
    }

    /// Row i as `normalise` would make it, or None to have `normalise` read it.
    pub fn group(&self, i: usize) -> Option<Group<'a>> {
        let mut skip_columns: Option<(usize, usize)> = None;
        let (prompt, responses) = match &self.layout {
            Layout::Rated { prompt, list, items, text: texts, rating, is_rank, model, item_extra } => {
                let prompt = text(prompt, i)?;
                if list.is_null(i) {
                    return None;
                }
                let offsets = list.value_offsets();
                let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
                if end - start < 2 {
                    return None;
                }
                let mut responses = Vec::with_capacity(end - start);
                for j in start..end {
                    if items.is_null(j) {
                        return None;
                    }
                    let value = rating.get(j).filter(|x| x.is_finite())?;
                    let mut r = Response::new(Content::Text(Cow::Borrowed(text(texts, j)?)));
                    if *is_rank {
                        r.rank = Some(value);
                    } else {
                        r.score = Some(value);
                    }
                    r.model = model.and_then(|m| m.is_valid(j).then(|| Cow::Borrowed(m.value(j))));
                    if !self.drop_extra {
                        r.extra = item_extra.iter().map(|c| c.get(j)).collect();
                    }
                    responses.push(r);
                }
                (prompt, responses)
            }
            Layout::TextPair { prompt, chosen, rejected, scores, ranks } => {
                let prompt = text(prompt, i)?;
                let mut c = Response::new(Content::Text(Cow::Borrowed(text(chosen, i)?)));
                let mut r = Response::new(Content::Text(Cow::Borrowed(text(rejected, i)?)));
                let finite = |x: Option<f64>| match x {
                    Some(v) if !v.is_finite() => None,
                    x => Some(x),
                };
                let (sc, sr) = match scores {
                    Some((a, b)) => (finite(a.get(i))?, finite(b.get(i))?),
                    None => (None, None),
                };
                match (sc, sr) {
                    (Some(_), Some(_)) => (c.score, r.score) = (sc, sr),
                    (None, None) => {
                        (c.rank, r.rank) = (Some(1.0), Some(2.0));
                        if let Some((ci, cn, ri, rn)) = ranks {
                            skip_columns = Some((*ci, *ri));
                            if let (Some(rc), Some(rr)) = (finite(cn.get(i))?, finite(rn.get(i))?) {
                                (c.rank, r.rank) = (Some(rc), Some(rr));
                            }
                        }
                    }
                    _ => return None,
                }
                (prompt, vec![c, r])
            }
        };
        let prompt = Content::Text(Cow::Borrowed(prompt));
        let prompt_id = prompt_id_value(self.prompt_id.as_ref().map(|c| c.value(i)), &prompt).ok()?;
        let extra: Fields<'a> = if self.drop_extra {
            Vec::new()
        } else {
            self.carried
                .iter()
                .filter(|(c, _)| skip_columns.is_none_or(|(a, b)| *c != a && *c != b))
                .map(|(_, c)| c.get(i))
                .collect()
        };
        Some(Group { prompt_id, prompt, responses, extra })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrow_in::{self, prepare_batch};
    use crate::arrow_out::rows_to_batch;
    use crate::formats::normalise;
    use crate::value::Value;

    /// Reads `lines` as one Arrow batch both ways; the reader must give exactly what
    /// `normalise` gives for every row it takes, and take every row `normalise` accepts.
    /// Returns how many rows it took.
    fn same_as_normalise(format: Format, read: &ReadOptions, lines: &[&str]) -> usize {
        let values: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let batch = rows_to_batch(&values, &[]);
        let prepared = prepare_batch(&batch).unwrap();
        let reader = GroupReader::new(&prepared, format, read).expect("a layout the reader knows");
        let cols = arrow_in::columns(&prepared);
        let mut taken = 0;
        assert_eq!(batch.num_rows(), lines.len());
        for (i, line) in lines.iter().enumerate() {
            let mut v = arrow_in::row(&cols, i);
            read.apply_column_map(&mut v);
            let general = normalise(v, format, read).ok();
            let fast = reader.group(i);
            taken += fast.is_some() as usize;
            assert_eq!(fast, general, "row {i}: {line}");
        }
        taken
    }

    const UF: &[&str] = &[
        r#"{"source": "a", "instruction": "q1", "completions": [{"response": "x", "overall_score": 3.5, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": null, "note": null}], "prompt_id": null}"#,
        r#"{"source": null, "instruction": "q2", "completions": [{"response": "é ü", "overall_score": -1, "model": "n", "note": 2}, {"response": "z", "overall_score": 1e300, "model": "m", "note": 3}, {"response": "é ü", "overall_score": 0, "model": "m", "note": 4}], "prompt_id": "given"}"#,
        // Rows the general path rejects: each must be declined, not misread.
        r#"{"source": "b", "instruction": null, "completions": [{"response": "x", "overall_score": 1, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": "m", "note": 1}], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": " \n", "completions": [{"response": "x", "overall_score": 1, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": "m", "note": 1}], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": null, "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [{"response": "x", "overall_score": 1, "model": "m", "note": 1}], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [{"response": "x", "overall_score": 1, "model": "m", "note": 1}, null], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [{"response": null, "overall_score": 1, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": "m", "note": 1}], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [{"response": "\u3000", "overall_score": 1, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": "m", "note": 1}], "prompt_id": null}"#,
        r#"{"source": "b", "instruction": "q3", "completions": [{"response": "x", "overall_score": null, "model": "m", "note": 1}, {"response": "y", "overall_score": 2, "model": "m", "note": 1}], "prompt_id": null}"#,
    ];

    #[test]
    fn ultrafeedback_rows_read_as_normalise_reads_them() {
        let read = ReadOptions::default();
        assert_eq!(same_as_normalise(Format::UltraFeedback, &read, UF), 2);
        // Without carried fields, and with a column renamed to the canonical name.
        let read = ReadOptions { drop_extra: true, ..Default::default() };
        assert_eq!(same_as_normalise(Format::UltraFeedback, &read, UF), 2);
        let renamed: Vec<String> = UF.iter().map(|l| l.replace("\"instruction\"", "\"question\"")).collect();
        let lines: Vec<&str> = renamed.iter().map(String::as_str).collect();
        let read = ReadOptions { column_map: vec![("instruction".into(), "question".into())], ..Default::default() };
        assert_eq!(same_as_normalise(Format::UltraFeedback, &read, &lines), 2);
        // Another score field; the default one is then an extra field of each completion
        // (the first row has a null note, so only the second is taken).
        let read = ReadOptions { score_field: Some("note".into()), ..Default::default() };
        assert_eq!(same_as_normalise(Format::UltraFeedback, &read, &UF[..2]), 1);
    }

    #[test]
    fn integer_ids_scores_and_nectar_ranks() {
        let lines = [
            r#"{"prompt": "p", "answers": [{"answer": "a", "rank": 2, "model": "m"}, {"answer": "b", "rank": 1, "model": "n"}], "prompt_id": 7}"#,
            r#"{"prompt": "p", "answers": [{"answer": "a", "rank": 1, "model": "m"}, {"answer": "b", "rank": 1, "model": null}], "prompt_id": null}"#,
            r#"{"prompt": "p", "answers": [{"answer": "a", "rank": null, "model": "m"}, {"answer": "b", "rank": 1, "model": null}], "prompt_id": 3}"#,
        ];
        assert_eq!(same_as_normalise(Format::Nectar, &ReadOptions::default(), &lines), 2);
    }

    #[test]
    fn text_pairs_with_scores_ranks_or_neither() {
        let scored = [
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 1, "score_rejected": 3, "rank_chosen": 5, "rank_rejected": 6, "x": [1]}"#,
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": null, "score_rejected": null, "rank_chosen": 5, "rank_rejected": 6, "x": null}"#,
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": null, "score_rejected": null, "rank_chosen": 5, "rank_rejected": null, "x": []}"#,
            r#"{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": 1, "score_rejected": null, "rank_chosen": 1, "rank_rejected": 2, "x": []}"#,
            r#"{"prompt": "p", "chosen": "", "rejected": "r", "score_chosen": 1, "score_rejected": 2, "rank_chosen": 1, "rank_rejected": 2, "x": []}"#,
            r#"{"prompt": "p", "chosen": "c", "rejected": null, "score_chosen": 1, "score_rejected": 2, "rank_chosen": 1, "rank_rejected": 2, "x": []}"#,
        ];
        assert_eq!(same_as_normalise(Format::Trl, &ReadOptions::default(), &scored), 3);
        let plain = [r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#, r#"{"prompt": "q", "chosen": "c", "rejected": " "}"#];
        assert_eq!(same_as_normalise(Format::UltraFeedbackBinarized, &ReadOptions::default(), &plain), 1);
    }

    #[test]
    fn layouts_it_does_not_know_get_no_reader() {
        let reader_for = |format: Format, line: &str| {
            let batch = rows_to_batch(&[serde_json::from_str(line).unwrap()], &[]);
            let prepared = prepare_batch(&batch).unwrap();
            GroupReader::new(&prepared, format, &ReadOptions::default()).is_some()
        };
        assert!(reader_for(Format::Trl, r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#));
        // Messages, a score of text, a missing score field, one rank column alone.
        assert!(!reader_for(Format::Trl, r#"{"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"}"#));
        assert!(!reader_for(Format::Trl, r#"{"prompt": "p", "chosen": "c", "rejected": "r", "score_chosen": "1", "score_rejected": 2}"#));
        assert!(!reader_for(Format::Trl, r#"{"prompt": "p", "chosen": "c", "rejected": "r", "rank_chosen": 1}"#));
        assert!(!reader_for(Format::UltraFeedback, r#"{"instruction": "q", "completions": [{"response": "x"}, {"response": "y"}]}"#));
        assert!(!reader_for(Format::Kto, r#"{"prompt": "p", "completion": "c", "label": true}"#));
    }
}
