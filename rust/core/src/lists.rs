//! List construction for listwise losses (LiPO-λ, RankDPO): one prompt's rated responses →
//! one ranked list with graded labels ψ (larger is better, ties equal).
//!
//! Rules (the pure-Python reference in tests/reference_lists.py re-implements them):
//! 1. Responses are ordered by preference (score, else −rank), best first, ties in input
//!    order; with `dedupe`, a response identical to a better one is dropped (as for pairs).
//! 2. Fewer than `min_size` left: the prompt makes no list ("below_min_size").
//! 3. More than `list_size` = K: "top" keeps the K best; when a tied block straddles the cut,
//!    which of its members stay is drawn with the prompt's seeded stream
//!    (`choose_sorted(block, K − before_block)`). "random" keeps `choose_sorted(n, K)` of the
//!    ordered responses. Either way the kept responses stay in preference order and the cut
//!    ones count as "over_list_size".
//! 4. Labels over the list as written: "dense_rank" ψ = number of distinct preference values
//!    below the response's (worst = 0, ties equal); "score" ψ = the response's score.
//!    Gains G = 2^ψ − 1.

use std::fmt;
use std::str::FromStr;

use crate::error::{Problem, RecordError};
use crate::formats::{Format, ReadOptions};
use crate::model::Group;
use crate::pairs::preference_order;
use crate::rng::LazyStream;
use crate::stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelKind {
    /// Dense rank from the bottom: worst distinct preference 0, next 1, ...
    DenseRank,
    /// The raw score (needs scored input).
    Score,
}

impl LabelKind {
    pub fn name(self) -> &'static str {
        match self {
            LabelKind::DenseRank => "dense_rank",
            LabelKind::Score => "score",
        }
    }
}

impl FromStr for LabelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dense_rank" => Ok(LabelKind::DenseRank),
            "score" => Ok(LabelKind::Score),
            _ => Err(format!("unknown label '{s}'; expected dense_rank or score")),
        }
    }
}

impl fmt::Display for LabelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    /// Keep the best K (ties at the cut drawn with the seed).
    Top,
    /// Keep K drawn uniformly with the seed.
    Random,
}

impl Truncate {
    pub fn name(self) -> &'static str {
        match self {
            Truncate::Top => "top",
            Truncate::Random => "random",
        }
    }
}

impl FromStr for Truncate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "top" => Ok(Truncate::Top),
            "random" => Ok(Truncate::Random),
            _ => Err(format!("unknown truncate policy '{s}'; expected top or random")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListOptions {
    /// At most this many responses per list; None keeps all.
    pub list_size: Option<usize>,
    pub label: LabelKind,
    pub truncate: Truncate,
    /// Prompts with fewer responses (after dedupe) make no list.
    pub min_size: usize,
    pub dedupe: bool,
    pub seed: u64,
}

impl Default for ListOptions {
    fn default() -> Self {
        ListOptions {
            list_size: None,
            label: LabelKind::DenseRank,
            truncate: Truncate::Top,
            min_size: 2,
            dedupe: true,
            seed: 0,
        }
    }
}

/// Formats whose records rank their responses and never carry scores.
fn rank_only(format: Format) -> bool {
    matches!(format, Format::Nectar | Format::RankedList | Format::Implicit | Format::ShareGpt)
}

impl ListOptions {
    /// Options that cannot work, whatever the data; and label="score" on rank-only formats.
    pub fn validate(&self, format: Option<Format>) -> Result<(), String> {
        if self.min_size < 1 {
            return Err("min_size must be at least 1".to_string());
        }
        if let Some(k) = self.list_size {
            if k < 2 {
                return Err(format!("list_size must be at least 2 (a list needs two responses to compare), got {k}"));
            }
            if self.min_size > k {
                return Err(format!("min_size ({}) must not exceed list_size ({k})", self.min_size));
            }
        }
        if let Some(f) = format {
            if self.label == LabelKind::Score && rank_only(f) {
                return Err(format!(
                    "label 'score' needs scored responses, but {} records only rank them; use label 'dense_rank'",
                    f.name()
                ));
            }
        }
        Ok(())
    }
}

/// Where a response's score lives in a record of `format`, for error messages.
fn score_field(format: Format, read: &ReadOptions, i: usize) -> String {
    let side = if i == 0 { "chosen" } else { "rejected" };
    match format {
        Format::Trl | Format::UltraFeedbackBinarized => format!("score_{side}"),
        Format::UltraFeedback => {
            format!("completions[{i}].{}", read.score_field.as_deref().unwrap_or("overall_score"))
        }
        Format::PickAPic => format!("label_{i}"),
        Format::Kto => "label".to_string(),
        _ => format!("responses[{i}].score"),
    }
}

/// Per-record check for label="score": every response has a score and a finite gain.
pub fn check_labels(group: &Group<'_>, opts: &ListOptions, format: Format, read: &ReadOptions) -> Result<(), RecordError> {
    if opts.label != LabelKind::Score {
        return Ok(());
    }
    for (i, r) in group.responses.iter().enumerate() {
        match r.score {
            None => {
                return Err(RecordError::new(
                    Problem::MissingField,
                    score_field(format, read, i),
                    "label 'score' needs a score on every response (this record has ranks only); use label 'dense_rank'",
                ))
            }
            Some(s) if !gain(s).is_finite() => {
                return Err(RecordError::new(
                    Problem::NonFiniteScore,
                    score_field(format, read, i),
                    format!("score {s} is too large for the gain 2^score - 1; use label 'dense_rank'"),
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// G = 2^ψ − 1 (C `pow`, as Python's `2.0 ** psi`). Dense-rank labels are small whole
/// numbers, for which 2^ψ is a shift (exact, as `pow` is there); `pow` was 2% of a lists run.
pub fn gain(label: f64) -> f64 {
    if (0.0..63.0).contains(&label) && label.fract() == 0.0 {
        return (1u64 << label as u32) as f64 - 1.0;
    }
    2f64.powf(label) - 1.0
}

/// A list as indices into `group.responses`, best first, with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct List {
    pub members: Vec<usize>,
    pub labels: Vec<f64>,
}

/// Make the list of one prompt, or None when it has too few responses. Counts drops and the
/// list counters (`stats.lists`, `stats.ties_kept`).
pub fn make_list(group: &Group<'_>, opts: &ListOptions, stats: &mut Stats) -> Option<List> {
    let (pref, order) = preference_order(group, opts.dedupe, stats);
    list_of_order(&pref, order, |i| group.responses[i].score, &group.prompt_id, opts, stats)
}

/// [`make_list`] from the responses' preferences, their order (`order_by_preference`) and
/// scores (for the "score" label), for readers that hold no `Group`.
pub(crate) fn list_of_order(
    pref: &[f64],
    mut order: Vec<usize>,
    score: impl Fn(usize) -> Option<f64>,
    prompt_id: &str,
    opts: &ListOptions,
    stats: &mut Stats,
) -> Option<List> {
    if order.len() < opts.min_size {
        stats.drop_reason("below_min_size", 1);
        stats.lists.get_or_insert_with(Default::default).responses_below_min_size += order.len() as u64;
        return None;
    }
    let mut truncated = false;
    if let Some(k) = opts.list_size.filter(|&k| order.len() > k) {
        let mut rng = LazyStream::new(opts.seed, prompt_id);
        stats.drop_reason("over_list_size", (order.len() - k) as u64);
        truncated = true;
        order = match opts.truncate {
            Truncate::Top => {
                let cut = pref[order[k - 1]];
                let first = order.iter().position(|&i| pref[i] == cut).expect("order[k-1] has it");
                let end = first + order[first..].iter().take_while(|&&i| pref[i] == cut).count();
                if end <= k {
                    order.truncate(k);
                    order
                } else {
                    let mut kept = order[..first].to_vec();
                    kept.extend(rng.get().choose_sorted(end - first, k - first).into_iter().map(|c| order[first + c]));
                    kept
                }
            }
            Truncate::Random => rng.get().choose_sorted(order.len(), k).into_iter().map(|p| order[p]).collect(),
        };
    }

    let labels: Vec<f64> = match opts.label {
        LabelKind::DenseRank => {
            let distinct = 1 + order.windows(2).filter(|w| pref[w[0]] != pref[w[1]]).count();
            let mut level = 0usize;
            order
                .iter()
                .enumerate()
                .map(|(a, &i)| {
                    if a > 0 && pref[order[a - 1]] != pref[i] {
                        level += 1;
                    }
                    (distinct - 1 - level) as f64
                })
                .collect()
        }
        LabelKind::Score => order.iter().map(|&i| score(i).unwrap_or(pref[i])).collect(),
    };

    // Labels never increase along the list, so equal labels form runs.
    let mut tied_pairs = 0u64;
    let mut run = 1u64;
    for a in 1..=labels.len() {
        if a < labels.len() && labels[a] == labels[a - 1] {
            run += 1;
        } else {
            tied_pairs += run * (run - 1) / 2;
            run = 1;
        }
    }
    stats.ties_kept += tied_pairs;
    let ls = stats.lists.get_or_insert_with(Default::default);
    ls.lists_made += 1;
    ls.responses_listed += order.len() as u64;
    ls.lists_truncated += truncated as u64;
    ls.lists_with_ties += (tied_pairs > 0) as u64;
    *ls.sizes.entry(order.len()).or_default() += 1;
    Some(List { members: order, labels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Content, Response};
    use std::borrow::Cow;

    fn group(prefs: &[(Option<f64>, Option<f64>)], texts: &[&'static str]) -> Group<'static> {
        Group {
            prompt_id: Cow::Borrowed("p"),
            prompt: Content::Text(Cow::Borrowed("prompt")),
            responses: prefs
                .iter()
                .zip(texts)
                .map(|(&(score, rank), &t)| {
                    let mut r = Response::new(Content::Text(Cow::Borrowed(t)));
                    r.score = score;
                    r.rank = rank;
                    r
                })
                .collect(),
            extra: vec![],
        }
    }

    fn scored(scores: &[f64]) -> Group<'static> {
        const T: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
        group(&scores.iter().map(|&s| (Some(s), None)).collect::<Vec<_>>(), &T[..scores.len()])
    }

    #[test]
    fn dense_rank_labels_keep_ties_from_ranks_and_scores() {
        // ImageReward-style ranks: 1 best, ties share a rank.
        let g = group(&[(None, Some(2.0)), (None, Some(1.0)), (None, Some(2.0)), (None, Some(3.0))], &["a", "b", "c", "d"]);
        let mut st = Stats::default();
        let l = make_list(&g, &ListOptions::default(), &mut st).unwrap();
        assert_eq!(l.members, vec![1, 0, 2, 3]);
        assert_eq!(l.labels, vec![2.0, 1.0, 1.0, 0.0]);
        assert_eq!(st.ties_kept, 1);
        let ls = st.lists.unwrap();
        assert_eq!((ls.lists_made, ls.responses_listed, ls.lists_with_ties), (1, 4, 1));

        let g = scored(&[3.5, 9.0, 3.5]);
        let o = ListOptions { label: LabelKind::Score, ..Default::default() };
        let l = make_list(&g, &o, &mut Stats::default()).unwrap();
        assert_eq!((l.members, l.labels), (vec![1, 0, 2], vec![9.0, 3.5, 3.5]));
    }

    #[test]
    fn top_truncation_draws_only_inside_the_tied_block_at_the_cut() {
        let g = scored(&[5.0, 4.0, 4.0, 4.0, 1.0]);
        let o = ListOptions { list_size: Some(3), ..Default::default() };
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let mut st = Stats::default();
            let l = make_list(&g, &ListOptions { seed, ..o.clone() }, &mut st).unwrap();
            assert_eq!(l.members[0], 0);
            assert_eq!(l.members.len(), 3);
            assert!(l.members[1] < l.members[2] && l.members[1..].iter().all(|&i| (1..4).contains(&i)));
            assert_eq!(l.labels, vec![1.0, 0.0, 0.0]);
            assert_eq!(st.dropped["over_list_size"], 2);
            seen.insert(l.members.clone());
        }
        assert!(seen.len() > 1, "the seed must matter");
        // No tie at the cut: plain top-K, no draw.
        let l = make_list(&scored(&[1.0, 3.0, 2.0, 0.0]), &ListOptions { list_size: Some(2), ..o }, &mut Stats::default());
        assert_eq!(l.unwrap().members, vec![1, 2]);
    }

    #[test]
    fn random_truncation_min_size_and_dedupe() {
        let g = scored(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let o = ListOptions { list_size: Some(3), truncate: Truncate::Random, seed: 9, ..Default::default() };
        let a = make_list(&g, &o, &mut Stats::default()).unwrap();
        assert_eq!(a, make_list(&g, &o, &mut Stats::default()).unwrap());
        assert!(a.members.windows(2).all(|w| g.responses[w[0]].score > g.responses[w[1]].score));
        assert_eq!(a.labels, vec![2.0, 1.0, 0.0]);

        let dup = group(&[(Some(2.0), None), (Some(1.0), None), (Some(0.0), None)], &["a", "a", "b"]);
        let mut st = Stats::default();
        let l = make_list(&dup, &ListOptions { min_size: 3, ..Default::default() }, &mut st);
        assert!(l.is_none());
        assert_eq!((st.dropped["duplicate_response"], st.dropped["below_min_size"]), (1, 1));
        assert_eq!(st.lists.unwrap().responses_below_min_size, 2);
    }

    #[test]
    fn gain_of_whole_labels_equals_pow() {
        for psi in (0..70).map(f64::from).chain([-1.0, -0.0, 0.5, 62.5, 1e-300, 3000.0]) {
            assert_eq!(gain(psi).to_bits(), (2f64.powf(psi) - 1.0).to_bits(), "{psi}");
        }
    }

    #[test]
    fn options_are_validated() {
        assert!(ListOptions { list_size: Some(1), ..Default::default() }.validate(None).is_err());
        assert!(ListOptions { min_size: 0, ..Default::default() }.validate(None).is_err());
        assert!(ListOptions { list_size: Some(3), min_size: 4, ..Default::default() }.validate(None).is_err());
        let score = ListOptions { label: LabelKind::Score, ..Default::default() };
        assert!(score.validate(Some(Format::Nectar)).unwrap_err().contains("nectar"));
        assert!(score.validate(Some(Format::UltraFeedback)).is_ok());
        let g = group(&[(None, Some(1.0)), (None, Some(2.0))], &["a", "b"]);
        let e = check_labels(&g, &score, Format::Grouped, &ReadOptions::default()).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("responses[0].score"));
        let big = scored(&[2000.0, 1.0]);
        assert_eq!(check_labels(&big, &score, Format::Trl, &ReadOptions::default()).unwrap_err().field.as_deref(), Some("score_chosen"));
    }
}
