//! Counters reported after a run: what was read, made, dropped and skipped, and why.

use std::collections::BTreeMap;

use serde::Serialize;

/// Upper edges are exclusive; the last bin is [100, inf).
pub const MARGIN_BIN_EDGES: [f64; 12] = [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0];
const MAX_EXAMPLES: usize = 20;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MarginHistogram {
    /// Bin i holds margins in [edges[i], edges[i+1]); the last bin is open-ended.
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    #[serde(skip)]
    sum: f64,
    #[serde(skip)]
    n: u64,
}

impl Default for MarginHistogram {
    fn default() -> Self {
        MarginHistogram {
            edges: MARGIN_BIN_EDGES.to_vec(),
            counts: vec![0; MARGIN_BIN_EDGES.len()],
            min: None,
            max: None,
            mean: None,
            sum: 0.0,
            n: 0,
        }
    }
}

impl MarginHistogram {
    pub fn add(&mut self, margin: f64) {
        let bin = MARGIN_BIN_EDGES.iter().rposition(|&e| margin >= e).unwrap_or(0);
        self.counts[bin] += 1;
        self.min = Some(self.min.map_or(margin, |m| m.min(margin)));
        self.max = Some(self.max.map_or(margin, |m| m.max(margin)));
        self.sum += margin;
        self.n += 1;
        self.mean = Some(self.sum / self.n as f64);
    }

    pub fn merge(&mut self, other: &MarginHistogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.sum += other.sum;
        self.n += other.n;
        self.mean = (self.n > 0).then(|| self.sum / self.n as f64);
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Input records read (lines, array elements or rows), including skipped ones.
    pub rows_read: u64,
    /// Records skipped as invalid (only with skip_invalid).
    pub rows_skipped: u64,
    /// Skipped records by problem.
    pub skipped: BTreeMap<String, u64>,
    /// The first skipped records, "line 12, field 'x': message".
    pub skipped_examples: Vec<String>,
    /// Prompts (groups) formed.
    pub prompts: u64,
    /// Prompts that gave at least one pair.
    pub prompts_with_pairs: u64,
    pub responses: u64,
    /// Output rows written (pairs, unpaired rows or groups, by output kind).
    pub rows_written: u64,
    pub pairs_made: u64,
    pub ties_kept: u64,
    /// Given (chosen, rejected) pairs with scores that rate the rejected response higher: the
    /// pair is written the other way round (preference comes from the scores), so the labels
    /// or the scores of these rows disagree and deserve a look.
    pub pairs_reordered_by_score: u64,
    /// Responses, candidate pairs and prompts dropped, by reason.
    pub dropped: BTreeMap<String, u64>,
    pub margin_histogram: MarginHistogram,
    /// Listwise output only (absent from pair runs' reports).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lists: Option<ListStats>,
}

/// Counters of a listwise run. With `Stats`, prompts = lists_made + dropped["below_min_size"],
/// and responses = responses_listed + responses_below_min_size + dropped["duplicate_response"]
/// plus dropped["over_list_size"]. `Stats::ties_kept` counts tied pairs (equal labels) inside
/// the written lists.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ListStats {
    pub lists_made: u64,
    pub responses_listed: u64,
    /// Responses (after dedupe) of the prompts dropped as "below_min_size".
    pub responses_below_min_size: u64,
    /// Lists cut down to list_size.
    pub lists_truncated: u64,
    /// Lists holding at least two responses with equal labels.
    pub lists_with_ties: u64,
    /// Written lists by size.
    pub sizes: BTreeMap<usize, u64>,
}

impl ListStats {
    pub fn merge(&mut self, other: &ListStats) {
        self.lists_made += other.lists_made;
        self.responses_listed += other.responses_listed;
        self.responses_below_min_size += other.responses_below_min_size;
        self.lists_truncated += other.lists_truncated;
        self.lists_with_ties += other.lists_with_ties;
        for (k, v) in &other.sizes {
            *self.sizes.entry(*k).or_default() += v;
        }
    }
}

/// Add n to a count by name. Called per prompt or per pair: the key is allocated only the
/// first time it is seen.
fn add_count(counts: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    match counts.get_mut(key) {
        Some(count) => *count += n,
        None => {
            counts.insert(key.to_string(), n);
        }
    }
}

impl Stats {
    pub fn drop_reason(&mut self, reason: &str, n: u64) {
        if n > 0 {
            add_count(&mut self.dropped, reason, n);
        }
    }

    pub fn skip(&mut self, problem: &str, example: impl FnOnce() -> String) {
        self.rows_skipped += 1;
        add_count(&mut self.skipped, problem, 1);
        if self.skipped_examples.len() < MAX_EXAMPLES {
            self.skipped_examples.push(example());
        }
    }

    /// Add the counts of a later chunk (examples stay in input order).
    pub fn merge(&mut self, other: &Stats) {
        self.rows_read += other.rows_read;
        self.rows_skipped += other.rows_skipped;
        for (k, v) in &other.skipped {
            *self.skipped.entry(k.clone()).or_default() += v;
        }
        for e in &other.skipped_examples {
            if self.skipped_examples.len() < MAX_EXAMPLES {
                self.skipped_examples.push(e.clone());
            }
        }
        self.prompts += other.prompts;
        self.prompts_with_pairs += other.prompts_with_pairs;
        self.responses += other.responses;
        self.rows_written += other.rows_written;
        self.pairs_made += other.pairs_made;
        self.ties_kept += other.ties_kept;
        self.pairs_reordered_by_score += other.pairs_reordered_by_score;
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        self.margin_histogram.merge(&other.margin_histogram);
        if let Some(l) = &other.lists {
            self.lists.get_or_insert_with(Default::default).merge(l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_and_merge() {
        let mut a = MarginHistogram::default();
        for m in [0.0, 0.05, 0.1, 1.0, 99.0, 1e6] {
            a.add(m);
        }
        assert_eq!(a.counts[0], 2);
        assert_eq!(a.counts[1], 1);
        assert_eq!(a.counts[4], 1);
        assert_eq!(a.counts[10], 1);
        assert_eq!(a.counts[11], 1);
        let mut b = MarginHistogram::default();
        b.add(-0.0);
        b.merge(&a);
        assert_eq!(b.counts.iter().sum::<u64>(), 7);
        assert_eq!(b.max, Some(1e6));
    }
}
