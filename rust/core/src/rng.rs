//! Seeded per-prompt randomness.
//!
//! Every prompt gets its own stream, seeded from (seed, prompt_id), so the pairs drawn for a
//! prompt do not depend on batch boundaries, thread count or the other prompts in the file.
//! The definitions are simple on purpose: the pure-Python reference in the tests re-implements
//! them bit for bit.

use std::cell::RefCell;

thread_local! {
    static KEY_BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// xxh3-64 of the bytes that `write` appends to an empty buffer. The same value as feeding
/// them to xxh3's streaming hasher, which costs more per key: its state (a 256-byte buffer
/// and the secret) is set up for every hasher, about as long as hashing a 200-byte key. The
/// buffer is reused per thread; `write` must not call `xxh3_of` itself.
pub fn xxh3_of(write: impl FnOnce(&mut Vec<u8>)) -> u64 {
    KEY_BYTES.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        write(&mut buf);
        let h = xxhash_rust::xxh3::xxh3_64(&buf);
        if buf.capacity() > 1 << 20 {
            *buf = Vec::new(); // do not hold on to the memory of one huge key
        }
        h
    })
}

/// xxh3-64 of `"prefops" ‖ seed (u64 little-endian) ‖ prompt_id (UTF-8)`.
pub fn prompt_seed(seed: u64, prompt_id: &str) -> u64 {
    xxh3_of(|b| {
        b.extend_from_slice(b"prefops");
        b.extend_from_slice(&seed.to_le_bytes());
        b.extend_from_slice(prompt_id.as_bytes());
    })
}

/// A uniform number in [0, 1) for a keyed yes/no decision (e.g. whether to flip a pair):
/// the top 53 bits of xxh3-64 of `"prefops" ‖ seed (u64 LE) ‖ domain ‖ 0x1f ‖ key`, times 2^-53.
/// Depends only on the seed and the key, so decisions do not depend on batching or threads.
pub fn keyed_unit(seed: u64, domain: &str, key: &str) -> f64 {
    let h = xxh3_of(|b| {
        b.extend_from_slice(b"prefops");
        b.extend_from_slice(&seed.to_le_bytes());
        b.extend_from_slice(domain.as_bytes());
        b.push(0x1f);
        b.extend_from_slice(key.as_bytes());
    });
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// SplitMix64 (Steele, Lea & Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn for_prompt(seed: u64, prompt_id: &str) -> Self {
        Self::new(prompt_seed(seed, prompt_id))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Integer in [0, n) by multiply-shift (bias below 2^-40 for the n used here).
    pub fn below(&mut self, n: usize) -> usize {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `k` distinct indices of 0..n chosen by a partial Fisher–Yates shuffle, returned sorted.
    pub fn choose_sorted(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx.sort_unstable();
        idx
    }
}

/// A prompt's stream, seeded on first use (hashing the prompt id is not free, and most
/// strategies never draw).
pub struct LazyStream<'a> {
    seed: u64,
    prompt_id: &'a str,
    inner: Option<SplitMix64>,
}

impl<'a> LazyStream<'a> {
    pub fn new(seed: u64, prompt_id: &'a str) -> Self {
        LazyStream { seed, prompt_id, inner: None }
    }

    pub fn get(&mut self) -> &mut SplitMix64 {
        let (seed, id) = (self.seed, self.prompt_id);
        self.inner.get_or_insert_with(|| SplitMix64::for_prompt(seed, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference_values() {
        // First outputs for seed 0 as published with the reference C implementation.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_is_in_range_and_choose_is_distinct() {
        let mut r = SplitMix64::for_prompt(7, "p");
        for n in 1..50 {
            assert!(r.below(n) < n);
            let c = r.choose_sorted(n, 3);
            assert_eq!(c.len(), n.min(3));
            assert!(c.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn keyed_unit_is_uniform_and_keyed() {
        let u: Vec<f64> = (0..20_000).map(|i| keyed_unit(3, "flip", &format!("{i:016x}"))).collect();
        assert!(u.iter().all(|&x| (0.0..1.0).contains(&x)));
        let mean = u.iter().sum::<f64>() / u.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_eq!(keyed_unit(3, "flip", "k"), keyed_unit(3, "flip", "k"));
        assert_ne!(keyed_unit(3, "flip", "k"), keyed_unit(4, "flip", "k"));
        assert_ne!(keyed_unit(3, "flip", "k"), keyed_unit(3, "other", "k"));
    }

    #[test]
    fn xxh3_of_equals_the_streaming_hasher() {
        // Lengths around xxh3's size classes (16, 128, 240 bytes, the 256-byte stream buffer
        // and 1 KiB stripes blocks), in several pieces, and one past the buffer's keep limit.
        let mut r = SplitMix64::new(9);
        for len in (0..1100).step_by(7).chain([2_000_000]) {
            let bytes: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
            let cut = r.below(len + 1);
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&bytes[..cut]);
            h.update(&bytes[cut..]);
            let got = xxh3_of(|b| {
                b.extend_from_slice(&bytes[..cut]);
                b.extend_from_slice(&bytes[cut..]);
            });
            assert_eq!(got, h.digest(), "length {len}");
        }
        // The previous key's bytes do not leak into the next.
        assert_eq!(xxh3_of(|b| b.push(1)), xxhash_rust::xxh3::xxh3_64(&[1]));
    }

    #[test]
    fn prompt_streams_differ_by_seed_and_id() {
        assert_ne!(prompt_seed(1, "a"), prompt_seed(2, "a"));
        assert_ne!(prompt_seed(1, "a"), prompt_seed(1, "b"));
        assert_eq!(prompt_seed(1, "a"), prompt_seed(1, "a"));
    }
}
