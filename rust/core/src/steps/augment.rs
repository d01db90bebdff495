//! Reward-augmented relabeling (Zhang et al. 2024, shenao-zhang/reward-augmented-preference):
//! every pair is emitted twice, with the prompt conditioned on a target score —
//!
//! - conditioned on the chosen response's score, order kept (`conditioned_on = "chosen"`);
//! - conditioned on the rejected response's score, chosen and rejected swapped
//!   (`conditioned_on = "rejected"`): under that goal the lower-scored response is preferred.
//!
//! So in every output row the prompt names the score of the row's own `chosen` response
//! (`target_score`). The prompt is rewritten with a template holding `{prompt}` and `{score}`
//! (`{{`/`}}` for literal braces); for conversational prompts the first user message's
//! content is rewritten (the first message when there is no user message), as in the source's
//! "nosys" variant. Scores print like the source does: integers without a decimal point,
//! others as Python's `repr` (shortest round-trip digits).
//!
//! Rows come out as the source concatenates them: every pair conditioned on its chosen score, in
//! input order, then every pair conditioned on its rejected score, in input order (columns the
//! relabeling does not change are shared with the input, not copied). `pair_id` becomes
//! `<pair_id>:c` / `<pair_id>:r` (the original is kept in `source_pair_id`); `prompt_id` is kept,
//! so the two rows still group with their prompt. Swapping follows the same rules as flipping
//! (every `*chosen*`/`*rejected*` column pair exchanged, `margin`/`*_margin` negated).

use std::fmt::Write as _;
use std::sync::Arc;

use arrow_array::builder::StringBuilder;
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, Float64Array, ListArray, RecordBatch, StringArray, StructArray};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;

use super::{column_error, make_batch, numeric_array, par_map, row_error, text_array, Swapper, Table, SLICE_ROWS};
use crate::error::{PrepError, Problem, Result};
use crate::pipeline::resolve_threads;

/// The default: the source's layout (goal first, a blank line, then the instruction) without
/// its UltraFeedback-specific wording. An assumption; pass your own template to change it.
pub const DEFAULT_TEMPLATE: &str = "Target score: {score}.\n\n{prompt}";

/// The source's own wording (scripts/reward_augmentation.py, "nosys" variant), for
/// UltraFeedback-style 1-10 overall scores.
pub const ULTRAFEEDBACK_TEMPLATE: &str = "You are an assistant that generates responses for the instruction while \
implicitly achieving the following target scores (on a scale of 1-10, where 1 is lowest and 10 is highest):\n\
Overall score: {score}.\n\n{prompt}";

#[derive(Debug, Clone)]
pub struct AugmentOptions {
    pub template: String,
    pub score_chosen: String,
    pub score_rejected: String,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

impl Default for AugmentOptions {
    fn default() -> Self {
        AugmentOptions {
            template: DEFAULT_TEMPLATE.into(),
            score_chosen: "score_chosen".into(),
            score_rejected: "score_rejected".into(),
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Prompt,
    Score,
}

/// A prompt template with `{prompt}` and `{score}` placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    segments: Vec<Segment>,
}

impl Template {
    pub fn parse(text: &str) -> std::result::Result<Template, String> {
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest.find('}').ok_or_else(|| format!("template: unclosed '{{' at character {i}"))?;
                    let seg = match &rest[..end] {
                        "prompt" => Segment::Prompt,
                        "score" => Segment::Score,
                        other => {
                            return Err(format!(
                                "template: unknown placeholder '{{{other}}}'; use {{prompt}} and {{score}} (and {{{{ }}}} for braces)"
                            ))
                        }
                    };
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(seg);
                    for _ in 0..=end {
                        chars.next();
                    }
                }
                '}' => return Err(format!("template: single '}}' at character {i}; write '}}}}' for a brace")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        for (needed, seg) in [("{prompt}", Segment::Prompt), ("{score}", Segment::Score)] {
            if !segments.contains(&seg) {
                return Err(format!("template: must contain {needed}"));
            }
        }
        Ok(Template { segments })
    }

    pub fn render_into(&self, prompt: &str, score: &str, out: &mut impl std::fmt::Write) {
        for s in &self.segments {
            let part = match s {
                Segment::Literal(l) => l.as_str(),
                Segment::Prompt => prompt,
                Segment::Score => score,
            };
            out.write_str(part).expect("writing to a string cannot fail");
        }
    }

    pub fn render(&self, prompt: &str, score: &str) -> String {
        let mut s = String::new();
        self.render_into(prompt, score, &mut s);
        s
    }
}

/// A score as the source prints it: `int(x)` when integral (|x| < 1e16), else Python's
/// `repr(x)` (shortest round-trip digits; exponent form below 1e-4 and from 1e16).
pub fn format_score(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        return format!("{}", x as i64);
    }
    // Shortest round-trip digits and decimal exponent, e.g. "1.2345e-5".
    let sci = format!("{:e}", x);
    let (mantissa, exp) = sci.split_once('e').expect("LowerExp has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let mut digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut exp = exp;
    // Two shortest candidates can be equally near x (x = 562949953421312.25: .2 or .3). Python
    // takes the even one, Rust may not: decide such ties from x's exact decimal expansion (a
    // double's has < 800 significant digits). Only long digit strings can tie.
    if digits.len() >= 12 {
        let exact = format!("{:.800e}", x.abs());
        let (m, e) = exact.split_once('e').expect("LowerExp has an exponent");
        let all: String = m.chars().filter(|c| *c != '.').collect();
        let n = digits.len();
        let rest = &all[n..];
        if e.parse::<i32>() == Ok(exp) && rest.starts_with('5') && rest[1..].bytes().all(|b| b == b'0') {
            let lower: u128 = all[..n].parse().expect("decimal digits");
            let even = lower + (lower % 2);
            let mut text = even.to_string();
            let even_exp = if text.len() > n { exp + 1 } else { exp };
            while text.len() > 1 && text.ends_with('0') {
                text.pop();
            }
            // Only if it reads back as x: beside a power of two the lower neighbour is nearer,
            // so one of the two may not round-trip (2^-24: only …063 does).
            if format!("{}.{}e{even_exp}", &text[..1], &text[1..]).parse::<f64>() == Ok(x.abs()) {
                (digits, exp) = (text, even_exp);
            }
        }
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        } else {
            let int_len = exp as usize + 1;
            if digits.len() > int_len {
                format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
            } else {
                format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
            }
        }
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AugmentStats {
    pub rows_in: u64,
    pub rows_out: u64,
    /// Pairs whose two scores are equal: both copies carry the same prompt in opposite order.
    pub equal_scores: u64,
    pub template: String,
    pub score_columns: [String; 2],
    pub swapped_columns: Vec<[String; 2]>,
    pub negated_columns: Vec<String>,
}

/// How to rewrite the prompt column.
#[derive(Clone, Copy)]
enum PromptKind {
    Text,
    /// List<Struct> with these child indices.
    Messages { role: usize, content: usize },
}

fn prompt_kind(dt: &DataType, source: &str) -> Result<PromptKind> {
    let bad = || {
        column_error(
            source,
            format!("column 'prompt' is {dt}; reward augmentation needs text or a list of {{role, content}} messages"),
        )
    };
    match dt {
        DataType::Utf8 => Ok(PromptKind::Text),
        DataType::List(f) => match f.data_type() {
            DataType::Struct(fields) => {
                let role = fields.iter().position(|f| f.name() == "role" && f.data_type() == &DataType::Utf8);
                let content = fields.iter().position(|f| f.name() == "content" && f.data_type() == &DataType::Utf8);
                match (role, content) {
                    (Some(role), Some(content)) => Ok(PromptKind::Messages { role, content }),
                    _ => Err(bad()),
                }
            }
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn render_prompts(
    prompt: &ArrayRef,
    kind: PromptKind,
    template: &Template,
    scores: &[&str],
    source: &str,
    first: u64,
) -> Result<ArrayRef> {
    let null_prompt = |i: usize| row_error(source, first + i as u64, "prompt", Problem::MissingField, "prompt is null");
    match kind {
        PromptKind::Text => {
            let p = prompt.as_string::<i32>();
            let mut b = StringBuilder::with_capacity(p.len(), p.values().len() + p.len() * 32);
            for (i, score) in scores.iter().enumerate() {
                if p.is_null(i) {
                    return Err(null_prompt(i));
                }
                template.render_into(p.value(i), score, &mut b);
                b.append_value(""); // ends the row written above
            }
            Ok(Arc::new(b.finish()))
        }
        PromptKind::Messages { role, content } => {
            let list = prompt.as_list::<i32>();
            let values = list.values().as_struct();
            let roles = values.column(role).as_string::<i32>();
            let contents = values.column(content).as_string::<i32>();
            let mut target: Vec<Option<usize>> = vec![None; values.len()];
            let offsets = list.value_offsets();
            for i in 0..list.len() {
                let (a, b) = (offsets[i] as usize, offsets[i + 1] as usize);
                if list.is_null(i) {
                    return Err(null_prompt(i));
                }
                if a == b {
                    return Err(row_error(source, first + i as u64, "prompt", Problem::EmptyPrompt, "prompt has no messages"));
                }
                let j = (a..b).find(|&j| roles.is_valid(j) && roles.value(j) == "user").unwrap_or(a);
                target[j] = Some(i);
            }
            let mut b = StringBuilder::with_capacity(values.len(), contents.values().len() + list.len() * 32);
            let mut buf = String::new();
            for (j, t) in target.iter().enumerate() {
                match t {
                    Some(i) => {
                        buf.clear();
                        template.render_into(if contents.is_valid(j) { contents.value(j) } else { "" }, scores[*i], &mut buf);
                        b.append_value(&buf);
                    }
                    None if contents.is_null(j) => b.append_null(),
                    None => b.append_value(contents.value(j)),
                }
            }
            let mut children = values.columns().to_vec();
            children[content] = Arc::new(b.finish());
            let new_values = StructArray::try_new(values.fields().clone(), children, values.nulls().cloned())
                .map_err(|e| PrepError::Config(format!("{source}: rebuilding prompt messages: {e}")))?;
            let DataType::List(field) = prompt.data_type() else { unreachable!("checked by prompt_kind") };
            let out = ListArray::try_new(field.clone(), list.offsets().clone(), Arc::new(new_values), list.nulls().cloned())
                .map_err(|e| PrepError::Config(format!("{source}: rebuilding prompt messages: {e}")))?;
            Ok(Arc::new(out))
        }
    }
}

pub fn reward_augment(table: &Table, opts: &AugmentOptions) -> Result<(Table, AugmentStats)> {
    let source = table.source.as_str();
    let template = Template::parse(&opts.template).map_err(PrepError::Config)?;
    let prompt_idx = table.column_index("prompt", "the prompt is conditioned on a target score")?;
    table.column_index("chosen", "the pairs to augment")?;
    table.column_index("rejected", "the pairs to augment")?;
    let pair_idx = table.column_index("pair_id", "each copy gets a new pair id")?;
    let sc_idx = table.column_index(&opts.score_chosen, "the chosen response's score is the first target")?;
    let sr_idx = table.column_index(&opts.score_rejected, "the rejected response's score is the second target")?;
    for name in ["source_pair_id", "conditioned_on", "target_score"] {
        if table.schema.index_of(name).is_ok() {
            return Err(column_error(source, format!("the table already has a '{name}' column: it is already reward-augmented")));
        }
    }
    let extra = [(opts.score_chosen.as_str(), opts.score_rejected.as_str())];
    let swapper = Swapper::new(&table.schema, source, &extra)?;
    let prompt_type = crate::arrow_in::reading_type(swapper.schema.field(prompt_idx).data_type(), "prompt")
        .map_err(|m| column_error(source, m))?;
    let kind = prompt_kind(&prompt_type, source)?;
    let mut fields: Vec<Field> = swapper.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields[prompt_idx] = Field::new("prompt", prompt_type.clone(), true);
    fields[pair_idx] = Field::new("pair_id", DataType::Utf8, true);
    fields.push(Field::new("source_pair_id", DataType::Utf8, true));
    fields.push(Field::new("conditioned_on", DataType::Utf8, true));
    fields.push(Field::new("target_score", DataType::Float64, true));
    let schema = Arc::new(Schema::new_with_metadata(fields, table.schema.metadata().clone()));

    let slices = table.slices(SLICE_ROWS);
    let threads = resolve_threads(opts.threads);
    let out = par_map(&slices, threads, |(first, batch): &(u64, RecordBatch)| {
        let n = batch.num_rows();
        let mut cols = swapper.columns(batch)?;
        let score = |i: usize, name: &str| -> Result<Float64Array> {
            let x = numeric_array(&cols[i], name, source, "a target score")?;
            for r in 0..n {
                if x.is_null(r) || !x.value(r).is_finite() {
                    let got = if x.is_null(r) { "null".to_string() } else { x.value(r).to_string() };
                    return Err(row_error(
                        source,
                        first + r as u64,
                        name,
                        Problem::NonFiniteScore,
                        format!(
                            "reward augmentation needs a finite score, got {got} (pairs made from ranked or \
                             unscored data have no scores: take them from other columns, e.g. rank_chosen and \
                             rank_rejected)"
                        ),
                    ));
                }
            }
            Ok(x)
        };
        let sc = score(sc_idx, &opts.score_chosen)?;
        let sr = score(sr_idx, &opts.score_rejected)?;
        let ids = text_array(&cols[pair_idx], "pair_id", source, "a pair id")?;
        if let Some(r) = (0..n).find(|&r| ids.is_null(r)) {
            return Err(row_error(source, first + r as u64, "pair_id", Problem::MissingField, "pair_id is null"));
        }
        if cols[prompt_idx].data_type() != &prompt_type {
            cols[prompt_idx] = arrow_cast::cast(&cols[prompt_idx], &prompt_type)
                .map_err(|e| column_error(source, format!("column 'prompt': {e}")))?;
        }
        // Scores take few distinct values: format each once.
        let mut texts: Vec<String> = Vec::new();
        let mut seen: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
        let mut index = |x: f64| -> usize {
            *seen.entry(x.to_bits()).or_insert_with(|| {
                texts.push(format_score(x));
                texts.len() - 1
            })
        };
        let ic: Vec<usize> = sc.values().iter().map(|&x| index(x)).collect();
        let ir: Vec<usize> = sr.values().iter().map(|&x| index(x)).collect();
        let fmt_c: Vec<&str> = ic.iter().map(|&i| texts[i].as_str()).collect();
        let fmt_r: Vec<&str> = ir.iter().map(|&i| texts[i].as_str()).collect();
        let prompt_c = render_prompts(&cols[prompt_idx], kind, &template, &fmt_c, source, *first)?;
        let prompt_r = render_prompts(&cols[prompt_idx], kind, &template, &fmt_r, source, *first)?;
        let equal = sc.values().iter().zip(sr.values()).filter(|(a, b)| a == b).count() as u64;

        let mut a = cols.clone();
        let mut b = cols;
        swapper.apply(&mut b, &BooleanArray::from(vec![true; n]))?;
        a[prompt_idx] = prompt_c;
        b[prompt_idx] = prompt_r;
        let suffixed = |suffix: &str| -> ArrayRef {
            let mut b = StringBuilder::with_capacity(n, ids.values().len() + n * suffix.len());
            for id in ids.iter() {
                b.write_str(id.unwrap_or_default()).expect("writing to a string cannot fail");
                b.append_value(suffix);
            }
            Arc::new(b.finish())
        };
        a[pair_idx] = suffixed(":c");
        b[pair_idx] = suffixed(":r");
        let source_ids: ArrayRef = Arc::new(ids.clone());
        a.push(source_ids.clone());
        b.push(source_ids);
        a.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n("chosen", n))));
        b.push(Arc::new(StringArray::from_iter_values(std::iter::repeat_n("rejected", n))));
        a.push(Arc::new(sc));
        b.push(Arc::new(sr));
        Ok((make_batch(schema.clone(), a, n)?, make_batch(schema.clone(), b, n)?, equal))
    })?;
    let rows_in = table.num_rows() as u64;
    let stats = AugmentStats {
        rows_in,
        rows_out: 2 * rows_in,
        equal_scores: out.iter().map(|(_, _, e)| e).sum(),
        template: opts.template.clone(),
        score_columns: [opts.score_chosen.clone(), opts.score_rejected.clone()],
        swapped_columns: swapper.pair_names().into_iter().map(|(a, b)| [a, b]).collect(),
        negated_columns: table.column_names().into_iter().filter(|n| super::is_margin_column(n)).map(String::from).collect(),
    };
    // All copies conditioned on the chosen score first, then all conditioned on the rejected
    // score, as the source concatenates them: unchanged columns are shared, not copied.
    let (firsts, seconds): (Vec<RecordBatch>, Vec<RecordBatch>) = out.into_iter().map(|(a, b, _)| (a, b)).unzip();
    Ok((Table { source: table.source.clone(), schema, batches: firsts.into_iter().chain(seconds).collect() }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::Float64Type;

    #[test]
    fn score_format_matches_python() {
        let cases = [
            (7.0, "7"),
            (-0.0, "0"),
            (7.5, "7.5"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (1e16, "1e+16"),
            (-2.5e20, "-2.5e+20"),
            (1234567890123456.5, "1234567890123456.5"),
            (-3.25, "-3.25"),
        ];
        for (x, want) in cases {
            assert_eq!(format_score(x), want, "{x}");
        }
    }

    #[test]
    fn templates() {
        let t = Template::parse("{{x}} {prompt} [{score}]").unwrap();
        assert_eq!(t.render("P", "3"), "{x} P [3]");
        assert!(Template::parse("{prompt}").unwrap_err().contains("{score}"));
        assert!(Template::parse("{prompt} {scor}").unwrap_err().contains("unknown placeholder '{scor}'"));
        assert!(Template::parse("{prompt} {score").unwrap_err().contains("unclosed"));
        assert!(Template::parse("{prompt} } {score}").unwrap_err().contains("single '}'"));
        assert_eq!(Template::parse(ULTRAFEEDBACK_TEMPLATE).unwrap().render("Q", "8").lines().last(), Some("Q"));
    }

    #[test]
    fn each_pair_twice_second_swapped() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt_id", DataType::Utf8, true),
            Field::new("pair_id", DataType::Utf8, true),
            Field::new("prompt", DataType::Utf8, true),
            Field::new("chosen", DataType::Utf8, true),
            Field::new("rejected", DataType::Utf8, true),
            Field::new("score_chosen", DataType::Float64, true),
            Field::new("score_rejected", DataType::Float64, true),
            Field::new("margin", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["q1", "q2"])),
                Arc::new(StringArray::from(vec!["p1", "p2"])),
                Arc::new(StringArray::from(vec!["Hi?", "Yo?"])),
                Arc::new(StringArray::from(vec!["good", "fine"])),
                Arc::new(StringArray::from(vec!["bad", "meh"])),
                Arc::new(Float64Array::from(vec![8.0, 6.5])),
                Arc::new(Float64Array::from(vec![3.0, 6.5])),
                Arc::new(Float64Array::from(vec![5.0, 0.0])),
            ],
        )
        .unwrap();
        let t = Table::new("t", schema, vec![batch]).unwrap();
        let opts = AugmentOptions { template: "{prompt} [{score}]".into(), ..Default::default() };
        let (out, st) = reward_augment(&t, &opts).unwrap();
        assert_eq!((st.rows_in, st.rows_out, st.equal_scores), (2, 4, 1));
        let s = |name: &str| -> Vec<String> {
            let i = out.schema.index_of(name).unwrap();
            out.batches.iter().flat_map(|b| b.column(i).as_string::<i32>().iter().map(|x| x.unwrap().to_string()).collect::<Vec<_>>()).collect()
        };
        let f = |name: &str| -> Vec<f64> {
            let i = out.schema.index_of(name).unwrap();
            out.batches.iter().flat_map(|b| b.column(i).as_primitive::<Float64Type>().values().to_vec()).collect()
        };
        assert_eq!(s("prompt"), ["Hi? [8]", "Yo? [6.5]", "Hi? [3]", "Yo? [6.5]"]);
        assert_eq!(s("chosen"), ["good", "fine", "bad", "meh"]);
        assert_eq!(s("pair_id"), ["p1:c", "p2:c", "p1:r", "p2:r"]);
        assert_eq!(s("source_pair_id"), ["p1", "p2", "p1", "p2"]);
        assert_eq!(s("conditioned_on"), ["chosen", "chosen", "rejected", "rejected"]);
        assert_eq!(f("target_score"), f("score_chosen"));
        assert_eq!(f("margin"), [5.0, 0.0, -5.0, -0.0]);
        let e = reward_augment(&out, &opts).unwrap_err().to_string();
        assert!(e.contains("already reward-augmented"), "{e}");
        let e = reward_augment(&t, &AugmentOptions { score_chosen: "rank_chosen".into(), ..opts }).unwrap_err().to_string();
        assert!(e.starts_with("t: missing column 'rank_chosen'"), "{e}");
    }
}
