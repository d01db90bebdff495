//! Output rows: TRL pairs, KTO unpaired rows, or the grouped layout.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use arrow_schema::DataType;

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
}

impl OutputKind {
    pub fn name(self) -> &'static str {
        match self {
            OutputKind::Pairs => "pairs",
            OutputKind::Unpaired => "unpaired",
            OutputKind::Grouped => "grouped",
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
            _ => Err(format!("unknown output kind '{s}'; expected pairs, unpaired or grouped")),
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
    f.extend(g.extra.iter().cloned());
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
struct ContentJson<'c, 'a>(&'c Content<'a>);

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

fn json_into<T: serde::Serialize + ?Sized>(buf: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(buf, v).expect("writing JSON to a Vec cannot fail");
}

fn json_bytes<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
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
    let prompt = json_bytes(&ContentJson(&g.prompt));
    let mut extra = Vec::new();
    for (k, v) in &g.extra {
        extra.push(b',');
        json_into(&mut extra, k.as_ref());
        extra.push(b':');
        json_into(&mut extra, v);
    }
    let mut responses: Vec<Option<Vec<u8>>> = vec![None; g.responses.len()];
    for p in pairs {
        for i in [p.chosen, p.rejected] {
            if responses[i].is_none() {
                responses[i] = Some(json_bytes(&ContentJson(&g.responses[i].content)));
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
