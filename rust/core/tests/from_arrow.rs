//! Pairs and lists from an Arrow table (made column-wise, without a group per row) equal the
//! ones from the same records read as JSONL (made row by row), batch for batch and stat for
//! stat.

use std::io::Write;

use arrow_array::RecordBatch;
use proptest::prelude::*;

use prefops_core::arrow_out::rows_to_batch;
use prefops_core::pairs::{Strategy as Pairing, TiePolicy};
use prefops_core::{
    prep, Input, LabelKind, ListOptions, Output, OutputKind, PairOptions, PrepOptions, Stats, Truncate, Value,
};

const NEVER: &(dyn Fn() -> bool + Sync) = &|| false;

/// Lists, or pairs with these options.
#[derive(Clone, Debug)]
enum Make {
    Lists(ListOptions),
    Pairs(PairOptions),
}

fn run(input: Input, make: &Make, drop_extra: bool) -> (RecordBatch, Stats) {
    // Skipping invalid rows (none in the generated data) lets the declined-rows test compare.
    let mut opts = PrepOptions { threads: 2, skip_invalid: true, ..Default::default() };
    match make {
        Make::Lists(l) => (opts.kind, opts.lists) = (Some(OutputKind::Lists), l.clone()),
        Make::Pairs(p) => (opts.kind, opts.pairs) = (Some(OutputKind::Pairs), p.clone()),
    }
    opts.read.drop_extra = drop_extra;
    let report = prep(input, &Output::Memory, &opts, NEVER).unwrap();
    let schema = report.schema.clone().unwrap();
    (arrow_select::concat::concat_batches(&schema, &report.batches).unwrap(), report.stats)
}

/// Both ways, for records given as JSON lines; the Arrow table is cut into batches of
/// `batch_rows`.
fn both_ways(lines: &[String], batch_rows: usize, make: &Make, drop_extra: bool) -> ((RecordBatch, Stats), (RecordBatch, Stats)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let from_rows = run(Input::File(path), make, drop_extra);

    let values: Vec<Value<'_>> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let batches: Vec<_> = values.chunks(batch_rows).map(|c| Ok(rows_to_batch(c, &[]))).collect();
    let input = Input::Batches { name: "<arrow>".into(), batches: Box::new(batches.into_iter()), total_rows: None };
    (from_rows, run(input, make, drop_extra))
}

fn uf_line(prompt: &str, completions: &[(String, f64, Option<&str>)], source: &str, n: i64) -> String {
    let items: Vec<String> = completions
        .iter()
        .map(|(t, s, m)| {
            let model = m.map_or("null".to_string(), |m| format!("{m:?}"));
            format!(r#"{{"response":{t:?},"overall_score":{s:?},"model":{model}}}"#)
        })
        .collect();
    // UltraFeedback's list of model names (empty when no completion names one).
    let models: Vec<String> = completions.iter().filter_map(|(_, _, m)| m.map(|m| format!("{m:?}"))).collect();
    format!(
        r#"{{"source":{source:?},"instruction":{prompt:?},"models":[{}],"completions":[{}],"n":{n},"ok":{}}}"#,
        models.join(","),
        items.join(","),
        n % 2 == 0
    )
}

fn list_options() -> impl Strategy<Value = ListOptions> {
    (
        proptest::option::of(2usize..6),
        prop_oneof![Just(LabelKind::DenseRank), Just(LabelKind::Score)],
        prop_oneof![Just(Truncate::Top), Just(Truncate::Random)],
        2usize..4,
        any::<bool>(),
        0u64..4,
    )
        .prop_map(|(list_size, label, truncate, min_size, dedupe, seed)| ListOptions {
            list_size,
            label,
            truncate,
            min_size: list_size.map_or(min_size, |k| min_size.min(k)), // never above list_size
            dedupe,
            seed,
        })
}

fn pair_options() -> impl Strategy<Value = PairOptions> {
    (
        prop_oneof![Just(Pairing::BestVsWorst), Just(Pairing::BestVsEach), Just(Pairing::AllPairs), Just(Pairing::BestVsRandom)],
        prop_oneof![Just(0.0), Just(1.0)],
        prop_oneof![Just(TiePolicy::Drop), Just(TiePolicy::Keep)],
        any::<bool>(),
        proptest::option::of(1usize..4),
        0u64..4,
    )
        .prop_map(|(strategy, min_margin, ties, dedupe, max_pairs_per_prompt, seed)| PairOptions {
            strategy,
            min_margin,
            ties,
            dedupe,
            max_pairs_per_prompt,
            seed,
        })
}

fn make() -> impl Strategy<Value = Make> {
    prop_oneof![list_options().prop_map(Make::Lists), pair_options().prop_map(Make::Pairs)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn ultrafeedback_pairs_and_lists_are_the_same_from_arrow_and_from_jsonl(
        rows in proptest::collection::vec(
            ("[a-c]{1,3}", proptest::collection::vec(("[xy]{1,2}", 0u8..5, proptest::option::weighted(0.8, "[mn]")), 2..8)),
            1..40),
        make in make(),
        batch_rows in 1usize..16,
        drop_extra in any::<bool>(),
    ) {
        let lines: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(i, (p, items))| {
                // Few texts and scores, so duplicates and ties are common; half-point scores too.
                let cs: Vec<(String, f64, Option<&str>)> =
                    items.iter().map(|(t, s, m)| (t.clone(), *s as f64 / 2.0, m.as_deref())).collect();
                uf_line(p, &cs, &format!("s{}", i % 3), i as i64)
            })
            .collect();
        let ((rows_batch, rows_stats), (arrow_batch, arrow_stats)) = both_ways(&lines, batch_rows, &make, drop_extra);
        prop_assert_eq!(rows_batch.schema(), arrow_batch.schema());
        prop_assert_eq!(&rows_batch, &arrow_batch);
        prop_assert_eq!(rows_stats, arrow_stats);
    }
}

#[test]
fn nectar_ranked_pairs_and_lists_are_the_same_from_arrow_and_from_jsonl() {
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let answers: Vec<String> = (0..(2 + i % 5))
                .map(|j| format!(r#"{{"answer":"a{}","rank":{},"model":"m{j}"}}"#, j % 3, 1 + (i * j) % 4))
                .collect();
            format!(r#"{{"prompt":"p{i}","answers":[{}],"turns":{i}}}"#, answers.join(","))
        })
        .collect();
    let makes = [
        Make::Lists(ListOptions::default()),
        Make::Lists(ListOptions { list_size: Some(2), truncate: Truncate::Random, seed: 3, ..Default::default() }),
        Make::Pairs(PairOptions { strategy: Pairing::BestVsEach, ties: TiePolicy::Keep, ..Default::default() }),
    ];
    for make in makes {
        let ((a, sa), (b, sb)) = both_ways(&lines, 7, &make, false);
        assert_eq!(a.schema(), b.schema());
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        let rank = if matches!(make, Make::Lists(_)) { "ranks" } else { "rank_chosen" };
        assert!(a.schema().field_with_name(rank).is_ok() && a.schema().field_with_name("turns").is_ok());
    }
}

#[test]
fn rows_the_column_path_declines_give_the_row_paths_results() {
    // A blank response, a null score, one completion, given prompt ids, a null carried value,
    // and a carried column the row path types itself (margin as float): each batch holding one
    // goes through the row path, and the results still agree.
    let good = uf_line("q", &[("a".into(), 1.0, Some("m")), ("b".into(), 2.0, None)], "s", 1);
    let odd = [
        r#"{"source":"s","instruction":"q","completions":[{"response":" ","overall_score":1,"model":"m"},{"response":"b","overall_score":2,"model":"m"}],"n":1,"ok":true}"#,
        r#"{"source":"s","instruction":"q","completions":[{"response":"a","overall_score":1,"model":"m"}],"n":1,"ok":true}"#,
        r#"{"source":null,"instruction":"q","completions":[{"response":"a","overall_score":1,"model":"m"},{"response":"b","overall_score":2,"model":"m"}],"n":1,"ok":true}"#,
    ];
    for line in odd {
        let lines = vec![good.clone(), line.to_string(), good.clone()];
        for make in [Make::Lists(ListOptions::default()), Make::Pairs(PairOptions::default())] {
            let ((a, sa), (b, sb)) = both_ways(&lines, 3, &make, false);
            assert_eq!(a, b, "{line}");
            assert_eq!(sa.rows_written, sb.rows_written);
            assert_eq!(sa.dropped, sb.dropped);
        }
    }
    let ids: Vec<String> = (0..4).map(|i| good.replace("\"n\":1", &format!("\"prompt_id\":\"id{i}\",\"margin\":{i}"))).collect();
    for make in [Make::Lists(ListOptions::default()), Make::Pairs(PairOptions::default())] {
        let ((a, sa), (b, sb)) = both_ways(&ids, 4, &make, false);
        assert_eq!((a, sa), (b, sb));
    }
}
