//! Token-level preparation for the token-weighted losses: prompt and completion token ids in
//! the layout TRL's `DataCollatorForPreference` takes, completion masks, the LD-DPO shared
//! length and the TAB-PO differing-token mask.
//!
//! Encoding (the tokenizer is a local `tokenizer.json`, never downloaded), by [`Split`]:
//!
//! - [`Split::Joint`] (default; TRL 1.16's `DPOTrainer` text path, id for id): each completion
//!   gets the EOS token's *text* appended (unless its text already ends with it); `prompt`,
//!   `prompt + chosen` and `prompt + rejected` are encoded (with the post-processor special tokens
//!   when `add_special_tokens`); `k` = the shorter of the two common prefixes of the prompt's ids
//!   with each joint encoding; `prompt_ids` = the prompt's first `k` ids, `chosen_ids` /
//!   `rejected_ids` = each joint encoding from `k` on. When tokens merge across the boundary (a
//!   prompt ending in a space, a completion not starting with one) or the post-processor ends
//!   the prompt with special tokens (`[SEP]` for BERT-style), the prompt's encoding is not a
//!   prefix of the joint one: its ids from `k` on are left out of `prompt_ids` (counted in the
//!   stats, as TRL warns) and the completion starts with the merged tokens.
//! - [`Split::Separate`]: the prompt encoded on its own (post-processor special tokens when
//!   `add_special_tokens`: BOS for Llama-style tokenizers, `[CLS] … [SEP]` for BERT-style,
//!   nothing for GPT-2), each completion on its own without special tokens and the EOS *id*
//!   appended unless it already ends with it; no token merges across the boundary.
//!
//! Then, in both modes, `prompt_ids` is cut to its last `max_prompt_length` tokens and each
//! completion to its first `max_completion_length` (so a cut completion loses its EOS). A
//! completion left with no tokens is an error naming its row.
//!
//! Per pair, on the final (cut) ids, with `P = len(prompt_ids)`, `C = len(chosen_ids)`,
//! `R = len(rejected_ids)`:
//!
//! - `chosen_completion_mask` (`P + C` int8) = `P` zeros then `C` ones, aligned with
//!   `prompt_ids + chosen_ids` (the row TRL's collator builds); same for rejected;
//! - `shared_length` = `min(C, R)` (LD-DPO's `l_p`: completion token k, 1-based, weighs 1 while
//!   k ≤ l_p and α after);
//! - `chosen_diff_mask` (`P + C` int8) = 0 on the prompt; on completion index k (0-based) 1 when
//!   `k < R` and `chosen_ids[k] != rejected_ids[k]`, else 0 (completions aligned from their first
//!   token; positions past the shorter one have nothing to differ from and stay 0, as in the
//!   TAB-PO source's `_apply_diff_weight`); same for rejected. TAB-PO's raw
//!   token weights are `completion_mask + (factor − 1)·diff_mask` (factor 1.2), which is what
//!   `prefops.losses.tabpo_diff_weights` computes from a padded batch.
//!
//! Rows are encoded in parallel in chunks; the output does not depend on the thread count.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Int32Array, ListArray, StringArray};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;
use tokenizers::Tokenizer;

use super::{column_error, make_batch, par_map, row_error, Table, SLICE_ROWS};
use crate::error::{PrepError, Problem, Result};
use crate::pipeline::resolve_threads;

/// Rows per parallel work item: small enough to keep every thread busy on one output slice.
const CHUNK_ROWS: usize = 512;

/// Which token ends each completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eos {
    /// `eos_token` of the `tokenizer_config.json` beside the `tokenizer.json`, if there is one;
    /// no EOS otherwise.
    Auto,
    /// No EOS appended.
    Off,
    /// This token (it must be in the vocabulary).
    Token(String),
}

/// How prompt and completion ids are obtained (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Prompt and prompt + completion (+ EOS text) encoded, split at their common prefix: TRL 1.16.
    #[default]
    Joint,
    /// Prompt and completions encoded on their own, the EOS id appended.
    Separate,
}

impl FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "joint" => Ok(Split::Joint),
            "separate" => Ok(Split::Separate),
            _ => Err(format!("unknown tokenize split '{s}'; expected joint or separate")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    pub tokenizer: PathBuf,
    /// The tokenizer's post-processor special tokens (e.g. BOS) on the prompt (on the joint
    /// encodings too, with [`Split::Joint`]).
    pub add_special_tokens: bool,
    pub eos: Eos,
    pub split: Split,
    /// Keep the last this-many prompt tokens.
    pub max_prompt_length: Option<usize>,
    /// Keep the first this-many tokens of each completion.
    pub max_completion_length: Option<usize>,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

impl TokenizeOptions {
    pub fn new(tokenizer: impl Into<PathBuf>) -> TokenizeOptions {
        TokenizeOptions {
            tokenizer: tokenizer.into(),
            add_special_tokens: true,
            eos: Eos::Auto,
            split: Split::Joint,
            max_prompt_length: None,
            max_completion_length: None,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenizeStats {
    pub rows: u64,
    pub tokenizer: String,
    pub add_special_tokens: bool,
    pub eos_token: Option<String>,
    pub eos_id: Option<u32>,
    /// "given", "tokenizer_config.json" or "none".
    pub eos_from: String,
    pub max_prompt_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    pub split: Split,
    /// Prompt + chosen + rejected tokens after truncation.
    pub tokens: u64,
    pub prompt_tokens: u64,
    pub chosen_tokens: u64,
    pub rejected_tokens: u64,
    pub truncated_prompts: u64,
    pub truncated_chosen: u64,
    pub truncated_rejected: u64,
    pub mean_prompt_length: f64,
    pub mean_chosen_length: f64,
    pub mean_rejected_length: f64,
    pub mean_shared_length: f64,
    /// Positions within the shared length where chosen and rejected hold different tokens
    /// (the only positions TAB-PO up-weights).
    pub differing_shared_tokens: u64,
    pub shared_tokens: u64,
    /// Rows whose prompt encoding is not a prefix of a joint encoding, so its end was left out of
    /// `prompt_ids` ([`Split::Joint`]; always 0 with [`Split::Separate`]).
    pub boundary_cut_prompts: u64,
    /// Prompt tokens so left out, over all rows.
    pub boundary_cut_tokens: u64,
    /// The first such row.
    pub boundary_cut_first: Option<BoundaryCut>,
}

/// A row whose prompt lost its end at the joint split.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BoundaryCut {
    pub row: u64,
    /// The left-out prompt tokens, decoded (special tokens kept).
    pub text: String,
    /// The same tokens as vocabulary strings (a decoder may render them as nothing, e.g. a lone
    /// Metaspace `▁`).
    pub tokens: Vec<String>,
}

/// A tokenizer loaded for the step, with its EOS.
pub struct PairTokenizer {
    tokenizer: Tokenizer,
    path: PathBuf,
    eos: Option<(String, u32)>,
    eos_from: &'static str,
}

fn config_eos(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| PrepError::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PrepError::Config(format!("{}: not valid JSON: {e}", path.display())))?;
    // `eos_token` is a string, or an AddedToken object with `content`.
    Ok(match v.get("eos_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    })
}

impl PairTokenizer {
    pub fn load(path: &Path, eos: &Eos) -> Result<PairTokenizer> {
        if !path.is_file() {
            return Err(PrepError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such tokenizer file (a local tokenizer.json is needed)"),
            ));
        }
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| PrepError::Config(format!("{}: not a valid tokenizer.json: {e}", path.display())))?;
        // A tokenizer.json may carry padding or truncation settings; they would silently change
        // the ids, and the step does its own truncation.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| PrepError::Config(format!("{}: cannot turn truncation off: {e}", path.display())))?;
        if tokenizer.get_vocab_size(true) > i32::MAX as usize {
            return Err(PrepError::Config(format!("{}: vocabulary too large for int32 token ids", path.display())));
        }
        let (name, eos_from) = match eos {
            Eos::Off => (None, "none"),
            Eos::Token(t) => (Some(t.clone()), "given"),
            Eos::Auto => match config_eos(path.parent().unwrap_or(Path::new(".")))? {
                Some(t) => (Some(t), "tokenizer_config.json"),
                None => (None, "none"),
            },
        };
        let eos = match name {
            None => None,
            Some(t) => match tokenizer.token_to_id(&t) {
                Some(id) => Some((t, id)),
                None => {
                    return Err(PrepError::Config(format!(
                        "{}: EOS token {t:?} (from {eos_from}) is not in the vocabulary",
                        path.display()
                    )))
                }
            },
        };
        Ok(PairTokenizer { tokenizer, path: path.to_path_buf(), eos, eos_from })
    }

    fn encode(&self, text: &str, special: bool) -> std::result::Result<Vec<u32>, String> {
        self.tokenizer.encode_fast(text, special).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
    }

    /// One row's prompt, chosen and rejected ids before truncation, and the prompt ids the joint
    /// split left out. An error carries the index (0 prompt, 1 chosen, 2 rejected) of the text
    /// being encoded.
    fn encode_pair(&self, texts: [&str; 3], split: Split, special: bool) -> std::result::Result<Pair, (usize, String)> {
        let mut prompt = self.encode(texts[0], special).map_err(|e| (0, e))?;
        let mut completions: [Vec<u32>; 2] = Default::default();
        let mut joint = String::new();
        for (j, ids) in completions.iter_mut().enumerate() {
            let text = texts[j + 1];
            *ids = match split {
                Split::Separate => {
                    let mut ids = self.encode(text, false).map_err(|e| (j + 1, e))?;
                    if let Some((_, eos)) = self.eos {
                        if ids.last() != Some(&eos) {
                            ids.push(eos);
                        }
                    }
                    ids
                }
                Split::Joint => {
                    // Plain concatenation, the EOS as text: what TRL encodes, so merges across
                    // the boundary and the post-processor's tokens come out as in TRL.
                    joint.clear();
                    joint.push_str(texts[0]);
                    joint.push_str(text);
                    if let Some((eos, _)) = &self.eos {
                        if !text.ends_with(eos.as_str()) {
                            joint.push_str(eos);
                        }
                    }
                    self.encode(&joint, special).map_err(|e| (j + 1, e))?
                }
            };
        }
        let mut dropped = Vec::new();
        if split == Split::Joint {
            // Both completions start at the same index (the shorter common prefix), as in TRL.
            let keep = completions.iter().map(|ids| common_prefix(&prompt, ids)).min().unwrap_or(0);
            dropped = prompt.split_off(keep);
            for ids in &mut completions {
                ids.drain(..keep);
            }
        }
        let [chosen, rejected] = completions;
        Ok(Pair { ids: [prompt, chosen, rejected], dropped })
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// One row's ids as split, before truncation.
struct Pair {
    ids: [Vec<u32>; 3],
    /// The prompt's ids from the split on, left out of `prompt_ids` (empty unless joint).
    dropped: Vec<u32>,
}

/// One pair's final ids, whether each part was cut by the length limits, and the prompt ids the
/// joint split left out.
struct Encoded {
    prompt: Vec<u32>,
    chosen: Vec<u32>,
    rejected: Vec<u32>,
    cut: [bool; 3],
    dropped: Vec<u32>,
}

fn text_input(table: &Table, name: &str) -> Result<usize> {
    let i = table.column_index(name, "the text to tokenize")?;
    match table.schema.field(i).data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => Ok(i),
        DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => Ok(i),
        DataType::List(_) | DataType::LargeList(_) | DataType::ListView(_) => Err(column_error(
            &table.source,
            format!(
                "column '{name}' holds conversations (lists of messages); tokenize takes text: render them with \
                 the model's chat template first (e.g. tokenizer.apply_chat_template(messages, tokenize=False)); \
                 prefops does not guess a template"
            ),
        )),
        other => Err(column_error(&table.source, format!("column '{name}' is {other}; tokenize needs a text column"))),
    }
}

fn strings(col: &ArrayRef, name: &str, source: &str) -> Result<StringArray> {
    arrow_cast::cast(col, &DataType::Utf8)
        .map(|c| c.as_string::<i32>().clone())
        .map_err(|e| column_error(source, format!("column '{name}': {e}")))
}

fn list_array<T: arrow_array::ArrowPrimitiveType>(lengths: &[usize], values: Vec<T::Native>, what: &str) -> Result<ArrayRef>
where
    arrow_array::PrimitiveArray<T>: From<Vec<T::Native>>,
{
    let mut offsets = Vec::with_capacity(lengths.len() + 1);
    let mut end = 0i32;
    offsets.push(end);
    for &len in lengths {
        end = i32::try_from(len).ok().and_then(|l| end.checked_add(l)).ok_or_else(|| {
            PrepError::Config(format!(
                "{what}: more than 2^31 tokens in one slice of {SLICE_ROWS} rows; sequences this long are not supported"
            ))
        })?;
        offsets.push(end);
    }
    let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
    let values = Arc::new(arrow_array::PrimitiveArray::<T>::from(values));
    let field = Arc::new(Field::new("item", T::DATA_TYPE, true));
    Ok(Arc::new(ListArray::new(field, offsets, values, None)))
}

fn ids_column(rows: &[Encoded], part: impl Fn(&Encoded) -> &[u32], what: &str) -> Result<ArrayRef> {
    let lengths: Vec<usize> = rows.iter().map(|r| part(r).len()).collect();
    let mut values = Vec::with_capacity(lengths.iter().sum());
    for r in rows {
        values.extend(part(r).iter().map(|&id| id as i32)); // fits: vocabulary size checked at load
    }
    list_array::<arrow_array::types::Int32Type>(&lengths, values, what)
}

/// `P` zeros then, per completion token, `mark(k)`; one list per row.
fn mask_column(rows: &[Encoded], completion: impl Fn(&Encoded) -> &[u32], mark: impl Fn(&Encoded, usize) -> bool, what: &str) -> Result<ArrayRef> {
    let lengths: Vec<usize> = rows.iter().map(|r| r.prompt.len() + completion(r).len()).collect();
    let mut values: Vec<i8> = Vec::with_capacity(lengths.iter().sum());
    for r in rows {
        values.extend(std::iter::repeat_n(0i8, r.prompt.len()));
        values.extend((0..completion(r).len()).map(|k| mark(r, k) as i8));
    }
    list_array::<arrow_array::types::Int8Type>(&lengths, values, what)
}

/// Whether completion index `k` of `a` differs from the aligned token of `b` (false past the
/// end of `b`: TAB-PO compares only the first min(|a|, |b|) positions).
fn differs(a: &[u32], b: &[u32], k: usize) -> bool {
    b.get(k).is_some_and(|&t| t != a[k])
}

pub const OUTPUT_COLUMNS: [&str; 8] = [
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "chosen_completion_mask",
    "rejected_completion_mask",
    "shared_length",
    "chosen_diff_mask",
    "rejected_diff_mask",
];

fn output_types() -> [DataType; 8] {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let (ids, mask) = (list(DataType::Int32), list(DataType::Int8));
    [ids.clone(), ids.clone(), ids, mask.clone(), mask.clone(), DataType::Int32, mask.clone(), mask]
}

pub fn tokenize_pairs(table: &Table, opts: &TokenizeOptions) -> Result<(Table, TokenizeStats)> {
    for (name, v) in [("max_prompt_length", opts.max_prompt_length), ("max_completion_length", opts.max_completion_length)] {
        if v == Some(0) {
            return Err(PrepError::Config(format!("{name} must be at least 1 (leave it unset for no limit)")));
        }
    }
    let source = table.source.as_str();
    let cols = [text_input(table, "prompt")?, text_input(table, "chosen")?, text_input(table, "rejected")?];
    let tk = PairTokenizer::load(&opts.tokenizer, &opts.eos)?;
    let eos_id = tk.eos.as_ref().map(|(_, id)| *id);
    let threads = resolve_threads(opts.threads);

    // The input's columns, then the new ones (replacing any of the same name: re-tokenizing).
    let mut fields: Vec<Field> = table.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut positions = Vec::with_capacity(OUTPUT_COLUMNS.len());
    for (name, dtype) in OUTPUT_COLUMNS.iter().zip(output_types()) {
        let field = Field::new(*name, dtype, true);
        match fields.iter().position(|f| f.name() == name) {
            Some(i) => {
                fields[i] = field;
                positions.push(i);
            }
            None => {
                positions.push(fields.len());
                fields.push(field);
            }
        }
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, table.schema.metadata().clone()));
    let mut out_batches = Vec::new();
    let mut totals = [0u64; 3];
    let mut cuts = [0u64; 3];
    let (mut shared_total, mut differing_shared) = (0u64, 0u64);
    let (mut boundary_rows, mut boundary_tokens, mut boundary_first) = (0u64, 0u64, None);
    for (first, batch) in table.slices(SLICE_ROWS) {
        let texts: Vec<StringArray> = cols
            .iter()
            .map(|&i| strings(batch.column(i), table.schema.field(i).name(), source))
            .collect::<Result<_>>()?;
        let n = batch.num_rows();
        let chunks: Vec<(usize, usize)> = (0..n).step_by(CHUNK_ROWS).map(|a| (a, (a + CHUNK_ROWS).min(n))).collect();
        let encoded = par_map(&chunks, threads, |&(a, b)| {
            let mut rows = Vec::with_capacity(b - a);
            for r in a..b {
                let row = first + r as u64;
                const FIELDS: [&str; 3] = ["prompt", "chosen", "rejected"];
                for (j, field) in FIELDS.into_iter().enumerate() {
                    if texts[j].is_null(r) {
                        return Err(row_error(source, row, field, Problem::MissingField, format!("{field} is null")));
                    }
                }
                let row_texts = [texts[0].value(r), texts[1].value(r), texts[2].value(r)];
                let Pair { ids: [mut prompt, mut chosen, mut rejected], dropped } =
                    tk.encode_pair(row_texts, opts.split, opts.add_special_tokens).map_err(|(j, e)| {
                        row_error(source, row, FIELDS[j], Problem::WrongType, format!("the tokenizer failed: {e}"))
                    })?;
                let mut cut = [false; 3];
                if let Some(m) = opts.max_prompt_length.filter(|&m| prompt.len() > m) {
                    prompt.drain(..prompt.len() - m); // keep the end: the prompt's last turn
                    cut[0] = true;
                }
                for (j, ids) in [(1, &mut chosen), (2, &mut rejected)] {
                    if let Some(m) = opts.max_completion_length.filter(|&m| ids.len() > m) {
                        ids.truncate(m);
                        cut[j] = true;
                    }
                    if ids.is_empty() {
                        let field = FIELDS[j];
                        let after = if opts.split == Split::Joint { " after the prompt" } else { "" };
                        let no_eos = if eos_id.is_none() { " and there is no EOS token to append" } else { "" };
                        return Err(row_error(
                            source,
                            row,
                            field,
                            Problem::EmptyResponse,
                            format!(
                                "{field} encodes to no tokens{after}{no_eos}; a completion needs at least one \
                                 token (give an EOS token, or drop the pair)"
                            ),
                        ));
                    }
                }
                rows.push(Encoded { prompt, chosen, rejected, cut, dropped });
            }
            Ok(rows)
        })?;
        let rows: Vec<Encoded> = encoded.into_iter().flatten().collect();
        for (i, r) in rows.iter().enumerate() {
            if !r.dropped.is_empty() {
                boundary_rows += 1;
                boundary_tokens += r.dropped.len() as u64;
                if boundary_first.is_none() {
                    // Decoded once, for the first row in input order (whatever the threads).
                    let text = tk.tokenizer.decode(&r.dropped, false).unwrap_or_else(|_| format!("{:?}", r.dropped));
                    let tokens = r.dropped.iter().map(|&id| tk.tokenizer.id_to_token(id).unwrap_or_default()).collect();
                    boundary_first = Some(BoundaryCut { row: first + i as u64, text, tokens });
                }
            }
            for (j, len) in [r.prompt.len(), r.chosen.len(), r.rejected.len()].into_iter().enumerate() {
                totals[j] += len as u64;
                cuts[j] += r.cut[j] as u64;
            }
            let shared = r.chosen.len().min(r.rejected.len());
            shared_total += shared as u64;
            differing_shared += (0..shared).filter(|&k| r.chosen[k] != r.rejected[k]).count() as u64;
        }
        let shared: ArrayRef =
            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.chosen.len().min(r.rejected.len()) as i32)));
        let made: [ArrayRef; 8] = [
            ids_column(&rows, |r| &r.prompt, "prompt_ids")?,
            ids_column(&rows, |r| &r.chosen, "chosen_ids")?,
            ids_column(&rows, |r| &r.rejected, "rejected_ids")?,
            mask_column(&rows, |r| &r.chosen, |_, _| true, "chosen_completion_mask")?,
            mask_column(&rows, |r| &r.rejected, |_, _| true, "rejected_completion_mask")?,
            shared,
            mask_column(&rows, |r| &r.chosen, |r, k| differs(&r.chosen, &r.rejected, k), "chosen_diff_mask")?,
            mask_column(&rows, |r| &r.rejected, |r, k| differs(&r.rejected, &r.chosen, k), "rejected_diff_mask")?,
        ];
        let mut columns = batch.columns().to_vec();
        for (&i, array) in positions.iter().zip(made) {
            if i == columns.len() {
                columns.push(array);
            } else {
                columns[i] = array;
            }
        }
        out_batches.push(make_batch(schema.clone(), columns, n)?);
    }
    let rows = table.num_rows() as u64;
    let mean = |total: u64| if rows == 0 { 0.0 } else { total as f64 / rows as f64 };
    let stats = TokenizeStats {
        rows,
        tokenizer: tk.path.display().to_string(),
        add_special_tokens: opts.add_special_tokens,
        eos_token: tk.eos.as_ref().map(|(t, _)| t.clone()),
        eos_id,
        eos_from: if tk.eos.is_some() { tk.eos_from } else { "none" }.to_string(),
        max_prompt_length: opts.max_prompt_length,
        max_completion_length: opts.max_completion_length,
        split: opts.split,
        tokens: totals.iter().sum(),
        prompt_tokens: totals[0],
        chosen_tokens: totals[1],
        rejected_tokens: totals[2],
        truncated_prompts: cuts[0],
        truncated_chosen: cuts[1],
        truncated_rejected: cuts[2],
        mean_prompt_length: mean(totals[0]),
        mean_chosen_length: mean(totals[1]),
        mean_rejected_length: mean(totals[2]),
        mean_shared_length: mean(shared_total),
        differing_shared_tokens: differing_shared,
        shared_tokens: shared_total,
        boundary_cut_prompts: boundary_rows,
        boundary_cut_tokens: boundary_tokens,
        boundary_cut_first: boundary_first,
    };
    Ok((Table { source: table.source.clone(), schema, batches: out_batches }, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::{Int32Type, Int8Type};
    use arrow_array::RecordBatch;

    /// A word-level tokenizer: whitespace words, `<s>` added before every single sequence.
    fn write_tokenizer(dir: &Path) -> PathBuf {
        let words = ["[UNK]", "<s>", "</s>", "a", "b", "c", "d", "e", "f"];
        let vocab: serde_json::Map<String, serde_json::Value> =
            words.iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::json!(i))).collect();
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(1, "<s>"), special(2, "</s>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            },
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        });
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    fn table(rows: &[(&str, &str, &str)], batch: usize) -> Table {
        let schema = Arc::new(Schema::new(vec![
            Field::new("pair_id", DataType::Utf8, true),
            Field::new("prompt", DataType::Utf8, true),
            Field::new("chosen", DataType::Utf8, true),
            Field::new("rejected", DataType::Utf8, true),
        ]));
        let batches = rows
            .chunks(batch)
            .enumerate()
            .map(|(b, c)| {
                let col = |j: usize| {
                    let texts: Vec<&str> = c.iter().map(|r| [r.0, r.1, r.2][j]).collect();
                    Arc::new(StringArray::from(texts)) as ArrayRef
                };
                let ids: Vec<String> = (0..c.len()).map(|i| format!("p{}", b * batch + i)).collect();
                RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(ids)), col(0), col(1), col(2)])
                    .unwrap()
            })
            .collect();
        Table::new("t", schema, batches).unwrap()
    }

    fn lists<T: arrow_array::ArrowPrimitiveType>(t: &Table, name: &str) -> Vec<Vec<T::Native>> {
        let i = t.schema.index_of(name).unwrap();
        t.batches
            .iter()
            .flat_map(|b| {
                let l = b.column(i).as_list::<i32>().clone();
                (0..l.len()).map(move |r| l.value(r).as_primitive::<T>().values().to_vec())
            })
            .collect()
    }

    fn opts(path: &Path) -> TokenizeOptions {
        TokenizeOptions { eos: Eos::Token("</s>".into()), threads: 1, ..TokenizeOptions::new(path) }
    }

    /// Rows whose completions start with a space (or whose prompt is empty): no token merges
    /// across the boundary, so both splits give the same ids.
    #[test]
    fn ids_masks_shared_length_and_differing_tokens() {
        for split in [Split::Joint, Split::Separate] {
            ids_masks_shared_length_and_differing_tokens_with(split);
        }
    }

    fn ids_masks_shared_length_and_differing_tokens_with(split: Split) {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let t = table(&[("a b", " c d", " c e f"), ("", "f", "f")], 8);
        let opts = |p: &Path| TokenizeOptions { split, ..opts(p) };
        let (out, st) = tokenize_pairs(&t, &opts(&tok)).unwrap();
        assert_eq!(out.schema.fields().len(), 4 + OUTPUT_COLUMNS.len());
        assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![1, 3, 4], vec![1]]);
        assert_eq!(lists::<Int32Type>(&out, "chosen_ids"), [vec![5, 6, 2], vec![8, 2]]);
        assert_eq!(lists::<Int32Type>(&out, "rejected_ids"), [vec![5, 7, 8, 2], vec![8, 2]]);
        assert_eq!(lists::<Int8Type>(&out, "chosen_completion_mask"), [vec![0, 0, 0, 1, 1, 1], vec![0, 1, 1]]);
        assert_eq!(lists::<Int8Type>(&out, "rejected_completion_mask"), [vec![0, 0, 0, 1, 1, 1, 1], vec![0, 1, 1]]);
        // c=c, d≠e, </s>≠f; the rejected's last token has no chosen counterpart: not marked.
        assert_eq!(lists::<Int8Type>(&out, "chosen_diff_mask"), [vec![0, 0, 0, 0, 1, 1], vec![0, 0, 0]]);
        assert_eq!(lists::<Int8Type>(&out, "rejected_diff_mask"), [vec![0, 0, 0, 0, 1, 1, 0], vec![0, 0, 0]]);
        let shared: Vec<i32> = out.batches[0].column_by_name("shared_length").unwrap().as_primitive::<Int32Type>().values().to_vec();
        assert_eq!(shared, [3, 2]);
        assert_eq!((st.rows, st.tokens, st.prompt_tokens, st.shared_tokens, st.differing_shared_tokens), (2, 15, 4, 5, 2));
        assert_eq!((st.eos_id, st.eos_from.as_str()), (Some(2), "given"));
        assert_eq!((st.split, st.boundary_cut_prompts, st.boundary_cut_first), (split, 0, None));

        // No special tokens, no EOS: completions as encoded.
        let o = TokenizeOptions { add_special_tokens: false, eos: Eos::Off, ..opts(&tok) };
        let (out, _) = tokenize_pairs(&t, &o).unwrap();
        assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![3, 4], vec![]]);
        assert_eq!(lists::<Int32Type>(&out, "chosen_ids"), [vec![5, 6], vec![8]]);
        // Re-tokenizing replaces the columns.
        let (again, _) = tokenize_pairs(&out, &opts(&tok)).unwrap();
        assert_eq!(again.schema.fields().len(), out.schema.fields().len());
        assert_eq!(lists::<Int32Type>(&again, "chosen_ids"), [vec![5, 6, 2], vec![8, 2]]);
    }

    #[test]
    fn truncation_keeps_prompt_end_and_completion_start() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let t = table(&[("a b c", " d e f", " d"), ("a", " b", " c")], 8);
        for split in [Split::Joint, Split::Separate] {
            let o = TokenizeOptions { split, max_prompt_length: Some(2), max_completion_length: Some(2), ..opts(&tok) };
            let (out, st) = tokenize_pairs(&t, &o).unwrap();
            assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![4, 5], vec![1, 3]]);
            assert_eq!(lists::<Int32Type>(&out, "chosen_ids"), [vec![6, 7], vec![4, 2]]);
            assert_eq!(lists::<Int32Type>(&out, "rejected_ids"), [vec![6, 2], vec![5, 2]]);
            assert_eq!((st.truncated_prompts, st.truncated_chosen, st.truncated_rejected), (1, 1, 0));
        }
        let e = tokenize_pairs(&t, &TokenizeOptions { max_completion_length: Some(0), ..opts(&tok) }).unwrap_err();
        assert!(e.to_string().contains("max_completion_length must be at least 1"), "{e}");
    }

    #[test]
    fn joint_splits_at_the_shorter_common_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        // Row 0: "a b" + "c" is "a bc", an unknown word: the prompt's "b" is not in the joint
        // encoding, so both completions start after "<s> a" (the rejected one with "b").
        // Row 1: no merge; a completion ending with the EOS text gets no second one.
        let t = table(&[("a b", "c", " d"), ("a ", "b", "c </s>")], 8);
        let (out, st) = tokenize_pairs(&t, &opts(&tok)).unwrap();
        assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![1, 3], vec![1, 3]]);
        assert_eq!(lists::<Int32Type>(&out, "chosen_ids"), [vec![0, 2], vec![4, 2]]);
        assert_eq!(lists::<Int32Type>(&out, "rejected_ids"), [vec![4, 6, 2], vec![5, 2]]);
        assert_eq!(lists::<Int8Type>(&out, "chosen_completion_mask")[0], [0, 0, 1, 1]);
        assert_eq!((st.split, st.boundary_cut_prompts, st.boundary_cut_tokens), (Split::Joint, 1, 1));
        assert_eq!(st.boundary_cut_first, Some(BoundaryCut { row: 0, text: "b".into(), tokens: vec!["b".into()] }));
        // The length limit applies to the split prompt.
        let (out, _) = tokenize_pairs(&t, &TokenizeOptions { max_prompt_length: Some(1), ..opts(&tok) }).unwrap();
        assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![3], vec![3]]);

        let (out, st) = tokenize_pairs(&t, &TokenizeOptions { split: Split::Separate, ..opts(&tok) }).unwrap();
        assert_eq!(lists::<Int32Type>(&out, "prompt_ids"), [vec![1, 3, 4], vec![1, 3]]);
        assert_eq!(lists::<Int32Type>(&out, "chosen_ids"), [vec![5, 2], vec![4, 2]]);
        assert_eq!((st.split, st.boundary_cut_prompts, st.boundary_cut_first), (Split::Separate, 0, None));
        assert_eq!("separate".parse::<Split>(), Ok(Split::Separate));
        assert!("both".parse::<Split>().unwrap_err().contains("expected joint or separate"));
    }

    #[test]
    fn same_output_for_any_thread_count_and_batching() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let words = ["a", "b", "c", "d", "e", "f", "zz"];
        let texts: Vec<String> = (0..3000).map(|i| (0..(i % 7)).map(|j| words[(i * 3 + j) % 7]).collect::<Vec<_>>().join(" ")).collect();
        let rows: Vec<(&str, &str, &str)> =
            (0..3000).map(|i| (texts[i].as_str(), texts[(i + 1) % 3000].as_str(), texts[(i + 5) % 3000].as_str())).collect();
        let (one, s1) = tokenize_pairs(&table(&rows, 3000), &opts(&tok)).unwrap();
        for (threads, batch) in [(2, 700), (5, 3000), (3, 1)] {
            let (many, s) = tokenize_pairs(&table(&rows, batch), &TokenizeOptions { threads, ..opts(&tok) }).unwrap();
            assert_eq!(s, s1);
            for name in OUTPUT_COLUMNS.iter().filter(|n| **n != "shared_length") {
                if name.ends_with("_ids") {
                    assert_eq!(lists::<Int32Type>(&many, name), lists::<Int32Type>(&one, name), "{name}");
                } else {
                    assert_eq!(lists::<Int8Type>(&many, name), lists::<Int8Type>(&one, name), "{name}");
                }
            }
        }
    }

    #[test]
    fn eos_from_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let t = table(&[("a", " b", " c </s>")], 8);
        let auto = TokenizeOptions { eos: Eos::Auto, ..opts(&tok) };
        let (_, st) = tokenize_pairs(&t, &auto).unwrap();
        assert_eq!((st.eos_id, st.eos_from.as_str()), (None, "none"));
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": {"content": "</s>"}}"#).unwrap();
        let (out, st) = tokenize_pairs(&t, &auto).unwrap();
        assert_eq!((st.eos_id, st.eos_from.as_str()), (Some(2), "tokenizer_config.json"));
        // A completion already ending with EOS gets no second one.
        assert_eq!(lists::<Int32Type>(&out, "rejected_ids"), [vec![5, 2]]);
        let e = tokenize_pairs(&t, &TokenizeOptions { eos: Eos::Token("<eos>".into()), ..opts(&tok) }).unwrap_err();
        assert!(e.to_string().contains("EOS token \"<eos>\" (from given) is not in the vocabulary"), "{e}");
    }

    #[test]
    fn errors_name_the_file_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let t = table(&[("a", "b", "c"), ("a", "", "c")], 8);
        let missing = dir.path().join("nope.json");
        let e = tokenize_pairs(&t, &opts(&missing)).unwrap_err().to_string();
        assert!(e.contains("nope.json") && e.contains("no such tokenizer file"), "{e}");
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let e = tokenize_pairs(&t, &opts(&bad)).unwrap_err().to_string();
        assert!(e.contains("bad.json: not a valid tokenizer.json"), "{e}");
        let separate = TokenizeOptions { eos: Eos::Off, split: Split::Separate, ..opts(&tok) };
        let e = tokenize_pairs(&t, &separate).unwrap_err().to_string();
        assert!(e.starts_with("t: row 1, field 'chosen': chosen encodes to no tokens and there is no EOS"), "{e}");
        tokenize_pairs(&t, &opts(&tok)).unwrap(); // with an EOS, an empty completion is [EOS]
        // Joint: "a " + "" encodes to the prompt's own ids, nothing after them.
        let joint = table(&[("a ", " b", " c"), ("a ", "", " c")], 8);
        let e = tokenize_pairs(&joint, &TokenizeOptions { eos: Eos::Off, ..opts(&tok) }).unwrap_err().to_string();
        let want = "t: row 1, field 'chosen': chosen encodes to no tokens after the prompt and there is no EOS";
        assert!(e.starts_with(want), "{e}");
        let (out, _) = tokenize_pairs(&joint, &opts(&tok)).unwrap();
        assert_eq!(lists::<Int32Type>(&out, "chosen_ids")[1], [2]);

        let schema = Arc::new(Schema::new(vec![Field::new("prompt", DataType::Utf8, true), Field::new("chosen", DataType::Utf8, true)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(vec!["a"])), Arc::new(StringArray::from(vec!["b"]))]).unwrap();
        let e = tokenize_pairs(&Table::new("t", schema, vec![b]).unwrap(), &opts(&tok)).unwrap_err().to_string();
        assert!(e.starts_with("t: missing column 'rejected'"), "{e}");

        let msg = DataType::List(Arc::new(Field::new("item", DataType::Struct(vec![Field::new("role", DataType::Utf8, true)].into()), true)));
        let schema = Arc::new(Schema::new(vec![
            Field::new("prompt", DataType::Utf8, true),
            Field::new("chosen", msg.clone(), true),
            Field::new("rejected", msg, true),
        ]));
        let e = tokenize_pairs(&Table::new("t", schema, vec![]).unwrap(), &opts(&tok)).unwrap_err().to_string();
        assert!(e.contains("column 'chosen' holds conversations") && e.contains("chat template"), "{e}");

        let t = table(&[("a", "b", "c")], 8);
        let mut cols = t.batches[0].columns().to_vec();
        cols[3] = Arc::new(StringArray::from(vec![None::<&str>]));
        let nulls = Table::new("t", t.schema.clone(), vec![RecordBatch::try_new(t.schema.clone(), cols).unwrap()]).unwrap();
        let e = tokenize_pairs(&nulls, &opts(&tok)).unwrap_err().to_string();
        assert!(e.starts_with("t: row 0, field 'rejected': rejected is null"), "{e}");
    }

    #[test]
    fn empty_table_gets_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let tok = write_tokenizer(dir.path());
        let (out, st) = tokenize_pairs(&table(&[], 8), &opts(&tok)).unwrap();
        assert_eq!(st.rows, 0);
        assert_eq!(st.mean_chosen_length, 0.0);
        assert!(out.schema.index_of("rejected_diff_mask").is_ok());
    }
}
