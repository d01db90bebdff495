//! The canonical grouped layout: one prompt with its rated responses.

use std::borrow::Cow;

use crate::rng::xxh3_of;

use crate::value::Value;

/// One chat message. Only role and content are kept; TRL's conversational format needs no more.
#[derive(Debug, Clone, PartialEq)]
pub struct Message<'a> {
    pub role: Cow<'a, str>,
    pub content: Cow<'a, str>,
}

/// A prompt or a response: plain text (also used for image references) or chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Content<'a> {
    Text(Cow<'a, str>),
    Messages(Vec<Message<'a>>),
}

/// Empty or only whitespace. Checked for every prompt and response: a text that starts with
/// a visible ASCII character is answered without `trim`'s Unicode scan (2% of a Parquet prep).
pub(crate) fn is_blank(t: &str) -> bool {
    match t.as_bytes().first() {
        None => true,
        Some(b) if b.is_ascii_graphic() => false,
        Some(_) => t.trim().is_empty(),
    }
}

impl<'a> Content<'a> {
    pub fn is_blank(&self) -> bool {
        match self {
            Content::Text(t) => is_blank(t),
            Content::Messages(m) => m.is_empty() || m.iter().all(|m| is_blank(&m.content)),
        }
    }

    pub fn is_messages(&self) -> bool {
        matches!(self, Content::Messages(_))
    }

    /// Feed the bytes that identify the content to a hasher: the text itself, or
    /// role \x1f content \x1e per message. Used for default prompt ids and pair ids; the
    /// Python reference mirrors it.
    pub fn fingerprint_into(&self, h: &mut Vec<u8>) {
        match self {
            Content::Text(t) => h.extend_from_slice(t.as_bytes()),
            Content::Messages(ms) => {
                for m in ms {
                    h.extend_from_slice(m.role.as_bytes());
                    h.push(0x1f);
                    h.extend_from_slice(m.content.as_bytes());
                    h.push(0x1e);
                }
            }
        }
    }

    pub fn to_value(&self) -> Value<'a> {
        match self {
            Content::Text(t) => Value::Str(t.clone()),
            Content::Messages(ms) => Value::List(
                ms.iter()
                    .map(|m| {
                        Value::Object(vec![
                            (Cow::Borrowed("role"), Value::Str(m.role.clone())),
                            (Cow::Borrowed("content"), Value::Str(m.content.clone())),
                        ])
                    })
                    .collect(),
            ),
        }
    }

    pub fn into_owned(self) -> Content<'static> {
        match self {
            Content::Text(t) => Content::Text(Cow::Owned(t.into_owned())),
            Content::Messages(ms) => Content::Messages(
                ms.into_iter()
                    .map(|m| Message {
                        role: Cow::Owned(m.role.into_owned()),
                        content: Cow::Owned(m.content.into_owned()),
                    })
                    .collect(),
            ),
        }
    }
}

pub type Fields<'a> = Vec<(Cow<'a, str>, Value<'a>)>;

#[derive(Debug, Clone, PartialEq)]
pub struct Response<'a> {
    pub content: Content<'a>,
    /// Higher is better.
    pub score: Option<f64>,
    /// 1 is best; ties share a rank.
    pub rank: Option<f64>,
    /// Factuality label (F-DPO): true = hallucinated.
    pub hallucinated: Option<bool>,
    pub model: Option<Cow<'a, str>>,
    /// Response-level fields the reader did not consume.
    pub extra: Fields<'a>,
}

impl<'a> Response<'a> {
    pub fn new(content: Content<'a>) -> Self {
        Response { content, score: None, rank: None, hallucinated: None, model: None, extra: Vec::new() }
    }

    /// Preference key, higher is better: the score if there is one, else minus the rank.
    pub fn preference(&self) -> f64 {
        match (self.score, self.rank) {
            (Some(s), _) => s,
            (None, Some(r)) => -r,
            (None, None) => 0.0,
        }
    }

    pub fn into_owned(self) -> Response<'static> {
        Response {
            content: self.content.into_owned(),
            score: self.score,
            rank: self.rank,
            hallucinated: self.hallucinated,
            model: self.model.map(|m| Cow::Owned(m.into_owned())),
            extra: own_fields(self.extra),
        }
    }
}

pub fn own_fields(fields: Fields<'_>) -> Fields<'static> {
    fields.into_iter().map(|(k, v)| (Cow::Owned(k.into_owned()), v.into_owned())).collect()
}

/// One prompt and its responses.
#[derive(Debug, Clone, PartialEq)]
pub struct Group<'a> {
    pub prompt_id: Cow<'a, str>,
    pub prompt: Content<'a>,
    pub responses: Vec<Response<'a>>,
    /// Row-level fields the reader did not consume; carried to every output row.
    pub extra: Fields<'a>,
}

impl<'a> Group<'a> {
    pub fn into_owned(self) -> Group<'static> {
        Group {
            prompt_id: Cow::Owned(self.prompt_id.into_owned()),
            prompt: self.prompt.into_owned(),
            responses: self.responses.into_iter().map(Response::into_owned).collect(),
            extra: own_fields(self.extra),
        }
    }
}

/// 16 lowercase hex digits.
fn hex16(x: u64) -> String {
    let mut bytes = Vec::with_capacity(16);
    push_hex16(&mut bytes, x);
    String::from_utf8(bytes).expect("hex digits are ASCII")
}

/// The 16 lowercase hex digits of `x` (the form of prompt and pair ids), appended to `buf`.
pub(crate) fn push_hex16(buf: &mut Vec<u8>, x: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    buf.extend((0..16).rev().map(|i| DIGITS[((x >> (4 * i)) & 0xf) as usize]));
}

/// Default prompt id: 16 hex digits of xxh3-64 over the prompt's fingerprint.
pub fn default_prompt_id(prompt: &Content<'_>) -> String {
    hex16(xxh3_of(|b| prompt.fingerprint_into(b)))
}

/// Pair id: 16 hex digits of xxh3-64 over prompt_id \0 chosen \0 rejected. Stable across runs,
/// batchings and thread counts; equal only for identical pairs.
pub fn pair_id(prompt_id: &str, chosen: &Content<'_>, rejected: &Content<'_>) -> String {
    hex16(pair_hash(prompt_id, chosen, rejected))
}

/// The xxh3-64 that [`pair_id`] writes in hex.
pub(crate) fn pair_hash(prompt_id: &str, chosen: &Content<'_>, rejected: &Content<'_>) -> u64 {
    xxh3_of(|b| {
        b.extend_from_slice(prompt_id.as_bytes());
        b.push(0);
        chosen.fingerprint_into(b);
        b.push(0);
        rejected.fingerprint_into(b);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_means_what_trim_says() {
        for t in ["", " ", "\t\n", "\u{a0}", "\u{3000} \u{2003}", " x", "x", "\u{a0}y", "é", "!", "\u{3000}z "] {
            assert_eq!(is_blank(t), t.trim().is_empty(), "{t:?}");
            assert_eq!(Content::Text(t.into()).is_blank(), t.trim().is_empty(), "{t:?}");
        }
    }
}
