//! What a submission needs from the store, read before the ring's lock is taken,
//! so that no disk read happens under it on the common path.
//!
//! Two things are read: the ops that idempotency keys name, and the completions of
//! ops that the batch depends on. Either may change between this read and the
//! lock: an op still live when it was read can complete and leave the ring before
//! the lock is taken. Its completion is in the store by then (an op is recorded
//! before it leaves), so only a read that found nothing can be stale:
//! - for a key, the engine bumps the key's epoch ([`KeyEpochs`]) whenever a keyed
//!   op leaves it; a miss read under an epoch that has not moved since is still
//!   true;
//! - for a dependency, a miss for an op that is not live either is read again
//!   under the lock (rare: the op completed just then, or does not exist).

use super::Ring;
use super::store::{self, decode_idempotency, idempotency_key, storage_error};
use crate::batch::Dependency;
use crate::engine::{KeyedOp, Recorded};
use bbx_core::op::Completion;
use bbx_core::{AgentId, OpId, Result};
use fjall::Readable;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Default)]
pub(super) struct Preread {
    /// Per key: the bucket's epoch before the read, and what the store held.
    keys: HashMap<(AgentId, String), (u64, Option<KeyedOp>)>,
    completions: FxHashMap<OpId, Arc<Completion>>,
}

impl Preread {
    /// Reads what `keys` and `deps` name; call it without the ring's lock.
    pub fn read<'a>(
        ring: &Ring,
        keys: impl Iterator<Item = (AgentId, &'a str)>,
        deps: &[Vec<Dependency>],
    ) -> Result<Self> {
        let mut preread = Self::default();
        // Every epoch before the view: a keyed op that leaves the ring after its
        // epoch was read moves the epoch, and one that left before had its
        // completion in the store already, so in this view.
        let epochs: Vec<(AgentId, &str, u64)> = keys
            .map(|(agent, key)| (agent, key, ring.key_epochs.read(&agent, key)))
            .collect();
        // Most batches name no key: no view for them.
        if !epochs.is_empty() {
            let view = ring.store.view();
            for (agent, key, epoch) in epochs {
                let stored = view
                    .get(ring.store.keyspace(store::IDEM), idempotency_key(&agent, key))
                    .map_err(|e| storage_error("read idempotency keys", e))?
                    .map(|bytes| decode_idempotency(&bytes).map(|(id, digest)| (id, Some(digest))))
                    .transpose()?;
                preread.keys.insert((agent, key.to_owned()), (epoch, stored));
            }
        }
        for dep in deps.iter().flatten() {
            if let Dependency::Op(id) = dep
                && let Some(done) = ring.stored_completion(id)?
            {
                preread.completions.insert(*id, Arc::new(done));
            }
        }
        Ok(preread)
    }

    /// What the engine asks of the store under the ring's lock: this read, or
    /// the store itself where this read may be stale.
    pub fn with<'a>(&'a self, ring: &'a Ring) -> Lookup<'a> {
        Lookup { preread: self, ring }
    }

    /// What the store holds for a key that no live op holds, read under the
    /// ring's lock only if the read before it may be stale.
    pub fn key(&self, ring: &Ring, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>> {
        match self.keys.get(&(*agent, key.to_owned())) {
            Some((_, Some(found))) => Ok(Some(found.clone())),
            Some((epoch, None)) if *epoch == ring.key_epochs.read(agent, key) => Ok(None),
            _ => ring.stored_key(agent, key),
        }
    }

    /// The completion of an op that is not live, from the read before the lock,
    /// or read now if that found none.
    pub fn completion(&self, ring: &Ring, id: &OpId) -> Result<Option<Arc<Completion>>> {
        match self.completions.get(id) {
            Some(done) => Ok(Some(done.clone())),
            None => Ok(ring.stored_completion(id)?.map(Arc::new)),
        }
    }
}

/// A [`Preread`] backed by its ring's store.
pub(super) struct Lookup<'a> {
    preread: &'a Preread,
    ring: &'a Ring,
}

impl Recorded for Lookup<'_> {
    fn key(&self, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>> {
        self.preread.key(self.ring, agent, key)
    }

    fn completion(&self, id: &OpId) -> Result<Option<Arc<Completion>>> {
        self.preread.completion(self.ring, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::tests::Fixture;
    use bbx_core::op::SubmitOp;

    /// A miss read at an epoch that moved since (an op of that key left the ring
    /// in between) is read again; one at the current epoch stands.
    #[tokio::test]
    async fn a_miss_read_before_a_keyed_op_left_the_ring_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Fixture::open(dir.path()).await;
        let (ring, agent) = (&fixture.ring, fixture.agent);
        let before = ring.key_epochs.read(&agent, "k");
        let mut keyed = SubmitOp::new(agent, "noop", serde_json::json!({}));
        keyed.idempotency_key = Some("k".into());
        let id = fixture.submit(keyed).await.unwrap();
        let done = ring
            .wait(&fixture.admin, &id, std::time::Duration::from_secs(30))
            .await
            .unwrap();
        assert!(done.completion.is_some());

        let mut stale = Preread::default();
        stale.keys.insert((agent, "k".to_owned()), (before, None));
        assert_eq!(stale.key(ring, &agent, "k").unwrap().map(|(op, _)| op), Some(id));
        let mut current = Preread::default();
        let epoch = ring.key_epochs.read(&agent, "other");
        current.keys.insert((agent, "other".to_owned()), (epoch, None));
        assert!(current.key(ring, &agent, "other").unwrap().is_none());
        fixture.close().await;
    }
}
