//! Property-based fuzzing of the readers: records built from the keys every schema uses, with
//! values of any JSON type, then damaged (cut short, invalid UTF-8, stray bytes, truncated
//! gzip). Whatever the input, prep and the table reader return Ok or an error — never panic —
//! and a failed run leaves nothing in the output directory; a successful one writes exactly
//! the rows its stats count.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;

use prefops_core::formats::ALL_FORMATS;
use prefops_core::steps::read_table;
use prefops_core::{prep, Input, Output, OutputKind, PrepOptions, ReadOptions};

const KEYS: &[&str] = &[
    "prompt", "chosen", "rejected", "score_chosen", "score_rejected", "instruction", "completions", "response",
    "overall_score", "answers", "answer", "rank", "model", "generations", "ranking", "caption", "label_0",
    "label_1", "jpg_0", "jpg_1", "conversations", "from", "value", "messages", "role", "content", "label",
    "completion", "responses", "score", "prompt_id", "hallucinated", "id",
];

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("\"\\ud800\"".to_string()), // a lone surrogate escape
        Just(format!("\"{}\"", "x".repeat(100_000))),
        Just("\"\\n\\nHuman: hi\\n\\nAssistant: yo\"".to_string()),
    ]
}

fn json_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|x| if x.is_finite() { format!("{x:?}") } else { "1e999".to_string() }),
        Just("18446744073709551616".to_string()),
        Just("-0.0".to_string()),
        json_string(),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|xs| format!("[{}]", xs.join(","))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

fn record() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(KEYS), json_value()), 0..7).prop_map(|kv| {
        let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", fields.join(","))
    })
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Cut(usize),
    Insert(usize, Vec<u8>),
    Flip(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => Just(Damage::None),
        1 => any::<usize>().prop_map(Damage::Cut),
        1 => (any::<usize>(), prop::collection::vec(prop_oneof![Just(0xffu8), Just(0xc3), Just(0x80), Just(b'\n'), Just(b'{'), Just(b'"'), any::<u8>()], 1..4))
            .prop_map(|(i, b)| Damage::Insert(i, b)),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Damage::Flip(i, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, d: &Damage) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    match d {
        Damage::None => {}
        Damage::Cut(i) => bytes.truncate(i % bytes.len()),
        Damage::Insert(i, b) => {
            let at = i % bytes.len();
            bytes.splice(at..at, b.iter().copied());
        }
        Damage::Flip(i, b) => {
            let at = i % bytes.len();
            bytes[at] ^= b | 1;
        }
    }
    bytes
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

const NEVER: &(dyn Fn() -> bool + Sync) = &|| false;

#[derive(Debug, Clone)]
struct Case {
    records: Vec<String>,
    damage: Damage,
    gz: bool,
    json_array: bool,
    format: Option<usize>,
    kind: usize,
    skip_invalid: bool,
    parquet_out: bool,
    threads: usize,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(record(), 0..12),
        damage(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.5, 0..ALL_FORMATS.len()),
        0..4usize,
        any::<bool>(),
        any::<bool>(),
        1..4usize,
    )
        .prop_map(|(records, damage, gz, json_array, format, kind, skip_invalid, parquet_out, threads)| Case {
            records,
            damage,
            gz,
            json_array,
            format,
            kind,
            skip_invalid,
            parquet_out,
            threads,
        })
}

fn input_bytes(c: &Case) -> Vec<u8> {
    let text = if c.json_array { format!("[{}]", c.records.join(",\n")) } else { c.records.join("\n") + "\n" };
    let bytes = text.into_bytes();
    if c.gz {
        // Damage after compressing: a truncated or corrupt gzip stream.
        apply(gzip(&bytes), &c.damage)
    } else {
        apply(bytes, &c.damage)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn prep_never_panics_and_never_leaves_partial_output(c in case()) {
        let dir = tempfile::tempdir().unwrap();
        let name = match (c.gz, c.json_array) { (true, _) => "in.jsonl.gz", (false, true) => "in.json", _ => "in.jsonl" };
        let input = dir.path().join(name);
        std::fs::write(&input, input_bytes(&c)).unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join(if c.parquet_out { "o.parquet" } else { "o.jsonl" });
        let opts = PrepOptions {
            read: ReadOptions { format: c.format.map(|i| ALL_FORMATS[i]), ..Default::default() },
            kind: Some([OutputKind::Pairs, OutputKind::Unpaired, OutputKind::Grouped, OutputKind::Lists][c.kind]),
            skip_invalid: c.skip_invalid,
            threads: c.threads,
            chunk_bytes: 256,
            batch_rows: 3,
            ..Default::default()
        };
        match prep(Input::File(input.clone()), &Output::File(out.clone()), &opts, NEVER) {
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert_eq!(entries(&out_dir), Vec::<String>::new(), "error {} left files", e);
            }
            Ok(report) => {
                prop_assert_eq!(entries(&out_dir), vec![out.file_name().unwrap().to_string_lossy().into_owned()]);
                let back = read_table(&out, 1);
                let rows = match back {
                    Ok(t) => t.num_rows() as u64,
                    // An empty JSONL file has no rows (and no columns to read).
                    Err(_) => { prop_assert_eq!(std::fs::metadata(&out).unwrap().len(), 0); 0 }
                };
                prop_assert_eq!(rows, report.stats.rows_written);
            }
        }
    }

    #[test]
    fn table_reader_never_panics(c in case()) {
        let dir = tempfile::tempdir().unwrap();
        let name = if c.gz { "t.jsonl.gz" } else { "t.jsonl" };
        let path = dir.path().join(name);
        std::fs::write(&path, input_bytes(&c)).unwrap();
        if let Ok(t) = read_table(&path, c.threads) {
            prop_assert!(t.num_rows() <= c.records.len() + 8);
        }
    }
}

#[test]
fn damaged_parquet_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> =
        (0..200).map(|i| format!(r#"{{"prompt":"p{i}","chosen":"a{i}","rejected":"b{i}"}}"#)).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let pq = dir.path().join("t.parquet");
    prep(Input::File(input), &Output::File(pq.clone()), &PrepOptions::default(), NEVER).unwrap();
    let good = std::fs::read(&pq).unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() });
    runner
        .run(&(any::<usize>(), any::<u8>(), any::<bool>()), |(at, byte, cut)| {
            let mut bytes = good.clone();
            if cut {
                bytes.truncate(at % bytes.len());
            } else {
                let i = at % bytes.len();
                bytes[i] ^= byte | 1;
            }
            let path = dir.path().join("bad.parquet");
            std::fs::write(&path, &bytes).unwrap();
            let _ = read_table(&path, 2);
            let out = dir.path().join("never.jsonl");
            if prep(Input::File(path), &Output::File(out.clone()), &PrepOptions::default(), NEVER).is_err() {
                prop_assert!(!out.exists());
            }
            let _ = std::fs::remove_file(&out);
            Ok(())
        })
        .unwrap();
}
