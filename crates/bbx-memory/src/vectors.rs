//! The `VectorStore` trait: where memories' vectors are searched. The kernel's
//! store keeps every memory's record and vector (the truth, journaled); a vector
//! store is an index over them, kept in step by the memory component and rebuilt
//! from the store when it falls behind (a remote one drains its queue of changes
//! on a task of its own, retrying, while the store keeps what it must hold). One namespace per agent, inside one
//! index: never one index per agent.

use crate::record::MemoryId;
use bbx_component::Pending;
use bbx_core::AgentId;
use rustc_hash::FxHashSet;

/// A vector to index.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: MemoryId,
    pub namespace: AgentId,
    pub vector: Vec<f32>,
}

/// A nearest-neighbour query in one namespace.
#[derive(Debug, Clone, Copy)]
pub struct VectorQuery<'a> {
    pub namespace: AgentId,
    pub vector: &'a [f32],
    pub k: usize,
    /// Only these ids (what a metadata filter let through), if given.
    pub allowed: Option<&'a FxHashSet<u64>>,
}

/// A match: the memory and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Match {
    pub id: MemoryId,
    pub similarity: f32,
}

/// An index of vectors by namespace.
pub trait VectorStore: Send + Sync {
    /// Its name in stats and errors: `embedded`, `pgvector`, `chroma`.
    fn name(&self) -> &'static str;

    /// Adds or replaces points: queued at once, never waiting on the index (it
    /// is called as an op completes), and searchable from the moment it returns.
    fn upsert(&self, points: Vec<Point>) -> bbx_core::Result<()>;

    /// Removes ids (those it does not hold are no error), as `upsert` queues.
    fn remove(&self, ids: &[MemoryId]);

    /// The `k` nearest of the namespace (of `allowed`, if given), best first.
    fn search<'a>(&'a self, query: VectorQuery<'a>) -> Pending<'a, Vec<Match>>;

    /// Points it holds.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
