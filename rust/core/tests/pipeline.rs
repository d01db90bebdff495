//! End-to-end runs of the streaming pipeline on temporary files.

use std::io::Write;
use std::path::Path;

use prefops_core::pairs::Strategy;
use prefops_core::{prep, Input, Output, PairOptions, PrepError, PrepOptions};

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn uf_line(i: usize, scores: &[f64]) -> String {
    let completions: Vec<String> = scores
        .iter()
        .enumerate()
        .map(|(j, s)| format!(r#"{{"response":"r{i}-{j}","overall_score":{s},"model":"m{j}"}}"#))
        .collect();
    format!(r#"{{"instruction":"q{i}","completions":[{}],"source":"s"}}"#, completions.join(","))
}

const NEVER: &(dyn Fn() -> bool + Sync) = &|| false;

#[test]
fn same_bytes_for_any_thread_count_and_chunk_size() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..3000).map(|i| uf_line(i, &[(i % 7) as f64, 3.0, 5.5, (i % 3) as f64])).collect();
    write_lines(&input, &lines);
    let mut outputs = Vec::new();
    for (threads, chunk_bytes) in [(1, 1 << 20), (2, 512), (4, 4096), (3, 100_000)] {
        let out = dir.path().join(format!("out-{threads}-{chunk_bytes}.jsonl"));
        let opts = PrepOptions {
            threads,
            chunk_bytes,
            pairs: PairOptions { strategy: Strategy::AllPairs, max_pairs_per_prompt: Some(2), seed: 9, ..Default::default() },
            ..Default::default()
        };
        let report = prep(Input::File(input.clone()), &Output::File(out.clone()), &opts, NEVER).unwrap();
        assert_eq!(report.stats.rows_read, 3000);
        assert_eq!(report.stats.rows_written, report.stats.pairs_made);
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    let n_lines = outputs[0].iter().filter(|&&b| b == b'\n').count();
    assert!(n_lines > 3000 && n_lines <= 6000, "{n_lines}");
}

#[test]
fn failure_leaves_no_output_and_keeps_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut lines: Vec<String> = (0..5000).map(|i| uf_line(i, &[1.0, 2.0])).collect();
    lines[4321] = r#"{"instruction":"q","completions":[{"response":"a","overall_score":"high"},{"response":"b","overall_score":1}]}"#.into();
    write_lines(&input, &lines);
    for name in ["out.jsonl", "out.parquet"] {
        let out = dir.path().join(name);
        std::fs::write(&out, b"old").unwrap();
        let opts = PrepOptions { threads: 2, chunk_bytes: 2048, ..Default::default() };
        let err = prep(Input::File(input.clone()), &Output::File(out.clone()), &opts, NEVER).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PrepError::Record { .. }));
        assert!(msg.contains("line 4322") && msg.contains("completions[0].overall_score"), "{msg}");
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "temporary files left behind: {names:?}");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn interrupt_stops_the_run_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = (0..20000).map(|i| uf_line(i, &[1.0, 2.0, 3.0])).collect();
    write_lines(&input, &lines);
    let out = dir.path().join("out.parquet");
    let opts = PrepOptions { threads: 2, chunk_bytes: 4096, ..Default::default() };
    let err = prep(Input::File(input), &Output::File(out.clone()), &opts, &|| true).unwrap_err();
    assert!(matches!(err, PrepError::Interrupted));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn dry_run_counts_and_skip_invalid_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let mut lines: Vec<String> = (0..100).map(|i| uf_line(i, &[1.0, 2.0, 2.0])).collect();
    lines[10] = "not json".into();
    lines[20] = uf_line(20, &[1.0]);
    write_lines(&input, &lines);
    let opts = PrepOptions { skip_invalid: true, ..Default::default() };
    let report = prep(Input::File(input), &Output::Discard, &opts, NEVER).unwrap();
    let s = &report.stats;
    assert_eq!((s.rows_read, s.rows_skipped), (100, 2));
    assert_eq!(s.skipped.get("malformed_json"), Some(&1));
    assert_eq!(s.skipped.get("single_response"), Some(&1));
    assert_eq!(s.prompts, 98);
    assert_eq!(s.pairs_made, 98);
    assert_eq!(s.margin_histogram.counts.iter().sum::<u64>(), 98);
}

#[cfg(unix)]
#[test]
fn output_mode_follows_the_umask_not_the_temp_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    write_lines(&input, &[uf_line(0, &[1.0, 2.0])]);
    let out = dir.path().join("out.jsonl");
    prep(Input::File(input), &Output::File(out.clone()), &PrepOptions::default(), NEVER).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_ne!(mode, 0o600, "output kept the temporary file's private mode");
    assert_eq!(mode & 0o044, 0o044 & !umask_now(), "mode {mode:o}");
}

#[cfg(unix)]
fn umask_now() -> u32 {
    // Read it back from a freshly created file: 0o666 minus the umask.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe");
    std::fs::File::create(&p).unwrap();
    use std::os::unix::fs::PermissionsExt;
    !std::fs::metadata(&p).unwrap().permissions().mode() & 0o666
}
