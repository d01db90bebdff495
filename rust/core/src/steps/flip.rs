//! Label flipping: swap chosen and rejected in selected pairs.
//!
//! Three rules, applied in this order when several are asked for (each sees the table as the
//! previous one left it):
//!
//! 1. factuality (F-DPO): with binary labels h (1 = hallucinated), a pair whose chosen is
//!    hallucinated and whose rejected is not, (h_w, h_l) = (1, 0), is swapped; its labels travel
//!    with the responses and become (0, 1). (0, 0), (1, 1) and unlabelled pairs are kept.
//!    Labels may instead be given as factual (1 = factual): the swap is then at (0, 1).
//! 2. reward disagreement: swap when `reward_rejected - reward_chosen > min_gap` (a reward
//!    model prefers the rejected response). Rows with a missing reward are kept.
//! 3. random: swap with probability `rate`, decided per pair by
//!    [`keyed_unit`](crate::rng::keyed_unit)`(seed, "flip", pair_id) < rate`, so a pair's fate
//!    depends only on the seed and its id.
//!
//! A swap exchanges every paired column (`chosen`/`rejected`, `score_chosen`/`score_rejected`,
//! `chosen_model`/`rejected_model`, any `*chosen*`/`*rejected*` pair, and the rule's own
//! label/reward columns) and changes the sign of `margin` and `*_margin` columns. `pair_id` is
//! kept. A boolean `flipped` column records which rows end up swapped relative to the input
//! (an existing `flipped` column is XOR-ed, so flipping back clears it).

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use serde::Serialize;

use super::{column_error, make_batch, numeric_array, par_map, row_error, text_array, Swapper, Table, SLICE_ROWS};
use crate::error::{Problem, Result};
use crate::pipeline::resolve_threads;
use crate::rng::keyed_unit;

/// What a label value of 1 (true) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelMeaning {
    /// 1 = hallucinated (F-DPO's h; what `prep` writes as `chosen_hallucinated`).
    Hallucinated,
    /// 1 = factual.
    Factual,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FactualRule {
    pub chosen: String,
    pub rejected: String,
    pub one_means: LabelMeaning,
}

impl FactualRule {
    pub fn hallucinated(chosen: &str, rejected: &str) -> Self {
        FactualRule { chosen: chosen.into(), rejected: rejected.into(), one_means: LabelMeaning::Hallucinated }
    }

    pub fn factual(chosen: &str, rejected: &str) -> Self {
        FactualRule { chosen: chosen.into(), rejected: rejected.into(), one_means: LabelMeaning::Factual }
    }

    /// `chosen_hallucinated`/`rejected_hallucinated` (written by `prep`) when present, else
    /// `chosen_factual`/`rejected_factual`.
    pub fn detect(table: &Table) -> Result<FactualRule> {
        let has = |n: &str| table.schema.index_of(n).is_ok();
        if has("chosen_hallucinated") && has("rejected_hallucinated") {
            Ok(FactualRule::hallucinated("chosen_hallucinated", "rejected_hallucinated"))
        } else if has("chosen_factual") && has("rejected_factual") {
            Ok(FactualRule::factual("chosen_factual", "rejected_factual"))
        } else {
            Err(column_error(
                &table.source,
                format!(
                    "missing factuality label columns: neither 'chosen_hallucinated'/'rejected_hallucinated' \
                     (1 = hallucinated) nor 'chosen_factual'/'rejected_factual' (1 = factual); name yours \
                     with --hallucinated-columns or --factual-columns; the table has: {}",
                    table.column_names().join(", ")
                ),
            ))
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RewardRule {
    pub chosen: String,
    pub rejected: String,
    /// Swap only when the reward model prefers the rejected response by more than this.
    pub min_gap: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomFlip {
    /// Probability of swapping each pair, in [0, 1].
    pub rate: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Default)]
pub struct FlipOptions {
    pub factual: Option<FactualRule>,
    pub reward: Option<RewardRule>,
    pub random: Option<RandomFlip>,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

/// Input factuality labels, in the hallucination convention (h = 1: hallucinated).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FactualCounts {
    /// (0, 0)
    pub both_factual: u64,
    /// (1, 0): swapped.
    pub chosen_hallucinated_only: u64,
    /// (0, 1)
    pub rejected_hallucinated_only: u64,
    /// (1, 1)
    pub both_hallucinated: u64,
    /// A label is missing: kept.
    pub unlabelled: u64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FlipStats {
    pub rows: u64,
    /// Rules applied, in order.
    pub rules: Vec<&'static str>,
    pub flipped_factual: u64,
    pub flipped_reward: u64,
    pub flipped_random: u64,
    /// Rows swapped relative to the input (a pair swapped by two rules is back in order).
    pub flipped_total: u64,
    pub factual_labels: Option<FactualCounts>,
    /// Rows kept by the reward rule because a reward is missing (null or NaN).
    pub reward_missing: Option<u64>,
    pub rate: Option<f64>,
    pub seed: Option<u64>,
    pub swapped_columns: Vec<[String; 2]>,
    pub negated_columns: Vec<String>,
}

impl FlipStats {
    fn merge(&mut self, o: &FlipStats) {
        self.rows += o.rows;
        self.flipped_factual += o.flipped_factual;
        self.flipped_reward += o.flipped_reward;
        self.flipped_random += o.flipped_random;
        self.flipped_total += o.flipped_total;
        if let (Some(a), Some(b)) = (self.factual_labels.as_mut(), o.factual_labels.as_ref()) {
            a.both_factual += b.both_factual;
            a.chosen_hallucinated_only += b.chosen_hallucinated_only;
            a.rejected_hallucinated_only += b.rejected_hallucinated_only;
            a.both_hallucinated += b.both_hallucinated;
            a.unlabelled += b.unlabelled;
        }
        if let (Some(a), Some(b)) = (self.reward_missing.as_mut(), o.reward_missing) {
            *a += b;
        }
    }
}

/// A factuality label: Some(true) = hallucinated (after applying the label meaning).
fn labels(col: &ArrayRef, name: &str, meaning: LabelMeaning, source: &str, first: u64) -> Result<Vec<Option<bool>>> {
    let flip = meaning == LabelMeaning::Factual;
    if let DataType::Boolean = col.data_type() {
        let b = col.as_boolean();
        return Ok((0..b.len()).map(|i| (!b.is_null(i)).then(|| b.value(i) ^ flip)).collect());
    }
    let x = numeric_array(col, name, source, "a factuality label (0/1 or true/false)")?;
    (0..x.len())
        .map(|i| {
            if x.is_null(i) {
                return Ok(None);
            }
            match x.value(i) {
                0.0 => Ok(Some(flip)),
                1.0 => Ok(Some(!flip)),
                v => Err(row_error(
                    source,
                    first + i as u64,
                    name,
                    Problem::WrongType,
                    format!("a factuality label must be 0/1 or true/false, got {v}"),
                )),
            }
        })
        .collect()
}

pub fn flip_labels(table: &Table, opts: &FlipOptions) -> Result<(Table, FlipStats)> {
    let source = table.source.as_str();
    if opts.factual.is_none() && opts.reward.is_none() && opts.random.is_none() {
        return Err(crate::error::PrepError::Config(
            "nothing to flip: choose at least one rule (factual labels, reward columns, or a random rate)".into(),
        ));
    }
    if let Some(r) = &opts.random {
        if !(0.0..=1.0).contains(&r.rate) {
            return Err(crate::error::PrepError::Config(format!("flip rate must be in [0, 1], got {}", r.rate)));
        }
    }
    if let Some(r) = &opts.reward {
        if r.min_gap.is_nan() {
            return Err(crate::error::PrepError::Config("reward min_gap must be a number".into()));
        }
    }
    table.column_index("chosen", "the pairs to swap")?;
    table.column_index("rejected", "the pairs to swap")?;
    let mut extra: Vec<(&str, &str)> = Vec::new();
    let fact = match &opts.factual {
        Some(f) => {
            let c = table.column_index(&f.chosen, "the chosen response's factuality label")?;
            let r = table.column_index(&f.rejected, "the rejected response's factuality label")?;
            extra.push((&f.chosen, &f.rejected));
            Some((f, c, r))
        }
        None => None,
    };
    let reward = match &opts.reward {
        Some(rr) => {
            let c = table.column_index(&rr.chosen, "the reward model's score of the chosen response")?;
            let r = table.column_index(&rr.rejected, "the reward model's score of the rejected response")?;
            extra.push((&rr.chosen, &rr.rejected));
            Some((rr, c, r))
        }
        None => None,
    };
    let pair_idx = match opts.random {
        Some(_) => Some(table.column_index("pair_id", "random flips are decided per pair id")?),
        None => None,
    };
    let swapper = Swapper::new(&table.schema, source, &extra)?;
    let flipped_idx = table.schema.index_of("flipped").ok();
    if let Some(i) = flipped_idx {
        let dt = table.schema.field(i).data_type();
        if !matches!(dt, DataType::Boolean | DataType::Null) {
            return Err(column_error(source, format!("column 'flipped' is {dt}; it must be boolean (it records flipped rows)")));
        }
    }
    let mut fields: Vec<Field> = swapper.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    match flipped_idx {
        Some(i) => fields[i] = Field::new("flipped", DataType::Boolean, true),
        None => fields.push(Field::new("flipped", DataType::Boolean, true)),
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, table.schema.metadata().clone()));
    let names: Vec<String> = table.schema.fields().iter().map(|f| f.name().clone()).collect();

    let mut rules = Vec::new();
    if fact.is_some() {
        rules.push("factual");
    }
    if reward.is_some() {
        rules.push("reward");
    }
    if opts.random.is_some() {
        rules.push("random");
    }

    let slices = table.slices(SLICE_ROWS);
    let threads = resolve_threads(opts.threads);
    let out = par_map(&slices, threads, |(first, batch): &(u64, RecordBatch)| {
        let n = batch.num_rows();
        let mut cols = swapper.columns(batch)?;
        let mut net = vec![false; n];
        let mut st = FlipStats {
            rows: n as u64,
            factual_labels: fact.map(|_| FactualCounts::default()),
            reward_missing: reward.map(|_| 0),
            ..Default::default()
        };
        if let Some((f, c, r)) = fact {
            let hc = labels(&cols[c], &f.chosen, f.one_means, source, *first)?;
            let hr = labels(&cols[r], &f.rejected, f.one_means, source, *first)?;
            let counts = st.factual_labels.as_mut().expect("set above");
            let mask: Vec<bool> = hc
                .iter()
                .zip(&hr)
                .map(|(a, b)| {
                    match (a, b) {
                        (Some(false), Some(false)) => counts.both_factual += 1,
                        (Some(true), Some(false)) => counts.chosen_hallucinated_only += 1,
                        (Some(false), Some(true)) => counts.rejected_hallucinated_only += 1,
                        (Some(true), Some(true)) => counts.both_hallucinated += 1,
                        _ => counts.unlabelled += 1,
                    }
                    matches!((a, b), (Some(true), Some(false)))
                })
                .collect();
            st.flipped_factual = apply(&swapper, &mut cols, mask, &mut net)?;
        }
        if let Some((rr, c, r)) = reward {
            let purpose = "a reward-model score";
            let xc = numeric_array(&cols[c], &rr.chosen, source, purpose)?;
            let xr = numeric_array(&cols[r], &rr.rejected, source, purpose)?;
            let mut missing = 0u64;
            let mask: Vec<bool> = (0..n)
                .map(|i| {
                    if xc.is_null(i) || xr.is_null(i) || xc.value(i).is_nan() || xr.value(i).is_nan() {
                        missing += 1;
                        return false;
                    }
                    xr.value(i) - xc.value(i) > rr.min_gap
                })
                .collect();
            st.reward_missing = Some(missing);
            st.flipped_reward = apply(&swapper, &mut cols, mask, &mut net)?;
        }
        if let (Some(rf), Some(p)) = (opts.random, pair_idx) {
            let ids = text_array(&cols[p], "pair_id", source, "a pair id")?;
            let mask = (0..n)
                .map(|i| {
                    if ids.is_null(i) {
                        return Err(row_error(source, first + i as u64, "pair_id", Problem::MissingField, "pair_id is null"));
                    }
                    Ok(keyed_unit(rf.seed, "flip", ids.value(i)) < rf.rate)
                })
                .collect::<Result<Vec<bool>>>()?;
            st.flipped_random = apply(&swapper, &mut cols, mask, &mut net)?;
        }
        st.flipped_total = net.iter().filter(|&&x| x).count() as u64;
        let flipped: ArrayRef = match flipped_idx {
            Some(i) => {
                let old = &cols[i];
                let old = (old.data_type() == &DataType::Boolean).then(|| old.as_boolean());
                Arc::new(BooleanArray::from(
                    (0..n).map(|k| old.is_some_and(|o| o.is_valid(k) && o.value(k)) ^ net[k]).collect::<Vec<bool>>(),
                ))
            }
            None => Arc::new(BooleanArray::from(net)),
        };
        match flipped_idx {
            Some(i) => cols[i] = flipped,
            None => cols.push(flipped),
        }
        Ok((make_batch(schema.clone(), cols, n)?, st))
    })?;

    let mut stats = FlipStats {
        rules,
        factual_labels: fact.map(|_| FactualCounts::default()),
        reward_missing: reward.map(|_| 0),
        rate: opts.random.map(|r| r.rate),
        seed: opts.random.map(|r| r.seed),
        swapped_columns: swapper.pair_names().into_iter().map(|(a, b)| [a, b]).collect(),
        negated_columns: names.iter().filter(|n| super::is_margin_column(n)).cloned().collect(),
        ..Default::default()
    };
    let mut batches = Vec::with_capacity(out.len());
    for (b, s) in out {
        stats.merge(&s);
        batches.push(b);
    }
    Ok((Table { source: table.source.clone(), schema, batches }, stats))
}

fn apply(swapper: &Swapper, cols: &mut [ArrayRef], mask: Vec<bool>, net: &mut [bool]) -> Result<u64> {
    let mut count = 0;
    for (n, &m) in net.iter_mut().zip(&mask) {
        *n ^= m;
        count += m as u64;
    }
    swapper.apply(cols, &BooleanArray::from(mask))?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::types::Float64Type;
    use arrow_array::{Float64Array, Int64Array, StringArray};

    fn table(batch: usize) -> Table {
        let schema = Arc::new(Schema::new(vec![
            Field::new("pair_id", DataType::Utf8, true),
            Field::new("chosen", DataType::Utf8, true),
            Field::new("rejected", DataType::Utf8, true),
            Field::new("score_chosen", DataType::Float64, true),
            Field::new("score_rejected", DataType::Float64, true),
            Field::new("margin", DataType::Float64, true),
            Field::new("chosen_hallucinated", DataType::Int64, true),
            Field::new("rejected_hallucinated", DataType::Int64, true),
            Field::new("rm_chosen", DataType::Float64, true),
            Field::new("rm_rejected", DataType::Float64, true),
        ]));
        let n = 200usize;
        let ids: Vec<String> = (0..n).map(|i| format!("{i:016x}")).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(ids.clone())),
            Arc::new(StringArray::from((0..n).map(|i| format!("c{i}")).collect::<Vec<_>>())),
            Arc::new(StringArray::from((0..n).map(|i| format!("r{i}")).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..n).map(|i| i as f64).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..n).map(|_| 0.0).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..n).map(|i| i as f64).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((0..n).map(|i| Some((i % 2) as i64)).collect::<Vec<_>>())),
            Arc::new(Int64Array::from((0..n).map(|i| if i % 7 == 0 { None } else { Some(((i / 2) % 2) as i64) }).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..n).map(|i| (i % 3) as f64).collect::<Vec<_>>())),
            Arc::new(Float64Array::from((0..n).map(|i| if i % 11 == 0 { f64::NAN } else { 1.0 }).collect::<Vec<_>>())),
        ];
        let full = RecordBatch::try_new(schema.clone(), cols).unwrap();
        let batches = (0..n).step_by(batch).map(|s| full.slice(s, batch.min(n - s))).collect();
        Table::new("t", schema, batches).unwrap()
    }

    fn strings(t: &Table, name: &str) -> Vec<String> {
        let i = t.schema.index_of(name).unwrap();
        t.batches.iter().flat_map(|b| b.column(i).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>()).collect()
    }

    fn floats(t: &Table, name: &str) -> Vec<f64> {
        let i = t.schema.index_of(name).unwrap();
        t.batches.iter().flat_map(|b| b.column(i).as_primitive::<Float64Type>().values().to_vec()).collect()
    }

    fn bools(t: &Table, name: &str) -> Vec<bool> {
        let i = t.schema.index_of(name).unwrap();
        t.batches.iter().flat_map(|b| b.column(i).as_boolean().iter().map(|x| x.unwrap()).collect::<Vec<_>>()).collect()
    }

    #[test]
    fn factual_rule_swaps_one_zero_only_and_is_idempotent() {
        let t = table(64);
        let opts = FlipOptions { factual: Some(FactualRule::detect(&t).unwrap()), ..Default::default() };
        let (out, st) = flip_labels(&t, &opts).unwrap();
        let flipped = bools(&out, "flipped");
        assert_eq!(flipped.len(), 200);
        for (i, &f) in flipped.iter().enumerate() {
            let h = (i % 2, if i % 7 == 0 { None } else { Some((i / 2) % 2) });
            assert_eq!(f, h == (1, Some(0)), "row {i}");
        }
        assert_eq!(st.flipped_factual, flipped.iter().filter(|&&x| x).count() as u64);
        let labels = st.factual_labels.clone().unwrap();
        assert_eq!(labels.chosen_hallucinated_only, st.flipped_factual);
        assert_eq!(labels.both_factual + labels.chosen_hallucinated_only + labels.rejected_hallucinated_only
            + labels.both_hallucinated + labels.unlabelled, 200);
        let (c, r, m) = (strings(&out, "chosen"), strings(&out, "rejected"), floats(&out, "margin"));
        for i in 0..200 {
            if flipped[i] {
                assert_eq!((c[i].as_str(), r[i].as_str(), m[i]), (format!("r{i}").as_str(), format!("c{i}").as_str(), -(i as f64)));
                assert_eq!(floats(&out, "score_rejected")[i], i as f64);
            }
        }
        // Labels travel with the responses, so a second pass flips nothing.
        let (again, st2) = flip_labels(&out, &opts).unwrap();
        assert_eq!(st2.flipped_factual, 0);
        assert_eq!(bools(&again, "flipped"), flipped);
    }

    #[test]
    fn random_flip_is_keyed_by_pair_id_and_flipping_twice_restores() {
        let opts = FlipOptions { random: Some(RandomFlip { rate: 0.3, seed: 5 }), threads: 2, ..Default::default() };
        let (a, st) = flip_labels(&table(200), &opts).unwrap();
        let (b, _) = flip_labels(&table(7), &FlipOptions { threads: 1, ..opts.clone() }).unwrap();
        assert_eq!(bools(&a, "flipped"), bools(&b, "flipped"));
        assert_eq!(strings(&a, "chosen"), strings(&b, "chosen"));
        assert!(st.flipped_random > 30 && st.flipped_random < 90, "{}", st.flipped_random);
        let (back, _) = flip_labels(&a, &opts).unwrap();
        assert_eq!(strings(&back, "chosen"), strings(&table(200), "chosen"));
        assert_eq!(floats(&back, "margin"), floats(&table(200), "margin"));
        assert!(bools(&back, "flipped").iter().all(|x| !x));
    }

    #[test]
    fn reward_rule_and_errors() {
        let t = table(50);
        let opts = FlipOptions {
            reward: Some(RewardRule { chosen: "rm_chosen".into(), rejected: "rm_rejected".into(), min_gap: 0.0 }),
            ..Default::default()
        };
        let (out, st) = flip_labels(&t, &opts).unwrap();
        let expect: Vec<bool> = (0..200).map(|i| i % 11 != 0 && 1.0 - (i % 3) as f64 > 0.0).collect();
        assert_eq!(bools(&out, "flipped"), expect);
        assert_eq!(st.reward_missing, Some(19));
        // rm_* pair up by name? No ("rm_chosen" has the token): they are swapped too.
        assert!(st.swapped_columns.contains(&["rm_chosen".to_string(), "rm_rejected".to_string()]));
        let bad = FlipOptions { reward: Some(RewardRule { chosen: "nope".into(), rejected: "rm_rejected".into(), min_gap: 0.0 }), ..Default::default() };
        let e = flip_labels(&t, &bad).unwrap_err().to_string();
        assert!(e.starts_with("t: missing column 'nope'"), "{e}");
        assert!(flip_labels(&t, &FlipOptions::default()).unwrap_err().to_string().contains("nothing to flip"));
        let e = flip_labels(&t, &FlipOptions { factual: Some(FactualRule::factual("chosen", "rejected")), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("column 'chosen' is Utf8"), "{e}");
    }
}
