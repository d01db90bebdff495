//! IVF (inverted-file) shortlists for millions of rows: a seeded k-means coarse quantiser
//! cuts the rows into `nlist` clusters; every row is a query that searches the rows of its
//! `nprobe` nearest clusters. Cost ≈ nprobe / nlist of the exact search, plus training.
//!
//! Training: a sample of min(N, 32·nlist) rows (seeded), initial centroids = nlist sample
//! rows (seeded), at most 5 Lloyd iterations with centroid sums in f64 over members in index
//! order; an empty cluster keeps its centroid. Cosine runs spherical k-means (unit rows and
//! centroids). Every step is fixed by the seed and N, so the index — and the result — does
//! not depend on the thread count.

use std::sync::Mutex;

use super::{dot_tile, for_each_index, BlockLists, Cand, Matrix, Metric, Norms, Scratch, SearchInfo, Shortlists, BLOCK};
use crate::rng::SplitMix64;

const SAMPLE_PER_LIST: usize = 32;
const ITERATIONS: usize = 5;

pub(super) fn shortlists(
    m: &Matrix,
    norms: &Norms,
    cap: usize,
    k: usize,
    opts: &super::IvfOptions,
    threads: usize,
    info: &mut SearchInfo,
) -> BlockLists {
    let (n, dim) = (m.rows, m.dim);
    let nlist = if opts.nlist == 0 { ((4.0 * (n as f64).sqrt()).round() as usize).clamp(1, n) } else { opts.nlist.min(n) };
    let nprobe = if opts.nprobe == 0 { nlist.min(16) } else { opts.nprobe.min(nlist) };
    info.nlist = Some(nlist);
    info.nprobe = Some(nprobe);

    let centroids = train(m, norms.metric, nlist, opts.seed, threads);
    let probes = nearest_centroids(&m.data, n, dim, &centroids, nlist, norms.metric, nprobe, threads);
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); nlist];
    let mut queries: Vec<Vec<u32>> = vec![Vec::new(); nlist];
    for i in 0..n {
        let p = &probes[i * nprobe..(i + 1) * nprobe];
        members[p[0] as usize].push(i as u32);
        for &l in p {
            queries[l as usize].push(i as u32);
        }
    }
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
    for l in 0..nlist {
        for qc in (0..queries[l].len()).step_by(BLOCK) {
            for mc in (0..members[l].len()).step_by(BLOCK) {
                tasks.push((l, qc, mc));
            }
        }
    }
    let lists = BlockLists::new(n, cap);
    let data: &[f32] = &m.data;
    let scratch: Scratch<(Vec<f32>, Vec<f32>, Vec<f32>)> = Scratch::default();
    for_each_index(tasks.len(), threads, |t| {
        let (l, qc, mc) = tasks[t];
        let qs = &queries[l][qc..(qc + BLOCK).min(queries[l].len())];
        let ms = &members[l][mc..(mc + BLOCK).min(members[l].len())];
        scratch.with(|(qbuf, mbuf, tile)| {
            gather(data, dim, qs, qbuf);
            gather(data, dim, ms, mbuf);
            tile.resize(qs.len() * ms.len(), 0.0);
            dot_tile(qbuf, dim, 0, qs.len(), mbuf, 0, ms.len(), tile);
            let mut held: Option<(usize, std::sync::MutexGuard<'_, Shortlists>)> = None;
            for (a, &q) in qs.iter().enumerate() {
                let q = q as usize;
                let b = q / BLOCK;
                if held.as_ref().map(|h| h.0) != Some(b) {
                    drop(held.take()); // one lock at a time
                    held = Some((b, lists.blocks[b].lock().expect("no thread panics holding a shortlist")));
                }
                let rows = &mut held.as_mut().expect("just set").1;
                let r = q - b * BLOCK;
                let mut thr = rows.threshold(r);
                for (c, &dot) in tile[a * ms.len()..(a + 1) * ms.len()].iter().enumerate() {
                    let j = ms[c] as usize;
                    let key = norms.key(dot, j);
                    if key <= thr && j != q {
                        rows.offer(r, Cand { key, idx: j as u32 });
                        thr = rows.threshold(r);
                    }
                }
            }
        });
    });

    // Queries whose probed clusters hold fewer than k other rows: an exact scan (keys are the
    // f64 distances themselves; refinement recomputes them anyway).
    let fallbacks = Mutex::new(0usize);
    for_each_index(lists.blocks.len(), threads, |b| {
        let mut rows = lists.blocks[b].lock().expect("no thread panicked");
        let mut count = 0;
        for r in 0..rows.lens.len() {
            if rows.len(r) >= k {
                continue;
            }
            count += 1;
            let q = b * BLOCK + r;
            rows.clear(r);
            for j in (0..n).filter(|&j| j != q) {
                rows.offer(r, Cand { key: norms.exact(m, q, j) as f32, idx: j as u32 });
            }
        }
        *fallbacks.lock().expect("no thread panicked") += count;
    });
    info.exact_fallbacks = fallbacks.into_inner().expect("no thread panicked");
    lists
}

fn gather(data: &[f32], dim: usize, rows: &[u32], out: &mut Vec<f32>) {
    out.clear();
    for &r in rows {
        out.extend_from_slice(&data[r as usize * dim..(r as usize + 1) * dim]);
    }
}

/// Seeded k-means centroids, [nlist, dim] (unit length for cosine).
fn train(m: &Matrix, metric: Metric, nlist: usize, seed: u64, threads: usize) -> Vec<f32> {
    let (n, dim) = (m.rows, m.dim);
    let mut rng = SplitMix64::new(crate::rng::prompt_seed(seed, "ivf-kmeans"));
    let sample = rng.choose_sorted(n, (nlist * SAMPLE_PER_LIST).min(n));
    let s = sample.len();
    let mut xs: Vec<f32> = Vec::with_capacity(s * dim);
    for &i in &sample {
        let row = m.row(i);
        match metric {
            Metric::L2 => xs.extend_from_slice(row),
            Metric::Cosine => {
                let inv = 1.0 / row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                xs.extend(row.iter().map(|&x| (x as f64 * inv) as f32));
            }
        }
    }
    let init = rng.choose_sorted(s, nlist);
    let mut centroids: Vec<f32> = init.iter().flat_map(|&i| xs[i * dim..(i + 1) * dim].iter().copied()).collect();
    let mut assigned: Vec<u32> = Vec::new();
    for _ in 0..ITERATIONS {
        let now = nearest_centroids(&xs, s, dim, &centroids, nlist, metric, 1, threads);
        if now == assigned {
            break;
        }
        assigned = now;
        let mut sums = vec![0f64; nlist * dim];
        let mut counts = vec![0usize; nlist];
        for (i, &c) in assigned.iter().enumerate() {
            let c = c as usize;
            counts[c] += 1;
            for (acc, &x) in sums[c * dim..(c + 1) * dim].iter_mut().zip(&xs[i * dim..(i + 1) * dim]) {
                *acc += x as f64;
            }
        }
        for c in 0..nlist {
            if counts[c] == 0 {
                continue; // an empty cluster keeps its centroid
            }
            let sum = &sums[c * dim..(c + 1) * dim];
            let scale = match metric {
                Metric::L2 => 1.0 / counts[c] as f64,
                Metric::Cosine => {
                    let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
                    if norm == 0.0 {
                        continue;
                    }
                    1.0 / norm
                }
            };
            for (dst, &x) in centroids[c * dim..(c + 1) * dim].iter_mut().zip(sum) {
                *dst = (x * scale) as f32;
            }
        }
    }
    centroids
}

/// The `nprobe` nearest centroids of each of `rows` rows of `x`, nearest first (ties: lower
/// centroid index), flattened [rows, nprobe].
#[allow(clippy::too_many_arguments)]
fn nearest_centroids(
    x: &[f32],
    rows: usize,
    dim: usize,
    centroids: &[f32],
    nlist: usize,
    metric: Metric,
    nprobe: usize,
    threads: usize,
) -> Vec<u32> {
    let csq: Vec<f32> = (0..nlist)
        .map(|c| centroids[c * dim..(c + 1) * dim].iter().map(|&v| v as f64 * v as f64).sum::<f64>() as f32)
        .collect();
    let blocks = rows.div_ceil(BLOCK);
    let parts: Vec<Mutex<Vec<u32>>> = (0..blocks).map(|_| Mutex::new(Vec::new())).collect();
    for_each_index(blocks, threads, |b| {
        let (r0, nr) = (b * BLOCK, BLOCK.min(rows - b * BLOCK));
        let mut best = Shortlists::new(nr, nprobe);
        let mut tile = vec![0f32; nr * BLOCK.min(nlist)];
        for c0 in (0..nlist).step_by(BLOCK) {
            let nc = BLOCK.min(nlist - c0);
            dot_tile(x, dim, r0, nr, centroids, c0, nc, &mut tile);
            for a in 0..nr {
                let mut thr = best.threshold(a);
                for (c, &dot) in tile[a * nc..(a + 1) * nc].iter().enumerate() {
                    let key = match metric {
                        Metric::L2 => csq[c0 + c] - 2.0 * dot,
                        Metric::Cosine => -dot,
                    };
                    if key <= thr {
                        best.offer(a, Cand { key, idx: (c0 + c) as u32 });
                        thr = best.threshold(a);
                    }
                }
            }
        }
        let out: Vec<u32> = (0..nr).flat_map(|a| best.get(a).iter().map(|c| c.idx).collect::<Vec<_>>()).collect();
        *parts[b].lock().expect("no thread panicked") = out;
    });
    parts.into_iter().flat_map(|p| p.into_inner().expect("no thread panicked")).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{knn, KnnOptions, Search};
    use super::*;

    #[test]
    fn ivf_recall_on_clustered_data_and_determinism() {
        // 40 well separated clusters of 50 rows in 16 dimensions.
        let (rows, dim, k) = (2000, 16, 5);
        let mut r = SplitMix64::new(3);
        let mut u = || (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let centers: Vec<f32> = (0..40 * dim).map(|_| 20.0 * u()).collect();
        let data: Vec<f32> = (0..rows).flat_map(|i| (0..dim).map(|d| centers[(i % 40) * dim + d] + u()).collect::<Vec<_>>()).collect();
        let m = Matrix::new(data, rows, dim).unwrap();
        for metric in [Metric::L2, Metric::Cosine] {
            let exact = knn(&m, &KnnOptions { k, metric, search: Search::Exact, threads: 2 }).unwrap();
            let ivf = |threads| {
                let opts = super::super::IvfOptions { nlist: 40, nprobe: 4, seed: 7 };
                knn(&m, &KnnOptions { k, metric, search: Search::Ivf(opts), threads }).unwrap()
            };
            let (a, b) = (ivf(1), ivf(3));
            assert_eq!(a.indices, b.indices);
            assert_eq!(a.distances, b.distances);
            let mut hits = 0;
            for q in 0..rows {
                let want = &exact.indices[q * k..(q + 1) * k];
                hits += a.indices[q * k..(q + 1) * k].iter().filter(|j| want.contains(j)).count();
            }
            let recall = hits as f64 / (rows * k) as f64;
            assert!(recall >= 0.95, "{metric}: recall {recall}");
            assert_eq!(a.info.nlist, Some(40));
        }
    }

    #[test]
    fn tiny_clusters_fall_back_to_exact() {
        let data: Vec<f32> = (0..30).map(|i| (i * i % 17) as f32).collect();
        let m = Matrix::new(data, 10, 3).unwrap();
        let opts = super::super::IvfOptions { nlist: 10, nprobe: 1, seed: 0 };
        let got = knn(&m, &KnnOptions { k: 2, metric: Metric::L2, search: Search::Ivf(opts), threads: 1 }).unwrap();
        let exact = knn(&m, &KnnOptions { k: 2, metric: Metric::L2, search: Search::Exact, threads: 1 }).unwrap();
        assert_eq!(got.distances, exact.distances);
        assert!(got.info.exact_fallbacks > 0);
    }
}
