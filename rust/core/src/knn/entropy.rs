//! The Kozachenko–Leonenko k-nearest-neighbour estimate of differential entropy (nats):
//!
//!   Ĥ = ψ(N) − ψ(k) + ln V_d + (d / N) · Σᵢ ln ρ_k(i),   V_d = π^{d/2} / Γ(d/2 + 1),
//!
//! with ρ_k(i) the Euclidean distance from sample i to its k-th nearest other sample and V_d
//! the volume of the unit d-ball (Kozachenko & Leonenko 1987; the form of Kraskov, Stögbauer
//! & Grassberger 2004, eq. 20, with the max-norm replaced by the Euclidean norm).

use super::{knn, KnnOptions, Matrix, Metric, Search};
use crate::error::{PrepError, Result};

/// Entropy estimate of the distribution the rows are drawn from. Exact kNN, L2. A zero
/// distance (k or more copies of a row) makes the estimate −∞: an error naming the row.
pub fn kl_entropy(m: &Matrix, k: usize, threads: usize) -> Result<f64> {
    let nn = knn(m, &KnnOptions { k, metric: Metric::L2, search: Search::Exact, threads })?;
    let radius = nn.radius();
    if let Some(i) = radius.iter().position(|&r| r == 0.0) {
        return Err(PrepError::Config(format!(
            "row {i}: its {k}-th nearest neighbour is at distance 0 (repeated rows), so the kNN entropy is -inf; \
             remove duplicates or raise k"
        )));
    }
    let (n, d) = (m.rows as f64, m.dim as f64);
    let mean_log = radius.iter().map(|r| r.ln()).sum::<f64>() / n;
    Ok(digamma(n) - digamma(k as f64) + log_unit_ball_volume(m.dim) + d * mean_log)
}

/// ln V_d, V_d = π^{d/2} / Γ(d/2 + 1).
pub fn log_unit_ball_volume(d: usize) -> f64 {
    let h = d as f64 / 2.0;
    h * std::f64::consts::PI.ln() - ln_gamma(h + 1.0)
}

/// ln Γ(x) for x > 0: the recurrence up to x ≥ 15, then Stirling's series (error < 1e-13).
pub fn ln_gamma(mut x: f64) -> f64 {
    debug_assert!(x > 0.0);
    let mut shift = 0.0;
    while x < 15.0 {
        shift -= x.ln();
        x += 1.0;
    }
    let (x2, x3) = (x * x, x * x * x);
    shift + (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + 1.0 / (12.0 * x)
        - 1.0 / (360.0 * x3)
        + 1.0 / (1260.0 * x3 * x2)
        - 1.0 / (1680.0 * x3 * x2 * x2)
}

/// ψ(x) = d/dx ln Γ(x) for x > 0: the recurrence up to x ≥ 15, then the asymptotic series.
pub fn digamma(mut x: f64) -> f64 {
    debug_assert!(x > 0.0);
    let mut shift = 0.0;
    while x < 15.0 {
        shift -= 1.0 / x;
        x += 1.0;
    }
    let inv2 = 1.0 / (x * x);
    shift + x.ln() - 0.5 / x
        - inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 / 132.0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_functions_match_closed_forms() {
        let euler = 0.577_215_664_901_532_9;
        assert!((digamma(1.0) + euler).abs() < 1e-13);
        // ψ(n) = H_{n-1} − γ
        let h: f64 = (1..10).map(|i| 1.0 / i as f64).sum();
        assert!((digamma(10.0) - (h - euler)).abs() < 1e-13);
        assert!((digamma(0.5) - (-euler - 2.0 * 2f64.ln())).abs() < 1e-13);
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        let fact: f64 = (1..=100).map(|i| (i as f64).ln()).sum();
        assert!((ln_gamma(101.0) - fact).abs() < 1e-10);
        // Unit disc π, unit ball 4π/3.
        assert!((log_unit_ball_volume(2) - std::f64::consts::PI.ln()).abs() < 1e-13);
        assert!((log_unit_ball_volume(3) - (4.0 * std::f64::consts::PI / 3.0).ln()).abs() < 1e-13);
    }

    #[test]
    fn uniform_square_entropy() {
        // Uniform on [0, 2]^2: H = 2 ln 2.
        let mut r = crate::rng::SplitMix64::new(11);
        let data: Vec<f32> = (0..2 * 4000).map(|_| 2.0 * (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32).collect();
        let m = Matrix::new(data, 4000, 2).unwrap();
        let h = kl_entropy(&m, 3, 2).unwrap();
        assert!((h - 2.0 * 2f64.ln()).abs() < 0.05, "{h}");
    }
}
