//! `hearth-benches`: micro-benchmarks of Hearth's hot paths (virtqueue and vsock packet handling,
//! wire protocol encoding, concurrency counting). Run with `cargo bench -p hearth-benches`.
//!
//! Owns: only benchmarks and the small timing harness they share ([`bench()`]): many samples, each
//! a batch of iterations, reported as the median and tail per iteration (no plots, no baselines:
//! compare A/B by running both in one invocation).
//!
//! Relies on: the other Hearth crates. Must not touch: production code.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Per-iteration timings of one benchmark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median nanoseconds per iteration.
    pub p50_ns: f64,
    /// 90th percentile nanoseconds per iteration.
    pub p90_ns: f64,
    /// 99th percentile nanoseconds per iteration.
    pub p99_ns: f64,
    /// Samples taken.
    pub samples: usize,
}

/// The value at quantile `q` (0..=1) of sorted `values` (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Run `f` in `samples` batches of `iters` calls after a warm-up batch; print and return the
/// per-call median, p90 and p99. `f` gets the iteration number.
pub fn bench(name: &str, samples: usize, iters: u64, mut f: impl FnMut(u64)) -> Stats {
    for i in 0..iters {
        f(i);
    }
    let mut per_iter: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iters {
                f(i);
            }
            duration_ns(start.elapsed()) / iters.max(1) as f64
        })
        .collect();
    per_iter.sort_by(f64::total_cmp);
    let stats = Stats {
        p50_ns: quantile(&per_iter, 0.5),
        p90_ns: quantile(&per_iter, 0.9),
        p99_ns: quantile(&per_iter, 0.99),
        samples,
    };
    println!(
        "{name:<40} p50 {:>10.1} ns   p90 {:>10.1} ns   p99 {:>10.1} ns   ({samples} x {iters})",
        stats.p50_ns, stats.p90_ns, stats.p99_ns
    );
    stats
}

fn duration_ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn bench_counts_every_call() {
        let mut calls = 0u64;
        let stats = bench("count", 3, 10, |_| calls += 1);
        assert_eq!(calls, 40);
        assert!(stats.p50_ns >= 0.0);
    }
}
