//! Epochs of idempotency keys, so that a submission can read the store for its
//! keys before it takes the ring's lock.
//!
//! A read that found no op for a key may be stale by the time the lock is taken:
//! an op of that key may have left the ring in between (its completion is in the
//! store by then, but after the read). The engine bumps the key's epoch, under
//! its lock, as a keyed op leaves; a miss read under an epoch that has not moved
//! since is still true.

use bbx_core::AgentId;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bumped when a keyed op leaves the ring, one counter per bucket of keys.
pub struct KeyEpochs {
    buckets: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for KeyEpochs {
    fn default() -> Self {
        Self {
            buckets: (0..Self::BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }
}

impl KeyEpochs {
    pub const BUCKETS: usize = 256;

    fn bucket(&self, agent: &AgentId, key: &str) -> &AtomicU64 {
        &self.buckets[self.hasher.hash_one((agent, key)) as usize % Self::BUCKETS]
    }

    /// Read before the store is: see the module's docs.
    pub fn read(&self, agent: &AgentId, key: &str) -> u64 {
        self.bucket(agent, key).load(Ordering::Acquire)
    }

    /// Called under the ring's lock as a keyed op leaves it.
    pub(super) fn bump(&self, agent: &AgentId, key: &str) {
        self.bucket(agent, key).fetch_add(1, Ordering::AcqRel);
    }
}
