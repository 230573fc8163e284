//! An agent's memories carried out and back in (snapshots, forks, recovery to
//! a moment): the records of its five keyspaces, as the store holds them.
//!
//! Memory ids are keys of the one vector index every agent shares, so an
//! import gives a memory a new id where another agent holds its id (a fork of
//! an agent that still has it), and rewrites every place that names it (the
//! record, its vector and access, the hash and subject that point at it, a
//! supersession). A restore of the agent itself keeps the ids it still holds;
//! every other memory gets a new one, so two forks of one snapshot never share
//! an id, whoever held it once.

use crate::record::{Access, Memory, MemoryId, decode_vector, memory_key, parse_memory_key};
use crate::{KEYSPACES, MEMORY_ACCESS, MEMORY_HASHES, MEMORY_ITEMS, MEMORY_SUBJECTS, MEMORY_VECTORS, Memories};
use bbx_component::{AgentKeyspaces, Exported};
use bbx_core::{AgentId, Error, Result};
use bbx_store::GroupTx;
use fjall::Readable;
use rustc_hash::{FxHashMap, FxHashSet};

/// What an agent's memories are exported from.
pub(crate) const EXPORTED: AgentKeyspaces = AgentKeyspaces(&KEYSPACES);

fn bad(why: impl std::fmt::Display) -> Error {
    Error::invalid_field("parts", format!("a memory record does not import: {why}"))
}

/// An 8-byte id as the hash and subject keyspaces hold it.
fn id_of(value: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| bad("an index entry is not an id"))?;
    Ok(u64::from_be_bytes(bytes))
}

impl Memories {
    /// Replaces the agent's memories with `records` (an export), staged in
    /// `tx`: every record is checked first, so a bad one imports nothing.
    pub(crate) fn import(&self, tx: &mut GroupTx<'_>, agent: &AgentId, records: &[Exported]) -> Result<()> {
        let incoming = EXPORTED.stored(agent, records, "memory")?;
        let (renamed, current) = self.new_ids(agent, &incoming)?;
        let dimensions = self.0.embedder.dimensions();
        let rename = |id: u64| {
            renamed
                .get(&id)
                .copied()
                .ok_or_else(|| bad(format!("{} names no memory of the export", MemoryId(id))))
        };
        let mut writes = Vec::with_capacity(incoming.len());
        for (keyspace, key, value) in incoming {
            let write = if keyspace == MEMORY_HASHES || keyspace == MEMORY_SUBJECTS {
                (key, rename(id_of(&value)?)?.to_be_bytes().to_vec())
            } else {
                let (_, id) = parse_memory_key(&key).ok_or_else(|| bad("a key is not a memory's"))?;
                let new = MemoryId(rename(id.0)?);
                let value = match keyspace {
                    MEMORY_ITEMS => {
                        let mut memory = Memory::decode(&value).map_err(|e| bad(e.message))?;
                        memory.id = new;
                        memory.superseded_by = memory
                            .superseded_by
                            .and_then(|s| renamed.get(&s.0).map(|n| MemoryId(*n)));
                        memory.encode()
                    }
                    MEMORY_VECTORS
                        if value.len() % 4 != 0
                            || (current.contains(&id.0) && value.len() != dimensions * 4)
                            || decode_vector(&value).iter().any(|x| !x.is_finite()) =>
                    {
                        return Err(bad(format!(
                            "memory {id}'s vector does not decode to the model's dimensions"
                        )));
                    }
                    MEMORY_ACCESS if value.len() != Access::BYTES => {
                        return Err(bad(format!("memory {id}'s access does not decode")));
                    }
                    _ => value,
                };
                (memory_key(agent, new), value)
            };
            writes.push((keyspace, write));
        }
        for (keyspace, key) in EXPORTED.keys(tx, agent)? {
            tx.remove(keyspace, key);
        }
        for (keyspace, (key, value)) in writes {
            tx.put(keyspace, key, value);
        }
        Ok(())
    }

    /// Each imported memory's id: its own where the agent holds it now, else
    /// a new one; and the memories of the model in use.
    fn new_ids(
        &self,
        agent: &AgentId,
        incoming: &[bbx_component::StoredRecord],
    ) -> Result<(FxHashMap<u64, u64>, FxHashSet<u64>)> {
        let catalog = self.0.catalog.read();
        let model = self.0.embedder.model();
        let mut renamed = FxHashMap::default();
        let mut current = FxHashSet::default();
        let mut taken = FxHashSet::default();
        for (keyspace, key, value) in incoming {
            if *keyspace != MEMORY_ITEMS {
                continue;
            }
            let (_, id) = parse_memory_key(key).ok_or_else(|| bad("a key is not a memory's"))?;
            let memory = Memory::decode(value).map_err(|e| bad(e.message))?;
            if memory.id != id {
                return Err(bad(format!("memory {} is filed under {id}", memory.id)));
            }
            let own = catalog.entries.get(&id.0).is_some_and(|e| e.agent == *agent);
            let new = match own && !taken.contains(&id.0) {
                true => id.0,
                false => std::iter::repeat_with(|| MemoryId::random().0)
                    .find(|fresh| !catalog.entries.contains_key(fresh) && !taken.contains(fresh))
                    .unwrap_or_default(),
            };
            taken.insert(new);
            renamed.insert(id.0, new);
            if memory.model == model {
                current.insert(id.0);
            }
        }
        Ok((renamed, current))
    }

    /// An import of the agent's memories committed: the catalog and the index
    /// let go of what they held of it and take what the store holds now.
    pub(crate) fn relearn(&self, agent: &AgentId) -> Result<()> {
        let held: Vec<MemoryId> = self.0.catalog.read().of(agent).map(|(id, _)| MemoryId(id)).collect();
        self.unlearn(&held)?;
        let store = self.store()?;
        let view = store.view();
        let mut stale_model = false;
        for kv in view.prefix(store.keyspace(MEMORY_ITEMS), agent.as_bytes()) {
            let (key, _) = kv
                .into_inner()
                .map_err(|e| bbx_store::storage_error("read memories", e))?;
            let Some((_, id)) = parse_memory_key(&key) else {
                continue;
            };
            if let Err(e) = self.learn(*agent, id) {
                tracing::error!(error = %e, %agent, %id, "an imported memory could not be indexed (a restart does)");
                continue;
            }
            let access = view
                .get(store.keyspace(MEMORY_ACCESS), &key)
                .map_err(|e| bbx_store::storage_error("read memories", e))?;
            let mut catalog = self.0.catalog.write();
            if let Some(entry) = catalog.entries.get_mut(&id.0) {
                if let Some(access) = access {
                    entry.access = Access::decode(&access);
                }
                stale_model |= !entry.current_model;
            }
        }
        if stale_model {
            self.reembed_later();
        }
        Ok(())
    }
}
