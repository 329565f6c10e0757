//! Zipfian ranks, by the algorithm of Gray et al., "Quickly generating billion-record synthetic
//! databases" (SIGMOD 1994), as YCSB's `ZipfianGenerator` uses it: rank 0 is the most popular,
//! rank r is drawn with probability proportional to 1 / (r + 1)^θ.

/// A generator of ranks in `0..n`.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

/// ζ(n, θ) = Σ_{i=1..n} 1 / i^θ.
fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| (i as f64).powf(-theta)).sum()
}

impl Zipf {
    /// Ranks in `0..n` (n ≥ 1) with skew `theta` (0 < θ < 1; YCSB's default is 0.99).
    pub fn new(n: u64, theta: f64) -> Zipf {
        assert!(n >= 1 && theta > 0.0 && theta < 1.0, "zipf: n = {n}, θ = {theta}");
        let zeta_n = zeta(n, theta);
        let zeta_2 = zeta(2.min(n), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Zipf { n, theta, alpha, zeta_n, eta }
    }

    /// The rank for a uniform draw `u` in [0, 1).
    pub fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }

    /// A rank drawn with `rng`.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u64 {
        self.rank(rng.f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_popular_one_percent_take_most_draws() {
        let n = 100_000u64;
        let zipf = Zipf::new(n, 0.99);
        let mut rng = fastrand::Rng::with_seed(7);
        let draws = 200_000;
        let mut counts = vec![0u64; n as usize];
        for _ in 0..draws {
            let r = zipf.sample(&mut rng);
            assert!(r < n);
            counts[r as usize] += 1;
        }
        let top: u64 = counts[..(n / 100) as usize].iter().sum();
        let share = top as f64 / draws as f64;
        // Exactly: ζ(1000, 0.99) / ζ(100000, 0.99) ≈ 0.62; uniform draws would give 0.01.
        assert!(share > 0.5 && share < 0.75, "top 1% share {share}");
        // Rank 0 is the most drawn, and about 1 / ζ(n, θ) ≈ 8% of all draws.
        assert_eq!(counts.iter().enumerate().max_by_key(|&(_, c)| *c).map(|(i, _)| i), Some(0));
        let first = counts[0] as f64 / draws as f64;
        assert!((first - 1.0 / zipf.zeta_n).abs() < 0.01, "rank 0 share {first}");
    }

    #[test]
    fn ranks_stay_in_range_at_the_edges() {
        let zipf = Zipf::new(10, 0.99);
        for u in [0.0, 0.5, 0.999_999_999] {
            assert!(zipf.rank(u) < 10);
        }
        assert_eq!(Zipf::new(1, 0.5).rank(0.9), 0);
    }
}
