//! Output rows: TRL pairs, KTO unpaired rows, or the grouped layout.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use arrow_schema::DataType;

use crate::formats::Format;
use crate::model::{pair_id, Group, Response};
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
