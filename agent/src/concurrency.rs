//! Concurrency counting as Lambda does it: an account limit shared by every function, reserved
//! concurrency carved out of it per function (0 turns a function off), and a scaling rate limit
//! on new environments per function.
//!
//! An invoke holds a [`Permit`] while it runs. Taking one is a read lock on the function table
//! (to find the function's counters) and a few atomic operations; `cargo bench -p hearth-agent
//! --bench concurrency` prints its cost (figures in the crate docs).
//!
//! The agent learns each function's reservation from its invokes (the API puts it in every
//! request), so a change takes effect with the next invoke.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::proxy::protocol::ThrottleReason;

/// The limits.
#[derive(Debug, Clone)]
pub struct ConcurrencyConfig {
    /// In-flight invokes across all functions (Lambda's default: 1,000).
    pub account_limit: u32,
    /// New environments a function may start per `scale_window` (Lambda: 1,000 per 10 s).
    pub scale_limit: u32,
    pub scale_window: Duration,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        ConcurrencyConfig {
            account_limit: 1000,
            scale_limit: 1000,
            scale_window: Duration::from_secs(10),
        }
    }
}

/// An invoke that may not run now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Throttled {
    pub reason: ThrottleReason,
    pub message: String,
}

impl Throttled {
    fn new(reason: ThrottleReason) -> Self {
        Throttled {
            reason,
            message: "Rate Exceeded.".into(),
        }
    }
}

/// No reservation.
const UNRESERVED: u32 = u32::MAX;

/// One function's counters.
#[derive(Debug)]
struct FunctionCounter {
    in_use: AtomicU32,
    /// Its reservation, or [`UNRESERVED`].
    reserved: AtomicU32,
    /// Start of the current scaling window, in ms since [`Concurrency`]'s epoch.
    window_start_ms: AtomicU64,
    window_started: AtomicU32,
}

/// The host's counters.
#[derive(Debug)]
pub struct Concurrency {
    config: ConcurrencyConfig,
    epoch: Instant,
    /// The sum of all reservations.
    reserved_total: AtomicU32,
    /// In-flight invokes of functions without a reservation.
    unreserved_in_use: AtomicU32,
    functions: RwLock<HashMap<String, Arc<FunctionCounter>>>,
}

/// The right to run one invoke; released when dropped.
#[derive(Debug)]
pub struct Permit {
    pool: Arc<Concurrency>,
    function: Arc<FunctionCounter>,
    /// Counted in the unreserved pool (else in the function's reservation).
    unreserved: bool,
}

impl Concurrency {
    pub fn new(config: ConcurrencyConfig) -> Arc<Self> {
        Arc::new(Concurrency {
            config,
            epoch: Instant::now(),
            reserved_total: AtomicU32::new(0),
            unreserved_in_use: AtomicU32::new(0),
            functions: RwLock::default(),
        })
    }

    pub fn config(&self) -> &ConcurrencyConfig {
        &self.config
    }

    fn counter(&self, function: &str) -> Arc<FunctionCounter> {
        if let Ok(map) = self.functions.read()
            && let Some(c) = map.get(function)
        {
            return c.clone();
        }
        let mut map = self
            .functions
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.entry(function.to_string())
            .or_insert_with(|| {
                Arc::new(FunctionCounter {
                    in_use: AtomicU32::new(0),
                    reserved: AtomicU32::new(UNRESERVED),
                    window_start_ms: AtomicU64::new(0),
                    window_started: AtomicU32::new(0),
                })
            })
            .clone()
    }

    /// Records `function`'s reservation (`None`: none) if it changed.
    fn note_reservation(&self, counter: &FunctionCounter, reserved: Option<u32>) {
        let new = reserved.unwrap_or(UNRESERVED);
        let old = counter.reserved.swap(new, Ordering::AcqRel);
        if old != new {
            let amount = |v: u32| if v == UNRESERVED { 0 } else { v };
            self.reserved_total.fetch_add(amount(new), Ordering::AcqRel);
            self.reserved_total.fetch_sub(amount(old), Ordering::AcqRel);
        }
    }

    /// Takes a permit for one invoke of `function`, whose reservation is `reserved`.
    pub fn acquire(
        self: &Arc<Self>,
        function: &str,
        reserved: Option<u32>,
    ) -> Result<Permit, Throttled> {
        let counter = self.counter(function);
        self.note_reservation(&counter, reserved);
        let unreserved = match reserved {
            Some(limit) => {
                take_below(&counter.in_use, limit).map_err(|_| {
                    Throttled::new(
                        ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded,
                    )
                })?;
                false
            }
            None => {
                let limit = self
                    .config
                    .account_limit
                    .saturating_sub(self.reserved_total.load(Ordering::Acquire));
                take_below(&self.unreserved_in_use, limit).map_err(|_| {
                    Throttled::new(ThrottleReason::ConcurrentInvocationLimitExceeded)
                })?;
                counter.in_use.fetch_add(1, Ordering::AcqRel);
                true
            }
        };
        Ok(Permit {
            pool: self.clone(),
            function: counter,
            unreserved,
        })
    }

    /// In-flight invokes of `function`.
    pub fn in_use(&self, function: &str) -> u32 {
        self.functions
            .read()
            .ok()
            .and_then(|m| m.get(function).map(|c| c.in_use.load(Ordering::Acquire)))
            .unwrap_or(0)
    }
}

/// Increments `v` if it is below `limit`.
fn take_below(v: &AtomicU32, limit: u32) -> Result<u32, u32> {
    v.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < limit).then_some(n + 1)
    })
}

impl Permit {
    /// Counts one new environment against the function's scaling rate.
    pub fn allow_new_environment(&self) -> Result<(), Throttled> {
        let pool = &self.pool;
        let now = u64::try_from(pool.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let window = u64::try_from(pool.config.scale_window.as_millis()).unwrap_or(u64::MAX);
        let c = &self.function;
        let start = c.window_start_ms.load(Ordering::Acquire);
        if now.saturating_sub(start) >= window
            && c.window_start_ms
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            c.window_started.store(0, Ordering::Release);
        }
        take_below(&c.window_started, pool.config.scale_limit).map_err(|_| {
            Throttled::new(if self.unreserved {
                ThrottleReason::FunctionInvocationRateLimitExceeded
            } else {
                ThrottleReason::ReservedFunctionInvocationRateLimitExceeded
            })
        })?;
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.unreserved {
            self.pool.unreserved_in_use.fetch_sub(1, Ordering::AcqRel);
        }
        self.function.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(account: u32, scale: u32) -> Arc<Concurrency> {
        Concurrency::new(ConcurrencyConfig {
            account_limit: account,
            scale_limit: scale,
            scale_window: Duration::from_secs(3600),
        })
    }

    #[test]
    fn reserved_zero_is_always_throttled() {
        let c = pool(10, 10);
        let e = c.acquire("f", Some(0)).unwrap_err();
        assert_eq!(
            e.reason,
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
        );
        assert_eq!(e.message, "Rate Exceeded.");
    }

    #[test]
    fn a_reservation_caps_its_function_and_is_carved_out_of_the_account() {
        let c = pool(10, 100);
        let a: Vec<_> = (0..3).map(|_| c.acquire("f", Some(3)).unwrap()).collect();
        assert_eq!(
            c.acquire("f", Some(3)).unwrap_err().reason,
            ThrottleReason::ReservedFunctionConcurrentInvocationLimitExceeded
        );
        assert_eq!(c.in_use("f"), 3);
        // 10 - 3 reserved = 7 for everyone else.
        let b: Vec<_> = (0..7).map(|_| c.acquire("g", None).unwrap()).collect();
        assert_eq!(
            c.acquire("h", None).unwrap_err().reason,
            ThrottleReason::ConcurrentInvocationLimitExceeded
        );
        drop(a);
        assert_eq!(c.in_use("f"), 0);
        // The reservation still stands while f is idle.
        assert!(c.acquire("h", None).is_err());
        drop(b);
        let _h = c.acquire("h", None).unwrap();
        // Removing f's reservation gives its share back.
        let _f = c.acquire("f", None).unwrap();
        let more: Vec<_> = (0..8).map(|_| c.acquire("g", None).unwrap()).collect();
        assert_eq!(more.len(), 8);
        assert!(c.acquire("g", None).is_err());
    }

    #[test]
    fn the_scaling_rate_limits_new_environments() {
        let c = pool(100, 2);
        let p = c.acquire("f", None).unwrap();
        p.allow_new_environment().unwrap();
        p.allow_new_environment().unwrap();
        assert_eq!(
            p.allow_new_environment().unwrap_err().reason,
            ThrottleReason::FunctionInvocationRateLimitExceeded
        );
        // Another function has its own budget.
        c.acquire("g", Some(5))
            .unwrap()
            .allow_new_environment()
            .unwrap();
        let fast = Concurrency::new(ConcurrencyConfig {
            account_limit: 10,
            scale_limit: 1,
            scale_window: Duration::from_millis(20),
        });
        let p = fast.acquire("f", None).unwrap();
        p.allow_new_environment().unwrap();
        assert!(p.allow_new_environment().is_err());
        std::thread::sleep(Duration::from_millis(30));
        p.allow_new_environment().unwrap();
    }

    #[test]
    fn counting_is_right_under_contention() {
        let c = pool(1000, 1000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        let _p = c.acquire("f", Some(900)).unwrap();
                    }
                });
            }
        });
        assert_eq!(c.in_use("f"), 0);
        let held: Vec<_> = (0..900)
            .map(|_| c.acquire("f", Some(900)).unwrap())
            .collect();
        assert!(c.acquire("f", Some(900)).is_err());
        drop(held);
    }
}
