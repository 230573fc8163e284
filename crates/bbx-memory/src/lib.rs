//! SemanticMemory: what agents remember, searched by meaning and by words.
//!
//! `bbx-memory` owns memories in the kernel's store and guarantees:
//! - **Acknowledged means durable.** `memory.add` is an op: journaled, its
//!   record and vector staged with its completion in one write, so a memory that
//!   was acknowledged is found after any crash, and an add run again with its
//!   idempotency key adds nothing.
//! - **One index, a namespace per agent.** Every agent's vectors live in one
//!   HNSW graph ([`embedded`]), tagged with the agent; small namespaces (and
//!   selective filters) are searched exactly. An agent's search never returns
//!   another agent's memory.
//! - **Embeddings in process.** all-MiniLM-L6-v2 on candle ([`embed`]), fetched
//!   by `bbx models fetch` ([`models`]), matches sentence-transformers to cosine
//!   0.9999; or an OpenAI-compatible server. Every memory records its model, and
//!   a search compares only vectors of the model in use.
//! - **No LLM on the write path.** Exact duplicates merge by hash, near ones by
//!   cosine; a memory about the same subject supersedes the old one, which
//!   stays, no longer valid, for searches "as of" a past time ([`write`]).
//! - **Forgetting is deletion.** LRU, decay, age and capacity take memories out
//!   of the store and the index, for good ([`forget`]).
//! - **Memories go with the agent.** Snapshots, forks and recovery to a moment
//!   carry an agent's memories; a fork's get ids of their own (`agent_data`).
//!
//! [`record`] lays the data out, [`catalog`] is what RAM holds of it,
//! [`keyword`] the BM25 index, [`search`] the ranking, [`vectors`] the vector
//! store trait, `memories` the runtime, `ops` and `endpoints` the interfaces.

mod agent_data;
pub mod catalog;
mod component;
pub mod embed;
pub mod embedded;
mod endpoints;
pub mod forget;
pub mod keyword;
mod memories;
pub mod models;
mod ops;
pub mod record;
mod reembed;
pub mod search;
pub mod testing;
pub mod vectors;
pub mod write;

pub use memories::Memories;

use bbx_store::KeyspaceDef;

/// agent, id -> a [`record::Memory`] as JSON. Ids are what redo records carry:
/// never change them.
pub const MEMORY_ITEMS: KeyspaceDef = KeyspaceDef {
    id: 27,
    name: "memory_items",
};
/// agent, id -> its vector, f32 little-endian.
pub const MEMORY_VECTORS: KeyspaceDef = KeyspaceDef {
    id: 28,
    name: "memory_vectors",
};
/// agent, text hash -> the id of the valid memory with that text.
pub const MEMORY_HASHES: KeyspaceDef = KeyspaceDef {
    id: 29,
    name: "memory_hashes",
};
/// agent, subject -> the id of the memory that holds for it now.
pub const MEMORY_SUBJECTS: KeyspaceDef = KeyspaceDef {
    id: 30,
    name: "memory_subjects",
};
/// agent, id -> when it was last found or merged into, and how often.
pub const MEMORY_ACCESS: KeyspaceDef = KeyspaceDef {
    id: 31,
    name: "memory_access",
};

pub const KEYSPACES: [KeyspaceDef; 5] = [
    MEMORY_ITEMS,
    MEMORY_VECTORS,
    MEMORY_HASHES,
    MEMORY_SUBJECTS,
    MEMORY_ACCESS,
];
