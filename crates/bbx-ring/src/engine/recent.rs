//! The completions of ops that left no record in the store (no effects, no key),
//! kept readable for a while.

use bbx_core::OpId;
use bbx_core::op::Completion;
use rustc_hash::FxHashMap;
use std::sync::Arc;

/// The newest `capacity` to `2 × capacity` completions, in two generations.
/// Forgetting them costs no removal per op (a random access into a large table):
/// a whole old generation is dropped at once.
pub(super) struct Recent {
    current: FxHashMap<OpId, Arc<Completion>>,
    previous: FxHashMap<OpId, Arc<Completion>>,
    generation: usize,
}

impl Recent {
    pub fn new(capacity: usize) -> Self {
        Self {
            current: FxHashMap::default(),
            previous: FxHashMap::default(),
            generation: capacity.max(1),
        }
    }

    pub fn get(&self, id: &OpId) -> Option<&Arc<Completion>> {
        self.current.get(id).or_else(|| self.previous.get(id))
    }

    /// Remembers a completion; returns the generation it pushed out, if any.
    pub fn insert(&mut self, id: OpId, completion: Arc<Completion>) -> Option<FxHashMap<OpId, Arc<Completion>>> {
        self.current.insert(id, completion);
        if self.current.len() < self.generation {
            return None;
        }
        // Sized for a whole generation at once: growing by doubling would rehash it
        // a dozen times under the ring's lock.
        let next = FxHashMap::with_capacity_and_hasher(self.generation, Default::default());
        let full = std::mem::replace(&mut self.current, next);
        Some(std::mem::replace(&mut self.previous, full))
    }
}
