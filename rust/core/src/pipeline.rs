//! The streaming prep run: read chunks → normalise and pair on worker threads → write in order.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use crossbeam_channel::{bounded, RecvTimeoutError};

use crate::arrow_groups::GroupReader;
use crate::arrow_in::{self, Col};
use crate::arrow_out::rows_to_batch;
use crate::columnar;
use crate::error::{Loc, PrepError, Problem, RecordError, Result};
use crate::formats::{normalise, Format, ReadOptions};
use crate::io::{read_file, BufferPool, Chunk, ChunkIter, Encoding, Output, Sink};
use crate::list_output::{write_list_jsonl, ListBatchBuilder, ListColumns, ListSizes};
use crate::lists::{check_labels, make_list, ListOptions};
use crate::model::Group;
use crate::output::{
    grouped_row, unpaired_rows, write_pairs_jsonl, OutputKind, PairBatchBuilder, PairColumns, PairSizes, TYPE_HINTS,
};
use crate::pairs::{count_pairs, make_pairs, PairOptions};
use crate::stats::Stats;
use crate::value::Value;

/// Environment variable that sets the default thread count.
pub const THREADS_ENV: &str = "PREFOPS_NUM_THREADS";

#[derive(Debug, Clone)]
pub struct PrepOptions {
    pub read: ReadOptions,
    pub pairs: PairOptions,
    /// Used when `kind` is Lists.
    pub lists: ListOptions,
    /// None = pairs, except unpaired input (KTO) which stays unpaired.
    pub kind: Option<OutputKind>,
    /// Count and skip bad records instead of stopping at the first.
    pub skip_invalid: bool,
    /// Merge rows that share a prompt id before pairing (holds the input in memory).
    /// Always on when pairs are made from unpaired input.
    pub group_by_prompt: bool,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
    /// Draw a progress bar on stderr when it is a terminal.
    pub progress: bool,
    pub chunk_bytes: usize,
    pub batch_rows: usize,
}

impl Default for PrepOptions {
    fn default() -> Self {
        PrepOptions {
            read: ReadOptions::default(),
            pairs: PairOptions::default(),
            lists: ListOptions::default(),
            kind: None,
            skip_invalid: false,
            group_by_prompt: false,
            threads: 0,
            progress: false,
            chunk_bytes: 4 << 20,
            batch_rows: 8192,
        }
    }
}

pub fn resolve_threads(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    if let Some(n) = std::env::var(THREADS_ENV).ok().and_then(|v| v.trim().parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Where records come from.
pub enum Input {
    File(PathBuf),
    /// An Arrow stream (e.g. from Python); `total_rows` sizes the progress bar.
    Batches { name: String, batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send>, total_rows: Option<u64> },
}

#[derive(Debug)]
pub struct PrepReport {
    pub stats: Stats,
    pub format: Format,
    pub kind: OutputKind,
    pub threads: usize,
    pub seconds: f64,
    /// In-memory output (Output::Memory).
    pub batches: Vec<RecordBatch>,
    pub schema: Option<SchemaRef>,
}

/// Asked between chunks whether to stop (Ctrl-C); nothing is written when it says yes.
pub type InterruptCheck<'a> = &'a (dyn Fn() -> bool + Sync);

struct Ctx {
    source: String,
    format: Format,
    read: ReadOptions,
    pairs: PairOptions,
    kind: OutputKind,
    columns: PairColumns,
    lists: ListOptions,
    list_columns: ListColumns,
    encoding: Encoding,
    skip_invalid: bool,
    /// First pass of group-by-prompt: keep normalised groups instead of emitting rows.
    collect_groups: bool,
    /// Where JSONL chunk buffers and JSONL output buffers go back to after use.
    buffers: Arc<BufferPool>,
    /// Sizes of the last Arrow batch built, which the next chunk's builder starts at.
    pair_sizes: Mutex<PairSizes>,
    list_sizes: Mutex<ListSizes>,
}

enum Payload {
    Bytes(Vec<u8>),
    Batch(RecordBatch),
    Groups(Vec<(Loc, Group<'static>)>),
    Nothing,
}

struct ChunkOut {
    loc: Loc,
    payload: Payload,
    stats: Stats,
}

fn first_loc(chunk: &Chunk) -> Loc {
    match chunk {
        Chunk::Lines { first_line, .. } => Loc::Line(*first_line),
        Chunk::Elements { first_index, .. } => Loc::Record(*first_index),
        Chunk::Batch { first_row, .. } | Chunk::Columns { first_row, .. } => Loc::Row(*first_row),
        Chunk::Groups { first_index, .. } => Loc::Record(*first_index),
    }
}

/// Where a chunk's output rows go: Arrow rows, JSONL text, or only counted (dry run).
#[allow(clippy::large_enum_variant)] // one per chunk in flight
enum Rows<'a> {
    Values(Vec<Value<'a>>),
    Pairs(PairBatchBuilder<'a>),
    Lists(ListBatchBuilder<'a>),
    Jsonl(Vec<u8>),
    Counted,
}

impl<'a> Rows<'a> {
    fn push(&mut self, row: Value<'a>) {
        match self {
            Rows::Values(v) => v.push(row),
            Rows::Pairs(_) | Rows::Lists(_) => unreachable!("typed builders take pairs or lists, not rows"),
            Rows::Jsonl(buf) => {
                serde_json::to_writer(&mut *buf, &row).expect("writing to a Vec cannot fail");
                buf.push(b'\n');
            }
            Rows::Counted => {}
        }
    }
}

/// Turn one group into output rows, counting what happens to it.
fn emit<'a>(g: &Group<'a>, ctx: &Ctx, stats: &mut Stats, rows: &mut Rows<'a>) {
    stats.prompts += 1;
    stats.responses += g.responses.len() as u64;
    // Pair formats put the given chosen first and the given rejected second.
    if matches!(ctx.format, Format::Trl | Format::UltraFeedbackBinarized) && g.responses.len() == 2 {
        if let (Some(c), Some(r)) = (g.responses[0].score, g.responses[1].score) {
            stats.pairs_reordered_by_score += (r > c) as u64;
        }
    }
    match ctx.kind {
        OutputKind::Pairs => {
            let pairs = make_pairs(g, &ctx.pairs, stats);
            count_pairs(stats, &pairs);
            match rows {
                Rows::Values(_) | Rows::Lists(_) => unreachable!("Arrow pair output goes through PairBatchBuilder"),
                Rows::Pairs(b) => b.append(g, &pairs),
                Rows::Jsonl(buf) => write_pairs_jsonl(buf, g, &pairs, ctx.columns),
                Rows::Counted => {}
            }
        }
        OutputKind::Unpaired => {
            for row in unpaired_rows(g) {
                stats.rows_written += 1;
                rows.push(row);
            }
        }
        OutputKind::Grouped => {
            stats.rows_written += 1;
            rows.push(grouped_row(g));
        }
        OutputKind::Lists => {
            let Some(list) = make_list(g, &ctx.lists, stats) else { return };
            stats.rows_written += 1;
            match rows {
                Rows::Lists(b) => b.append(g, &list),
                Rows::Jsonl(buf) => write_list_jsonl(buf, g, &list, ctx.list_columns),
                Rows::Counted => {}
                Rows::Values(_) | Rows::Pairs(_) => unreachable!("Arrow list output goes through ListBatchBuilder"),
            }
        }
    }
}

/// One record as a group: the column map, then the format's reading.
fn read_record<'a>(mut record: Value<'a>, ctx: &Ctx) -> std::result::Result<Group<'a>, RecordError> {
    ctx.read.apply_column_map(&mut record);
    normalise(record, ctx.format, &ctx.read)
}

/// A size hint's lock; a hint is only ever replaced whole, so one a panicking thread held is
/// still a valid hint.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Names the lifetime of the groups a closure takes (a closure's own parameter types cannot).
fn group_sink<'a, F>(f: F) -> F
where
    F: FnMut(Loc, std::result::Result<Group<'a>, RecordError>) -> Result<()>,
{
    f
}

fn process(chunk: Chunk, ctx: &Ctx) -> Result<ChunkOut> {
    let loc = first_loc(&chunk);
    let chunk = chunk.prepare().map_err(|m| PrepError::Config(format!("{}: {m}", ctx.source)))?;
    let mut stats = Stats::default();
    let mut rows = match ctx.encoding {
        Encoding::Arrow if ctx.kind == OutputKind::Pairs => {
            Rows::Pairs(PairBatchBuilder::with_sizes(ctx.columns, *locked(&ctx.pair_sizes)))
        }
        Encoding::Arrow if ctx.kind == OutputKind::Lists => {
            Rows::Lists(ListBatchBuilder::with_sizes(ctx.list_columns, *locked(&ctx.list_sizes)))
        }
        Encoding::Arrow => Rows::Values(Vec::new()),
        Encoding::Jsonl => Rows::Jsonl(ctx.buffers.take()),
        Encoding::None => Rows::Counted,
    };
    let reader = match &chunk {
        Chunk::Columns { columns, first_row } => GroupReader::new(columns, ctx.format, &ctx.read).map(|r| (r, columns, *first_row)),
        _ => None,
    };
    // Arrow in, Arrow out: pairs and lists straight from the columns when the chunk allows.
    if let (Some((reader, columns, _)), false) = (&reader, ctx.collect_groups) {
        let n = columns.first().map_or(0, |(_, a)| a.len());
        let made = match rows {
            Rows::Lists(_) => columnar::lists_batch(reader, n, &ctx.lists, ctx.list_columns),
            Rows::Pairs(_) => columnar::pairs_batch(reader, n, &ctx.pairs, ctx.columns),
            _ => None,
        };
        if let Some((batch, stats)) = made {
            return Ok(ChunkOut { loc, payload: Payload::Batch(batch), stats });
        }
    }
    let mut groups: Vec<(Loc, Group<'static>)> = Vec::new();
    if let Chunk::Groups { groups: gs, .. } = &chunk {
        for g in gs {
            emit(g, ctx, &mut stats, &mut rows);
        }
    }
    let mut take = group_sink(|loc, group| {
        stats.rows_read += 1;
        let group = group.and_then(|g| match ctx.kind {
            OutputKind::Lists => check_labels(&g, &ctx.lists, ctx.format, &ctx.read).map(|()| g),
            _ => Ok(g),
        });
        match group {
            Err(e) => {
                let e = e.at(loc);
                if ctx.skip_invalid {
                    stats.skip(e.problem.key(), || e.describe());
                    Ok(())
                } else {
                    Err(PrepError::Record { source: ctx.source.clone(), error: e })
                }
            }
            Ok(g) if ctx.collect_groups => {
                groups.push((loc, g.into_owned()));
                Ok(())
            }
            Ok(g) => {
                emit(&g, ctx, &mut stats, &mut rows);
                Ok(())
            }
        }
    });
    if let Some((reader, columns, first_row)) = reader {
        // Rows the reader declines are read as records, for the general path's results and errors.
        let n = columns.first().map_or(0, |(_, a)| a.len());
        let mut fallback: Option<Vec<(&str, Col<'_>)>> = None;
        for i in 0..n {
            let group = match reader.group(i) {
                Some(g) => Ok(g),
                None => read_record(arrow_in::row(fallback.get_or_insert_with(|| arrow_in::columns(columns)), i), ctx),
            };
            take(Loc::Row(first_row + i as u64), group)?;
        }
    } else {
        chunk.for_each_record(|loc, parsed| take(loc, parsed.and_then(|v| read_record(v, ctx))))?;
    }
    let payload = if ctx.collect_groups {
        Payload::Groups(groups)
    } else {
        match rows {
            Rows::Counted => Payload::Nothing,
            Rows::Values(v) => Payload::Batch(rows_to_batch(&v, TYPE_HINTS)),
            Rows::Pairs(b) => {
                *locked(&ctx.pair_sizes) = b.sizes();
                Payload::Batch(b.finish())
            }
            Rows::Lists(b) => {
                *locked(&ctx.list_sizes) = b.sizes();
                Payload::Batch(b.finish())
            }
            Rows::Jsonl(buf) => Payload::Bytes(buf),
        }
    };
    if let Chunk::Lines { buf, .. } = chunk {
        ctx.buffers.give(buf);
    }
    Ok(ChunkOut { loc, payload, stats })
}

/// Find the format from the first record that parses.
fn detect(chunk: &Chunk, read: &ReadOptions, source: &str) -> Result<Option<Format>> {
    let mut found: Option<std::result::Result<Format, (Loc, String)>> = None;
    let _ = chunk.for_each_record(|loc, parsed| {
        if found.is_none() {
            if let Ok(mut v) = parsed {
                read.apply_column_map(&mut v);
                found = Some(Format::detect(&v).map_err(|m| (loc, m)));
            }
        }
        Ok(())
    });
    match found {
        None => Ok(None),
        Some(Ok(f)) => Ok(Some(f)),
        Some(Err((loc, message))) => Err(PrepError::Config(format!("{source}: {loc}: {message}"))),
    }
}

struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(enabled: bool, total: Option<u64>, unit_bytes: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::stderr());
        let template = if unit_bytes {
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}"
        } else {
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows ({per_sec}, eta {eta}) {msg}"
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        Progress { bar: Some(bar) }
    }

    fn update(&self, pos: u64, stats: &Stats) {
        if let Some(bar) = &self.bar {
            bar.set_position(pos);
            bar.set_message(format!("{} prompts, {} rows out", stats.prompts, stats.rows_written));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Run chunks through the workers and hand the results to `on_result` in input order.
fn run_chunks(
    chunks: ChunkIter,
    ctx: &Ctx,
    threads: usize,
    interrupted: InterruptCheck<'_>,
    mut on_result: impl FnMut(ChunkOut) -> Result<()>,
) -> Result<()> {
    let cancel = AtomicBool::new(false);
    crate::threads::scope(|s| {
        let (chunk_tx, chunk_rx) = bounded::<(u64, Chunk)>(threads * 2);
        let (out_tx, out_rx) = bounded::<(u64, Result<ChunkOut>)>(threads * 2);
        {
            let out_tx = out_tx.clone();
            let cancel = &cancel;
            s.spawn(move || {
                for (i, chunk) in chunks.enumerate() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let sent = match chunk {
                        Ok(c) => chunk_tx.send((i as u64, c)).is_ok(),
                        Err(e) => {
                            let _ = out_tx.send((i as u64, Err(e)));
                            false
                        }
                    };
                    if !sent {
                        break;
                    }
                }
            });
        }
        for _ in 0..threads {
            let (chunk_rx, out_tx, cancel) = (chunk_rx.clone(), out_tx.clone(), &cancel);
            s.spawn(move || {
                for (i, chunk) in chunk_rx.iter() {
                    if cancel.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = process(chunk, ctx);
                    if out_tx.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((chunk_rx, out_tx));

        let mut pending: BTreeMap<u64, Result<ChunkOut>> = BTreeMap::new();
        let mut next = 0u64;
        let outcome = loop {
            match out_rx.recv_timeout(Duration::from_millis(100)) {
                Ok((i, r)) => {
                    pending.insert(i, r);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            }
            if interrupted() {
                break Err(PrepError::Interrupted);
            }
            let mut failed = None;
            while let Some(r) = pending.remove(&next) {
                next += 1;
                if let Err(e) = r.and_then(&mut on_result) {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                break Err(e);
            }
        };
        if outcome.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        drop(out_rx); // unblocks workers still sending
        outcome
    })
}

/// Prepare preference data: read `input`, make pairs (or unpaired / grouped rows), write `output`.
///
/// Output files appear only when the whole run succeeds.
pub fn prep(input: Input, output: &Output, opts: &PrepOptions, interrupted: InterruptCheck<'_>) -> Result<PrepReport> {
    let start = Instant::now();
    let threads = resolve_threads(opts.threads);
    let encoding = output.encoding()?;
    let position = Arc::new(AtomicU64::new(0));
    // Enough for every chunk in flight (queued, in a worker, waiting to be written) to come back.
    let buffers = BufferPool::new(threads * 6 + 4);
    let (source, mut chunks, total, unit_bytes): (String, ChunkIter, Option<u64>, bool) = match input {
        Input::File(path) => {
            let meta = std::fs::metadata(&path).map_err(|e| PrepError::io(&path, e))?;
            let kind = crate::io::sniff(&path)?;
            let chunks = read_file(&path, opts.chunk_bytes, opts.batch_rows, position.clone(), buffers.clone())?;
            let (total, unit_bytes) = if kind == crate::io::FileKind::Parquet {
                let rows = parquet::file::reader::FileReader::metadata(
                    &parquet::file::serialized_reader::SerializedFileReader::new(
                        std::fs::File::open(&path).map_err(|e| PrepError::io(&path, e))?,
                    )
                    .map_err(|e| PrepError::Parquet { path: path.display().to_string(), message: e.to_string() })?,
                )
                .file_metadata()
                .num_rows() as u64;
                (Some(rows), false)
            } else {
                (Some(meta.len()), true)
            };
            (path.display().to_string(), chunks, total, unit_bytes)
        }
        Input::Batches { name, batches, total_rows } => {
            let pos = position.clone();
            let mut first_row = 0u64;
            // A big batch (a whole pyarrow Table is often one) is cut into batch_rows slices
            // (zero-copy) so that the workers share it.
            let slice_rows = opts.batch_rows.max(1);
            let chunks = batches.flat_map(move |b| -> Vec<Result<Chunk>> {
                let batch = match b {
                    Ok(batch) => batch,
                    Err(e) => return vec![Err(e)],
                };
                let n = batch.num_rows();
                let starts: Vec<usize> = if n == 0 { vec![0] } else { (0..n).step_by(slice_rows).collect() };
                starts
                    .into_iter()
                    .map(|start| {
                        let part = batch.slice(start, slice_rows.min(n - start));
                        let chunk = Chunk::Batch { first_row, batch: part };
                        first_row += slice_rows.min(n - start) as u64;
                        pos.store(first_row, Ordering::Relaxed);
                        Ok(chunk)
                    })
                    .collect()
            });
            (name, Box::new(chunks) as ChunkIter, total_rows, false)
        }
    };

    // Detect the format on the first chunk, then put it back at the front.
    let first = match chunks.next().transpose()? {
        Some(c) => Some(c.prepare().map_err(|m| PrepError::Config(format!("{source}: {m}")))?),
        None => None,
    };
    let format = match (opts.read.format, &first) {
        (Some(f), _) => f,
        (None, Some(chunk)) => detect(chunk, &opts.read, &source)?.ok_or_else(|| {
            PrepError::Config(format!("{source}: no valid record in the first chunk to detect the format from; pass --format"))
        })?,
        (None, None) => return Err(PrepError::Config(format!("{source}: input is empty"))),
    };
    let chunks: ChunkIter = Box::new(first.map(Ok).into_iter().chain(chunks));

    let kind = opts.kind.unwrap_or(if format.is_unpaired() { OutputKind::Unpaired } else { OutputKind::Pairs });
    if kind == OutputKind::Lists {
        opts.lists.validate(Some(format)).map_err(|m| PrepError::Config(format!("{source}: {m}")))?;
    }
    let group_first = opts.group_by_prompt || (format.is_unpaired() && kind != OutputKind::Unpaired);
    let ctx = Ctx {
        source: source.clone(),
        format,
        read: opts.read.clone(),
        pairs: opts.pairs.clone(),
        kind,
        columns: PairColumns::for_run(format, opts.pairs.ties),
        lists: opts.lists.clone(),
        list_columns: ListColumns::for_run(format),
        encoding,
        skip_invalid: opts.skip_invalid,
        collect_groups: group_first,
        buffers: buffers.clone(),
        pair_sizes: Mutex::default(),
        list_sizes: Mutex::default(),
    };

    let progress = Progress::new(opts.progress, total, unit_bytes);
    let mut sink = Sink::open(output, &source, threads)?;
    let mut stats = Stats::default();

    let write = |out: ChunkOut, sink: &mut Sink, stats: &mut Stats| -> Result<()> {
        stats.merge(&out.stats);
        match out.payload {
            Payload::Bytes(b) => {
                let written = sink.write_bytes(&b);
                buffers.give(b);
                written
            }
            Payload::Batch(b) => sink.write_batch(out.loc, b),
            Payload::Groups(_) | Payload::Nothing => Ok(()),
        }
    };

    if group_first {
        // Pass 1: normalise everything and merge groups by prompt id, in first-seen order.
        let mut groups: Vec<Group<'static>> = Vec::new();
        let mut index: HashMap<String, (usize, Loc)> = HashMap::new();
        run_chunks(chunks, &ctx, threads, interrupted, |out| {
            stats.merge(&out.stats);
            if let Payload::Groups(gs) = out.payload {
                for (loc, g) in gs {
                    match index.get(g.prompt_id.as_ref()) {
                        Some(&(i, _)) if groups[i].prompt == g.prompt => groups[i].responses.extend(g.responses),
                        // Same id, different prompt: merging would silently drop one prompt.
                        Some(&(_, first)) => {
                            let e = RecordError::new(
                                Problem::PromptIdConflict,
                                "prompt_id".to_string(),
                                format!(
                                    "prompt id '{}' was used at {first} for a different prompt; give each prompt its own id",
                                    g.prompt_id
                                ),
                            )
                            .at(loc);
                            if !opts.skip_invalid {
                                return Err(PrepError::Record { source: source.clone(), error: e });
                            }
                            stats.skip(e.problem.key(), || e.describe());
                        }
                        None => {
                            index.insert(g.prompt_id.to_string(), (groups.len(), loc));
                            groups.push(g);
                        }
                    }
                }
            }
            progress.update(position.load(Ordering::Relaxed), &stats);
            Ok(())
        })?;
        // Pass 2: pair the merged groups.
        let pass2 = Ctx { collect_groups: false, ..ctx };
        let per_chunk = 4096usize;
        let mut group_chunks: Vec<Result<Chunk>> = Vec::new();
        let mut it = groups.into_iter().peekable();
        let mut first_index = 0u64;
        while it.peek().is_some() {
            let part: Vec<Group<'static>> = it.by_ref().take(per_chunk).collect();
            let n = part.len() as u64;
            group_chunks.push(Ok(Chunk::Groups { groups: part, first_index }));
            first_index += n;
        }
        run_chunks(Box::new(group_chunks.into_iter()), &pass2, threads, interrupted, |out| {
            write(out, &mut sink, &mut stats)
        })?;
    } else {
        run_chunks(chunks, &ctx, threads, interrupted, |out| {
            write(out, &mut sink, &mut stats)?;
            progress.update(position.load(Ordering::Relaxed), &stats);
            Ok(())
        })?;
    }
    progress.finish();
    if kind == OutputKind::Lists {
        stats.lists.get_or_insert_with(Default::default); // reported even when no list was made
    }
    let (batches, schema) = sink.finish(|| Arc::new(Schema::empty()))?;
    Ok(PrepReport { stats, format, kind, threads, seconds: start.elapsed().as_secs_f64(), batches, schema })
}
