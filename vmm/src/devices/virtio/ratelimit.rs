//! Rate limiting for logs a guest can trigger: a token bucket shared by all of them, so a hostile
//! guest cannot flood the host's log. Use [`guest_warn!`](crate::guest_warn) in device code for
//! anything a guest's behaviour causes.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket: up to `capacity` events at once, refilled at `per_second`.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: u32,
    per_second: u32,
    tokens: u32,
    last_refill: Option<Instant>,
    suppressed: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub const fn new(capacity: u32, per_second: u32) -> Self {
        Self {
            capacity,
            per_second,
            tokens: capacity,
            last_refill: None,
            suppressed: 0,
        }
    }

    /// Take one token at `now`. `Some(n)` means allowed, `n` being how many events were refused
    /// since the last allowed one; `None` means refused.
    pub fn take_at(&mut self, now: Instant) -> Option<u64> {
        match self.last_refill {
            None => self.last_refill = Some(now),
            Some(last) => {
                let elapsed = now.saturating_duration_since(last);
                let per_token = Duration::from_secs(1) / self.per_second.max(1);
                let new_tokens = elapsed.as_nanos() / per_token.as_nanos().max(1);
                if new_tokens > 0 {
                    let add = u32::try_from(new_tokens).unwrap_or(u32::MAX);
                    self.tokens = self.tokens.saturating_add(add).min(self.capacity);
                    self.last_refill = Some(now);
                }
            }
        }
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The bucket behind `guest_warn!`: bursts of 20, then 5 a second.
pub static GUEST_LOG_LIMIT: Mutex<TokenBucket> = Mutex::new(TokenBucket::new(20, 5));

/// Take a token from [`GUEST_LOG_LIMIT`]; see [`TokenBucket::take_at`].
pub fn guest_log_allowed() -> Option<u64> {
    let mut bucket = GUEST_LOG_LIMIT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    bucket.take_at(Instant::now())
}

/// `tracing::warn!` behind the guest log rate limit; says how many messages it dropped.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        if let Some(dropped) = $crate::devices::virtio::ratelimit::guest_log_allowed() {
            if dropped > 0 {
                tracing::warn!(dropped, "guest-triggered messages were rate-limited");
            }
            tracing::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_bursts_then_refills() {
        let mut bucket = TokenBucket::new(3, 10);
        let t0 = Instant::now();
        assert_eq!(bucket.take_at(t0), Some(0));
        assert_eq!(bucket.take_at(t0), Some(0));
        assert_eq!(bucket.take_at(t0), Some(0));
        assert_eq!(bucket.take_at(t0), None);
        assert_eq!(bucket.take_at(t0), None);
        // 100 ms buys one token at 10/s; the two refusals are reported.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(bucket.take_at(t1), Some(2));
        assert_eq!(bucket.take_at(t1), None);
        // A long pause refills only up to capacity.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(bucket.take_at(t2).is_some());
        }
        assert_eq!(bucket.take_at(t2), None);
    }

    #[test]
    fn global_limit_bounds_a_flood() {
        let allowed = (0..10_000)
            .filter(|_| guest_log_allowed().is_some())
            .count();
        assert!(allowed <= 40, "{allowed} messages passed the limit");
    }
}
