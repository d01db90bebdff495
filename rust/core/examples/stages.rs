//! Time each stage of prep on one core: `cargo run --release --example stages -- FILE.jsonl`.
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use prefops_core::formats::{normalise, Format, ReadOptions};
use prefops_core::io::parse_json;
use prefops_core::output::{pair_row, PairColumns};
use prefops_core::pairs::{make_pairs, PairOptions, TiePolicy};
use prefops_core::{Stats, Value};

// The two parse loops are functions of their own so that a profiler can count them apart:
// `valgrind --tool=callgrind --toggle-collect='*parse_pipeline*' ...`.

/// serde_json alone, as every record was parsed before the hand-written parser.
#[inline(never)]
fn parse_serde(lines: &[&[u8]]) -> usize {
    let mut k = 0;
    for l in lines {
        let v: Value = serde_json::from_slice(l).unwrap();
        k += matches!(v, Value::Object(_)) as usize;
    }
    k
}

/// What the pipeline does per record: io::parse_json, the fast parser with serde as fallback.
#[inline(never)]
fn parse_pipeline(lines: &[&[u8]]) -> usize {
    let mut k = 0;
    for l in lines {
        let v = parse_json(l).unwrap();
        k += matches!(v, Value::Object(_)) as usize;
    }
    k
}

fn main() {
    let path = std::env::args().nth(1).expect("FILE.jsonl");
    let buf = std::fs::read(&path).unwrap();
    let lines: Vec<&[u8]> = buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let n = lines.len() as f64;
    let opts = ReadOptions::default();
    let popts = PairOptions::default();
    let cols = PairColumns::for_run(Format::UltraFeedback, TiePolicy::Drop);

    let t = Instant::now();
    let mut k = parse_serde(&lines);
    let parse = t.elapsed().as_secs_f64();

    let t = Instant::now();
    k += parse_pipeline(&lines);
    let fast = t.elapsed().as_secs_f64();

    let mut copies: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
    let t = Instant::now();
    for l in copies.iter_mut() {
        let _v: serde::de::IgnoredAny = serde_json::from_slice(l).unwrap();
        k += 1;
    }
    let simd = t.elapsed().as_secs_f64();

    let t = Instant::now();
    for l in &lines {
        let v = parse_json(l).unwrap();
        let g = normalise(v, Format::UltraFeedback, &opts).unwrap();
        k += g.responses.len();
    }
    let norm = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut st = Stats::default();
    let mut rows = Vec::new();
    for l in &lines {
        let v = parse_json(l).unwrap();
        let g = normalise(v, Format::UltraFeedback, &opts).unwrap();
        for p in make_pairs(&g, &popts, &mut st) {
            rows.push(pair_row(&g, &p, cols).into_owned());
        }
    }
    let pairs = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut direct = Vec::new();
    for l in &lines {
        let v = parse_json(l).unwrap();
        let g = normalise(v, Format::UltraFeedback, &opts).unwrap();
        let ps = make_pairs(&g, &popts, &mut st);
        prefops_core::output::write_pairs_jsonl(&mut direct, &g, &ps, cols);
    }
    let full_direct = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut out = Vec::new();
    for r in &rows {
        serde_json::to_writer(&mut out, r).unwrap();
        out.push(b'\n');
    }
    let ser = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let batch = prefops_core::arrow_out::rows_to_batch(&rows, prefops_core::output::TYPE_HINTS);
    let arrow = t.elapsed().as_secs_f64();

    println!("rows {n}  bytes/row {:.0}  (k={k}, batch rows {})", buf.len() as f64 / n, batch.num_rows());
    for (name, s) in [("parse", parse), ("fast parse", fast), ("scan only (IgnoredAny)", simd), ("parse+normalise", norm), ("+pairs+rows(owned)", pairs), ("json out", ser), ("parse..direct jsonl", full_direct), ("arrow out", arrow)] {
        println!("{name:>22}: {:8.3} s  {:7.2} us/row  {:8.0} rows/s", s, s / n * 1e6, n / s);
    }
}
