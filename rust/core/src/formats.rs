//! Input schemas: detection, column mapping, and normalisation into the grouped layout.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::error::{Problem, RecordError};
use crate::model::{default_prompt_id, Content, Fields, Group, Message, Response};
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TRL standard or conversational: prompt, chosen, rejected.
    Trl,
    /// TRL implicit prompt (HH-RLHF): chosen and rejected both hold the whole dialogue.
    Implicit,
    /// UltraFeedback raw: instruction, completions[{response, overall_score, model, ...}].
    UltraFeedback,
    /// ultrafeedback_binarized: prompt, chosen, rejected, score_chosen, score_rejected.
    UltraFeedbackBinarized,
    /// Nectar: prompt, answers[{answer, model, rank}], rank 1 = best.
    Nectar,
    /// ShareGPT / LLaMA-Factory: conversations[{from, value}], chosen {from, value}, rejected.
    ShareGpt,
    /// ImageReward-style ranked lists: prompt, generations[], ranking[] (1 = best, ties allowed).
    RankedList,
    /// Pick-a-Pic: caption, image refs, label_0 / label_1 (0.5 each = tie).
    PickAPic,
    /// KTO unpaired: prompt + completion (or messages) + label.
    Kto,
    /// prefops' own grouped layout: prompt_id, prompt, responses[{content, score, rank, ...}].
    Grouped,
}

pub const ALL_FORMATS: &[Format] = &[
    Format::Trl,
    Format::Implicit,
    Format::UltraFeedback,
    Format::UltraFeedbackBinarized,
    Format::Nectar,
    Format::ShareGpt,
    Format::RankedList,
    Format::PickAPic,
    Format::Kto,
    Format::Grouped,
];

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Trl => "trl",
            Format::Implicit => "implicit",
            Format::UltraFeedback => "ultrafeedback",
            Format::UltraFeedbackBinarized => "ultrafeedback_binarized",
            Format::Nectar => "nectar",
            Format::ShareGpt => "sharegpt",
            Format::RankedList => "ranked_list",
            Format::PickAPic => "pickapic",
            Format::Kto => "kto",
            Format::Grouped => "grouped",
        }
    }

    /// Formats with one response per row: pairs need rows grouped by prompt first.
    pub fn is_unpaired(self) -> bool {
        self == Format::Kto
    }

    /// Detect the format from the keys of the first record.
    pub fn detect(record: &Value<'_>) -> Result<Format, String> {
        let Value::Object(fields) = record else {
            return Err(format!("expected each record to be an object, got {}", record.type_name()));
        };
        let has = |k: &str| fields.iter().any(|(key, _)| key == k);
        let format = if has("responses") && has("prompt") {
            Format::Grouped
        } else if has("completions") {
            Format::UltraFeedback
        } else if has("answers") {
            Format::Nectar
        } else if has("generations") && has("ranking") {
            Format::RankedList
        } else if has("caption") && has("label_0") {
            Format::PickAPic
        } else if has("conversations") && has("chosen") && has("rejected") {
            Format::ShareGpt
        } else if has("chosen") && has("rejected") && has("score_chosen") && has("score_rejected") {
            Format::UltraFeedbackBinarized
        } else if has("prompt") && has("chosen") && has("rejected") {
            Format::Trl
        } else if has("chosen") && has("rejected") {
            Format::Implicit
        } else if has("label") && (has("completion") || has("messages")) {
            Format::Kto
        } else {
            let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_ref()).collect();
            return Err(format!(
                "cannot detect the input format from columns {keys:?}; pass --format (one of {}) \
                 or map your columns with --map canonical=yours",
                ALL_FORMATS.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            ));
        };
        Ok(format)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ALL_FORMATS.iter().copied().find(|f| f.name() == s).ok_or_else(|| {
            format!(
                "unknown format '{s}'; expected one of {}",
                ALL_FORMATS.iter().map(|f| f.name()).collect::<Vec<_>>().join(", ")
            )
        })
    }
}

/// How to read records.
#[derive(Debug, Clone, Default)]
pub struct ReadOptions {
    /// None = detect from the first record.
    pub format: Option<Format>,
    /// (canonical name, name in the input): top-level columns renamed before anything else.
    pub column_map: Vec<(String, String)>,
    /// Field of each UltraFeedback completion that holds its score (default "overall_score").
    pub score_field: Option<String>,
    /// Drop the record's and the responses' other fields instead of carrying them to the output.
    pub drop_extra: bool,
}

impl ReadOptions {
    pub fn apply_column_map(&self, record: &mut Value<'_>) {
        if self.column_map.is_empty() {
            return;
        }
        if let Value::Object(fields) = record {
            for (key, _) in fields.iter_mut() {
                if let Some((canonical, _)) = self.column_map.iter().find(|(_, src)| src == key) {
                    *key = Cow::Owned(canonical.clone());
                }
            }
        }
    }
}

type RecResult<T> = Result<T, RecordError>;

/// A field path built only when an error needs it ("completions[2].overall_score").
struct At<'a> {
    parent: &'a dyn fmt::Display,
    index: Option<usize>,
    key: Option<&'a str>,
}

impl<'a> At<'a> {
    fn index(parent: &'a dyn fmt::Display, i: usize) -> Self {
        At { parent, index: Some(i), key: None }
    }
    fn key(parent: &'a dyn fmt::Display, key: &'a str) -> Self {
        At { parent, index: None, key: Some(key) }
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.parent.fmt(f)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        if let Some(k) = self.key {
            write!(f, ".{k}")?;
        }
        Ok(())
    }
}

type Field<'a> = &'a dyn fmt::Display;

fn take_field<'a>(fields: &mut Fields<'a>, key: &str) -> Option<Value<'a>> {
    let pos = fields.iter().position(|(k, _)| k == key)?;
    Some(fields.remove(pos).1)
}

fn require<'a>(fields: &mut Fields<'a>, key: &str) -> RecResult<Value<'a>> {
    match take_field(fields, key) {
        Some(Value::Null) | None => Err(RecordError::new(
            Problem::MissingField,
            key.to_string(),
            "missing (required by this format)",
        )),
        Some(v) => Ok(v),
    }
}

fn wrong_type(field: Field<'_>, expected: &str, got: &Value<'_>) -> RecordError {
    RecordError::new(
        Problem::WrongType,
        field.to_string(),
        format!("must be {expected}, got {} {}", got.type_name(), got.preview()),
    )
}

fn into_object<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Fields<'a>> {
    match v {
        Value::Object(f) => Ok(f),
        other => Err(wrong_type(field, "an object", &other)),
    }
}

fn into_list<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Vec<Value<'a>>> {
    match v {
        Value::List(items) => Ok(items),
        other => Err(wrong_type(field, "a list", &other)),
    }
}

fn into_text<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Cow<'a, str>> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(wrong_type(field, "a string", &other)),
    }
}

/// A finite number, or None when absent/null. Strings are refused: a score of "7" is a data bug.
fn parse_score(v: Option<Value<'_>>, field: Field<'_>) -> RecResult<Option<f64>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            Some(x) => Err(RecordError::new(
                Problem::NonFiniteScore,
                field.to_string(),
                format!("score must be finite, got {x}"),
            )),
            None => Err(wrong_type(field, "a number", &v)),
        },
    }
}

fn required_score(v: Option<Value<'_>>, field: Field<'_>) -> RecResult<f64> {
    parse_score(v, field)?.ok_or_else(|| {
        RecordError::new(Problem::MissingField, field.to_string(), "missing score")
    })
}

/// ShareGPT speaker names to chat roles.
fn normalise_role(role: Cow<'_, str>) -> Cow<'_, str> {
    match role.as_ref() {
        "human" => Cow::Borrowed("user"),
        "gpt" => Cow::Borrowed("assistant"),
        _ => role,
    }
}

fn parse_message<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Message<'a>> {
    let mut obj = into_object(v, field)?;
    let role = match take_field(&mut obj, "role").or_else(|| take_field(&mut obj, "from")) {
        Some(r) => normalise_role(into_text(r, &At::key(field, "role"))?),
        None => {
            return Err(RecordError::new(
                Problem::MissingField,
                format!("{field}.role"),
                "message has no 'role' (or ShareGPT 'from')",
            ))
        }
    };
    let content = match take_field(&mut obj, "content").or_else(|| take_field(&mut obj, "value")) {
        Some(c) => into_text(c, &At::key(field, "content"))?,
        None => {
            return Err(RecordError::new(
                Problem::MissingField,
                format!("{field}.content"),
                "message has no 'content' (or ShareGPT 'value')",
            ))
        }
    };
    Ok(Message { role, content })
}

/// Text, a list of messages, or a single message object.
fn parse_content<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Content<'a>> {
    match v {
        Value::Str(s) => Ok(Content::Text(s)),
        Value::List(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, m)| parse_message(m, &At::index(field, i)))
            .collect::<RecResult<Vec<_>>>()
            .map(Content::Messages),
        obj @ Value::Object(_) => Ok(Content::Messages(vec![parse_message(obj, field)?])),
        other => Err(wrong_type(field, "text or a list of messages", &other)),
    }
}

fn non_empty<'a>(c: Content<'a>, field: Field<'_>, problem: Problem) -> RecResult<Content<'a>> {
    if c.is_blank() {
        let what = if problem == Problem::EmptyPrompt { "prompt" } else { "response" };
        Err(RecordError::new(problem, field.to_string(), format!("empty {what}")))
    } else {
        Ok(c)
    }
}

fn response_content<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Content<'a>> {
    non_empty(parse_content(v, field)?, field, Problem::EmptyResponse)
}

fn prompt_content<'a>(v: Value<'a>, field: Field<'_>) -> RecResult<Content<'a>> {
    non_empty(parse_content(v, field)?, field, Problem::EmptyPrompt)
}

fn prompt_id_of<'a>(fields: &mut Fields<'a>, prompt: &Content<'_>) -> RecResult<Cow<'a, str>> {
    prompt_id_value(take_field(fields, "prompt_id"), prompt)
}

/// A record's prompt id from its `prompt_id` value (absent or null: the default id).
pub(crate) fn prompt_id_value<'a>(value: Option<Value<'a>>, prompt: &Content<'_>) -> RecResult<Cow<'a, str>> {
    match value {
        None | Some(Value::Null) => Ok(Cow::Owned(default_prompt_id(prompt))),
        Some(Value::Str(s)) => Ok(s),
        Some(Value::Int(i)) => Ok(Cow::Owned(i.to_string())),
        Some(Value::UInt(u)) => Ok(Cow::Owned(u.to_string())),
        Some(other) => Err(wrong_type(&"prompt_id", "a string or integer", &other)),
    }
}

fn two_ranked<'a>(chosen: Content<'a>, rejected: Content<'a>) -> Vec<Response<'a>> {
    let mut c = Response::new(chosen);
    c.rank = Some(1.0);
    let mut r = Response::new(rejected);
    r.rank = Some(2.0);
    vec![c, r]
}

const HH_MARKER: &str = "\n\nAssistant:";

/// Byte length of the longest common prefix of two strings, on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Where the prompt ends in an implicit-prompt text pair: just after the last
/// "\n\nAssistant:" inside the shared prefix (HH-RLHF), else at the shared prefix
/// backed off to a space (TRL's extract_prompt rule).
pub fn implicit_prompt_cut(chosen: &str, rejected: &str) -> Option<usize> {
    let common = common_prefix_len(chosen, rejected);
    if let Some(pos) = chosen[..common].rfind(HH_MARKER) {
        return Some(pos + HH_MARKER.len());
    }
    let mut cut = common;
    if cut > 0 && cut < chosen.len().min(rejected.len()) && chosen.as_bytes()[cut - 1] == b' ' {
        cut -= 1;
    }
    (cut > 0).then_some(cut)
}

fn slice_cow<'a>(c: &Cow<'a, str>, from: usize, to: usize) -> Cow<'a, str> {
    match c {
        Cow::Borrowed(s) => Cow::Borrowed(&s[from..to]),
        Cow::Owned(s) => Cow::Owned(s[from..to].to_string()),
    }
}

/// Split a shared dialogue prefix off two full conversations.
fn split_implicit<'a>(
    chosen: Content<'a>,
    rejected: Content<'a>,
) -> RecResult<(Content<'a>, Content<'a>, Content<'a>)> {
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let cut = implicit_prompt_cut(&c, &r).ok_or_else(|| {
                RecordError::new(
                    Problem::NoPromptBoundary,
                    "chosen".to_string(),
                    "chosen and rejected share no prompt prefix (no \"\\n\\nAssistant:\" and no common text)",
                )
            })?;
            Ok((
                Content::Text(slice_cow(&c, 0, cut)),
                Content::Text(slice_cow(&c, cut, c.len())),
                Content::Text(slice_cow(&r, cut, r.len())),
            ))
        }
        (Content::Messages(mut c), Content::Messages(mut r)) => {
            let common = c.iter().zip(r.iter()).take_while(|(x, y)| x == y).count();
            if common == 0 || common >= c.len() || common >= r.len() {
                return Err(RecordError::new(
                    Problem::NoPromptBoundary,
                    "chosen".to_string(),
                    format!(
                        "conversations must share a prompt prefix and then differ (shared {common} of {} / {} messages)",
                        c.len(),
                        r.len()
                    ),
                ));
            }
            let chosen_tail = c.split_off(common);
            let rejected_tail = r.split_off(common);
            Ok((Content::Messages(c), Content::Messages(chosen_tail), Content::Messages(rejected_tail)))
        }
        _ => Err(RecordError::new(
            Problem::WrongType,
            "rejected".to_string(),
            "chosen and rejected must both be text or both be message lists",
        )),
    }
}

/// A normalised record: a group of ≥1 responses (KTO rows have exactly one).
pub type Record<'a> = Group<'a>;

/// Turn one input record into a group.
pub fn normalise<'a>(record: Value<'a>, format: Format, opts: &ReadOptions) -> RecResult<Record<'a>> {
    let mut f = match record {
        Value::Object(fields) => fields,
        other => {
            return Err(RecordError::new(
                Problem::WrongType,
                None,
                format!("expected an object, got {}", other.type_name()),
            ))
        }
    };
    let (prompt, mut responses) = match format {
        Format::Trl | Format::UltraFeedbackBinarized => {
            let prompt = prompt_content(require(&mut f, "prompt")?, &"prompt")?;
            let chosen = response_content(require(&mut f, "chosen")?, &"chosen")?;
            let rejected = response_content(require(&mut f, "rejected")?, &"rejected")?;
            let (prompt, chosen, rejected) = strip_prompt_from_responses(prompt, chosen, rejected)?;
            let sc = parse_score(take_field(&mut f, "score_chosen"), &"score_chosen")?;
            let sr = parse_score(take_field(&mut f, "score_rejected"), &"score_rejected")?;
            let responses = match (sc, sr) {
                (Some(sc), Some(sr)) => {
                    let (mut c, mut r) = (Response::new(chosen), Response::new(rejected));
                    (c.score, r.score) = (Some(sc), Some(sr));
                    vec![c, r]
                }
                // Both scores null: an unrated pair, e.g. prep's own output for ranked input
                // (ImageReward). Its rank columns, when there, keep the rank gap as the margin.
                (None, None) => {
                    let rc = parse_score(take_field(&mut f, "rank_chosen"), &"rank_chosen")?;
                    let rr = parse_score(take_field(&mut f, "rank_rejected"), &"rank_rejected")?;
                    let mut pair = two_ranked(chosen, rejected);
                    if let (Some(rc), Some(rr)) = (rc, rr) {
                        (pair[0].rank, pair[1].rank) = (Some(rc), Some(rr));
                    }
                    pair
                }
                (None, _) => {
                    return Err(RecordError::new(Problem::MissingField, "score_chosen".to_string(), "missing score"))
                }
                (_, None) => {
                    return Err(RecordError::new(Problem::MissingField, "score_rejected".to_string(), "missing score"))
                }
            };
            (prompt, responses)
        }
        Format::Implicit => {
            let chosen = response_content(require(&mut f, "chosen")?, &"chosen")?;
            let rejected = response_content(require(&mut f, "rejected")?, &"rejected")?;
            let (prompt, chosen, rejected) = split_implicit(chosen, rejected)?;
            let prompt = non_empty(prompt, &"chosen", Problem::EmptyPrompt)?;
            let chosen = non_empty(chosen, &"chosen", Problem::EmptyResponse)?;
            let rejected = non_empty(rejected, &"rejected", Problem::EmptyResponse)?;
            (prompt, two_ranked(chosen, rejected))
        }
        Format::UltraFeedback => {
            let prompt = prompt_content(require(&mut f, "instruction")?, &"instruction")?;
            let score_key = opts.score_field.as_deref().unwrap_or("overall_score");
            let completions = require(&mut f, "completions")?;
            (prompt, rated_list(completions, "completions", "response", score_key, Rating::Score)?)
        }
        Format::Nectar => {
            let prompt = prompt_content(require(&mut f, "prompt")?, &"prompt")?;
            let answers = require(&mut f, "answers")?;
            (prompt, rated_list(answers, "answers", "answer", "rank", Rating::Rank)?)
        }
        Format::ShareGpt => {
            let prompt = prompt_content(require(&mut f, "conversations")?, &"conversations")?;
            let chosen = response_content(require(&mut f, "chosen")?, &"chosen")?;
            let rejected = response_content(require(&mut f, "rejected")?, &"rejected")?;
            let prompt = match prompt {
                Content::Messages(m) => Content::Messages(m),
                Content::Text(_) => {
                    return Err(RecordError::new(
                        Problem::WrongType,
                        "conversations".to_string(),
                        "must be a list of {from, value} messages",
                    ))
                }
            };
            (prompt, two_ranked(as_messages(chosen), as_messages(rejected)))
        }
        Format::RankedList => {
            let prompt = prompt_content(require(&mut f, "prompt")?, &"prompt")?;
            let generations = into_list(require(&mut f, "generations")?, &"generations")?;
            let ranking = into_list(require(&mut f, "ranking")?, &"ranking")?;
            if generations.len() != ranking.len() {
                return Err(RecordError::new(
                    Problem::LengthMismatch,
                    "ranking".to_string(),
                    format!("has {} entries but generations has {}", ranking.len(), generations.len()),
                ));
            }
            let mut responses = Vec::with_capacity(generations.len());
            for (i, (g, r)) in generations.into_iter().zip(ranking).enumerate() {
                let mut resp = Response::new(response_content(g, &At::index(&"generations", i))?);
                resp.rank = Some(required_score(Some(r), &At::index(&"ranking", i))?);
                responses.push(resp);
            }
            (prompt, responses)
        }
        Format::PickAPic => {
            let prompt = prompt_content(require(&mut f, "caption")?, &"caption")?;
            let mut responses = Vec::with_capacity(2);
            for side in 0..2 {
                let image = ["image_{}_url", "jpg_{}", "image_{}"]
                    .iter()
                    .map(|pat| pat.replace("{}", &side.to_string()))
                    .find_map(|key| take_field(&mut f, &key).filter(|v| !v.is_null()).map(|v| (key, v)));
                let Some((key, image)) = image else {
                    return Err(RecordError::new(
                        Problem::MissingField,
                        format!("image_{side}_url"),
                        format!("no image reference (looked for image_{side}_url, jpg_{side}, image_{side})"),
                    ));
                };
                let content = Content::Text(into_text(image, &key)?);
                let mut r = Response::new(non_empty(content, &key, Problem::EmptyResponse)?);
                let label = format!("label_{side}");
                r.score = Some(required_score(take_field(&mut f, &label), &label)?);
                responses.push(r);
            }
            (prompt, responses)
        }
        Format::Kto => {
            let label = match require(&mut f, "label")? {
                Value::Bool(b) => b,
                Value::Int(1) => true,
                Value::Int(0) => false,
                other => return Err(wrong_type(&"label", "a boolean (or 0/1)", &other)),
            };
            let (prompt, completion) = if let Some(messages) = take_field(&mut f, "messages") {
                let Content::Messages(mut m) = parse_content(messages, &"messages")? else {
                    return Err(RecordError::new(Problem::WrongType, "messages".to_string(), "must be a list of messages"));
                };
                if m.len() < 2 {
                    return Err(RecordError::new(
                        Problem::MissingField,
                        "messages".to_string(),
                        "needs at least a prompt message and a completion message",
                    ));
                }
                let last = m.pop().expect("len checked");
                (Content::Messages(m), Content::Messages(vec![last]))
            } else {
                let prompt = parse_content(require(&mut f, "prompt")?, &"prompt")?;
                (prompt, parse_content(require(&mut f, "completion")?, &"completion")?)
            };
            let prompt = non_empty(prompt, &"prompt", Problem::EmptyPrompt)?;
            let mut r = Response::new(non_empty(completion, &"completion", Problem::EmptyResponse)?);
            r.score = Some(if label { 1.0 } else { 0.0 });
            (prompt, vec![r])
        }
        Format::Grouped => {
            let prompt = prompt_content(require(&mut f, "prompt")?, &"prompt")?;
            let items = into_list(require(&mut f, "responses")?, &"responses")?;
            let mut responses = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let field = At::index(&"responses", i);
                let mut obj = into_object(item, &field)?;
                let content = require(&mut obj, "content").map_err(|e| prefix_field(e, &field))?;
                let mut r = Response::new(response_content(content, &At::key(&field, "content"))?);
                r.score = parse_score(take_field(&mut obj, "score"), &At::key(&field, "score"))?;
                r.rank = parse_score(take_field(&mut obj, "rank"), &At::key(&field, "rank"))?;
                r.hallucinated = match take_field(&mut obj, "hallucinated") {
                    None | Some(Value::Null) => None,
                    Some(Value::Bool(b)) => Some(b),
                    Some(other) => return Err(wrong_type(&At::key(&field, "hallucinated"), "a boolean", &other)),
                };
                r.model = take_model(&mut obj, &field)?;
                if r.score.is_none() && r.rank.is_none() {
                    return Err(RecordError::new(Problem::MissingField, format!("{field}.score"), "needs a score or a rank"));
                }
                r.extra = obj;
                responses.push(r);
            }
            (prompt, responses)
        }
    };
    if !format.is_unpaired() && responses.len() < 2 {
        return Err(RecordError::new(
            Problem::SingleResponse,
            None,
            format!("prompt has {} response(s); at least 2 are needed to make pairs", responses.len()),
        ));
    }
    if responses.iter().any(|r| r.score.is_some()) && responses.iter().any(|r| r.score.is_none()) {
        return Err(RecordError::new(Problem::MissingField, None, "some responses have a score and some do not"));
    }
    let prompt_id = prompt_id_of(&mut f, &prompt)?;
    if opts.drop_extra {
        f.clear();
        for r in &mut responses {
            r.extra.clear();
        }
    }
    Ok(Group { prompt_id, prompt, responses, extra: f })
}

enum Rating {
    Score,
    Rank,
}

/// A list of response objects, each with its text, a required score or rank, an optional
/// model, and extra fields kept (UltraFeedback completions, Nectar answers).
fn rated_list<'a>(
    list: Value<'a>,
    list_name: &'static str,
    text_key: &str,
    rating_key: &str,
    rating: Rating,
) -> RecResult<Vec<Response<'a>>> {
    let items = into_list(list, &list_name)?;
    let mut responses = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let field = At::index(&list_name, i);
        let mut obj = into_object(item, &field)?;
        let text = require(&mut obj, text_key).map_err(|e| prefix_field(e, &field))?;
        let mut r = Response::new(response_content(text, &At::key(&field, text_key))?);
        let value = Some(required_score(take_field(&mut obj, rating_key), &At::key(&field, rating_key))?);
        match rating {
            Rating::Score => r.score = value,
            Rating::Rank => r.rank = value,
        }
        r.model = take_model(&mut obj, &field)?;
        r.extra = obj;
        responses.push(r);
    }
    Ok(responses)
}

fn as_messages(c: Content<'_>) -> Content<'_> {
    match c {
        Content::Text(t) => Content::Messages(vec![Message { role: Cow::Borrowed("assistant"), content: t }]),
        m => m,
    }
}

fn take_model<'a>(obj: &mut Fields<'a>, field: Field<'_>) -> RecResult<Option<Cow<'a, str>>> {
    match take_field(obj, "model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Str(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(&At::key(field, "model"), "a string", &other)),
    }
}

fn prefix_field(mut e: RecordError, prefix: Field<'_>) -> RecordError {
    e.field = Some(match e.field {
        Some(f) => format!("{prefix}.{f}"),
        None => prefix.to_string(),
    });
    e
}

/// ultrafeedback_binarized and TRL conversational data repeat the prompt at the start of
/// chosen/rejected; TRL expects it only in `prompt`.
fn strip_prompt_from_responses<'a>(
    prompt: Content<'a>,
    chosen: Content<'a>,
    rejected: Content<'a>,
) -> RecResult<(Content<'a>, Content<'a>, Content<'a>)> {
    match (&prompt, &chosen, &rejected) {
        (Content::Text(_), Content::Messages(_), Content::Messages(_)) => split_implicit(chosen, rejected),
        (Content::Messages(p), Content::Messages(c), Content::Messages(r))
            if c.len() > p.len() && r.len() > p.len() && c.starts_with(p) && r.starts_with(p) =>
        {
            let n = p.len();
            let (Content::Messages(mut c), Content::Messages(mut r)) = (chosen, rejected) else { unreachable!() };
            Ok((prompt, Content::Messages(c.split_off(n)), Content::Messages(r.split_off(n))))
        }
        _ => Ok((prompt, chosen, rejected)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value<'_> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn hh_prompt_cut_is_after_last_shared_assistant_marker() {
        let c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: good";
        let r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bad";
        let cut = implicit_prompt_cut(c, r).unwrap();
        assert_eq!(&c[..cut], "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:");
        assert_eq!(&c[cut..], " good");
    }

    #[test]
    fn detects_every_format() {
        let cases = [
            (r#"{"prompt":"p","chosen":"a","rejected":"b"}"#, Format::Trl),
            (r#"{"chosen":"a","rejected":"b"}"#, Format::Implicit),
            (r#"{"instruction":"p","completions":[]}"#, Format::UltraFeedback),
            (r#"{"prompt":"p","chosen":[],"rejected":[],"score_chosen":1,"score_rejected":0}"#, Format::UltraFeedbackBinarized),
            (r#"{"prompt":"p","answers":[]}"#, Format::Nectar),
            (r#"{"conversations":[],"chosen":{},"rejected":{}}"#, Format::ShareGpt),
            (r#"{"prompt":"p","generations":[],"ranking":[]}"#, Format::RankedList),
            (r#"{"caption":"c","label_0":1,"label_1":0}"#, Format::PickAPic),
            (r#"{"prompt":"p","completion":"c","label":true}"#, Format::Kto),
            (r#"{"messages":[],"label":true}"#, Format::Kto),
            (r#"{"prompt":"p","responses":[]}"#, Format::Grouped),
        ];
        for (text, want) in cases {
            assert_eq!(Format::detect(&parse(text)).unwrap(), want, "{text}");
        }
        assert!(Format::detect(&parse(r#"{"q":1}"#)).unwrap_err().contains("--format"));
    }

    #[test]
    fn binarized_conversation_prompt_is_split_off() {
        let v = parse(
            r#"{"prompt":"hi","chosen":[{"role":"user","content":"hi"},{"role":"assistant","content":"a"}],
               "rejected":[{"role":"user","content":"hi"},{"role":"assistant","content":"b"}],
               "score_chosen":8.0,"score_rejected":5.5,"source":"x"}"#,
        );
        let g = normalise(v, Format::UltraFeedbackBinarized, &ReadOptions::default()).unwrap();
        assert_eq!(g.prompt, Content::Messages(vec![Message { role: "user".into(), content: "hi".into() }]));
        assert_eq!(g.responses[0].score, Some(8.0));
        assert_eq!(g.responses[1].content, Content::Messages(vec![Message { role: "assistant".into(), content: "b".into() }]));
        assert_eq!(g.extra, vec![(Cow::Borrowed("source"), Value::Str("x".into()))]);
    }

    #[test]
    fn errors_name_the_field() {
        let v = parse(r#"{"instruction":"p","completions":[{"response":"a","overall_score":1},{"response":"b","overall_score":"7"}]}"#);
        let e = normalise(v, Format::UltraFeedback, &ReadOptions::default()).unwrap_err();
        assert_eq!(e.problem, Problem::WrongType);
        assert_eq!(e.field.as_deref(), Some("completions[1].overall_score"));
        let v = parse(r#"{"instruction":"p","completions":[{"response":"a","overall_score":1}]}"#);
        let e = normalise(v, Format::UltraFeedback, &ReadOptions::default()).unwrap_err();
        assert_eq!(e.problem, Problem::SingleResponse);
        let v = parse(r#"{"prompt":"p","chosen":"  ","rejected":"b"}"#);
        let e = normalise(v, Format::Trl, &ReadOptions::default()).unwrap_err();
        assert_eq!((e.problem, e.field.as_deref()), (Problem::EmptyResponse, Some("chosen")));
    }

    #[test]
    fn column_map_renames_before_detection() {
        let mut v = parse(r#"{"question":"p","good":"a","bad":"b"}"#);
        let opts = ReadOptions {
            column_map: vec![
                ("prompt".into(), "question".into()),
                ("chosen".into(), "good".into()),
                ("rejected".into(), "bad".into()),
            ],
            ..Default::default()
        };
        opts.apply_column_map(&mut v);
        assert_eq!(Format::detect(&v).unwrap(), Format::Trl);
    }
}
