//! The pairs table in memory, and reading/writing it as JSONL or Parquet (atomically).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};

use super::{column_error, par_map, SLICE_ROWS};
use crate::arrow_out::{conform, merged_schema, rows_to_batch};
use crate::error::{Loc, PrepError, Problem, RecordError, Result};
use crate::io::{parquet_batches, read_file, sniff, Chunk, Encoding, FileKind, Output, Sink, Staged};
use crate::value::Value;

/// Record batches sharing one schema, with the name of where they came from (for errors).
#[derive(Debug, Clone)]
pub struct Table {
    pub source: String,
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Table {
    /// Batches whose schema differs from `schema` (e.g. only in metadata) are cast to it.
    pub fn new(source: impl Into<String>, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Table> {
        let source = source.into();
        let mut row = 0u64;
        let batches = batches
            .into_iter()
            .filter(|b| b.num_rows() > 0)
            .map(|b| {
                let loc = Loc::Row(row);
                row += b.num_rows() as u64;
                if b.schema_ref() == &schema {
                    Ok(b)
                } else if b.schema_ref().fields() == schema.fields() {
                    super::make_batch(schema.clone(), b.columns().to_vec(), b.num_rows())
                } else {
                    conform(&b, &schema).map_err(|message| PrepError::Schema { source: source.clone(), loc, message })
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Table { source, schema, batches })
    }

    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.schema.fields().iter().map(|f| f.name().as_str()).collect()
    }

    /// Index of a column, or an error naming it, what needs it, and the columns there are.
    pub fn column_index(&self, name: &str, needed_for: &str) -> Result<usize> {
        self.schema.index_of(name).map_err(|_| {
            column_error(
                &self.source,
                format!(
                    "missing column '{name}' ({needed_for}); the table has: {}",
                    if self.schema.fields().is_empty() { "no columns".to_string() } else { self.column_names().join(", ") }
                ),
            )
        })
    }

    /// Zero-copy slices of at most `max_rows` rows, with the index of their first row.
    pub fn slices(&self, max_rows: usize) -> Vec<(u64, RecordBatch)> {
        let mut out = Vec::new();
        let mut first = 0u64;
        for b in &self.batches {
            let mut offset = 0;
            while offset < b.num_rows() {
                let len = max_rows.min(b.num_rows() - offset);
                out.push((first + offset as u64, b.slice(offset, len)));
                offset += len;
            }
            first += b.num_rows() as u64;
        }
        out
    }
}

/// Read a .jsonl / .jsonl.gz / .json (array or JSONL) / .parquet file into a table. JSON
/// column types are inferred over the whole file (integers and floats mixed give Float64).
pub fn read_table(path: &Path, threads: usize) -> Result<Table> {
    read_table_noting(path, threads).map(|(table, _)| table)
}

/// The JSON kinds a value can have, in the order reports list them.
const KINDS: [&str; 6] = ["null", "boolean", "number", "string", "list", "object"];

fn kind_index(v: &Value<'_>) -> usize {
    match v {
        Value::Null => 0,
        Value::Bool(_) => 1,
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => 2,
        Value::Str(_) => 3,
        Value::List(_) => 4,
        Value::Object(_) => 5,
    }
}

/// A top-level JSON column whose values mix kinds that no one Arrow type holds (numbers and
/// text, say). It is read as text, each non-string value as its JSON text: a number 5 and a
/// string "5" both become "5", which a user should hear about.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MixedColumn {
    pub column: String,
    /// Each non-null kind seen, with where it first appears.
    pub kinds: Vec<(String, String)>,
}

impl MixedColumn {
    pub fn describe(&self) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, at)| format!("{k} (first at {at})")).collect();
        format!(
            "column '{}' mixes {} values: read as text, each non-string value as its JSON text",
            self.column,
            kinds.join(" and ")
        )
    }
}

/// First location of each kind, per column, in first-seen column order.
type KindsSeen = Vec<(String, [Option<Loc>; 6])>;

/// The column's entry, added (with no kind seen yet) when it is new.
fn kinds_of<'s>(seen: &'s mut KindsSeen, name: &str) -> &'s mut [Option<Loc>; 6] {
    let i = match seen.iter().position(|(n, _)| n == name) {
        Some(i) => i,
        None => {
            seen.push((name.to_string(), Default::default()));
            seen.len() - 1
        }
    };
    &mut seen[i].1
}

fn note_kinds(seen: &mut KindsSeen, loc: Loc, row: &Value<'_>) {
    let Value::Object(fields) = row else { return };
    for (name, v) in fields {
        kinds_of(seen, name)[kind_index(v)].get_or_insert(loc);
    }
}

/// [`read_table`], and the JSON columns read as text because their values mix kinds.
pub fn read_table_noting(path: &Path, threads: usize) -> Result<(Table, Vec<MixedColumn>)> {
    let source = path.display().to_string();
    if !path.is_file() {
        return Err(PrepError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
    }
    if sniff(path)? == FileKind::Parquet {
        let (schema, reader) = parquet_batches(path, SLICE_ROWS)?;
        let batches = reader.map(|b| super::cancel::check().and(b)).collect::<Result<Vec<_>>>()?;
        return Ok((Table::new(source, schema, batches)?, Vec::new()));
    }
    let chunks: Vec<Chunk> = read_file(path, 4 << 20, SLICE_ROWS, Arc::new(AtomicU64::new(0)), crate::io::BufferPool::new(0))?
        .map(|c| super::cancel::check().and(c))
        .collect::<Result<Vec<_>>>()?;
    let parts = par_map(&chunks, crate::pipeline::resolve_threads(threads), |chunk| {
        let mut rows: Vec<Value<'_>> = Vec::new();
        let mut seen = KindsSeen::new();
        chunk.for_each_record(|loc, parsed| {
            let record_error = |error: RecordError| PrepError::Record { source: source.clone(), error: error.at(loc) };
            match parsed {
                Err(e) => Err(record_error(e)),
                Ok(v @ Value::Object(_)) => {
                    note_kinds(&mut seen, loc, &v);
                    rows.push(v);
                    Ok(())
                }
                Ok(v) => Err(record_error(RecordError::new(
                    Problem::WrongType,
                    None,
                    format!("expected a JSON object (one pair per record), got {}", v.type_name()),
                ))),
            }
        })?;
        Ok((rows_to_batch(&rows, &[]), seen))
    })?;
    // Chunks are in file order, so the first chunk to see a kind saw it first.
    let mut seen = KindsSeen::new();
    for (_, part) in &parts {
        for (name, locs) in part {
            for (slot, loc) in kinds_of(&mut seen, name).iter_mut().zip(locs) {
                if slot.is_none() {
                    *slot = *loc;
                }
            }
        }
    }
    let batches: Vec<RecordBatch> = parts.into_iter().map(|(b, _)| b).collect();
    let schema = merged_schema(batches.iter());
    let mixed = seen
        .into_iter()
        .filter_map(|(column, locs)| {
            let text = schema.field_with_name(&column).is_ok_and(|f| f.data_type() == &arrow_schema::DataType::Utf8);
            let kinds: Vec<(String, String)> = KINDS
                .iter()
                .zip(locs)
                .skip(1) // null mixes with anything
                .filter_map(|(k, loc)| loc.map(|l| (k.to_string(), l.to_string())))
                .collect();
            (text && kinds.iter().any(|(k, _)| k != "string")).then_some(MixedColumn { column, kinds })
        })
        .collect();
    Ok((Table::new(source, schema, batches)?, mixed))
}

/// `pairs.parquet` → `pairs.stage0.parquet`; `pairs.jsonl.gz` → `pairs.stage0.jsonl.gz`.
pub fn stage_path(path: &Path, stage: usize) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    let ext_len = [".jsonl.gz", ".ndjson", ".jsonl", ".parquet", ".pq"]
        .iter()
        .find(|e| lower.ends_with(*e) && lower.len() > e.len())
        .map(|e| e.len())
        .or_else(|| name.rfind('.').filter(|&i| i > 0).map(|i| name.len() - i))
        .unwrap_or(0);
    let (stem, ext) = name.split_at(name.len() - ext_len);
    path.with_file_name(format!("{stem}.stage{stage}{ext}"))
}

fn jsonl_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let columns = crate::arrow_in::prepare_batch(batch).map_err(PrepError::Config)?;
    let mut buf = Vec::with_capacity(batch.get_array_memory_size());
    for row in crate::arrow_in::rows(&columns) {
        serde_json::to_writer(&mut buf, &row).expect("writing JSON to a Vec cannot fail");
        buf.push(b'\n');
    }
    Ok(buf)
}

fn write_staged(path: &Path, table: &Table, threads: usize) -> Result<Staged> {
    let output = Output::File(path.to_path_buf());
    let encoding = output.encoding()?;
    let mut sink = Sink::open(&output, &table.source, threads.max(1))?;
    let slices = table.slices(SLICE_ROWS);
    match encoding {
        Encoding::Jsonl => {
            // A few slices at a time so that memory stays near the size of the table.
            for window in slices.chunks(threads.max(1) * 2) {
                for bytes in par_map(window, threads, |(_, b)| jsonl_bytes(b))? {
                    sink.write_bytes(&bytes)?;
                }
            }
        }
        _ => {
            for (first, b) in slices {
                super::cancel::check()?;
                sink.write_batch(Loc::Row(first), b)?;
            }
        }
    }
    let schema = table.schema.clone();
    let (_, _, staged) = sink.finish_staged(|| schema)?;
    staged.ok_or_else(|| PrepError::Config(format!("{}: internal: file output was not staged", path.display())))
}

/// Write each table to its path (.jsonl, .jsonl.gz or .parquet). All files are written and
/// fsynced under temporary names first and renamed into place only when every one is
/// complete: on error none of them appears (a failure among the final renames removes those
/// already renamed).
pub fn write_tables(outputs: &[(PathBuf, &Table)], threads: usize) -> Result<()> {
    let threads = crate::pipeline::resolve_threads(threads);
    for (i, (p, _)) in outputs.iter().enumerate() {
        if outputs[..i].iter().any(|(q, _)| q == p) {
            return Err(PrepError::Config(format!("{}: the same output path is given twice", p.display())));
        }
    }
    let mut staged = Vec::with_capacity(outputs.len());
    for (path, table) in outputs {
        staged.push(write_staged(path, table, threads)?);
    }
    // Last chance to stop: after this, outputs appear.
    super::cancel::check()?;
    let mut done: Vec<PathBuf> = Vec::new();
    for s in staged {
        let dest = s.dest().to_path_buf();
        if let Err(e) = s.persist() {
            for d in &done {
                let _ = std::fs::remove_file(d);
            }
            return Err(e);
        }
        done.push(dest);
    }
    Ok(())
}

/// What `convert` reports: the rows and the Arrow type of every column.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableStats {
    pub rows: u64,
    pub columns: Vec<(String, String)>,
}

impl TableStats {
    pub fn of(table: &Table) -> TableStats {
        TableStats {
            rows: table.num_rows() as u64,
            columns: table.schema.fields().iter().map(|f| (f.name().clone(), f.data_type().to_string())).collect(),
        }
    }
}

/// An empty table with no columns.
pub fn empty(source: &str) -> Table {
    Table { source: source.to_string(), schema: Arc::new(Schema::empty()), batches: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_paths() {
        let p = |s: &str, i| stage_path(Path::new(s), i).display().to_string();
        assert_eq!(p("out/pairs.parquet", 0), "out/pairs.stage0.parquet");
        assert_eq!(p("pairs.jsonl.gz", 3), "pairs.stage3.jsonl.gz");
        assert_eq!(p("pairs.JSONL", 1), "pairs.stage1.JSONL");
        assert_eq!(p("a.b.jsonl", 2), "a.b.stage2.jsonl");
        assert_eq!(p("noext", 2), "noext.stage2");
    }

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("in.jsonl");
        std::fs::write(
            &path,
            "{\"pair_id\":\"a\",\"chosen\":\"x\",\"rejected\":\"y\",\"margin\":1,\"n\":null}\n\
             {\"pair_id\":\"b\",\"chosen\":[{\"role\":\"assistant\",\"content\":\"hi\"}],\"rejected\":\"z\",\"margin\":2.5,\"n\":3}\n",
        )
        .unwrap();
        path
    }

    /// Mixed kinds are found across chunk boundaries (tiny chunks via many rows), with the
    /// first line of each kind; columns that merge to a real type are not reported.
    #[test]
    fn mixed_kind_columns_are_noted_with_their_first_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mixed.jsonl");
        let mut text = String::new();
        for i in 0..30_000 {
            let score = if i == 20_000 { "\"7\"".to_string() } else { i.to_string() };
            let flag = if i == 5 { "null".to_string() } else { (i % 2 == 0).to_string() };
            let number = if i % 3 == 0 { "1.5" } else { "2" };
            let tag = if i == 29_999 { "{\"a\":1}" } else { "\"t\"" };
            text.push_str(&format!(
                "{{\"score\":{score},\"flag\":{flag},\"number\":{number},\"tag\":{tag},\"pad\":\"{}\"}}\n",
                "p".repeat(200)
            ));
        }
        std::fs::write(&path, text).unwrap();
        for threads in [1, 3] {
            let (table, mixed) = read_table_noting(&path, threads).unwrap();
            assert!(table.batches.len() > 1, "the file must span several chunks for this test");
            let at = |kinds: &[(&str, &str)]| kinds.iter().map(|(k, l)| (k.to_string(), l.to_string())).collect::<Vec<_>>();
            assert_eq!(
                mixed,
                vec![
                    MixedColumn { column: "score".into(), kinds: at(&[("number", "line 1"), ("string", "line 20001")]) },
                    MixedColumn { column: "tag".into(), kinds: at(&[("string", "line 1"), ("object", "line 30000")]) },
                ]
            );
            assert!(mixed[0].describe().contains("column 'score' mixes number (first at line 1) and string (first at line 20001)"));
        }
    }

    #[test]
    fn jsonl_and_parquet_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let t = read_table(&sample(dir.path()), 2).unwrap();
        assert_eq!(t.num_rows(), 2);
        assert_eq!(t.schema.field_with_name("margin").unwrap().data_type(), &arrow_schema::DataType::Float64);
        assert_eq!(t.schema.field_with_name("n").unwrap().data_type(), &arrow_schema::DataType::Int64);
        let (pq, jl) = (dir.path().join("o.parquet"), dir.path().join("o.jsonl.gz"));
        write_tables(&[(pq.clone(), &t), (jl.clone(), &t)], 2).unwrap();
        let back = read_table(&pq, 1).unwrap();
        assert_eq!(back.schema.fields(), t.schema.fields());
        assert_eq!(back.batches[0].columns(), t.batches[0].columns());
        let back = read_table(&jl, 1).unwrap();
        assert_eq!(back.batches[0].columns(), t.batches[0].columns());
        let e = read_table(&dir.path().join("missing.jsonl"), 1).unwrap_err().to_string();
        assert!(e.contains("missing.jsonl: no such file"), "{e}");
        std::fs::write(dir.path().join("bad.jsonl"), "{}\n[1]\n").unwrap();
        let e = read_table(&dir.path().join("bad.jsonl"), 1).unwrap_err().to_string();
        assert!(e.ends_with("bad.jsonl: line 2: expected a JSON object (one pair per record), got list"), "{e}");
    }

    #[test]
    fn several_outputs_appear_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let t = read_table(&sample(dir.path()), 1).unwrap();
        let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.parquet"));
        std::fs::create_dir(&b).unwrap(); // renaming onto a directory fails
        assert!(write_tables(&[(a.clone(), &t), (b.clone(), &t)], 1).is_err());
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["b.parquet", "in.jsonl"]);
        let e = write_tables(&[(a.clone(), &t), (a.clone(), &t)], 1).unwrap_err().to_string();
        assert!(e.contains("given twice"), "{e}");
        write_tables(&[(a.clone(), &t)], 1).unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap().lines().count(), 2);
    }
}
