//! Brute force: failed authentications are limited per source address and per key
//! id. A source past its limit is refused (429) before its credentials are even
//! checked; a key id past its limit answers wrong secrets with 429 instead of 401,
//! but still accepts the right one, so an attacker cannot lock a valid key out.

use bbx_core::{Error, KeyId, Result};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Failures allowed in a burst, per source and per key id.
const BURST: f64 = 20.0;
/// One more failure allowed every this long.
const REFILL: Duration = Duration::from_secs(5);
/// Sources (or key ids) remembered at most; past this the table starts over, so
/// that addresses an attacker makes up cannot grow it without bound.
const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> Self {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        Self {
            tokens: (self.tokens + earned).min(BURST),
            at: now,
        }
    }

    /// How long until one failure is allowed again; zero if one is now.
    fn wait(self) -> Duration {
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            REFILL.mul_f64(1.0 - self.tokens)
        }
    }
}

struct Buckets<K>(Mutex<HashMap<K, Bucket>>);

impl<K: Hash + Eq> Buckets<K> {
    fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn wait(&self, key: &K, now: Instant) -> Duration {
        self.0
            .lock()
            .get(key)
            .map_or(Duration::ZERO, |b| b.refilled(now).wait())
    }

    /// Counts a failure; how long until the next is allowed.
    fn fail(&self, key: K, now: Instant) -> Duration {
        let mut buckets = self.0.lock();
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            buckets.clear();
        }
        let bucket = buckets.entry(key).or_insert(Bucket { tokens: BURST, at: now });
        *bucket = bucket.refilled(now);
        bucket.tokens = (bucket.tokens - 1.0).max(0.0);
        bucket.wait()
    }
}

/// The limits on failed authentications.
pub struct Throttle {
    sources: Buckets<String>,
    keys: Buckets<KeyId>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            sources: Buckets::new(),
            keys: Buckets::new(),
        }
    }
}

fn too_many(what: &str, wait: Duration) -> Error {
    Error::resource_exhausted(format!("too many failed authentications {what}; try again later"), wait)
}

impl Throttle {
    /// Authenticates with `check`, within the limits of `source` and of the key id
    /// the credential names (`bbx_<id>_...`), counting a failure against both.
    pub fn authenticate<T>(&self, token: &str, source: Option<&str>, check: impl FnOnce() -> Result<T>) -> Result<T> {
        let now = Instant::now();
        if let Some(source) = source {
            let wait = self.sources.wait(&source.to_owned(), now);
            if !wait.is_zero() {
                return Err(too_many("from this address", wait));
            }
        }
        let failure = match check() {
            Ok(accepted) => return Ok(accepted),
            Err(e) => e,
        };
        if let Some(source) = source {
            self.sources.fail(source.to_owned(), now);
        }
        if let Some(id) = key_id(token) {
            let wait = self.keys.fail(id, now);
            if !wait.is_zero() {
                return Err(too_many("for this key", wait));
            }
        }
        Err(failure)
    }
}

/// The key id an API key's text names, if it names one.
fn key_id(token: &str) -> Option<KeyId> {
    let (id, _) = token.strip_prefix("bbx_")?.split_once('_')?;
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(id, &mut bytes).ok()?;
    Some(KeyId::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_core::ErrorCode;

    fn refused() -> Result<()> {
        Err(Error::unauthenticated("invalid", "no"))
    }

    #[test]
    fn a_source_past_its_limit_is_refused_before_it_is_checked() {
        let throttle = Throttle::default();
        let attacker = Some("10.0.0.9");
        for _ in 0..BURST as usize {
            assert_eq!(
                throttle.authenticate("x", attacker, refused).unwrap_err().code,
                ErrorCode::Unauthenticated
            );
        }
        let limited = throttle.authenticate("x", attacker, || Ok(())).unwrap_err();
        assert_eq!(
            limited.code,
            ErrorCode::ResourceExhausted,
            "even a good credential waits"
        );
        assert!(limited.retry_after().is_some());
        assert!(
            throttle.authenticate("x", Some("10.0.0.10"), || Ok(())).is_ok(),
            "other sources are not"
        );
    }

    #[test]
    fn a_key_past_its_limit_still_takes_its_right_secret() {
        let throttle = Throttle::default();
        let key = format!("bbx_{}_{}", hex::encode(KeyId::generate().as_bytes()), "0".repeat(64));
        let mut last = None;
        for i in 0..=BURST as usize {
            // From ever new addresses: only the key's limit is reached.
            let source = format!("10.1.{}.{}", i / 256, i % 256);
            last = Some(throttle.authenticate(&key, Some(&source), refused).unwrap_err().code);
        }
        assert_eq!(last, Some(ErrorCode::ResourceExhausted));
        assert!(
            throttle.authenticate(&key, Some("10.2.0.1"), || Ok(())).is_ok(),
            "the right secret still works"
        );
    }
}
