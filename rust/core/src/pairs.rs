//! Pair construction from a group of rated responses.

use std::fmt;
use std::str::FromStr;

use crate::model::Group;
use crate::rng::LazyStream;
use crate::stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The best response against the worst.
    BestVsWorst,
    /// The best against each other response (Curry-DPO).
    BestVsEach,
    /// Every (better, worse) pair.
    AllPairs,
    /// The best against one other response drawn with the prompt's seeded stream.
    BestVsRandom,
}

impl Strategy {
    pub const ALL: [Strategy; 4] =
        [Strategy::BestVsWorst, Strategy::BestVsEach, Strategy::AllPairs, Strategy::BestVsRandom];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::BestVsWorst => "best_vs_worst",
            Strategy::BestVsEach => "best_vs_each",
            Strategy::AllPairs => "all_pairs",
            Strategy::BestVsRandom => "best_vs_random",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Strategy::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
            format!(
                "unknown strategy '{s}'; expected one of {}",
                Strategy::ALL.map(Strategy::name).join(", ")
            )
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TiePolicy {
    Drop,
    Keep,
}

impl FromStr for TiePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(TiePolicy::Drop),
            "keep" => Ok(TiePolicy::Keep),
            _ => Err(format!("unknown tie policy '{s}'; expected drop or keep")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PairOptions {
    pub strategy: Strategy,
    /// Pairs whose margin is below this are dropped (ties are governed by `ties`).
    pub min_margin: f64,
    pub ties: TiePolicy,
    /// Drop responses whose content equals a better-ranked one of the same prompt.
    pub dedupe: bool,
    pub max_pairs_per_prompt: Option<usize>,
    pub seed: u64,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            strategy: Strategy::BestVsWorst,
            min_margin: 0.0,
            ties: TiePolicy::Drop,
            dedupe: true,
            max_pairs_per_prompt: None,
            seed: 0,
        }
    }
}

/// A pair as indices into `group.responses`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub chosen: usize,
    pub rejected: usize,
    /// preference(chosen) − preference(rejected), ≥ 0.
    pub margin: f64,
    pub tie: bool,
}

/// Each response's preference (score, else −rank) and the response indices ordered by it,
/// highest first, ties in input order; with `dedupe`, a response whose content equals a
/// better-ordered one is left out (counted as "duplicate_response"). Pairs and lists share it.
pub fn preference_order(group: &Group<'_>, dedupe: bool, stats: &mut Stats) -> (Vec<f64>, Vec<usize>) {
    let pref: Vec<f64> = group.responses.iter().map(|r| r.preference()).collect();
    let r = &group.responses;
    let order = order_by_preference(&pref, dedupe, |a, b| r[a].content == r[b].content, stats);
    (pref, order)
}

/// [`preference_order`] on the preferences alone, `same(a, b)` telling whether responses a and
/// b have equal content (for readers that hold no `Group`).
pub(crate) fn order_by_preference(
    pref: &[f64],
    dedupe: bool,
    same: impl Fn(usize, usize) -> bool,
    stats: &mut Stats,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pref.len()).collect();
    // Scores are validated finite; partial_cmp treats -0.0 and 0.0 as equal (a tie).
    order.sort_by(|&a, &b| pref[b].partial_cmp(&pref[a]).unwrap_or(std::cmp::Ordering::Equal));

    if dedupe {
        // In place: the responses kept so far are order[..kept].
        let mut kept = 0;
        for a in 0..order.len() {
            let i = order[a];
            if order[..kept].iter().any(|&k| same(k, i)) {
                stats.drop_reason("duplicate_response", 1);
            } else {
                order[kept] = i;
                kept += 1;
            }
        }
        order.truncate(kept);
    }
    order
}

/// Count one prompt's pairs, once made, in the run's stats (pairs, ties, margins, rows).
pub(crate) fn count_pairs(stats: &mut Stats, pairs: &[Pair]) {
    stats.prompts_with_pairs += !pairs.is_empty() as u64;
    for p in pairs {
        stats.pairs_made += 1;
        stats.ties_kept += p.tie as u64;
        stats.margin_histogram.add(p.margin);
    }
    stats.rows_written += pairs.len() as u64;
}

/// Make the pairs of one prompt. Counts drops in `stats`.
///
/// Responses are ordered by preference (score, else −rank), highest first, ties kept in input
/// order; that order decides "best", "worst" and which of two tied responses is `chosen`.
pub fn make_pairs(group: &Group<'_>, opts: &PairOptions, stats: &mut Stats) -> Vec<Pair> {
    let (pref, order) = preference_order(group, opts.dedupe, stats);
    pairs_of_order(&pref, &order, &group.prompt_id, opts, stats)
}

/// [`make_pairs`] from the responses' preferences and their order (`order_by_preference`),
/// for readers that hold no `Group`.
pub(crate) fn pairs_of_order(pref: &[f64], order: &[usize], prompt_id: &str, opts: &PairOptions, stats: &mut Stats) -> Vec<Pair> {
    if order.len() < 2 {
        stats.drop_reason("fewer_than_two_responses", 1);
        return Vec::new();
    }

    let mut rng = LazyStream::new(opts.seed, prompt_id);
    let best = order[0];
    let candidates: Vec<(usize, usize)> = match opts.strategy {
        Strategy::BestVsWorst => vec![(best, *order.last().expect("len >= 2"))],
        Strategy::BestVsEach => order[1..].iter().map(|&j| (best, j)).collect(),
        Strategy::AllPairs => {
            let mut v = Vec::with_capacity(order.len() * (order.len() - 1) / 2);
            for (a, &i) in order.iter().enumerate() {
                for &j in &order[a + 1..] {
                    v.push((i, j));
                }
            }
            v
        }
        Strategy::BestVsRandom => {
            // When ties are dropped, draw only among responses strictly worse than the best.
            let pool: Vec<usize> = match opts.ties {
                TiePolicy::Drop => order[1..].iter().copied().filter(|&j| pref[j] < pref[best]).collect(),
                TiePolicy::Keep => order[1..].to_vec(),
            };
            if pool.is_empty() {
                vec![(best, order[1])]
            } else {
                vec![(best, pool[rng.get().below(pool.len())])]
            }
        }
    };

    let mut pairs = Vec::with_capacity(candidates.len());
    for (c, r) in candidates {
        let margin = pref[c] - pref[r];
        let tie = margin == 0.0;
        if tie {
            if opts.ties == TiePolicy::Drop {
                stats.drop_reason("tie", 1);
                continue;
            }
        } else if margin < opts.min_margin {
            stats.drop_reason("below_min_margin", 1);
            continue;
        }
        pairs.push(Pair { chosen: c, rejected: r, margin, tie });
    }

    if let Some(max) = opts.max_pairs_per_prompt {
        if pairs.len() > max {
            stats.drop_reason("over_max_pairs_per_prompt", (pairs.len() - max) as u64);
            let keep = rng.get().choose_sorted(pairs.len(), max);
            pairs = keep.into_iter().map(|i| pairs[i]).collect();
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Content, Response};
    use std::borrow::Cow;

    fn group(scores: &[f64], texts: &[&'static str]) -> Group<'static> {
        Group {
            prompt_id: Cow::Borrowed("p"),
            prompt: Content::Text(Cow::Borrowed("prompt")),
            responses: scores
                .iter()
                .zip(texts)
                .map(|(&s, &t)| {
                    let mut r = Response::new(Content::Text(Cow::Borrowed(t)));
                    r.score = Some(s);
                    r
                })
                .collect(),
            extra: vec![],
        }
    }

    fn idx(pairs: &[Pair]) -> Vec<(usize, usize)> {
        pairs.iter().map(|p| (p.chosen, p.rejected)).collect()
    }

    #[test]
    fn strategies_on_distinct_scores() {
        let g = group(&[3.0, 9.0, 1.0, 5.0], &["a", "b", "c", "d"]);
        let mut st = Stats::default();
        let mut o = PairOptions::default();
        assert_eq!(idx(&make_pairs(&g, &o, &mut st)), vec![(1, 2)]);
        o.strategy = Strategy::BestVsEach;
        assert_eq!(idx(&make_pairs(&g, &o, &mut st)), vec![(1, 3), (1, 0), (1, 2)]);
        o.strategy = Strategy::AllPairs;
        assert_eq!(make_pairs(&g, &o, &mut st).len(), 6);
        o.min_margin = 4.0;
        assert_eq!(idx(&make_pairs(&g, &o, &mut st)), vec![(1, 3), (1, 0), (1, 2), (3, 2)]);
        assert_eq!(st.dropped["below_min_margin"], 2);
    }

    #[test]
    fn ties_and_duplicates() {
        let g = group(&[2.0, 2.0, 1.0, 1.0], &["a", "b", "c", "a"]);
        let mut st = Stats::default();
        let mut o = PairOptions { strategy: Strategy::AllPairs, ..Default::default() };
        // "a" at index 3 duplicates the better "a" at index 0.
        assert_eq!(idx(&make_pairs(&g, &o, &mut st)), vec![(0, 2), (1, 2)]);
        assert_eq!(st.dropped["duplicate_response"], 1);
        assert_eq!(st.dropped["tie"], 1);
        o.ties = TiePolicy::Keep;
        let pairs = make_pairs(&g, &o, &mut st);
        assert_eq!(idx(&pairs), vec![(0, 1), (0, 2), (1, 2)]);
        assert!(pairs[0].tie && !pairs[1].tie);
    }

    #[test]
    fn random_choices_depend_only_on_seed_and_prompt() {
        let g = group(&[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], &["a", "b", "c", "d", "e", "f"]);
        let o = PairOptions { strategy: Strategy::AllPairs, max_pairs_per_prompt: Some(4), seed: 3, ..Default::default() };
        let a = make_pairs(&g, &o, &mut Stats::default());
        let b = make_pairs(&g, &o, &mut Stats::default());
        assert_eq!(a, b);
        assert_eq!(a.len(), 4);
        let o2 = PairOptions { seed: 4, ..o };
        let draws: Vec<_> = (0..20u64)
            .map(|s| idx(&make_pairs(&g, &PairOptions { seed: s, ..o2.clone() }, &mut Stats::default())))
            .collect();
        assert!(draws.iter().any(|d| d != &draws[0]), "seed must matter");
    }
}
