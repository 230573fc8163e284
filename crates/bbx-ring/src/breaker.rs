//! Circuit breakers, one per target (an executor, plus the host for remote targets).
//!
//! Closed: calls pass, consecutive failures are counted; at `failure_threshold` the
//! breaker opens. Open: calls are refused with the time left until `open_for` has
//! passed. Half-open: up to `half_open_trials` calls go through as trials; a trial's
//! success closes the breaker, its failure opens it again.
//!
//! The closed path is one atomic load to admit and, on success, one load (plus a
//! store only if failures had been counted): no lock, no allocation.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub open_for: Duration,
    pub half_open_trials: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
            half_open_trials: 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// How a call was let through; hand it back to [`CircuitBreaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "record the outcome of an admitted call"]
pub enum Admission {
    Closed,
    /// A half-open trial of one round; outcomes of an earlier round are ignored.
    Trial {
        round: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the circuit breaker is open; retry in {retry_after:?}")]
pub struct Rejected {
    pub retry_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerStats {
    pub state: BreakerState,
    pub consecutive_failures: u32,
    pub opened_total: u64,
    pub rejected_total: u64,
}

#[derive(Default)]
struct Transitions {
    opened_at: Option<Instant>,
    half_open_at: Option<Instant>,
    trials_in_flight: u32,
    /// Bumped on every state change, so that a trial admitted before a reset or in an
    /// earlier half-open round cannot decide the current one.
    round: u64,
}

pub struct CircuitBreaker {
    config: BreakerConfig,
    state: AtomicU8,
    consecutive_failures: AtomicU32,
    opened_total: AtomicU64,
    rejected_total: AtomicU64,
    transitions: Mutex<Transitions>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: AtomicU8::new(CLOSED),
            consecutive_failures: AtomicU32::new(0),
            opened_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            transitions: Mutex::new(Transitions::default()),
        }
    }

    pub fn admit(&self, now: Instant) -> Result<Admission, Rejected> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(Admission::Closed);
        }
        let mut t = self.transitions.lock();
        if self.state.load(Ordering::Acquire) == OPEN {
            let reopens = t.opened_at.map_or(now, |at| at + self.config.open_for);
            if now < reopens {
                self.rejected_total.fetch_add(1, Ordering::Relaxed);
                return Err(Rejected {
                    retry_after: reopens - now,
                });
            }
            self.start_half_open(&mut t, now);
        }
        if self.state.load(Ordering::Acquire) != HALF_OPEN {
            return Ok(Admission::Closed);
        }
        // Trials whose outcome never came back (their caller vanished) expire, or the
        // breaker would refuse forever.
        let expired = t.half_open_at.is_some_and(|at| now >= at + self.config.open_for);
        if t.trials_in_flight >= self.config.half_open_trials && expired {
            self.start_half_open(&mut t, now);
        }
        if t.trials_in_flight < self.config.half_open_trials {
            t.trials_in_flight += 1;
            Ok(Admission::Trial { round: t.round })
        } else {
            self.rejected_total.fetch_add(1, Ordering::Relaxed);
            Err(Rejected {
                retry_after: self.config.open_for / 10,
            })
        }
    }

    pub fn record(&self, admission: Admission, success: bool, now: Instant) {
        match (admission, success) {
            (Admission::Closed, true) => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
            }
            (Admission::Closed, false) => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= self.config.failure_threshold {
                    let mut t = self.transitions.lock();
                    if self.state.load(Ordering::Acquire) == CLOSED {
                        self.open(&mut t, now);
                    }
                }
            }
            (Admission::Trial { round }, success) => {
                let mut t = self.transitions.lock();
                if round != t.round || self.state.load(Ordering::Acquire) != HALF_OPEN {
                    return;
                }
                t.trials_in_flight = t.trials_in_flight.saturating_sub(1);
                if success {
                    t.round += 1;
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                    self.state.store(CLOSED, Ordering::Release);
                } else {
                    self.open(&mut t, now);
                }
            }
        }
    }

    fn start_half_open(&self, t: &mut Transitions, now: Instant) {
        t.round += 1;
        t.trials_in_flight = 0;
        t.half_open_at = Some(now);
        self.state.store(HALF_OPEN, Ordering::Release);
    }

    fn open(&self, t: &mut Transitions, now: Instant) {
        t.round += 1;
        t.opened_at = Some(now);
        self.opened_total.fetch_add(1, Ordering::Relaxed);
        self.state.store(OPEN, Ordering::Release);
    }

    /// Closes the breaker and forgets its failures (`bbx ring circuit-breaker --reset`).
    pub fn reset(&self) {
        let mut t = self.transitions.lock();
        *t = Transitions {
            round: t.round + 1,
            ..Transitions::default()
        };
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.state.store(CLOSED, Ordering::Release);
    }

    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    pub fn stats(&self) -> BreakerStats {
        BreakerStats {
            state: self.state(),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            opened_total: self.opened_total.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
        }
    }
}

/// The breakers of every tenant's targets, created on first use with one
/// configuration. Keyed by tenant first: one tenant's failures never open a
/// breaker another tenant's calls go through, and a tenant is shown only its own.
///
/// Breakers idle for [`Breakers::IDLE`] (and closed) are forgotten by
/// [`Breakers::evict_idle`]; a tenant holds at most [`Breakers::PER_TENANT`], so
/// calls to ever new hosts cannot grow the map without bound.
pub struct Breakers {
    config: BreakerConfig,
    /// What `last_used` counts seconds from.
    epoch: Instant,
    by_tenant: RwLock<HashMap<Arc<str>, TenantBreakers>>,
}

/// One tenant's breakers, by target.
type TenantBreakers = HashMap<String, Arc<Tracked>>;

/// A breaker and when it was last asked to admit a call.
pub struct Tracked {
    breaker: CircuitBreaker,
    /// Seconds since the registry's epoch; a relaxed store per admission.
    last_used: AtomicU64,
}

impl std::ops::Deref for Tracked {
    type Target = CircuitBreaker;

    fn deref(&self) -> &CircuitBreaker {
        &self.breaker
    }
}

/// One breaker as [`Breakers::stats`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStats {
    pub tenant: Arc<str>,
    pub target: String,
    pub stats: BreakerStats,
}

impl Breakers {
    /// How long a breaker goes unused before it may be forgotten.
    pub const IDLE: Duration = Duration::from_secs(600);
    /// The most breakers one tenant holds at once.
    pub const PER_TENANT: usize = 1024;

    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            epoch: Instant::now(),
            by_tenant: RwLock::new(HashMap::new()),
        }
    }

    fn seconds(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// The breaker of `tenant`'s calls to `target`, marked as used at `now`.
    pub fn get(&self, tenant: &Arc<str>, target: &str, now: Instant) -> Arc<Tracked> {
        let seconds = self.seconds(now);
        if let Some(tracked) = self.by_tenant.read().get(tenant).and_then(|t| t.get(target)) {
            tracked.last_used.store(seconds, Ordering::Relaxed);
            return tracked.clone();
        }
        let mut all = self.by_tenant.write();
        let targets = all.entry(tenant.clone()).or_default();
        if let Some(tracked) = targets.get(target) {
            tracked.last_used.store(seconds, Ordering::Relaxed);
            return tracked.clone();
        }
        if targets.len() >= Self::PER_TENANT {
            self.make_room(targets, seconds);
        }
        let tracked = Arc::new(Tracked {
            breaker: CircuitBreaker::new(self.config.clone()),
            last_used: AtomicU64::new(seconds),
        });
        targets.insert(target.to_owned(), tracked.clone());
        tracked
    }

    /// Frees a place in a full tenant: its idle breakers go, or else the one unused
    /// longest (an open one too: the tenant's newest targets matter more).
    fn make_room(&self, targets: &mut TenantBreakers, seconds: u64) {
        let idle = Self::IDLE.as_secs();
        targets.retain(|_, t| !t.evictable(seconds, idle));
        if targets.len() >= Self::PER_TENANT
            && let Some(oldest) = targets
                .iter()
                .min_by_key(|(_, t)| t.last_used.load(Ordering::Relaxed))
                .map(|(target, _)| target.clone())
        {
            targets.remove(&oldest);
        }
    }

    /// Forgets breakers unused for [`Self::IDLE`] that are closed (an open or
    /// half-open one still has a say), and tenants left with none; returns how
    /// many breakers went.
    pub fn evict_idle(&self, now: Instant) -> usize {
        let seconds = self.seconds(now);
        let idle = Self::IDLE.as_secs();
        let mut all = self.by_tenant.write();
        let before: usize = all.values().map(HashMap::len).sum();
        for targets in all.values_mut() {
            targets.retain(|_, t| !t.evictable(seconds, idle));
        }
        all.retain(|_, targets| !targets.is_empty());
        before - all.values().map(HashMap::len).sum::<usize>()
    }

    /// The breakers of one tenant, or of all (`None`), sorted by tenant and target.
    pub fn stats(&self, tenant: Option<&str>) -> Vec<TargetStats> {
        let all = self.by_tenant.read();
        let mut listed: Vec<TargetStats> = all
            .iter()
            .filter(|(t, _)| tenant.is_none_or(|only| &***t == only))
            .flat_map(|(t, targets)| {
                targets.iter().map(move |(target, b)| TargetStats {
                    tenant: t.clone(),
                    target: target.clone(),
                    stats: b.stats(),
                })
            })
            .collect();
        listed.sort_by(|a, b| (&a.tenant, &a.target).cmp(&(&b.tenant, &b.target)));
        listed
    }

    /// Closes the breakers of `target` (every target when `None`) of one tenant
    /// (every tenant when `None`); returns how many it closed.
    pub fn reset(&self, tenant: Option<&str>, target: Option<&str>) -> usize {
        let all = self.by_tenant.read();
        let mut closed = 0;
        for (t, targets) in all.iter() {
            if tenant.is_some_and(|only| &**t != only) {
                continue;
            }
            for (name, breaker) in targets {
                if target.is_none_or(|only| name == only) {
                    breaker.reset();
                    closed += 1;
                }
            }
        }
        closed
    }
}

impl Tracked {
    fn evictable(&self, seconds: u64, idle: u64) -> bool {
        self.state() == BreakerState::Closed && seconds.saturating_sub(self.last_used.load(Ordering::Relaxed)) >= idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerConfig {
            failure_threshold: 3,
            open_for: Duration::from_secs(10),
            half_open_trials: 1,
        })
    }

    fn fail(b: &CircuitBreaker, now: Instant) {
        let admission = b.admit(now).unwrap();
        b.record(admission, false, now);
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breaker();
        let now = Instant::now();
        fail(&b, now);
        fail(&b, now);
        let ok = b.admit(now).unwrap();
        b.record(ok, true, now);
        fail(&b, now);
        fail(&b, now);
        assert_eq!(b.state(), BreakerState::Closed, "a success in between resets the count");
        fail(&b, now);
        assert_eq!(b.state(), BreakerState::Open);
        let rejected = b.admit(now + Duration::from_secs(4)).unwrap_err();
        assert_eq!(rejected.retry_after, Duration::from_secs(6));
        assert_eq!(b.stats().rejected_total, 1);
    }

    #[test]
    fn half_open_lets_trials_through_and_their_outcome_decides() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&b, t0);
        }
        let later = t0 + Duration::from_secs(10);
        let trial = b.admit(later).unwrap();
        assert!(matches!(trial, Admission::Trial { .. }));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admit(later).is_err(), "only one trial at a time");
        b.record(trial, false, later);
        assert_eq!(b.state(), BreakerState::Open, "a failed trial reopens");
        assert!(b.admit(later + Duration::from_secs(9)).is_err());

        let trial = b.admit(later + Duration::from_secs(10)).unwrap();
        b.record(trial, true, later + Duration::from_secs(10));
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(later + Duration::from_secs(10)).unwrap(), Admission::Closed);
        assert_eq!(b.stats().opened_total, 2);
    }

    #[test]
    fn stale_and_lost_trials_do_not_decide_or_block() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..3 {
            fail(&b, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        let stale = b.admit(t1).unwrap();
        b.reset();
        for _ in 0..3 {
            fail(&b, t1);
        }
        let t2 = t1 + Duration::from_secs(10);
        let _lost = b.admit(t2).unwrap();
        b.record(stale, true, t2);
        assert_eq!(
            b.state(),
            BreakerState::HalfOpen,
            "a trial from before the reset decides nothing"
        );
        assert!(b.admit(t2).is_err(), "the stale record freed no trial slot");

        // The current trial's caller vanishes without recording: after open_for, a
        // new trial may go.
        assert!(b.admit(t2 + Duration::from_secs(9)).is_err());
        let retry = b.admit(t2 + Duration::from_secs(10)).unwrap();
        b.record(retry, true, t2 + Duration::from_secs(10));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn reset_closes_and_targets_and_tenants_are_independent() {
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: 1,
            ..Default::default()
        });
        let (acme, other): (Arc<str>, Arc<str>) = ("acme".into(), "other".into());
        let now = Instant::now();
        fail(&breakers.get(&acme, "tool.http example.com:80", now), now);
        assert_eq!(
            breakers.get(&acme, "tool.http example.com:80", now).state(),
            BreakerState::Open
        );
        assert_eq!(
            breakers.get(&other, "tool.http example.com:80", now).state(),
            BreakerState::Closed
        );
        assert_eq!(breakers.get(&acme, "tool.shell", now).state(), BreakerState::Closed);
        let theirs = breakers.stats(Some("other"));
        assert_eq!(theirs.len(), 1);
        assert!(theirs.iter().all(|s| &*s.tenant == "other"));
        assert_eq!(breakers.stats(None).len(), 3);
        assert_eq!(breakers.reset(Some("acme"), Some("tool.http example.com:80")), 1);
        assert_eq!(
            breakers.get(&acme, "tool.http example.com:80", now).state(),
            BreakerState::Closed
        );
        assert_eq!(breakers.reset(None, None), 3);
    }

    #[test]
    fn idle_breakers_are_forgotten_unless_open() {
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: 1,
            open_for: Breakers::IDLE * 2,
            ..Default::default()
        });
        let tenant: Arc<str> = "t".into();
        let now = Instant::now();
        breakers.get(&tenant, "idle", now);
        fail(&breakers.get(&tenant, "open", now), now);
        let later = now + Breakers::IDLE;
        breakers.get(&tenant, "busy", later);
        assert_eq!(breakers.evict_idle(later), 1);
        let left: Vec<String> = breakers.stats(None).into_iter().map(|s| s.target).collect();
        assert_eq!(left, ["busy", "open"]);
    }

    #[test]
    fn a_tenant_holds_a_bounded_number_of_breakers() {
        let breakers = Breakers::new(BreakerConfig::default());
        let tenant: Arc<str> = "t".into();
        let now = Instant::now();
        let host = |i: usize| format!("tool.http host{i}:80");
        for i in 0..Breakers::PER_TENANT {
            breakers.get(&tenant, &host(i), now);
        }
        breakers.get(&tenant, &host(0), now + Duration::from_secs(1));
        // Full and none idle: the one unused longest makes room, not the one just used.
        breakers.get(&tenant, "newest", now + Duration::from_secs(2));
        let held = breakers.stats(Some("t"));
        assert_eq!(held.len(), Breakers::PER_TENANT);
        assert!(held.iter().any(|s| s.target == host(0)) && held.iter().any(|s| s.target == "newest"));
        // Full again, much later: every idle one goes at once.
        breakers.get(&tenant, "later", now + Breakers::IDLE + Duration::from_secs(3));
        let targets: Vec<String> = breakers.stats(Some("t")).into_iter().map(|s| s.target).collect();
        assert_eq!(targets, ["later"]);
        // Another tenant's breakers are not this one's to evict.
        assert!(breakers.stats(Some("other")).is_empty());
    }
}
