//! k-nearest-neighbour distances among the rows of an [N, D] f32 matrix (every row against
//! all the others, itself excluded), exact or through an IVF index, and the
//! Kozachenko–Leonenko entropy estimator built on them.
//!
//! Both searches work in two phases:
//!
//! 1. **Shortlist**: dot products in f32 by a GEMM over tiles of [`BLOCK`] × [`BLOCK`] rows,
//!    turned into a ranking key per (query, candidate) (L2: ‖y‖² − 2·x·y; cosine:
//!    −x·y/‖y‖; terms that depend on the query alone are left out), keeping the best
//!    `shortlist_len(k)` = 2k + 8 candidates of every query ordered by (key, index).
//! 2. **Refine**: the shortlisted distances recomputed in f64 straight from the rows
//!    (L2: √Σ(x−y)²; cosine: ½‖x/‖x‖ − y/‖y‖‖² = 1 − cos), sorted by (distance, index), the
//!    first k kept. So duplicates come out at distance exactly 0 (the ‖x‖² trick alone would
//!    leave f32 rounding noise), and the reported distances do not carry the GEMM's error.
//!
//! Determinism: the tiles are fixed by N alone and each tile is computed once by one thread;
//! a shortlist is the first entries of its candidates under a total order, which does not
//! depend on the order in which tiles arrive. So the result is the same for any thread count.
//! The exact search computes each pair of blocks once (tiles (I, J) with J ≥ I), feeding both
//! blocks' shortlists: half the GEMM work of a plain X·Xᵀ.

pub mod entropy;
pub mod ivf;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, FixedSizeListArray};
use arrow_schema::DataType;

use crate::error::{PrepError, Result};

/// Rows per tile side (queries and candidates).
pub const BLOCK: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// 1 − cos(x, y), in [0, 2]. Rows must not be all zeros.
    Cosine,
    /// Euclidean distance ‖x − y‖.
    L2,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "l2" | "euclidean" => Ok(Metric::L2),
            _ => Err(format!("unknown kNN metric '{s}'; expected cosine or l2")),
        }
    }
}

/// IVF index settings (0 = automatic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IvfOptions {
    /// Coarse clusters; automatic: round(4·√N).
    pub nlist: usize,
    /// Clusters searched per query; automatic: min(nlist, 16).
    pub nprobe: usize,
    /// Seeds the k-means training sample and its initial centroids.
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// Every row against every row.
    Exact,
    /// Seeded k-means coarse quantiser; each query searches the rows of its `nprobe` nearest
    /// clusters. Approximate: a true neighbour in an unprobed cluster is missed.
    Ivf(IvfOptions),
}

impl Search {
    pub fn name(&self) -> &'static str {
        match self {
            Search::Exact => "exact",
            Search::Ivf(_) => "ivf",
        }
    }
}

#[derive(Debug, Clone)]
pub struct KnnOptions {
    pub k: usize,
    pub metric: Metric,
    pub search: Search,
    /// 0 = $PREFOPS_NUM_THREADS, else the number of CPUs.
    pub threads: usize,
}

/// An [rows, dim] row-major matrix.
#[derive(Debug, Clone)]
pub struct Matrix<'a> {
    pub data: Cow<'a, [f32]>,
    pub rows: usize,
    pub dim: usize,
}

impl<'a> Matrix<'a> {
    pub fn new(data: impl Into<Cow<'a, [f32]>>, rows: usize, dim: usize) -> Result<Matrix<'a>> {
        let data = data.into();
        if dim == 0 {
            return Err(PrepError::Config("embeddings must have at least one dimension".into()));
        }
        if rows.checked_mul(dim) != Some(data.len()) {
            return Err(PrepError::Config(format!(
                "internal: a {rows} x {dim} matrix needs {} values, got {}",
                rows.saturating_mul(dim),
                data.len()
            )));
        }
        if rows > u32::MAX as usize {
            return Err(PrepError::Config(format!("{rows} rows: at most 2^32 - 1 rows are supported")));
        }
        Ok(Matrix { data, rows, dim })
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// A matrix from an Arrow fixed-size list of float32 without nulls (zero-copy), or any
    /// list / fixed-size list of numbers (copied, cast to f32; all rows the same length).
    pub fn from_arrow(array: &'a dyn Array) -> Result<Matrix<'a>> {
        if let DataType::FixedSizeList(child, dim) = array.data_type() {
            if child.data_type() == &DataType::Float32 && array.logical_null_count() == 0 {
                let list: &FixedSizeListArray = array.as_fixed_size_list();
                let values = list.values().as_primitive::<Float32Type>();
                if values.null_count() == 0 && *dim > 0 {
                    let start = list.value_offset(0) as usize;
                    let end = start + list.len() * *dim as usize;
                    return Matrix::new(&values.values()[start..end], list.len(), *dim as usize);
                }
            }
        }
        let (data, dim) = flatten_rows(array, 0).map_err(|(row, message)| {
            PrepError::Config(format!("matrix row {row}: {message}"))
        })?;
        Matrix::new(data, array.len(), dim)
    }
}

/// All rows of a list column flattened to f32, with their common length. Errors name the row
/// (counted from `first_row`) and say what is wrong.
pub fn flatten_rows(array: &dyn Array, first_row: usize) -> std::result::Result<(Vec<f32>, usize), (usize, String)> {
    let (values, offsets): (arrow_array::ArrayRef, Vec<(usize, usize)>) = match array.data_type() {
        DataType::FixedSizeList(_, d) => {
            let l = array.as_fixed_size_list();
            let d = *d as usize;
            (l.values().clone(), (0..l.len()).map(|i| (l.value_offset(i) as usize, d)).collect())
        }
        DataType::List(_) => {
            let l = array.as_list::<i32>();
            let o = l.value_offsets();
            (l.values().clone(), (0..l.len()).map(|i| (o[i] as usize, (o[i + 1] - o[i]) as usize)).collect())
        }
        DataType::LargeList(_) => {
            let l = array.as_list::<i64>();
            let o = l.value_offsets();
            (l.values().clone(), (0..l.len()).map(|i| (o[i] as usize, (o[i + 1] - o[i]) as usize)).collect())
        }
        other => {
            return Err((first_row, format!("an embedding must be a list of numbers, the column is {other}")));
        }
    };
    if !values.data_type().is_numeric() {
        return Err((first_row, format!("an embedding must be a list of numbers, got a list of {}", values.data_type())));
    }
    let cast = arrow_cast::cast(&values, &DataType::Float32).map_err(|e| (first_row, e.to_string()))?;
    let floats = cast.as_primitive::<Float32Type>();
    let dim = offsets.first().map_or(0, |o| o.1);
    let mut out = Vec::with_capacity(offsets.len() * dim);
    for (i, &(start, len)) in offsets.iter().enumerate() {
        let row = first_row + i;
        if array.is_null(i) {
            return Err((row, "no embedding (null)".into()));
        }
        if len != dim {
            return Err((row, format!("embedding has {len} values, earlier rows have {dim}")));
        }
        if let Some(j) = (start..start + len).find(|&j| floats.is_null(j)) {
            return Err((row, format!("embedding has a null at position {}", j - start)));
        }
        out.extend_from_slice(&floats.values()[start..start + len]);
    }
    if dim == 0 && !offsets.is_empty() {
        return Err((first_row, "embedding is empty (0 values)".into()));
    }
    Ok((out, dim))
}

/// The first row the metric cannot use, and why: a NaN or infinite value, a squared norm that
/// overflows f32, or (cosine) a zero row.
pub fn find_bad_row(m: &Matrix, metric: Metric) -> Option<(usize, String)> {
    for i in 0..m.rows {
        let row = m.row(i);
        if let Some(j) = row.iter().position(|x| !x.is_finite()) {
            return Some((i, format!("embedding value {} at position {j} is not finite", row[j])));
        }
        let sq: f64 = row.iter().map(|&x| x as f64 * x as f64).sum();
        if !((4.0 * sq) as f32).is_finite() {
            return Some((i, "embedding values are too large for float32 dot products".into()));
        }
        if metric == Metric::Cosine && sq == 0.0 {
            return Some((i, "embedding is all zeros: the cosine distance is undefined".into()));
        }
    }
    None
}

/// Rows identical (bit for bit) to an earlier row.
pub fn duplicate_rows(m: &Matrix) -> usize {
    use std::collections::HashMap;
    let mut seen: HashMap<u64, Vec<usize>, xxhash_rust::xxh3::Xxh3Builder> =
        HashMap::with_hasher(xxhash_rust::xxh3::Xxh3Builder::new());
    let mut dups = 0;
    for i in 0..m.rows {
        let bytes: Vec<u8> = m.row(i).iter().flat_map(|x| (*x + 0.0).to_bits().to_le_bytes()).collect();
        let h = xxhash_rust::xxh3::xxh3_64(&bytes);
        let same = seen.entry(h).or_default();
        if same.iter().any(|&j| m.row(j).iter().zip(m.row(i)).all(|(a, b)| a == b)) {
            dups += 1;
        } else {
            same.push(i);
        }
    }
    dups
}

/// Shortlist length for k neighbours: room for candidates that f32 rounding ranks too low.
pub fn shortlist_len(k: usize) -> usize {
    2 * k + 8
}

/// The k nearest neighbours of every row, nearest first: `distances[i * k + j]` and
/// `indices[i * k + j]` for row i.
#[derive(Debug, Clone)]
pub struct Neighbors {
    pub k: usize,
    pub distances: Vec<f64>,
    pub indices: Vec<u32>,
    pub info: SearchInfo,
}

impl Neighbors {
    /// Distance from every row to its k-th nearest neighbour.
    pub fn radius(&self) -> Vec<f64> {
        self.distances.chunks(self.k).map(|c| c[self.k - 1]).collect()
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct SearchInfo {
    pub mode: &'static str,
    pub metric: &'static str,
    pub k: usize,
    pub rows: usize,
    pub dim: usize,
    pub nlist: Option<usize>,
    pub nprobe: Option<usize>,
    /// IVF: queries whose probed clusters held fewer than k other rows, searched exactly.
    pub exact_fallbacks: usize,
}

/// Ranking data of the rows: squared norms (L2) or inverse norms (cosine).
pub(crate) struct Norms {
    pub metric: Metric,
    pub sq: Vec<f32>,
    pub inv: Vec<f32>,
    pub inv64: Vec<f64>,
}

impl Norms {
    pub fn new(m: &Matrix, metric: Metric) -> Norms {
        let sq64: Vec<f64> = (0..m.rows).map(|i| m.row(i).iter().map(|&x| x as f64 * x as f64).sum()).collect();
        let inv64: Vec<f64> = sq64.iter().map(|s| 1.0 / s.sqrt()).collect();
        Norms {
            metric,
            sq: sq64.iter().map(|&s| s as f32).collect(),
            inv: inv64.iter().map(|&s| s as f32).collect(),
            inv64,
        }
    }

    /// Ranking key of candidate `j` for a query with dot product `dot` (smaller = nearer).
    #[inline(always)]
    pub fn key(&self, dot: f32, j: usize) -> f32 {
        match self.metric {
            Metric::L2 => self.sq[j] - 2.0 * dot,
            Metric::Cosine => -dot * self.inv[j],
        }
    }

    /// The distance in f64 from the rows themselves.
    pub fn exact(&self, m: &Matrix, q: usize, j: usize) -> f64 {
        let (x, y) = (m.row(q), m.row(j));
        match self.metric {
            Metric::L2 => x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>().sqrt(),
            Metric::Cosine => {
                let (sx, sy) = (self.inv64[q], self.inv64[j]);
                0.5 * x.iter().zip(y).map(|(&a, &b)| (a as f64 * sx - b as f64 * sy).powi(2)).sum::<f64>()
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Cand {
    pub key: f32,
    pub idx: u32,
}

#[inline(always)]
fn before(a: Cand, b: Cand) -> bool {
    match a.key.total_cmp(&b.key) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => a.idx < b.idx,
    }
}

/// The best `cap` candidates of each of `rows` queries, sorted by (key, index).
pub(crate) struct Shortlists {
    cap: usize,
    entries: Vec<Cand>,
    lens: Vec<u32>,
}

impl Shortlists {
    pub fn new(rows: usize, cap: usize) -> Shortlists {
        Shortlists { cap, entries: vec![Cand { key: 0.0, idx: 0 }; rows * cap], lens: vec![0; rows] }
    }

    pub fn len(&self, r: usize) -> usize {
        self.lens[r] as usize
    }

    pub fn get(&self, r: usize) -> &[Cand] {
        &self.entries[r * self.cap..r * self.cap + self.len(r)]
    }

    /// Keys above this cannot enter row r's list.
    #[inline(always)]
    pub fn threshold(&self, r: usize) -> f32 {
        if (self.lens[r] as usize) < self.cap {
            f32::INFINITY
        } else {
            self.entries[r * self.cap + self.cap - 1].key
        }
    }

    pub fn clear(&mut self, r: usize) {
        self.lens[r] = 0;
    }

    pub fn offer(&mut self, r: usize, c: Cand) {
        let cap = self.cap;
        let len = self.lens[r] as usize;
        let list = &mut self.entries[r * cap..(r + 1) * cap];
        if len == cap && !before(c, list[cap - 1]) {
            return;
        }
        let end = len.min(cap - 1);
        let pos = list[..end].partition_point(|&e| before(e, c));
        list.copy_within(pos..end, pos + 1);
        list[pos] = c;
        if len < cap {
            self.lens[r] += 1;
        }
    }
}

/// Shortlists of all rows in blocks of [`BLOCK`] rows, each behind its own lock.
pub(crate) struct BlockLists {
    pub blocks: Vec<Mutex<Shortlists>>,
}

impl BlockLists {
    pub fn new(rows: usize, cap: usize) -> BlockLists {
        let blocks = (0..rows.div_ceil(BLOCK))
            .map(|b| Mutex::new(Shortlists::new(BLOCK.min(rows - b * BLOCK), cap)))
            .collect();
        BlockLists { blocks }
    }
}

/// C[a × b] = rows `a0..a0+a` of `x` times rows `b0..b0+b` transposed (f32, one thread).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_tile(x: &[f32], dim: usize, a0: usize, a: usize, y: &[f32], b0: usize, b: usize, out: &mut [f32]) {
    debug_assert!(out.len() >= a * b);
    // SAFETY: the pointers and strides describe slices of the given lengths: x holds rows
    // a0..a0+a and y rows b0..b0+b of `dim` values each, out holds a*b values.
    assert!(x.len() >= (a0 + a) * dim && y.len() >= (b0 + b) * dim && out.len() >= a * b);
    unsafe {
        matrixmultiply::sgemm(
            a,
            dim,
            b,
            1.0,
            x.as_ptr().add(a0 * dim),
            dim as isize,
            1,
            y.as_ptr().add(b0 * dim),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            b as isize,
            1,
        );
    }
}

/// Scratch buffers of one call: a task takes one (or a new one) and gives it back, so a call
/// makes at most one per thread and frees them all as it ends. (Thread-locals would stay with
/// the worker threads, which are kept for the life of the process.)
#[derive(Default)]
pub(crate) struct Scratch<T>(Mutex<Vec<T>>);

impl<T: Default> Scratch<T> {
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut buffer = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        let r = f(&mut buffer);
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(buffer);
        r
    }
}

/// Run `work(i)` for i in 0..n on `threads` threads (dynamic scheduling).
pub(crate) fn for_each_index(n: usize, threads: usize, work: impl Fn(usize) + Sync) {
    if threads <= 1 || n <= 1 {
        (0..n).for_each(work);
        return;
    }
    let next = AtomicUsize::new(0);
    crate::threads::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                work(i);
            });
        }
    });
}

/// Tiles (I, J ≥ I) of `nb` blocks, in rounds whose tiles touch disjoint blocks (the
/// diagonal, then a round-robin tournament), so that threads working through the list in
/// order rarely wait for the same block's lock.
fn tile_schedule(nb: usize) -> Vec<(usize, usize)> {
    let mut tiles: Vec<(usize, usize)> = (0..nb).map(|i| (i, i)).collect();
    let m = nb + nb % 2; // with an idle "bye" block when nb is odd
    for round in 0..m.saturating_sub(1) {
        for p in 0..m / 2 {
            let a = if p == 0 { m - 1 } else { (round + p) % (m - 1) };
            let b = (round + m - 1 - p) % (m - 1);
            if a < nb && b < nb {
                tiles.push((a.min(b), a.max(b)));
            }
        }
    }
    tiles
}

/// Chunk width of the scans: a whole chunk is tested at once (vectorised), and only a chunk
/// holding a key under the threshold is looked at entry by entry.
const SCAN_CHUNK: usize = 16;

/// Offer row `r` the candidates `j0 + t` of one tile row (skipping `skip`, the query itself).
#[inline(always)]
fn scan_row(dots: &[f32], j0: usize, skip: usize, list: &mut Shortlists, r: usize, key: impl Fn(f32, usize) -> f32) {
    let mut thr = list.threshold(r);
    for (c, chunk) in dots.chunks(SCAN_CHUNK).enumerate() {
        let base = j0 + c * SCAN_CHUNK;
        let mut hit = false;
        for (t, &dot) in chunk.iter().enumerate() {
            hit |= key(dot, base + t) <= thr;
        }
        if hit {
            for (t, &dot) in chunk.iter().enumerate() {
                let (j, k) = (base + t, key(dot, base + t));
                if k <= thr && j != skip {
                    list.offer(r, Cand { key: k, idx: j as u32 });
                    thr = list.threshold(r);
                }
            }
        }
    }
}

/// Offer the rows of block J (the tile's columns) candidate `i` with key `key(dot)`.
#[inline(always)]
fn scan_column(dots: &[f32], i: usize, thr: &mut [f32], list: &mut Shortlists, key: impl Fn(f32) -> f32) {
    for (c, chunk) in dots.chunks(SCAN_CHUNK).enumerate() {
        let tc = &thr[c * SCAN_CHUNK..c * SCAN_CHUNK + chunk.len()];
        let mut hit = false;
        for (&dot, &t) in chunk.iter().zip(tc) {
            hit |= key(dot) <= t;
        }
        if hit {
            for (t, &dot) in chunk.iter().enumerate() {
                let b = c * SCAN_CHUNK + t;
                let k = key(dot);
                if k <= thr[b] {
                    list.offer(b, Cand { key: k, idx: i as u32 });
                    thr[b] = list.threshold(b);
                }
            }
        }
    }
}

/// Exact shortlists: every tile (I, J ≥ I) once, feeding block I's rows and block J's rows.
fn exact_shortlists(m: &Matrix, norms: &Norms, cap: usize, threads: usize) -> BlockLists {
    let n = m.rows;
    let lists = BlockLists::new(n, cap);
    let tiles = tile_schedule(n.div_ceil(BLOCK));
    let data: &[f32] = &m.data;
    let (sq, inv) = (&norms.sq[..], &norms.inv[..]);
    let scratch: Scratch<Vec<f32>> = Scratch::default();
    for_each_index(tiles.len(), threads, |t| {
        let (bi, bj) = tiles[t];
        let (i0, j0) = (bi * BLOCK, bj * BLOCK);
        let (ni, nj) = (BLOCK.min(n - i0), BLOCK.min(n - j0));
        scratch.with(|tile| {
            tile.resize(BLOCK * BLOCK, 0.0);
            dot_tile(data, m.dim, i0, ni, data, j0, nj, tile);
            {
                let mut rows = lists.blocks[bi].lock().expect("no thread panics holding a shortlist");
                for a in 0..ni {
                    let dots = &tile[a * nj..(a + 1) * nj];
                    match norms.metric {
                        Metric::L2 => scan_row(dots, j0, i0 + a, &mut rows, a, |d, j| sq[j] - 2.0 * d),
                        Metric::Cosine => scan_row(dots, j0, i0 + a, &mut rows, a, |d, j| -d * inv[j]),
                    }
                }
            }
            if bj != bi {
                let mut cols = lists.blocks[bj].lock().expect("no thread panics holding a shortlist");
                let mut thr: Vec<f32> = (0..nj).map(|b| cols.threshold(b)).collect();
                for a in 0..ni {
                    let i = i0 + a;
                    let dots = &tile[a * nj..(a + 1) * nj];
                    match norms.metric {
                        Metric::L2 => scan_column(dots, i, &mut thr, &mut cols, |d| sq[i] - 2.0 * d),
                        Metric::Cosine => scan_column(dots, i, &mut thr, &mut cols, |d| -d * inv[i]),
                    }
                }
            }
        });
    });
    lists
}

/// Exact f64 distances of each row's shortlist, sorted by (distance, index); the first k.
fn refine(m: &Matrix, norms: &Norms, lists: BlockLists, k: usize, threads: usize) -> (Vec<f64>, Vec<u32>) {
    let blocks: Vec<Shortlists> =
        lists.blocks.into_iter().map(|b| b.into_inner().expect("no thread panicked holding a shortlist")).collect();
    let parts: Vec<Mutex<(Vec<f64>, Vec<u32>)>> = blocks.iter().map(|_| Mutex::new((Vec::new(), Vec::new()))).collect();
    for_each_index(blocks.len(), threads, |b| {
        let lists = &blocks[b];
        let rows = lists.lens.len();
        let (mut dist, mut idx) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
        let mut exact: Vec<(f64, u32)> = Vec::new();
        for r in 0..rows {
            let q = b * BLOCK + r;
            exact.clear();
            exact.extend(lists.get(r).iter().map(|c| (norms.exact(m, q, c.idx as usize), c.idx)));
            exact.sort_unstable_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            debug_assert!(exact.len() >= k);
            for &(d, j) in &exact[..k] {
                dist.push(d);
                idx.push(j);
            }
        }
        *parts[b].lock().expect("no thread panicked") = (dist, idx);
    });
    let (mut dist, mut idx) = (Vec::with_capacity(m.rows * k), Vec::with_capacity(m.rows * k));
    for p in parts {
        let (d, i) = p.into_inner().expect("no thread panicked");
        dist.extend(d);
        idx.extend(i);
    }
    (dist, idx)
}

/// The k nearest neighbours of every row among the other rows.
pub fn knn(m: &Matrix, opts: &KnnOptions) -> Result<Neighbors> {
    let k = opts.k;
    if k == 0 {
        return Err(PrepError::Config("k must be at least 1".into()));
    }
    if m.rows < k + 1 {
        return Err(PrepError::Config(format!(
            "k = {k} nearest neighbours need at least {} rows (each row's neighbours are the other rows), got {}",
            k + 1,
            m.rows
        )));
    }
    if let Some((row, message)) = find_bad_row(m, opts.metric) {
        return Err(PrepError::Config(format!("row {row}: {message}")));
    }
    let threads = crate::pipeline::resolve_threads(opts.threads);
    let norms = Norms::new(m, opts.metric);
    let cap = shortlist_len(k).min(m.rows - 1);
    let mut info = SearchInfo {
        mode: opts.search.name(),
        metric: opts.metric.name(),
        k,
        rows: m.rows,
        dim: m.dim,
        ..Default::default()
    };
    let lists = match opts.search {
        Search::Exact => exact_shortlists(m, &norms, cap, threads),
        Search::Ivf(ivf) => ivf::shortlists(m, &norms, cap, k, &ivf, threads, &mut info),
    };
    let (distances, indices) = refine(m, &norms, lists, k, threads);
    Ok(Neighbors { k, distances, indices, info })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut r = crate::rng::SplitMix64::new(seed);
        (0..rows * dim).map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect()
    }

    fn brute(m: &Matrix, metric: Metric, k: usize) -> Vec<Vec<(f64, u32)>> {
        let norms = Norms::new(m, metric);
        (0..m.rows)
            .map(|q| {
                let mut d: Vec<(f64, u32)> =
                    (0..m.rows).filter(|&j| j != q).map(|j| (norms.exact(m, q, j), j as u32)).collect();
                d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                d.truncate(k);
                d
            })
            .collect()
    }

    #[test]
    fn tile_schedule_covers_every_pair_once_in_disjoint_rounds() {
        for nb in 0..12 {
            let tiles = tile_schedule(nb);
            let mut all: Vec<(usize, usize)> = tiles.clone();
            all.sort();
            let want: Vec<(usize, usize)> = (0..nb).flat_map(|i| (i..nb).map(move |j| (i, j))).collect();
            assert_eq!(all, want, "nb = {nb}");
            // After the diagonal, each run of nb/2 tiles (one round) touches distinct blocks.
            for round in tiles[nb..].chunks((nb / 2).max(1)) {
                let mut blocks: Vec<usize> = round.iter().flat_map(|&(a, b)| [a, b]).collect();
                blocks.sort();
                blocks.dedup();
                assert_eq!(blocks.len(), 2 * round.len(), "nb = {nb}: {round:?}");
            }
        }
    }

    #[test]
    fn shortlist_keeps_the_best_in_order() {
        let mut s = Shortlists::new(1, 3);
        for (key, idx) in [(5.0, 0), (1.0, 1), (3.0, 2), (1.0, 0), (0.5, 9), (3.0, 1), (7.0, 4)] {
            s.offer(0, Cand { key, idx });
        }
        let got: Vec<(f32, u32)> = s.get(0).iter().map(|c| (c.key, c.idx)).collect();
        assert_eq!(got, [(0.5, 9), (1.0, 0), (1.0, 1)]);
        assert_eq!(s.threshold(0), 1.0);
    }

    #[test]
    fn exact_matches_brute_force_across_blocks_and_threads() {
        // More rows than one block, a dimension that is no multiple of the GEMM kernel.
        let (rows, dim, k) = (BLOCK + 300, 13, 4);
        let mut data = random_matrix(rows, dim, 1);
        // Exact duplicates: distance 0, whatever the f32 rounding of the GEMM.
        let dup: Vec<f32> = data[5 * dim..6 * dim].to_vec();
        data[(BLOCK + 7) * dim..(BLOCK + 8) * dim].copy_from_slice(&dup);
        let m = Matrix::new(data, rows, dim).unwrap();
        for metric in [Metric::L2, Metric::Cosine] {
            let want = brute(&m, metric, k);
            let mut first: Option<Neighbors> = None;
            for threads in [1, 3] {
                let got = knn(&m, &KnnOptions { k, metric, search: Search::Exact, threads }).unwrap();
                for (q, want_q) in want.iter().enumerate().take(rows) {
                    for (j, &(d, _)) in want_q.iter().enumerate() {
                        let g = got.distances[q * k + j];
                        assert!((g - d).abs() <= 1e-12 * d.max(1.0), "{metric} row {q} #{j}: {g} vs {d}");
                    }
                }
                assert_eq!(got.distances[5 * k], 0.0);
                assert_eq!(got.indices[5 * k], (BLOCK + 7) as u32);
                if let Some(f) = &first {
                    assert_eq!(f.distances, got.distances);
                    assert_eq!(f.indices, got.indices);
                } else {
                    first = Some(got);
                }
            }
        }
        assert_eq!(duplicate_rows(&m), 1);
    }

    #[test]
    fn bad_input_is_reported() {
        let m = Matrix::new(vec![0.0f32, 1.0, 0.0, 0.0, 2.0, 2.0], 3, 2).unwrap();
        let e = knn(&m, &KnnOptions { k: 1, metric: Metric::Cosine, search: Search::Exact, threads: 1 }).unwrap_err();
        assert_eq!(e.to_string(), "row 1: embedding is all zeros: the cosine distance is undefined");
        let e = knn(&m, &KnnOptions { k: 3, metric: Metric::L2, search: Search::Exact, threads: 1 }).unwrap_err();
        assert!(e.to_string().contains("need at least 4 rows"), "{e}");
        let m = Matrix::new(vec![0.0f32, f32::NAN, 1.0, 1.0], 2, 2).unwrap();
        let e = knn(&m, &KnnOptions { k: 1, metric: Metric::L2, search: Search::Exact, threads: 1 }).unwrap_err();
        assert_eq!(e.to_string(), "row 0: embedding value NaN at position 1 is not finite");
    }
}
