//! Readers that cut inputs into chunks of records, and atomic writers.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::value::RawValue;

use crate::arrow_out::{conform, merged_schema};
use crate::error::{Loc, Problem, PrepError, RecordError, Result};
use crate::model::Group;
use crate::parquet_out::ParallelParquetWriter;
use crate::value::Value;

/// A unit of work for one thread.
pub enum Chunk {
    /// Complete JSONL lines.
    Lines { buf: Vec<u8>, first_line: u64 },
    /// Elements of a JSON array file, as byte spans of a shared buffer.
    Elements { buf: Arc<Vec<u8>>, spans: Vec<(usize, usize)>, first_index: u64 },
    /// Rows of a Parquet file or an Arrow stream.
    Batch { batch: RecordBatch, first_row: u64 },
    /// A batch with its columns cast to the reading types (see `prepare`).
    Columns { columns: Vec<(String, arrow_array::ArrayRef)>, first_row: u64 },
    /// Groups already normalised (second pass of group-by-prompt).
    Groups { groups: Vec<Group<'static>>, first_index: u64 },
}

impl Chunk {
    /// Cast Arrow columns once per chunk so that rows can borrow from them.
    pub fn prepare(self) -> std::result::Result<Chunk, String> {
        match self {
            Chunk::Batch { batch, first_row } => {
                Ok(Chunk::Columns { columns: crate::arrow_in::prepare_batch(&batch)?, first_row })
            }
            other => Ok(other),
        }
    }

    /// Call `f` with each record and its location.
    pub fn for_each_record<'s>(
        &'s self,
        mut f: impl FnMut(Loc, std::result::Result<Value<'s>, RecordError>) -> Result<()>,
    ) -> Result<()> {
        match self {
            Chunk::Lines { buf, first_line } => {
                let mut start = 0;
                // The same pieces as `buf.split(|&b| b == b'\n')`, found with memchr.
                let ends = memchr::memchr_iter(b'\n', buf).chain(std::iter::once(buf.len()));
                for (line_no, end) in (*first_line..).zip(ends) {
                    let line = &buf[start..end];
                    start = end + 1;
                    let loc = Loc::Line(line_no);
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    f(loc, parse_json(line))?;
                }
                Ok(())
            }
            Chunk::Elements { buf, spans, first_index } => {
                for (i, &(a, b)) in spans.iter().enumerate() {
                    f(Loc::Record(first_index + i as u64), parse_json(&buf[a..b]))?;
                }
                Ok(())
            }
            Chunk::Columns { columns, first_row } => {
                for (i, row) in crate::arrow_in::rows(columns).enumerate() {
                    f(Loc::Row(first_row + i as u64), Ok(row))?;
                }
                Ok(())
            }
            Chunk::Batch { .. } => Err(PrepError::Config("internal: Arrow chunk read before prepare()".into())),
            Chunk::Groups { .. } => Ok(()),
        }
    }
}

/// Parse one record: the hand-written parser for the usual case, serde_json for anything it
/// declines (including every malformed record, so that errors read as serde words them).
pub fn parse_json(bytes: &[u8]) -> std::result::Result<Value<'_>, RecordError> {
    if let Some(value) = crate::json::parse_fast(bytes) {
        return Ok(value);
    }
    serde_json::from_slice::<Value>(bytes).map_err(|e| {
        let col = e.column();
        let near = bytes.get(col.saturating_sub(1)..).unwrap_or_default();
        let message = if near.starts_with(b"NaN") || near.starts_with(b"Infinity") || near.starts_with(b"-Infinity") {
            format!("malformed JSON at column {col}: NaN and Infinity are not JSON; write null or a finite number")
        } else {
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            format!("malformed JSON at column {col}: {msg}")
        };
        RecordError::new(Problem::MalformedJson, None, message)
    })
}

/// A reader that counts the bytes it has handed out (for progress).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Jsonl,
    JsonArray,
    Parquet,
}

/// Open a file, undoing gzip if its magic bytes say so, and tell what it holds.
fn open_text(path: &Path, count: Arc<AtomicU64>) -> Result<(Box<dyn Read + Send>, bool)> {
    let mut file = File::open(path).map_err(|e| PrepError::io(path, e))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(|e| PrepError::io(path, e))?;
    drop(file);
    let file = File::open(path).map_err(|e| PrepError::io(path, e))?;
    let counted = Counting { inner: file, count };
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok((Box::new(MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, counted))), true))
    } else {
        Ok((Box::new(counted), false))
    }
}

pub fn sniff(path: &Path) -> Result<FileKind> {
    let mut file = File::open(path).map_err(|e| PrepError::io(path, e))?;
    let mut head = [0u8; 4];
    let n = file.read(&mut head).map_err(|e| PrepError::io(path, e))?;
    if n == 4 && &head == b"PAR1" {
        return Ok(FileKind::Parquet);
    }
    let (mut reader, _) = open_text(path, Arc::new(AtomicU64::new(0)))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = reader.read(&mut buf).map_err(|e| PrepError::io(path, e))?;
        if n == 0 {
            return Ok(FileKind::Jsonl);
        }
        if let Some(&b) = buf[..n].iter().find(|b| !b.is_ascii_whitespace()) {
            return Ok(if b == b'[' { FileKind::JsonArray } else { FileKind::Jsonl });
        }
    }
}

pub type ChunkIter = Box<dyn Iterator<Item = Result<Chunk>> + Send>;

/// Record batches of a Parquet file. The parquet crate can panic on a corrupt file (found by
/// fuzzing: a damaged definition-level buffer); such a panic becomes an error naming the
/// file, and the reader stops there.
pub fn parquet_batches(path: &Path, batch_rows: usize) -> Result<(SchemaRef, impl Iterator<Item = Result<RecordBatch>> + Send)> {
    let name = path.display().to_string();
    let error = {
        let name = name.clone();
        move |message: String| PrepError::Parquet { path: name.clone(), message }
    };
    let file = File::open(path).map_err(|e| PrepError::io(path, e))?;
    let built = catch_unwind(AssertUnwindSafe(|| {
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
        let schema = builder.schema().clone();
        Ok::<_, parquet::errors::ParquetError>((schema, builder.with_batch_size(batch_rows).build()?))
    }));
    let (schema, mut reader) = match built {
        Ok(r) => r.map_err(|e| error(e.to_string()))?,
        Err(panic) => return Err(error(corrupt(panic.as_ref()))),
    };
    let mut failed = false;
    let batches = std::iter::from_fn(move || {
        if failed {
            return None;
        }
        match catch_unwind(AssertUnwindSafe(|| reader.next())) {
            Ok(next) => next.map(|b| b.map_err(|e| error(e.to_string()))),
            Err(panic) => {
                failed = true;
                Some(Err(error(corrupt(panic.as_ref()))))
            }
        }
    });
    Ok((schema, batches))
}

fn corrupt(panic: &(dyn std::any::Any + Send)) -> String {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    format!("corrupt Parquet data ({detail})")
}

/// Byte buffers handed back after use (JSONL chunks read, JSONL text written), so that a run
/// reuses memory that is already paged in. A fresh multi-megabyte buffer per chunk costs a
/// page fault and a kernel page-zeroing per 4 KiB, and the allocator returns it to the OS
/// when it is freed: about a tenth of a JSONL run's time before the pool.
pub struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` buffers between uses.
    pub fn new(keep: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool { free: std::sync::Mutex::new(Vec::new()), keep })
    }

    /// An empty buffer, with the capacity of one given back earlier when there is one.
    pub fn take(&self) -> Vec<u8> {
        self.free.lock().map(|mut f| f.pop()).ok().flatten().unwrap_or_default()
    }

    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut free) = self.free.lock() {
            if free.len() < self.keep {
                free.push(buf);
            }
        }
    }
}

/// Chunks of a file, with the number of source bytes read so far in `progress`. JSONL chunk
/// buffers come from `pool` (give them back there when done).
pub fn read_file(
    path: &Path,
    chunk_bytes: usize,
    batch_rows: usize,
    progress: Arc<AtomicU64>,
    pool: Arc<BufferPool>,
) -> Result<ChunkIter> {
    match sniff(path)? {
        FileKind::Parquet => {
            let (_, reader) = parquet_batches(path, batch_rows)?;
            let mut first_row = 0u64;
            Ok(Box::new(reader.map(move |b| {
                let batch = b?;
                let chunk = Chunk::Batch { first_row, batch };
                if let Chunk::Batch { batch, .. } = &chunk {
                    first_row += batch.num_rows() as u64;
                    progress.store(first_row, Ordering::Relaxed);
                }
                Ok(chunk)
            })))
        }
        FileKind::JsonArray => {
            let (mut reader, _) = open_text(path, progress)?;
            let mut buf = Vec::new();
            reader.read_to_end(&mut buf).map_err(|e| PrepError::io(path, e))?;
            let spans = {
                let elements: Vec<&RawValue> = serde_json::from_slice(&buf).map_err(|e| PrepError::Record {
                    source: path.display().to_string(),
                    error: RecordError::new(
                        Problem::MalformedJson,
                        None,
                        format!("malformed JSON array at column {}: {}", e.column(), e.to_string().split(" at line ").next().unwrap_or("")),
                    )
                    .at(Loc::Line(e.line() as u64)),
                })?;
                let base = buf.as_ptr() as usize;
                elements
                    .iter()
                    .map(|r| {
                        let start = r.get().as_ptr() as usize - base;
                        (start, start + r.get().len())
                    })
                    .collect::<Vec<_>>()
            };
            let buf = Arc::new(buf);
            let per_chunk = 2048usize;
            let chunks: Vec<Result<Chunk>> = spans
                .chunks(per_chunk)
                .enumerate()
                .map(|(i, s)| {
                    Ok(Chunk::Elements { buf: buf.clone(), spans: s.to_vec(), first_index: (i * per_chunk) as u64 })
                })
                .collect();
            Ok(Box::new(chunks.into_iter()))
        }
        FileKind::Jsonl => {
            let (reader, _) = open_text(path, progress)?;
            Ok(Box::new(JsonlChunks {
                reader,
                path: path.to_path_buf(),
                carry: Vec::new(),
                next_line: 1,
                chunk_bytes,
                done: false,
                pool,
            }))
        }
    }
}

struct JsonlChunks {
    reader: Box<dyn Read + Send>,
    path: PathBuf,
    carry: Vec<u8>,
    next_line: u64,
    chunk_bytes: usize,
    done: bool,
    pool: Arc<BufferPool>,
}

impl Iterator for JsonlChunks {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Result<Chunk>> {
        if self.done {
            return None;
        }
        let mut buf = self.pool.take();
        buf.extend_from_slice(&self.carry);
        let target = self.chunk_bytes.max(1);
        loop {
            let start = buf.len();
            buf.resize(start + target.max(64 * 1024), 0);
            let n = match read_full(&mut self.reader, &mut buf[start..]) {
                Ok(n) => n,
                Err(e) => {
                    self.done = true;
                    return Some(Err(PrepError::Io {
                        path: self.path.clone(),
                        error: std::io::Error::new(e.kind(), format!("after line {}: {e}", self.next_line)),
                    }));
                }
            };
            buf.truncate(start + n);
            if n == 0 {
                self.done = true;
                break;
            }
            // Cut after the last newline; a line longer than the chunk makes us read on.
            if buf.len() >= target {
                if let Some(pos) = memchr::memrchr(b'\n', &buf) {
                    self.carry.clear();
                    self.carry.extend_from_slice(&buf[pos + 1..]);
                    buf.truncate(pos + 1);
                    break;
                }
            }
        }
        if buf.is_empty() {
            return None;
        }
        let first_line = self.next_line;
        self.next_line += memchr::memchr_iter(b'\n', &buf).count() as u64;
        Some(Ok(Chunk::Lines { buf, first_line }))
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Rows per Parquet row group. The writer holds a whole row group in memory before it
/// flushes, so this bounds the memory of a streaming run (the default, 1M rows, does not).
pub const PARQUET_ROW_GROUP_ROWS: usize = 64 * 1024;

fn parquet_properties() -> WriterProperties {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP_ROWS));
    // Responses and pair ids are nearly all distinct: trying a dictionary for them costs a
    // quarter of the write time and saves nothing. Prompts, prompt ids, models and roles
    // repeat (every pair of a prompt), so they keep it.
    for column in ["pair_id", "chosen", "rejected"] {
        for path in [vec![column], vec![column, "list", "item", "content"], vec![column, "list", "element", "content"]] {
            let path = parquet::schema::types::ColumnPath::new(path.into_iter().map(String::from).collect());
            builder = builder.set_column_dictionary_enabled(path, false);
        }
    }
    builder.build()
}

/// Where the output goes.
#[derive(Debug, Clone)]
pub enum Output {
    /// .jsonl, .jsonl.gz or .parquet, written to a temporary file and renamed at the end.
    File(PathBuf),
    /// Arrow record batches returned to the caller.
    Memory,
    /// Nothing is written (dry run); counts are still made.
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Jsonl,
    Arrow,
    None,
}

impl Output {
    pub fn encoding(&self) -> Result<Encoding> {
        match self {
            Output::Discard => Ok(Encoding::None),
            Output::Memory => Ok(Encoding::Arrow),
            Output::File(p) => {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_ascii_lowercase();
                if name.ends_with(".parquet") || name.ends_with(".pq") {
                    Ok(Encoding::Arrow)
                } else if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") || name.ends_with(".ndjson") {
                    Ok(Encoding::Jsonl)
                } else {
                    Err(PrepError::Config(format!(
                        "{}: unknown output type; name it .jsonl, .jsonl.gz or .parquet",
                        p.display()
                    )))
                }
            }
        }
    }
}

/// Batches wait here until the schema is fixed from the first few (so a column that is all
/// null in the first chunk still gets its real type).
const SCHEMA_WINDOW: usize = 8;

// One Sink per run: boxing the larger variant would save nothing worth an indirection.
#[allow(clippy::large_enum_variant)]
pub enum Sink {
    Jsonl { tmp: tempfile::NamedTempFile, out: Box<dyn Write + Send>, dest: PathBuf },
    Arrow { pending: Vec<(Loc, RecordBatch)>, schema: Option<SchemaRef>, target: ArrowTarget, source: String },
    Discard,
}

#[allow(clippy::large_enum_variant)] // one per Sink
pub enum ArrowTarget {
    Parquet { tmp: tempfile::NamedTempFile, writer: Option<ParallelParquetWriter>, dest: PathBuf, threads: usize },
    Memory(Vec<RecordBatch>),
}

fn temp_beside(dest: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(PrepError::Config(format!("{}: output directory does not exist", dir.display())));
    }
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("output");
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    // Temporary files are 0600 by default and would keep that mode after the rename; ask for
    // 0666 like any new file, so the umask decides as it would for a plain create.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(&dir).map_err(|e| PrepError::io(&dir, e))
}

impl Sink {
    /// `threads`: how many threads may encode Parquet columns at once.
    pub fn open(output: &Output, source: &str, threads: usize) -> Result<Sink> {
        Ok(match (output, output.encoding()?) {
            (Output::Discard, _) => Sink::Discard,
            (Output::Memory, _) => Sink::Arrow {
                pending: Vec::new(),
                schema: None,
                target: ArrowTarget::Memory(Vec::new()),
                source: source.to_string(),
            },
            (Output::File(dest), Encoding::Jsonl) => {
                let tmp = temp_beside(dest)?;
                let file = tmp.as_file().try_clone().map_err(|e| PrepError::io(tmp.path(), e))?;
                let buffered = BufWriter::with_capacity(1 << 20, file);
                let gz = dest.to_string_lossy().to_ascii_lowercase().ends_with(".gz");
                let out: Box<dyn Write + Send> = if gz {
                    Box::new(GzEncoder::new(buffered, flate2::Compression::new(6)))
                } else {
                    Box::new(buffered)
                };
                Sink::Jsonl { tmp, out, dest: dest.clone() }
            }
            (Output::File(dest), _) => Sink::Arrow {
                pending: Vec::new(),
                schema: None,
                target: ArrowTarget::Parquet { tmp: temp_beside(dest)?, writer: None, dest: dest.clone(), threads },
                source: source.to_string(),
            },
        })
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        if let Sink::Jsonl { out, tmp, .. } = self {
            out.write_all(bytes).map_err(|e| PrepError::io(tmp.path(), e))?;
        }
        Ok(())
    }

    pub fn write_batch(&mut self, loc: Loc, batch: RecordBatch) -> Result<()> {
        if let Sink::Arrow { pending, schema, .. } = self {
            pending.push((loc, batch));
            if schema.is_none() && pending.len() < SCHEMA_WINDOW {
                return Ok(());
            }
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        let Sink::Arrow { pending, schema, target, source } = self else { return Ok(()) };
        if pending.is_empty() {
            return Ok(());
        }
        let schema = schema.get_or_insert_with(|| merged_schema(pending.iter().map(|(_, b)| b))).clone();
        for (loc, batch) in pending.drain(..) {
            let batch = conform(&batch, &schema)
                .map_err(|message| PrepError::Schema { source: source.clone(), loc, message })?;
            match target {
                ArrowTarget::Memory(out) => out.push(batch),
                ArrowTarget::Parquet { tmp, writer, threads, .. } => {
                    if writer.is_none() {
                        let file = tmp.as_file().try_clone().map_err(|e| PrepError::io(tmp.path(), e))?;
                        let props = parquet_properties();
                        *writer = Some(ParallelParquetWriter::try_new(file, schema.clone(), props, *threads).map_err(|e| {
                            PrepError::Parquet { path: tmp.path().display().to_string(), message: e.to_string() }
                        })?);
                    }
                    let w = writer.as_mut().expect("created above");
                    w.write(&batch)
                        .map_err(|e| PrepError::Parquet { path: tmp.path().display().to_string(), message: e.to_string() })?;
                }
            }
        }
        Ok(())
    }

    /// Flush and move the output into place. Returns in-memory batches and their schema.
    pub fn finish(self, empty_schema: impl FnOnce() -> SchemaRef) -> Result<(Vec<RecordBatch>, Option<SchemaRef>)> {
        let (batches, schema, staged) = self.finish_staged(empty_schema)?;
        if let Some(staged) = staged {
            staged.persist()?;
        }
        Ok((batches, schema))
    }

    /// Flush and fsync a file output but leave it beside its destination: the caller renames
    /// it into place with `Staged::persist` (several outputs can then appear together).
    pub fn finish_staged(
        mut self,
        empty_schema: impl FnOnce() -> SchemaRef,
    ) -> Result<(Vec<RecordBatch>, Option<SchemaRef>, Option<Staged>)> {
        self.flush_pending()?;
        match self {
            Sink::Discard => Ok((Vec::new(), None, None)),
            Sink::Jsonl { tmp, mut out, dest } => {
                out.flush().map_err(|e| PrepError::io(tmp.path(), e))?;
                drop(out); // finishes the gzip stream
                tmp.as_file().sync_all().map_err(|e| PrepError::io(tmp.path(), e))?;
                Ok((Vec::new(), None, Some(Staged { tmp, dest })))
            }
            Sink::Arrow { schema, target, .. } => {
                let schema = schema.unwrap_or_else(empty_schema);
                match target {
                    ArrowTarget::Memory(batches) => Ok((batches, Some(schema), None)),
                    ArrowTarget::Parquet { tmp, writer, dest, threads } => {
                        let writer = match writer {
                            Some(w) => w,
                            None => {
                                let file = tmp.as_file().try_clone().map_err(|e| PrepError::io(tmp.path(), e))?;
                                ParallelParquetWriter::try_new(file, schema.clone(), parquet_properties(), threads).map_err(|e| PrepError::Parquet {
                                    path: tmp.path().display().to_string(),
                                    message: e.to_string(),
                                })?
                            }
                        };
                        writer.close().map_err(|e| PrepError::Parquet {
                            path: tmp.path().display().to_string(),
                            message: e.to_string(),
                        })?;
                        tmp.as_file().sync_all().map_err(|e| PrepError::io(tmp.path(), e))?;
                        Ok((Vec::new(), Some(schema), Some(Staged { tmp, dest })))
                    }
                }
            }
        }
    }
}

/// A complete, fsynced output file waiting beside its destination under a temporary name.
/// Dropping it removes the temporary file.
pub struct Staged {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
}

impl Staged {
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Rename into place.
    pub fn persist(self) -> Result<()> {
        let dest = self.dest;
        self.tmp.persist(&dest).map_err(|e| PrepError::io(&dest, e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_lines_keep_their_numbers_and_serde_error_messages() {
        // CRLF, a blank and a whitespace-only line, a malformed line, no final newline.
        let buf = b"{\"a\":1}\r\n\n \t\n{\"a\":\"x\\ny\"}\n{\"a\": 01}\n[NaN]\n{\"a\":3}".to_vec();
        let chunk = Chunk::Lines { buf, first_line: 10 };
        let mut seen = Vec::new();
        chunk
            .for_each_record(|loc, parsed| {
                seen.push(format!("{loc}: {}", parsed.map(|v| v.to_json()).unwrap_or_else(|e| e.message)));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                r#"line 10: {"a":1}"#,
                r#"line 13: {"a":"x\ny"}"#,
                "line 14: malformed JSON at column 8: invalid number",
                "line 15: malformed JSON at column 2: NaN and Infinity are not JSON; write null or a finite number",
                r#"line 16: {"a":3}"#,
            ]
        );
    }
}
