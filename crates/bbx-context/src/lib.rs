//! ContextTiering: an agent's whole context, cheap to hold, fast to get
//! back, and assembled into windows a prompt cache keeps serving.
//!
//! `bbx-context` owns agents' context items in the kernel's store and
//! guarantees:
//! - **Acknowledged means durable.** `context.put` is an op: journaled, its
//!   record and block staged with its completion, so an acknowledged item is
//!   there after any crash, and a put run again with its idempotency key adds
//!   nothing.
//! - **Four tiers, each read back exactly.** HOT (in memory), WARM (in
//!   memory, lz4), COOL (on disk, zstd) and COLD (on disk, zstd at a higher
//!   level) ([`codec`]); every block carries the CRC32 of its content, so a
//!   damaged one is reported, never served. Access promotes to HOT; the
//!   migrator ([`migrate`]) ages items down under byte budgets per agent and
//!   global, MGLRU-style (oldest generation, then least important, first),
//!   off every reader's and writer's path; a demotion that cannot be written
//!   leaves the item where it was.
//! - **An idle agent costs no memory.** An agent's index is loaded on first
//!   use and let go when idle (its blocks are on disk already; those still
//!   lz4 are rewritten as COOL afterwards).
//! - **Learned importance.** Gradient-boosted trees over access features,
//!   trained on the re-accesses the kernel observes, persisted, with a fixed
//!   formula before there is data ([`importance`]); prefetch by co-access
//!   and by hint ([`prefetch`]).
//! - **Prefix-stable windows.** `context.assemble` keeps the previous window
//!   as its prefix whenever it can and compacts rarely, evicted spans
//!   replaced by a summary ([`assemble`], [`summary`]).
//!
//! [`item`] lays the data out, [`state`] is what memory holds of an agent,
//! `contexts` the runtime, `ops`, `views`, `window` and `endpoints` the
//! interfaces.

pub mod assemble;
mod chores;
pub mod codec;
mod cold_objects;
mod cold_search;
mod component;
mod contexts;
mod endpoints;
pub mod importance;
pub mod item;
mod lifecycle;
pub mod migrate;
mod model_summary;
mod ops;
pub mod prefetch;
pub mod state;
pub mod summary;
pub mod tokens;
mod views;
mod window;

pub use contexts::{Contexts, Got};
pub use ops::PutArgs;
pub use window::Asker;

use bbx_store::KeyspaceDef;

/// agent, id -> an item's [`item::Record`] as JSON. Ids are what redo records
/// carry: never change them.
pub const CONTEXT_ITEMS: KeyspaceDef = KeyspaceDef {
    id: 32,
    name: "context_items",
};
/// agent, id -> the item's content as a [`codec`] block.
pub const CONTEXT_BLOCKS: KeyspaceDef = KeyspaceDef {
    id: 33,
    name: "context_blocks",
};
/// agent, id -> its [`item::Access`].
pub const CONTEXT_ACCESS: KeyspaceDef = KeyspaceDef {
    id: 34,
    name: "context_access",
};
/// agent, what -> the agent's id sequence and last window.
pub const CONTEXT_AGENTS: KeyspaceDef = KeyspaceDef {
    id: 35,
    name: "context_agents",
};
/// `importance` -> the trained model.
pub const CONTEXT_MODEL: KeyspaceDef = KeyspaceDef {
    id: 36,
    name: "context_model",
};

/// agent, id -> what a write left to do for the item outside the store
/// ([`chores`]): add it to memory, forget it there, remove objects.
pub const CONTEXT_CHORES: KeyspaceDef = KeyspaceDef {
    id: 46,
    name: "context_chores",
};

pub const KEYSPACES: [KeyspaceDef; 6] = [
    CONTEXT_ITEMS,
    CONTEXT_BLOCKS,
    CONTEXT_ACCESS,
    CONTEXT_AGENTS,
    CONTEXT_MODEL,
    CONTEXT_CHORES,
];
