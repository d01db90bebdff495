//! A Parquet file writer that encodes the columns of each batch on several threads.
//!
//! `ArrowWriter` encodes and compresses every column on the thread that calls it, and in a
//! prep run that is the one thread that writes results in order: with Parquet output it was
//! the bottleneck (best_vs_each, 250k prompts: 1.8 s with 1 worker thread and with 3, against
//! 0.9 s for the same run writing JSONL). Here each batch's columns are handed out, largest
//! first, to encoder threads that live as long as the writer (and to the calling thread), so
//! that the text columns are compressed side by side. The file is
//! the one `ArrowWriter` would write, byte for byte: the same column writers get the same
//! slices in the same order, and row groups are cut at the same rows.

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

use arrow_array::{Array, RecordBatch};
use arrow_schema::SchemaRef;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnWriter, ArrowLeafColumn, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::errors::Result;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

/// Batches smaller than this are encoded on the calling thread: starting threads would cost
/// more than it saves.
const PARALLEL_MIN_ROWS: usize = 2048;

pub struct ParallelParquetWriter {
    file: SerializedFileWriter<File>,
    factory: ArrowRowGroupWriterFactory,
    schema: SchemaRef,
    /// Column writers of the row group being filled, and its rows so far.
    in_progress: Option<(Vec<ArrowColumnWriter>, usize)>,
    row_group_rows: usize,
    /// None with one thread: everything is encoded on the caller's thread.
    encoders: Option<Encoders>,
}

impl ParallelParquetWriter {
    pub fn try_new(file: File, schema: SchemaRef, props: WriterProperties, threads: usize) -> Result<Self> {
        let row_group_rows = props.max_row_group_row_count().unwrap_or(usize::MAX).max(1);
        // Going through ArrowWriter gives the file the Arrow schema metadata it would write.
        let (file, factory) = ArrowWriter::try_new(file, schema.clone(), Some(props))?.into_serialized_writer()?;
        let encoders = (threads > 1).then(|| Encoders::new(threads - 1));
        Ok(ParallelParquetWriter { file, factory, schema, in_progress: None, row_group_rows, encoders })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut rest = batch.clone();
        while rest.num_rows() > 0 {
            let (writers, rows) = match &mut self.in_progress {
                Some(open) => open,
                none => none.insert((self.factory.create_column_writers(self.file.flushed_row_groups().len())?, 0)),
            };
            let take = (self.row_group_rows - *rows).min(rest.num_rows());
            let part = rest.slice(0, take);
            rest = rest.slice(take, rest.num_rows() - take);
            encode(&self.schema, writers, &part, self.encoders.as_ref())?;
            *rows += take;
            if *rows >= self.row_group_rows {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let Some((writers, _)) = self.in_progress.take() else { return Ok(()) };
        let mut row_group = self.file.next_row_group()?;
        for writer in writers {
            writer.close()?.append_to_row_group(&mut row_group)?;
        }
        row_group.close()?;
        Ok(())
    }

    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        self.file.close()?;
        Ok(())
    }
}

/// A column write handed to an encoder thread: its position, the writer and the leaf.
type Job = (usize, ArrowColumnWriter, ArrowLeafColumn);
/// The writer back from the encoder thread, with the outcome (a panic is carried back whole).
type Done = (usize, ArrowColumnWriter, std::thread::Result<Result<()>>);

/// Encoder threads that live as long as the writer. Threads started per batch cost more than
/// their start: each new thread gets a fresh allocator heap, so every batch's page buffers
/// landed in fresh memory that the kernel had to fault in and zero (Parquet -> Parquet
/// best_vs_each, 250k prompts: 22.8k page faults and 0.75 s of system time per run).
struct Encoders {
    jobs: Option<Sender<Job>>,
    queue: Receiver<Job>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
}

fn run_job((i, mut writer, leaf): Job) -> Done {
    let outcome = catch_unwind(AssertUnwindSafe(|| writer.write(&leaf)));
    (i, writer, outcome)
}

impl Encoders {
    /// `helpers` threads besides the caller, which works too while it waits.
    fn new(helpers: usize) -> Encoders {
        let (job_tx, job_rx) = unbounded::<Job>();
        let (done_tx, done_rx) = unbounded::<Done>();
        let threads = (0..helpers)
            .map(|_| {
                let (jobs, done) = (job_rx.clone(), done_tx.clone());
                std::thread::spawn(move || {
                    for job in jobs.iter() {
                        if done.send(run_job(job)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Encoders { jobs: Some(job_tx), queue: job_rx, done: done_rx, threads }
    }

    /// Run every job; the writers come back in job-index order, with the first error.
    fn run(&self, jobs: Vec<Job>) -> (Vec<ArrowColumnWriter>, Result<()>) {
        let n = jobs.len();
        let sender = self.jobs.as_ref().expect("encoder queue open until drop");
        for job in jobs {
            sender.send(job).expect("the queue's receiver lives in self");
        }
        let mut finished = Vec::with_capacity(n);
        while let Ok(job) = self.queue.try_recv() {
            finished.push(run_job(job));
        }
        while finished.len() < n {
            finished.push(self.done.recv().expect("encoder threads send back every job"));
        }
        finished.sort_unstable_by_key(|(i, _, _)| *i);
        let mut first_error = None;
        let writers = finished
            .into_iter()
            .map(|(_, writer, outcome)| {
                match outcome {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(Err(e)) if first_error.is_none() => first_error = Some(e),
                    Ok(_) => {}
                }
                writer
            })
            .collect();
        (writers, first_error.map_or(Ok(()), Err))
    }
}

impl Drop for Encoders {
    fn drop(&mut self) {
        self.jobs = None; // ends the threads' loops
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Feed one batch to the row group's column writers (one per Parquet leaf column).
fn encode(schema: &SchemaRef, writers: &mut Vec<ArrowColumnWriter>, batch: &RecordBatch, encoders: Option<&Encoders>) -> Result<()> {
    let mut leaves: Vec<(usize, ArrowLeafColumn)> = Vec::with_capacity(writers.len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let size = column.get_array_memory_size();
        for leaf in compute_leaves(field, column)? {
            leaves.push((size, leaf));
        }
    }
    assert_eq!(leaves.len(), writers.len(), "one column writer per leaf");
    let encoders = match encoders {
        Some(e) if batch.num_rows() >= PARALLEL_MIN_ROWS => e,
        _ => {
            for (writer, (_, leaf)) in writers.iter_mut().zip(&leaves) {
                writer.write(leaf)?;
            }
            return Ok(());
        }
    };
    // Largest first, so that the text columns start side by side.
    let mut jobs: Vec<(usize, Job)> =
        writers.drain(..).zip(leaves).enumerate().map(|(i, (w, (size, leaf)))| (size, (i, w, leaf))).collect();
    jobs.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let (back, outcome) = encoders.run(jobs.into_iter().map(|(_, job)| job).collect());
    writers.extend(back);
    outcome
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray, StructArray};
    use arrow_schema::{DataType, Field};

    use super::*;

    fn batch(start: usize, rows: usize) -> RecordBatch {
        let text: StringArray =
            (start..start + rows).map(|i| (i % 7 != 0).then(|| format!("text {i} {}", "x".repeat(i % 50)))).collect();
        let score: Float64Array = (start..start + rows).map(|i| (i % 5 != 0).then_some(i as f64 / 3.0)).collect();
        let mut models = ListBuilder::new(StringBuilder::new());
        for i in start..start + rows {
            for j in 0..i % 4 {
                models.values().append_value(format!("m{}", (i + j) % 9));
            }
            models.append(i % 11 != 0);
        }
        let ids: Int64Array = (start..start + rows).map(|i| i as i64).collect();
        let nested = StructArray::from(vec![
            (Arc::new(Field::new("id", DataType::Int64, true)), Arc::new(ids) as ArrayRef),
            (Arc::new(Field::new("score", DataType::Float64, true)), Arc::new(score.clone()) as ArrayRef),
        ]);
        RecordBatch::try_from_iter(vec![
            ("text", Arc::new(text) as ArrayRef),
            ("score", Arc::new(score) as ArrayRef),
            ("models", Arc::new(models.finish()) as ArrayRef),
            ("nested", Arc::new(nested) as ArrayRef),
        ])
        .unwrap()
    }

    /// Batch sizes on both sides of PARALLEL_MIN_ROWS, cut across row groups of 5,000 rows.
    #[test]
    fn writes_the_bytes_arrow_writer_writes_for_any_thread_count() {
        let sizes = [3000, 7000, 100, 4999, 1, 12000, 2500];
        let mut batches = Vec::new();
        let mut start = 0;
        for n in sizes {
            batches.push(batch(start, n));
            start += n;
        }
        let schema: SchemaRef = batches[0].schema();
        let props = || WriterProperties::builder().set_max_row_group_row_count(Some(5000)).build();
        let dir = tempfile::tempdir().unwrap();

        let expected_path = dir.path().join("arrow_writer.parquet");
        let mut w = ArrowWriter::try_new(File::create(&expected_path).unwrap(), schema.clone(), Some(props())).unwrap();
        for b in &batches {
            w.write(b).unwrap();
        }
        w.close().unwrap();
        let expected = std::fs::read(&expected_path).unwrap();

        for threads in [1, 2, 3, 8] {
            let path = dir.path().join(format!("parallel_{threads}.parquet"));
            let mut w = ParallelParquetWriter::try_new(File::create(&path).unwrap(), schema.clone(), props(), threads).unwrap();
            for b in &batches {
                w.write(b).unwrap();
            }
            w.close().unwrap();
            assert!(std::fs::read(&path).unwrap() == expected, "{threads} threads: the file differs from ArrowWriter's");
        }
    }
}
