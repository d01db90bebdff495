//! Listwise output rows: one per prompt, every per-response column a list of the same length.
//!
//! Columns: prompt_id, prompt, responses, labels, gains, scores, ranks (ranked formats), models
//! (formats that name them), list_size, then the record's other top-level fields. Lists
//! round-trip through JSONL and Parquet alike; `list_tensors` (Python) turns them into the
//! flat values + offsets or padded [P, K] + mask the listwise losses take.

use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int64Builder, StringBuilder};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::Field;

use crate::formats::Format;
use crate::lists::{gain, List};
use crate::model::Group;
use crate::output::{json_bytes, json_into, room, strings, BatchColumns, ContentColumn, ContentJson, PairColumns};
use crate::pairs::TiePolicy;
use crate::value::Value;

/// Optional list columns, fixed per run (from the format) so that every chunk agrees.
#[derive(Debug, Clone, Copy)]
pub struct ListColumns {
    pub ranks: bool,
    pub models: bool,
}

impl ListColumns {
    /// The same choice as for pairs: ranks for ranked formats, models where records name them.
    pub fn for_run(format: Format) -> Self {
        let p = PairColumns::for_run(format, TiePolicy::Drop);
        ListColumns { ranks: p.ranks, models: p.models }
    }
}

/// Columns a list row is made of; an input column of the same name is not carried through.
const LIST_COLUMNS: &[&str] =
    &["prompt_id", "prompt", "responses", "labels", "gains", "scores", "ranks", "models", "list_size"];

pub(crate) fn is_list_column(name: &str) -> bool {
    LIST_COLUMNS.contains(&name)
}

/// One JSONL line per list, written straight from the group.
pub fn write_list_jsonl(buf: &mut Vec<u8>, g: &Group<'_>, list: &List, cols: ListColumns) {
    let members = || list.members.iter().map(|&i| &g.responses[i]);
    buf.extend_from_slice(b"{\"prompt_id\":");
    json_into(buf, g.prompt_id.as_ref());
    buf.extend_from_slice(b",\"prompt\":");
    ContentJson(&g.prompt).write(buf);
    buf.extend_from_slice(b",\"responses\":[");
    for (a, r) in members().enumerate() {
        if a > 0 {
            buf.push(b',');
        }
        ContentJson(&r.content).write(buf);
    }
    buf.push(b']');
    let mut array = |name: &str, items: &mut dyn Iterator<Item = Vec<u8>>| {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":[");
        for (a, item) in items.enumerate() {
            if a > 0 {
                buf.push(b',');
            }
            buf.extend_from_slice(&item);
        }
        buf.push(b']');
    };
    array("labels", &mut list.labels.iter().map(json_bytes));
    array("gains", &mut list.labels.iter().map(|&l| json_bytes(&gain(l))));
    array("scores", &mut members().map(|r| json_bytes(&r.score)));
    if cols.ranks {
        array("ranks", &mut members().map(|r| json_bytes(&r.rank)));
    }
    if cols.models {
        array("models", &mut members().map(|r| json_bytes(&r.model.as_deref())));
    }
    buf.extend_from_slice(b",\"list_size\":");
    json_into(buf, &list.members.len());
    for (k, v) in g.extra.iter().filter(|(k, _)| !is_list_column(k)) {
        buf.push(b',');
        json_into(buf, k.as_ref());
        buf.push(b':');
        json_into(buf, v);
    }
    buf.extend_from_slice(b"}\n");
}

/// How large the last batch of a run's list builder grew: the next one starts at these sizes
/// (see [`crate::output::PairSizes`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ListSizes {
    rows: usize,
    /// Responses over all lists.
    items: usize,
    prompt_id: usize,
    prompt: usize,
    responses: usize,
    models: usize,
}

/// List rows appended straight into Arrow builders: each per-response column is one flat child
/// array sharing one offsets buffer. Carried-through columns go through the generic row path.
pub struct ListBatchBuilder<'a> {
    cols: ListColumns,
    offsets: Vec<i32>,
    prompt_id: StringBuilder,
    prompt: ContentColumn,
    responses: ContentColumn,
    labels: Float64Builder,
    gains: Float64Builder,
    scores: Float64Builder,
    ranks: Float64Builder,
    models: StringBuilder,
    list_size: Int64Builder,
    extra: Vec<Value<'a>>,
    any_extra: bool,
}

impl<'a> ListBatchBuilder<'a> {
    pub fn new(cols: ListColumns) -> Self {
        Self::with_sizes(cols, ListSizes::default())
    }

    /// A builder with room for a batch of the given sizes (see [`ListBatchBuilder::sizes`]);
    /// only the columns the run writes get room.
    pub fn with_sizes(cols: ListColumns, s: ListSizes) -> Self {
        let mut offsets = Vec::with_capacity(room(s.rows) + 1);
        offsets.push(0);
        let items = room(s.items);
        ListBatchBuilder {
            cols,
            offsets,
            prompt_id: strings(s.rows, s.prompt_id),
            prompt: ContentColumn::with_capacity(s.rows, s.prompt),
            responses: ContentColumn::with_capacity(s.items, s.responses),
            labels: Float64Builder::with_capacity(items),
            gains: Float64Builder::with_capacity(items),
            scores: Float64Builder::with_capacity(items),
            ranks: Float64Builder::with_capacity(if cols.ranks { items } else { 0 }),
            models: if cols.models { strings(s.items, s.models) } else { strings(0, 0) },
            list_size: Int64Builder::with_capacity(room(s.rows)),
            extra: Vec::with_capacity(room(s.rows)),
            any_extra: false,
        }
    }

    /// The sizes this batch has reached, to start the run's next builder at.
    pub fn sizes(&self) -> ListSizes {
        ListSizes {
            rows: self.offsets.len() - 1,
            items: *self.offsets.last().expect("starts with 0") as usize,
            prompt_id: self.prompt_id.values_slice().len(),
            prompt: self.prompt.text_bytes(),
            responses: self.responses.text_bytes(),
            models: self.models.values_slice().len(),
        }
    }

    pub fn append(&mut self, g: &Group<'a>, list: &List) {
        self.prompt_id.append_value(&g.prompt_id);
        self.prompt.append(&g.prompt);
        for (&i, &label) in list.members.iter().zip(&list.labels) {
            let r = &g.responses[i];
            self.responses.append(&r.content);
            self.labels.append_value(label);
            self.gains.append_value(gain(label));
            self.scores.append_option(r.score);
            if self.cols.ranks {
                self.ranks.append_option(r.rank);
            }
            if self.cols.models {
                self.models.append_option(r.model.as_deref());
            }
        }
        let end = self.offsets.last().expect("starts with 0") + list.members.len() as i32;
        self.offsets.push(end);
        self.list_size.append_value(list.members.len() as i64);
        self.any_extra |= !g.extra.is_empty();
        self.extra.push(Value::Object(g.extra.clone()));
    }

    pub fn finish(mut self) -> RecordBatch {
        let rows = self.offsets.len() - 1;
        let offsets = OffsetBuffer::new(ScalarBuffer::from(std::mem::take(&mut self.offsets)));
        let mut out = BatchColumns::default();
        let list = |child: ArrayRef| -> ArrayRef {
            let item = Arc::new(Field::new("item", child.data_type().clone(), true));
            Arc::new(ListArray::new(item, offsets.clone(), child, None))
        };
        out.push("prompt_id", Arc::new(self.prompt_id.finish()));
        out.push("prompt", self.prompt.finish());
        out.push("responses", list(self.responses.finish()));
        out.push("labels", list(Arc::new(self.labels.finish())));
        out.push("gains", list(Arc::new(self.gains.finish())));
        out.push("scores", list(Arc::new(self.scores.finish())));
        if self.cols.ranks {
            out.push("ranks", list(Arc::new(self.ranks.finish())));
        }
        if self.cols.models {
            out.push("models", list(Arc::new(self.models.finish())));
        }
        out.push("list_size", Arc::new(self.list_size.finish()));
        if self.any_extra {
            out.push_extra(&self.extra, is_list_column);
        }
        out.finish(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arrow_in;
    use crate::output::json_text_len;
    use crate::lists::{make_list, ListOptions};
    use crate::model::{Content, Message, Response};
    use crate::stats::Stats;
    use std::borrow::Cow;

    fn group(prompt: Content<'static>, texts: Vec<Content<'static>>, extra: crate::model::Fields<'static>) -> Group<'static> {
        let n = texts.len();
        Group {
            prompt_id: Cow::Owned(format!("p{n}")),
            prompt,
            responses: texts
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut r = Response::new(c);
                    r.rank = Some(((n - i) / 2) as f64);
                    r.model = (i % 2 == 0).then_some(Cow::Borrowed("m"));
                    r
                })
                .collect(),
            extra,
        }
    }

    fn msgs(text: &'static str) -> Content<'static> {
        Content::Messages(vec![Message { role: "assistant".into(), content: text.into() }])
    }

    #[test]
    fn arrow_and_jsonl_rows_agree() {
        let extra: crate::model::Fields<'static> =
            vec![("source".into(), Value::Str("s".into())), ("labels".into(), Value::Int(99))];
        let groups = vec![
            group(Content::Text("p1".into()), vec![Content::Text("a".into()), Content::Text("b".into())], extra.clone()),
            group(msgs("p2"), vec![msgs("c"), msgs("d"), msgs("e")], vec![]),
            // Text after messages in the same column: the column becomes JSON text.
            group(Content::Text("p3".into()), vec![msgs("f"), Content::Text("g".into())], extra),
        ];
        for cols in [ListColumns { ranks: true, models: true }, ListColumns { ranks: false, models: false }] {
            let mut typed = ListBatchBuilder::new(cols);
            let mut jsonl = Vec::new();
            for g in &groups {
                let l = make_list(g, &ListOptions::default(), &mut Stats::default()).unwrap();
                typed.append(g, &l);
                write_list_jsonl(&mut jsonl, g, &l, cols);
            }
            // The sizes it reports are the batch's; a builder started at them (or at any size)
            // makes the same batch.
            let sizes = typed.sizes();
            let responses = || groups.iter().flat_map(|g| g.responses.iter());
            assert_eq!((sizes.rows, sizes.items, sizes.prompt_id), (3, 7, 6));
            assert_eq!(sizes.prompt, groups.iter().map(|g| json_text_len(&g.prompt)).sum::<usize>());
            assert_eq!(sizes.responses, responses().map(|r| json_text_len(&r.content)).sum::<usize>());
            let models: usize = responses().map(|r| r.model.as_deref().map_or(0, str::len)).sum();
            assert_eq!(sizes.models, if cols.models { models } else { 0 });
            let batch = typed.finish();
            for start in [sizes, ListSizes { rows: 1, items: 0, responses: 1 << 20, ..sizes }] {
                let mut again = ListBatchBuilder::with_sizes(cols, start);
                for g in &groups {
                    again.append(g, &make_list(g, &ListOptions::default(), &mut Stats::default()).unwrap());
                }
                assert_eq!(again.finish(), batch);
            }
            assert_eq!(batch.num_rows(), 3);
            let prepared = arrow_in::prepare_batch(&batch).unwrap();
            let from_arrow: Vec<Value> = arrow_in::rows(&prepared).collect();
            let text = String::from_utf8(jsonl).unwrap();
            let from_json: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            // The third row's responses column is JSON text in Arrow (mixed content): compare the rest.
            for (a, j) in from_arrow.iter().zip(&from_json) {
                for key in ["prompt_id", "labels", "gains", "scores", "ranks", "models", "list_size", "source"] {
                    // A row without the carried column holds null in Arrow and omits it in JSONL.
                    let json = |v: Option<&Value>| v.map_or("null".to_string(), |v| v.to_json());
                    assert_eq!(json(a.get(key)), json(j.get(key)), "{key}");
                }
            }
            let m = |t: &str| format!(r#"[{{"role":"assistant","content":"{t}"}}]"#);
            // Ranks 1, 1, 0 from c, d, e: e is best, c and d tie in input order.
            assert_eq!(from_json[1].get("responses").unwrap().to_json(), format!("[{},{},{}]", m("e"), m("c"), m("d")));
            assert_eq!(from_json[0].get("labels").unwrap().to_json(), "[1.0,0.0]");
        }
    }
}
