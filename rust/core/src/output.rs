//! Output rows: TRL pairs, KTO unpaired rows, or the grouped layout.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use arrow_array::builder::{BooleanBuilder, Float64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch, RecordBatchOptions};
use arrow_schema::{DataType, Field, Fields, Schema};

use crate::formats::Format;
use crate::model::{pair_id, Content, Group, Message, Response};
use crate::pairs::{Pair, TiePolicy};
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// prompt, chosen, rejected, scores, margin, ids (TRL DPO form).
    Pairs,
    /// prompt, completion, label (TRL KTO form).
    Unpaired,
    /// One row per prompt with all its responses.
    Grouped,
    /// One row per prompt: its ranked list of responses with labels and gains (LiPO, RankDPO).
    Lists,
}

impl OutputKind {
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Pairs => "pairs",
            OutputKind::Unpaired => "unpaired",
            OutputKind::Grouped => "grouped",
            OutputKind::Lists => "lists",
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OutputKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pairs" => Ok(OutputKind::Pairs),
            "unpaired" => Ok(OutputKind::Unpaired),
            "grouped" => Ok(OutputKind::Grouped),
            "lists" => Ok(OutputKind::Lists),
            _ => Err(format!("unknown output kind '{s}'; expected pairs, unpaired, grouped or lists")),
        }
    }
}

/// Which optional pair columns a run writes. Fixed per run (from the format and options) so
/// every row and every chunk has the same columns.
#[derive(Debug, Clone, Copy)]
pub struct PairColumns {
    pub tie: bool,
    pub ranks: bool,
    pub models: bool,
    pub hallucinated: bool,
}

impl PairColumns {
    pub fn for_run(format: Format, ties: TiePolicy) -> Self {
        PairColumns {
            tie: ties == TiePolicy::Keep,
            ranks: matches!(format, Format::Nectar | Format::RankedList | Format::Grouped),
            models: matches!(format, Format::UltraFeedback | Format::Nectar | Format::Grouped),
            hallucinated: format == Format::Grouped,
        }
    }
}

/// Arrow types of the known columns, so that chunks agree even when a chunk is all null.
pub const TYPE_HINTS: &[(&str, DataType)] = &[
    ("prompt_id", DataType::Utf8),
    ("pair_id", DataType::Utf8),
    ("score_chosen", DataType::Float64),
    ("score_rejected", DataType::Float64),
    ("margin", DataType::Float64),
    ("tie", DataType::Boolean),
    ("rank_chosen", DataType::Float64),
    ("rank_rejected", DataType::Float64),
    ("chosen_model", DataType::Utf8),
    ("rejected_model", DataType::Utf8),
    ("chosen_hallucinated", DataType::Boolean),
    ("rejected_hallucinated", DataType::Boolean),
    ("label", DataType::Boolean),
];

fn opt_f64(x: Option<f64>) -> Value<'static> {
    x.map_or(Value::Null, Value::Float)
}

fn opt_str<'a>(x: &Option<Cow<'a, str>>) -> Value<'a> {
    x.clone().map_or(Value::Null, Value::Str)
}

fn opt_bool(x: Option<bool>) -> Value<'static> {
    x.map_or(Value::Null, Value::Bool)
}

fn key(k: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(k)
}

/// Columns a pair row is made of; an input column of the same name is not carried through.
const PAIR_COLUMNS: &[&str] = &[
    "prompt_id", "pair_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "margin", "tie",
    "rank_chosen", "rank_rejected", "chosen_model", "rejected_model", "chosen_hallucinated",
    "rejected_hallucinated",
];

pub(crate) fn is_pair_column(name: &str) -> bool {
    PAIR_COLUMNS.contains(&name)
}

pub fn pair_row<'a>(g: &Group<'a>, p: &Pair, cols: PairColumns) -> Value<'a> {
    let (c, r) = (&g.responses[p.chosen], &g.responses[p.rejected]);
    let mut f = Vec::with_capacity(16 + g.extra.len());
    f.push((key("prompt_id"), Value::Str(g.prompt_id.clone())));
    f.push((key("pair_id"), Value::Str(Cow::Owned(pair_id(&g.prompt_id, &c.content, &r.content)))));
    f.push((key("prompt"), g.prompt.to_value()));
    f.push((key("chosen"), c.content.to_value()));
    f.push((key("rejected"), r.content.to_value()));
    f.push((key("score_chosen"), opt_f64(c.score)));
    f.push((key("score_rejected"), opt_f64(r.score)));
    f.push((key("margin"), Value::Float(p.margin)));
    if cols.tie {
        f.push((key("tie"), Value::Bool(p.tie)));
    }
    if cols.ranks {
        f.push((key("rank_chosen"), opt_f64(c.rank)));
        f.push((key("rank_rejected"), opt_f64(r.rank)));
    }
    if cols.models {
        f.push((key("chosen_model"), opt_str(&c.model)));
        f.push((key("rejected_model"), opt_str(&r.model)));
    }
    if cols.hallucinated {
        f.push((key("chosen_hallucinated"), opt_bool(c.hallucinated)));
        f.push((key("rejected_hallucinated"), opt_bool(r.hallucinated)));
    }
    f.extend(g.extra.iter().filter(|(k, _)| !is_pair_column(k)).cloned());
    Value::Object(f)
}

pub fn unpaired_rows<'a, 'g>(g: &'g Group<'a>) -> impl Iterator<Item = Value<'a>> + 'g {
    g.responses.iter().map(move |r| {
        let mut f = Vec::with_capacity(4 + g.extra.len());
        f.push((key("prompt_id"), Value::Str(g.prompt_id.clone())));
        f.push((key("prompt"), g.prompt.to_value()));
        f.push((key("completion"), r.content.to_value()));
        // Unpaired inputs carry label as score 1/0; scored inputs count as desirable above 0.5.
        f.push((key("label"), Value::Bool(r.score.unwrap_or(0.0) > 0.5)));
        f.extend(g.extra.iter().cloned());
        Value::Object(f)
    })
}

fn response_value<'a>(r: &Response<'a>) -> Value<'a> {
    let mut f = Vec::with_capacity(5 + r.extra.len());
    f.push((key("content"), r.content.to_value()));
    f.push((key("score"), opt_f64(r.score)));
    f.push((key("rank"), opt_f64(r.rank)));
    f.push((key("model"), opt_str(&r.model)));
    f.push((key("hallucinated"), opt_bool(r.hallucinated)));
    f.extend(r.extra.iter().cloned());
    Value::Object(f)
}

pub fn grouped_row<'a>(g: &Group<'a>) -> Value<'a> {
    let mut f = Vec::with_capacity(3 + g.extra.len());
    f.push((key("prompt_id"), Value::Str(g.prompt_id.clone())));
    f.push((key("prompt"), g.prompt.to_value()));
    f.push((key("responses"), Value::List(g.responses.iter().map(response_value).collect())));
    f.extend(g.extra.iter().cloned());
    Value::Object(f)
}

struct MessageJson<'m, 'a>(&'m Message<'a>);

impl serde::Serialize for MessageJson<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("role", self.0.role.as_ref())?;
        map.serialize_entry("content", self.0.content.as_ref())?;
        map.end()
    }
}

/// Content as JSON without building a `Value` first (same text as `to_value()` would give).
pub(crate) struct ContentJson<'c, 'a>(pub(crate) &'c Content<'a>);

impl serde::Serialize for ContentJson<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        match self.0 {
            Content::Text(t) => s.serialize_str(t),
            Content::Messages(ms) => {
                let mut seq = s.serialize_seq(Some(ms.len()))?;
                for m in ms {
                    seq.serialize_element(&MessageJson(m))?;
                }
                seq.end()
            }
        }
    }
}

impl ContentJson<'_, '_> {
    /// Append the content's JSON. Text, the bulk of every output row, goes through
    /// `write_json_str`; message lists through serde.
    pub(crate) fn write(&self, buf: &mut Vec<u8>) {
        match self.0 {
            Content::Text(t) => write_json_str(buf, t),
            Content::Messages(_) => json_into(buf, self),
        }
    }
}

/// `s` as a JSON string, byte for byte what serde_json writes (the same escapes, lowercase
/// `\u00xx` for other control characters, non-ASCII kept as UTF-8). Bytes are checked a word
/// at a time (`json::find_special`), and runs with nothing to escape are copied whole:
/// serde_json looks up every byte, which made escaping an eighth of a JSONL prep run.
pub(crate) fn write_json_str(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    let mut start = 0; // first byte not yet copied
    loop {
        // The same scan the JSON reader uses: the next '"', '\\' or control byte.
        let i = crate::json::find_special(bytes, start);
        buf.extend_from_slice(&bytes[start..i]);
        let Some(&b) = bytes.get(i) else { break };
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                &[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]
            }
        };
        buf.extend_from_slice(escape);
        start = i + 1;
    }
    buf.push(b'"');
}

pub(crate) fn json_into<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(buf, v).expect("writing JSON to a Vec cannot fail");
}

pub(crate) fn json_bytes<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let mut b = Vec::new();
    json_into(&mut b, v);
    b
}

/// JSONL pair rows written straight from the group: the prompt, each response and the
/// carried-through columns are serialised once per prompt, not once per pair. Produces the
/// same keys, order and text as serialising `pair_row`.
pub fn write_pairs_jsonl(buf: &mut Vec<u8>, g: &Group<'_>, pairs: &[Pair], cols: PairColumns) {
    if pairs.is_empty() {
        return;
    }
    let prompt_id = json_bytes(g.prompt_id.as_ref());
    let mut prompt = Vec::new();
    ContentJson(&g.prompt).write(&mut prompt);
    let mut extra = Vec::new();
    for (k, v) in g.extra.iter().filter(|(k, _)| !is_pair_column(k)) {
        extra.push(b',');
        json_into(&mut extra, k.as_ref());
        extra.push(b':');
        json_into(&mut extra, v);
    }
    let mut responses: Vec<Option<Vec<u8>>> = vec![None; g.responses.len()];
    for p in pairs {
        for i in [p.chosen, p.rejected] {
            if responses[i].is_none() {
                let mut text = Vec::new();
                ContentJson(&g.responses[i].content).write(&mut text);
                responses[i] = Some(text);
            }
        }
        let (c, r) = (&g.responses[p.chosen], &g.responses[p.rejected]);
        buf.extend_from_slice(b"{\"prompt_id\":");
        buf.extend_from_slice(&prompt_id);
        buf.extend_from_slice(b",\"pair_id\":\"");
        buf.extend_from_slice(pair_id(&g.prompt_id, &c.content, &r.content).as_bytes());
        buf.extend_from_slice(b"\",\"prompt\":");
        buf.extend_from_slice(&prompt);
        buf.extend_from_slice(b",\"chosen\":");
        buf.extend_from_slice(responses[p.chosen].as_deref().expect("filled above"));
        buf.extend_from_slice(b",\"rejected\":");
        buf.extend_from_slice(responses[p.rejected].as_deref().expect("filled above"));
        let mut field = |name: &str, value: &dyn erased::Json| {
            buf.extend_from_slice(b",\"");
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b"\":");
            value.write(buf);
        };
        field("score_chosen", &c.score);
        field("score_rejected", &r.score);
        field("margin", &p.margin);
        if cols.tie {
            field("tie", &p.tie);
        }
        if cols.ranks {
            field("rank_chosen", &c.rank);
            field("rank_rejected", &r.rank);
        }
        if cols.models {
            field("chosen_model", &c.model.as_deref());
            field("rejected_model", &r.model.as_deref());
        }
        if cols.hallucinated {
            field("chosen_hallucinated", &c.hallucinated);
            field("rejected_hallucinated", &r.hallucinated);
        }
        buf.extend_from_slice(&extra);
        buf.extend_from_slice(b"}\n");
    }
}

mod erased {
    /// A JSON scalar that can be written through a trait object.
    pub trait Json {
        fn write(&self, buf: &mut Vec<u8>);
    }

    impl<T: serde::Serialize> Json for T {
        fn write(&self, buf: &mut Vec<u8>) {
            super::json_into(buf, self);
        }
    }
}

/// A text-or-messages column built straight from `Content`, as Utf8 or
/// List<Struct<role, content>>. A column that mixes the two becomes Utf8 with the message
/// lists as JSON text — what the generic row path gives for mixed columns too.
pub(crate) enum ContentColumn {
    /// Nothing but nulls so far, and the (rows, bytes) to start a text builder at.
    Empty { nulls: usize, capacity: (usize, usize) },
    Text(StringBuilder),
    Messages(ListBuilder<StructBuilder>),
}

fn message_fields() -> Fields {
    Fields::from(vec![Field::new("role", DataType::Utf8, true), Field::new("content", DataType::Utf8, true)])
}

impl ContentColumn {
    /// A column whose text builder, if it gets one, starts with room for `rows` values of
    /// `bytes` bytes in all.
    pub(crate) fn with_capacity(rows: usize, bytes: usize) -> Self {
        ContentColumn::Empty { nulls: 0, capacity: (rows, bytes) }
    }

    /// Bytes of text so far (0 for messages).
    pub(crate) fn text_bytes(&self) -> usize {
        match self {
            ContentColumn::Text(b) => b.values_slice().len(),
            _ => 0,
        }
    }

    pub(crate) fn append(&mut self, c: &Content<'_>) {
        if let ContentColumn::Empty { nulls, capacity: (rows, bytes) } = *self {
            *self = match c {
                Content::Text(_) => ContentColumn::Text(strings(rows, bytes)),
                Content::Messages(_) => ContentColumn::Messages(ListBuilder::new(StructBuilder::from_fields(message_fields(), 0))),
            };
            for _ in 0..nulls {
                self.append_null();
            }
        }
        match (&mut *self, c) {
            (ContentColumn::Text(b), Content::Text(t)) => b.append_value(t),
            (ContentColumn::Text(b), Content::Messages(_)) => b.append_value(json_string(&ContentJson(c))),
            (ContentColumn::Messages(b), Content::Messages(ms)) => {
                let s = b.values();
                for m in ms {
                    s.field_builder::<StringBuilder>(0).expect("role").append_value(&m.role);
                    s.field_builder::<StringBuilder>(1).expect("content").append_value(&m.content);
                    s.append(true);
                }
                b.append(true);
            }
            (ContentColumn::Messages(_), Content::Text(_)) => {
                self.switch_to_text();
                self.append(c);
            }
            (ContentColumn::Empty { .. }, _) => unreachable!("set above"),
        }
    }

    fn append_null(&mut self) {
        match self {
            ContentColumn::Empty { nulls, .. } => *nulls += 1,
            ContentColumn::Text(b) => b.append_null(),
            ContentColumn::Messages(b) => b.append(false),
        }
    }

    /// Switch a message column to text, writing the lists so far as JSON.
    fn switch_to_text(&mut self) {
        if let ContentColumn::Messages(b) = self {
            let list = b.finish();
            let mut text = StringBuilder::new();
            for i in 0..list.len() {
                if list.is_null(i) {
                    text.append_null();
                    continue;
                }
                let item = list.value(i);
                let s = item.as_struct();
                let (roles, contents) = (s.column(0).as_string::<i32>(), s.column(1).as_string::<i32>());
                let ms: Vec<Message<'_>> = (0..s.len())
                    .map(|j| Message { role: Cow::Borrowed(roles.value(j)), content: Cow::Borrowed(contents.value(j)) })
                    .collect();
                text.append_value(json_string(&ContentJson(&Content::Messages(ms))));
            }
            *self = ContentColumn::Text(text);
        }
    }

    pub(crate) fn finish(&mut self) -> ArrayRef {
        match self {
            ContentColumn::Empty { nulls, .. } => Arc::new(arrow_array::NullArray::new(*nulls)),
            ContentColumn::Text(b) => Arc::new(b.finish()),
            ContentColumn::Messages(b) => Arc::new(b.finish()),
        }
    }
}

/// Bytes a content takes in a text column (messages as JSON text).
#[cfg(test)]
pub(crate) fn json_text_len(c: &Content<'_>) -> usize {
    match c {
        Content::Text(t) => t.len(),
        Content::Messages(_) => json_string(&ContentJson(c)).len(),
    }
}

fn json_string<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("serialising to a String cannot fail")
}

/// Room for `n` values (or bytes), plus an eighth for a batch a little larger than the one the
/// sizes come from.
pub(crate) fn room(n: usize) -> usize {
    n + n / 8
}

/// A string builder with room for `rows` strings of `bytes` bytes in all.
pub(crate) fn strings(rows: usize, bytes: usize) -> StringBuilder {
    StringBuilder::with_capacity(room(rows), room(bytes))
}

/// How large the last batch of a run's pair builder grew: the next one starts at these sizes.
/// Growing a column by doubling copies it once more and takes fresh pages for the copy, which
/// the kernel zeroes; a starting size changes no output.
#[derive(Debug, Clone, Copy, Default)]
pub struct PairSizes {
    rows: usize,
    prompt_id: usize,
    pair_id: usize,
    prompt: usize,
    chosen: usize,
    rejected: usize,
    chosen_model: usize,
    rejected_model: usize,
}

/// Pair rows appended straight into Arrow builders (one copy of each string); the
/// carried-through columns go through the generic row path. Same columns and types as
/// `rows_to_batch` over `pair_row`s.
pub struct PairBatchBuilder<'a> {
    cols: PairColumns,
    rows: usize,
    prompt_id: StringBuilder,
    pair_id: StringBuilder,
    prompt: ContentColumn,
    chosen: ContentColumn,
    rejected: ContentColumn,
    score_chosen: Float64Builder,
    score_rejected: Float64Builder,
    margin: Float64Builder,
    tie: BooleanBuilder,
    rank_chosen: Float64Builder,
    rank_rejected: Float64Builder,
    chosen_model: StringBuilder,
    rejected_model: StringBuilder,
    chosen_hallucinated: BooleanBuilder,
    rejected_hallucinated: BooleanBuilder,
    /// The other columns, once per group; `extra_row` says which group each pair came from, so
    /// they are typed and built per group and then repeated (not cloned per pair).
    extra: Vec<Value<'a>>,
    extra_row: Vec<u32>,
    any_extra: bool,
}

impl<'a> PairBatchBuilder<'a> {
    pub fn new(cols: PairColumns) -> Self {
        Self::with_sizes(cols, PairSizes::default())
    }

    /// A builder with room for a batch of the given sizes (see [`PairBatchBuilder::sizes`]);
    /// only the columns the run writes get room.
    pub fn with_sizes(cols: PairColumns, s: PairSizes) -> Self {
        // Rows of a column the run writes, else none.
        let rows_if = |written: bool| if written { s.rows } else { 0 };
        let n = room(s.rows);
        PairBatchBuilder {
            cols,
            rows: 0,
            prompt_id: strings(s.rows, s.prompt_id),
            pair_id: strings(s.rows, s.pair_id),
            prompt: ContentColumn::with_capacity(s.rows, s.prompt),
            chosen: ContentColumn::with_capacity(s.rows, s.chosen),
            rejected: ContentColumn::with_capacity(s.rows, s.rejected),
            score_chosen: Float64Builder::with_capacity(n),
            score_rejected: Float64Builder::with_capacity(n),
            margin: Float64Builder::with_capacity(n),
            tie: BooleanBuilder::with_capacity(room(rows_if(cols.tie))),
            rank_chosen: Float64Builder::with_capacity(room(rows_if(cols.ranks))),
            rank_rejected: Float64Builder::with_capacity(room(rows_if(cols.ranks))),
            chosen_model: strings(rows_if(cols.models), s.chosen_model),
            rejected_model: strings(rows_if(cols.models), s.rejected_model),
            chosen_hallucinated: BooleanBuilder::with_capacity(room(rows_if(cols.hallucinated))),
            rejected_hallucinated: BooleanBuilder::with_capacity(room(rows_if(cols.hallucinated))),
            extra: Vec::new(),
            extra_row: Vec::with_capacity(n),
            any_extra: false,
        }
    }

    /// The sizes this batch has reached, to start the run's next builder at.
    pub fn sizes(&self) -> PairSizes {
        PairSizes {
            rows: self.rows,
            prompt_id: self.prompt_id.values_slice().len(),
            pair_id: self.pair_id.values_slice().len(),
            prompt: self.prompt.text_bytes(),
            chosen: self.chosen.text_bytes(),
            rejected: self.rejected.text_bytes(),
            chosen_model: self.chosen_model.values_slice().len(),
            rejected_model: self.rejected_model.values_slice().len(),
        }
    }

    pub fn append(&mut self, g: &Group<'a>, pairs: &[Pair]) {
        if pairs.is_empty() {
            return;
        }
        self.any_extra |= !g.extra.is_empty();
        let group_row = self.extra.len() as u32;
        self.extra.push(Value::Object(g.extra.clone()));
        for p in pairs {
            let (c, r) = (&g.responses[p.chosen], &g.responses[p.rejected]);
            self.rows += 1;
            self.prompt_id.append_value(&g.prompt_id);
            self.pair_id.append_value(pair_id(&g.prompt_id, &c.content, &r.content));
            self.prompt.append(&g.prompt);
            self.chosen.append(&c.content);
            self.rejected.append(&r.content);
            self.score_chosen.append_option(c.score);
            self.score_rejected.append_option(r.score);
            self.margin.append_value(p.margin);
            // Only the columns this run writes (an unwritten one was a null per pair).
            if self.cols.tie {
                self.tie.append_value(p.tie);
            }
            if self.cols.ranks {
                self.rank_chosen.append_option(c.rank);
                self.rank_rejected.append_option(r.rank);
            }
            if self.cols.models {
                self.chosen_model.append_option(c.model.as_deref());
                self.rejected_model.append_option(r.model.as_deref());
            }
            if self.cols.hallucinated {
                self.chosen_hallucinated.append_option(c.hallucinated);
                self.rejected_hallucinated.append_option(r.hallucinated);
            }
            self.extra_row.push(group_row);
        }
    }

    pub fn finish(mut self) -> RecordBatch {
        let mut out = BatchColumns::default();
        out.push("prompt_id", Arc::new(self.prompt_id.finish()));
        out.push("pair_id", Arc::new(self.pair_id.finish()));
        out.push("prompt", self.prompt.finish());
        out.push("chosen", self.chosen.finish());
        out.push("rejected", self.rejected.finish());
        out.push("score_chosen", Arc::new(self.score_chosen.finish()));
        out.push("score_rejected", Arc::new(self.score_rejected.finish()));
        out.push("margin", Arc::new(self.margin.finish()));
        if self.cols.tie {
            out.push("tie", Arc::new(self.tie.finish()));
        }
        if self.cols.ranks {
            out.push("rank_chosen", Arc::new(self.rank_chosen.finish()));
            out.push("rank_rejected", Arc::new(self.rank_rejected.finish()));
        }
        if self.cols.models {
            out.push("chosen_model", Arc::new(self.chosen_model.finish()));
            out.push("rejected_model", Arc::new(self.rejected_model.finish()));
        }
        if self.cols.hallucinated {
            out.push("chosen_hallucinated", Arc::new(self.chosen_hallucinated.finish()));
            out.push("rejected_hallucinated", Arc::new(self.rejected_hallucinated.finish()));
        }
        if self.any_extra {
            out.push_repeated_extra(&self.extra, &self.extra_row, is_pair_column);
        }
        out.finish(self.rows)
    }
}

/// The columns of an output batch in order: the ones a builder made, then the records' other
/// columns (typed over the batch), which never replace a made one.
#[derive(Default)]
pub(crate) struct BatchColumns {
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
}

impl BatchColumns {
    pub fn push(&mut self, name: &str, array: ArrayRef) {
        self.fields.push(Field::new(name, array.data_type().clone(), true));
        self.columns.push(array);
    }

    pub fn push_extra(&mut self, extra: &[Value<'_>], is_made: impl Fn(&str) -> bool) {
        let batch = crate::arrow_out::rows_to_batch(extra, TYPE_HINTS);
        for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
            if !is_made(f.name()) {
                self.push(f.name(), c.clone());
            }
        }
    }

    /// `push_extra` for rows that repeat: `extra` holds each distinct row once and `rows` the
    /// index of each output row in it.
    pub fn push_repeated_extra(&mut self, extra: &[Value<'_>], rows: &[u32], is_made: impl Fn(&str) -> bool) {
        let batch = crate::arrow_out::rows_to_batch(extra, TYPE_HINTS);
        let indices = arrow_array::UInt32Array::from(rows.to_vec());
        for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
            if !is_made(f.name()) {
                let repeated = arrow_select::take::take(c.as_ref(), &indices, None).expect("indices are in range");
                self.push(f.name(), repeated);
            }
        }
    }

    pub fn finish(self, rows: usize) -> RecordBatch {
        RecordBatch::try_new_with_options(
            Arc::new(Schema::new(self.fields)),
            self.columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )
        .expect("built columns match their schema")
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn json_strings_are_written_as_serde_json_writes_them() {
        use proptest::prelude::*;
        let check = |s: &str| {
            let mut fast = Vec::new();
            write_json_str(&mut fast, s);
            assert_eq!(String::from_utf8(fast).unwrap(), serde_json::to_string(s).unwrap(), "{s:?}");
        };
        // Every byte value that can stand alone, at every offset of an 8-byte word.
        for c in (0u32..0x80).chain([0xe9, 0x2192, 0x65e5, 0x1f600]).filter_map(char::from_u32) {
            for pad in 0..17 {
                check(&format!("{}{c}{}", "a".repeat(pad), "b".repeat(16 - pad)));
            }
        }
        check("");
        proptest!(ProptestConfig::with_cases(2000), |(s in "(?s).{0,80}", t in "[\\x00-\\x7f]{0,40}")| {
            check(&s);
            check(&t);
            check(&format!("{t}{s}{t}"));
        });
    }
    use super::*;
    use crate::arrow_out::rows_to_batch;
    use crate::pairs::{make_pairs, PairOptions, Strategy};
    use crate::stats::Stats;

    fn group(prompt: Content<'static>, texts: Vec<Content<'static>>, extra: crate::model::Fields<'static>) -> Group<'static> {
        let n = texts.len();
        Group {
            prompt_id: Cow::Borrowed("p"),
            prompt,
            responses: texts
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut r = Response::new(c);
                    r.score = Some((n - i) as f64);
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

    fn model_len(r: &Response<'_>) -> usize {
        r.model.as_deref().map_or(0, str::len)
    }

    #[test]
    fn typed_builder_and_jsonl_writer_match_the_generic_rows() {
        let extra: crate::model::Fields<'static> =
            vec![("source".into(), Value::Str("s".into())), ("margin".into(), Value::Int(99)), ("n".into(), Value::Int(1))];
        let groups = vec![
            group(Content::Text("p1".into()), vec![Content::Text("a".into()), Content::Text("b".into())], extra.clone()),
            group(msgs("p2"), vec![msgs("c"), msgs("d"), msgs("e")], vec![]),
            // One response, so no pairs: its other columns must not shift the next group's.
            group(Content::Text("p0".into()), vec![Content::Text("z".into())], vec![("source".into(), Value::Str("none".into()))]),
            // Text after messages in the same column: the column becomes JSON text.
            group(
                Content::Text("p3".into()),
                vec![msgs("f"), Content::Text("g".into())],
                vec![("source".into(), Value::Str("t".into())), ("n".into(), Value::Float(2.5))],
            ),
        ];
        let opts = PairOptions { strategy: Strategy::AllPairs, ..Default::default() };
        for cols in [
            PairColumns { tie: true, ranks: true, models: true, hallucinated: true },
            PairColumns { tie: false, ranks: false, models: false, hallucinated: false },
        ] {
            let mut typed = PairBatchBuilder::new(cols);
            let mut rows = Vec::new();
            let mut jsonl = Vec::new();
            for g in &groups {
                let pairs = make_pairs(g, &opts, &mut Stats::default());
                typed.append(g, &pairs);
                rows.extend(pairs.iter().map(|p| pair_row(g, p, cols)));
                write_pairs_jsonl(&mut jsonl, g, &pairs, cols);
            }
            // The sizes it reports are the batch's; a builder started at them (or at any size)
            // makes the same batch.
            let sizes = typed.sizes();
            let text_bytes = |f: fn(&Group<'static>, &Pair) -> usize| -> usize {
                groups.iter().flat_map(|g| make_pairs(g, &opts, &mut Stats::default()).into_iter().map(move |p| f(g, &p))).sum()
            };
            assert_eq!(sizes.rows, rows.len());
            assert_eq!(sizes.prompt_id, rows.len());
            assert_eq!(sizes.pair_id, 16 * rows.len());
            assert_eq!(sizes.chosen, text_bytes(|g, p| json_text_len(&g.responses[p.chosen].content)));
            assert_eq!(sizes.prompt, text_bytes(|g, _| json_text_len(&g.prompt)));
            assert_eq!(sizes.chosen_model, if cols.models { text_bytes(|g, p| model_len(&g.responses[p.chosen])) } else { 0 });
            let batch = typed.finish();
            assert_eq!(batch, rows_to_batch(&rows, TYPE_HINTS));
            for start in [sizes, PairSizes { rows: 1, prompt: 1, chosen: 1 << 20, ..sizes }] {
                let mut again = PairBatchBuilder::with_sizes(cols, start);
                for g in &groups {
                    again.append(g, &make_pairs(g, &opts, &mut Stats::default()));
                }
                assert_eq!(again.finish(), batch);
            }
            let generic: Vec<u8> = rows.iter().flat_map(|r| format!("{}\n", r.to_json()).into_bytes()).collect();
            assert_eq!(String::from_utf8(jsonl).unwrap(), String::from_utf8(generic).unwrap());
        }
    }
}
