//! The cost of the concurrency check per invoke: taking and releasing a [`Permit`] for a function
//! with and without reserved concurrency, single-threaded and with two threads contending.
//! Prints ns per invoke (median of 15 runs of 200,000).

use std::time::Instant;

use hearth_agent::concurrency::{Concurrency, ConcurrencyConfig};

fn run(label: &str, threads: usize, reserved: Option<u32>) {
    let c = Concurrency::new(ConcurrencyConfig::default());
    let n = 200_000;
    let mut samples: Vec<f64> = (0..15)
        .map(|_| {
            let started = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        for _ in 0..n {
                            let p = c.acquire("bench-function", reserved);
                            std::hint::black_box(&p);
                        }
                    });
                }
            });
            started.elapsed().as_nanos() as f64 / (n * threads) as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    println!(
        "{label}: p50 {:.1} ns/invoke, min {:.1}, max {:.1}",
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1]
    );
}

fn main() {
    run("unreserved, 1 thread", 1, None);
    run("reserved 100, 1 thread", 1, Some(100));
    run("unreserved, 2 threads", 2, None);
    run("reserved 100, 2 threads", 2, Some(100));
}
