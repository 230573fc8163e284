//! A token bucket that can be asked before it is taken from.
//!
//! `governor` (GCRA) is the usual pick for one rate limit, but a hierarchy must
//! check every node before it takes from any, and governor has no way to ask
//! without taking, nor to give back. This bucket separates the two.

use std::time::{Duration, Instant};

/// `capacity` tokens, refilled at `per_sec` tokens a second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Self {
            capacity,
            per_sec,
            tokens: capacity,
            at: now,
        }
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refill(&mut self, now: Instant) {
        // A clock read before `at` (another thread's older reading) adds nothing.
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.at = self.at.max(now);
    }

    /// `None` if `n` tokens are there now; else how long until they will be
    /// (`None` inside the `Some` if they never will: `n` is above the capacity).
    pub fn shortfall(&mut self, n: f64, now: Instant) -> Option<Option<Duration>> {
        self.refill(now);
        if self.tokens >= n {
            return None;
        }
        if n > self.capacity {
            return Some(None);
        }
        Some(Some(Duration::from_secs_f64((n - self.tokens) / self.per_sec)))
    }

    /// Takes `n` tokens; call after `shortfall` said they are there.
    pub fn take(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - n).max(0.0);
    }

    /// Takes `n` tokens whether or not they are there, going into debt, and says
    /// how long until the debt is repaid: the start time of work queued behind
    /// the limit, in the order it was queued.
    pub fn borrow(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }

    /// Gives back `n` tokens taken for work that used fewer (up to the capacity).
    pub fn refund(&mut self, n: f64) {
        self.tokens = (self.tokens + n).min(self.capacity);
    }

    /// How much of the capacity is in use, 0.0 to 1.0.
    pub fn used_fraction(&self) -> f64 {
        1.0 - self.tokens / self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 10.0, t0);
        assert!(bucket.shortfall(10.0, t0).is_none());
        bucket.take(10.0, t0);
        let wait = bucket.shortfall(1.0, t0).unwrap().unwrap();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
        assert!(bucket.shortfall(5.0, t0 + Duration::from_millis(500)).is_none());
        assert!(bucket.shortfall(11.0, t0 + Duration::from_secs(60)) == Some(None));
    }

    #[test]
    fn borrowing_queues_work_behind_the_limit_in_order() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(2.0, 2.0, t0);
        assert_eq!(bucket.borrow(2.0, t0), Duration::ZERO, "the burst is there");
        let waits: Vec<Duration> = (0..3).map(|_| bucket.borrow(1.0, t0)).collect();
        assert_eq!(waits, [0.5, 1.0, 1.5].map(Duration::from_secs_f64));
        assert!(
            bucket.shortfall(1.0, t0 + Duration::from_secs(1)).is_some(),
            "the debt is repaid first"
        );
        assert!(bucket.shortfall(1.0, t0 + Duration::from_secs(2)).is_none());
    }

    proptest! {
        /// Over any sequence of asks, what is taken never exceeds the capacity plus
        /// what the rate refilled: the limit holds however requests are timed.
        #[test]
        fn takes_never_exceed_capacity_plus_refill(
            capacity in 1u32..50, rate in 1u32..100,
            asks in proptest::collection::vec((0u64..200, 1u32..5), 1..200),
        ) {
            let t0 = Instant::now();
            let mut bucket = TokenBucket::new(f64::from(capacity), f64::from(rate), t0);
            let mut now = t0;
            let mut taken = 0.0;
            for (advance_ms, n) in asks {
                now += Duration::from_millis(advance_ms);
                if bucket.shortfall(f64::from(n), now).is_none() {
                    bucket.take(f64::from(n), now);
                    taken += f64::from(n);
                }
            }
            let refilled = now.duration_since(t0).as_secs_f64() * f64::from(rate);
            prop_assert!(taken <= f64::from(capacity) + refilled + 1e-6);
        }
    }
}
