//! Rate limiting for logs a guest can trigger, so a guest cannot flood the host's logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Allows at most `per_second` events per wall-clock second; counts the rest.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limiter for `per_second` events a second.
    pub const fn new(per_second: u64) -> Self {
        RateLimit {
            per_second,
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether one more event may be logged now; on a new second, returns how many were dropped
    /// in the previous ones through [`RateLimit::take_suppressed`].
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.allow_at(now)
    }

    fn allow_at(&self, now: u64) -> bool {
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < self.per_second {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Events dropped since the last call.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

/// `tracing::warn!` limited to 10 events a second per call site; reports how many were dropped.
#[macro_export]
macro_rules! limited_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new(10);
        if LIMIT.allow() {
            let dropped = LIMIT.take_suppressed();
            if dropped > 0 {
                tracing::warn!(dropped, "guest-triggered messages were dropped by the rate limit");
            }
            tracing::warn!($($arg)+);
        }
    }};
}

/// `tracing::debug!` limited to 10 events a second per call site.
#[macro_export]
macro_rules! limited_debug {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new(10);
        if LIMIT.allow() {
            tracing::debug!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_within_a_second_and_resets_after() {
        let l = RateLimit::new(3);
        let allowed = (0..10).filter(|_| l.allow_at(100)).count();
        assert_eq!(allowed, 3);
        assert_eq!(l.take_suppressed(), 7);
        assert!(l.allow_at(101));
    }
}
