//! Where a new sandbox runs: the one CPU its processes are pinned to, chosen by the core that owns
//! its function ([`crate::cores`]).
//!
//! Why: every warm invoke crosses from the owning core to the sandbox's init and its function and
//! back. When those run on other CPUs, each crossing wakes an idle CPU, which costs far more than a
//! switch between threads on one CPU: on the 2-vCPU development VM a round trip between two
//! threads costs 116-125 us p50 across CPUs and 21-27 us on one CPU (`cargo run --release -p
//! hearth-perf --example loopback_rtt`, idle machine, against the same under `taskset -c 0`). So a
//! core places a function's first sandbox on its own CPU, and each further one on the CPU with the
//! fewest of that core's live sandboxes (its own CPU first on a tie): one function's environments
//! still spread over every CPU when it runs many at once.
//!
//! Figures (`hearth-perf warm-invoke --invokes 3000` and `throughput --windows 4`, this 2-core
//! machine, three rounds alternating `--sandbox-affinity any` and `core`, 2026-11-29): one caller,
//! latency p50 450-458 us with `any` against 274-283 us placed, p99 817-1254 against 421-493 us;
//! the platform overhead p50 239-243 against 177-187 us. Eight callers: p99 2.8-3.9 ms against
//! 4.7-25.9 ms, and 5,990-6,506 invokes/s against 5,461-5,778. At 64 callers both are within the
//! noise (3,190-3,858 against 3,491-3,851 invokes/s).
//!
//! Relies on: the cores' pinning ([`crate::cores::home_cpu`], [`crate::cores::shared_cpus`]);
//! where no core is pinned, nothing is placed. The sandbox applies the choice when it starts its
//! processes ([`crate::cores::spawn_on`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Whether sandboxes are placed ([`CpuPlacement`]) or run on any CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxAffinity {
    /// Pinned to one CPU: the owning core's first, then the least used.
    #[default]
    Core,
    /// Any CPU the agent may use.
    Any,
}

/// The live sandboxes of one core, counted per CPU.
#[derive(Debug, Default)]
pub struct CpuPlacement {
    affinity: SandboxAffinity,
    live: Mutex<BTreeMap<usize, usize>>,
}

/// A sandbox's place: its CPU stays counted until this is dropped.
#[derive(Debug)]
pub struct CpuLease {
    cpu: usize,
    placement: Arc<CpuPlacement>,
}

impl CpuLease {
    /// The CPU.
    pub fn cpu(&self) -> usize {
        self.cpu
    }
}

impl Drop for CpuLease {
    fn drop(&mut self) {
        let mut live = self.placement.lock();
        if let Some(n) = live.get_mut(&self.cpu) {
            *n = n.saturating_sub(1);
        }
    }
}

impl CpuPlacement {
    /// Placement as `affinity` says.
    pub fn new(affinity: SandboxAffinity) -> Arc<Self> {
        Arc::new(CpuPlacement {
            affinity,
            live: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, usize>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The CPU for a new sandbox started from the calling thread: `None` with
    /// [`SandboxAffinity::Any`], off a pinned core, or where the cores share a single CPU.
    pub fn choose(self: &Arc<Self>) -> Option<CpuLease> {
        if self.affinity == SandboxAffinity::Any {
            return None;
        }
        let home = crate::cores::home_cpu()?;
        let cpus = crate::cores::shared_cpus()?;
        if cpus.len() < 2 {
            return None;
        }
        let mut live = self.lock();
        let cpu = pick(&cpus, home, &live)?;
        *live.entry(cpu).or_insert(0) += 1;
        drop(live);
        Some(CpuLease {
            cpu,
            placement: self.clone(),
        })
    }

    /// Live sandboxes on `cpu`.
    pub fn live_on(&self, cpu: usize) -> usize {
        self.lock().get(&cpu).copied().unwrap_or(0)
    }
}

/// Among `cpus` (ascending), the one with the fewest `live` sandboxes; on a tie the first from
/// `home` onwards (wrapping), so `home` wins ties.
fn pick(cpus: &[usize], home: usize, live: &BTreeMap<usize, usize>) -> Option<usize> {
    let start = cpus.iter().position(|&c| c == home).unwrap_or(0);
    (0..cpus.len())
        .map(|k| cpus[(start + k) % cpus.len()])
        .min_by_key(|c| live.get(c).copied().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_first_then_the_least_used_then_home_again() {
        let cpus = [0, 1, 2, 3];
        let mut live = BTreeMap::new();
        let mut order = Vec::new();
        for _ in 0..6 {
            let cpu = pick(&cpus, 2, &live).unwrap();
            *live.entry(cpu).or_insert(0) += 1;
            order.push(cpu);
        }
        assert_eq!(order, vec![2, 3, 0, 1, 2, 3]);
        live.insert(0, 0);
        assert_eq!(pick(&cpus, 2, &live), Some(0), "a freed CPU is taken first");
        assert_eq!(pick(&[], 2, &live), None);
        assert_eq!(
            pick(&[5, 7], 1, &BTreeMap::new()),
            Some(5),
            "a home outside the set starts at the first CPU"
        );
    }

    #[test]
    fn off_a_pinned_core_or_with_any_nothing_is_placed() {
        let placement = CpuPlacement::new(SandboxAffinity::Core);
        assert!(placement.choose().is_none(), "this test thread is no core");
        let any = CpuPlacement::new(SandboxAffinity::Any);
        assert!(any.choose().is_none());
    }

    #[test]
    fn a_lease_is_counted_until_dropped() {
        let placement = CpuPlacement::new(SandboxAffinity::Core);
        *placement.lock().entry(3).or_insert(0) += 1;
        let lease = CpuLease {
            cpu: 3,
            placement: placement.clone(),
        };
        assert_eq!(lease.cpu(), 3);
        assert_eq!(placement.live_on(3), 1);
        drop(lease);
        assert_eq!(placement.live_on(3), 0);
    }
}
