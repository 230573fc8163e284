//! An agent's context as a whole: exported and imported (snapshots, forks),
//! and let go when the agent is deleted: every record under its prefix,
//! in bounded steps (a step is one write, small enough for one journal
//! record).

use crate::KEYSPACES;
use bbx_core::{AgentId, Result};
use bbx_store::{Applied, GroupTx, Staged, Store, storage_error};
use fjall::Readable;

/// Keys removed per step.
const STEP: usize = 2000;

/// Removes up to [`STEP`] of the agent's records; answers how many.
#[derive(Debug)]
struct ForgetStep(AgentId);

impl Staged for ForgetStep {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let mut removed = 0usize;
        for keyspace in KEYSPACES.iter().filter(|k| k.id != crate::CONTEXT_MODEL.id) {
            let keys: Vec<Vec<u8>> = tx
                .keyspace(*keyspace)?
                .prefix(self.0.as_bytes())
                .take(STEP - removed)
                .map(|kv| kv.into_inner().map(|(k, _)| k.to_vec()))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| storage_error("list a deleted agent's context", e))?;
            removed += keys.len();
            for key in keys {
                tx.remove(*keyspace, key);
            }
            if removed == STEP {
                break;
            }
        }
        Ok(Applied::output(removed))
    }
}

/// Removes the context of agents that no longer exist: what a crash left
/// behind of a deletion (each agent's context has its id sequence, so one
/// key per agent is read).
pub(crate) async fn forget_orphans(store: &Store) -> Result<()> {
    let agents = store.keyspace(bbx_agents::AGENTS);
    let view = store.view();
    let mut orphans = Vec::new();
    for kv in view.iter(store.keyspace(crate::CONTEXT_AGENTS)) {
        let (key, _) = kv.into_inner().map_err(|e| storage_error("list contexts", e))?;
        let Some(agent) = key
            .get(..16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(AgentId::from_bytes)
        else {
            continue;
        };
        if key[16..] == *crate::contexts::SEQUENCE
            && view
                .get(agents, agent.as_bytes())
                .map_err(|e| storage_error("read an agent", e))?
                .is_none()
        {
            orphans.push(agent);
        }
    }
    for agent in orphans {
        forget_agent(store, agent).await?;
    }
    Ok(())
}

/// Removes all the agent's records, step by step.
pub(crate) async fn forget_agent(store: &Store, agent: AgentId) -> Result<()> {
    loop {
        let removed: usize = store.write(ForgetStep(agent)).await?.into_output()?;
        if removed < STEP {
            return Ok(());
        }
    }
}

/// The keyspaces an agent's context is exported from, by id: what the first
/// byte of an exported key names.
const EXPORTED: bbx_component::AgentKeyspaces = bbx_component::AgentKeyspaces(&[
    crate::CONTEXT_ITEMS,
    crate::CONTEXT_BLOCKS,
    crate::CONTEXT_ACCESS,
    crate::CONTEXT_AGENTS,
]);

/// Every record of the agent's context, as durable now. Blocks kept in object
/// storage are exported whole (`resolve` fetches them, together), so an export
/// stands on its own.
pub(crate) fn export(
    store: &Store,
    view: &fjall::Snapshot,
    agent: &AgentId,
    resolve: impl Fn(Vec<Vec<u8>>) -> Vec<Result<Vec<u8>>>,
) -> Result<Vec<bbx_component::Exported>> {
    let blocks_id = crate::CONTEXT_BLOCKS.id;
    let (blocks, mut records): (Vec<_>, Vec<_>) = EXPORTED
        .export(store, view, agent)?
        .into_iter()
        .partition(|record| record.key.first() == Some(&blocks_id));
    let (keys, values): (Vec<Vec<u8>>, Vec<Vec<u8>>) = blocks.into_iter().map(|r| (r.key, r.value)).unzip();
    for (key, value) in keys.into_iter().zip(resolve(values)) {
        records.push(bbx_component::Exported { key, value: value? });
    }
    Ok(records)
}

/// How a write to a context keyspace changes the agent's export.
pub(crate) fn exported_write(
    agent: &AgentId,
    write: bbx_component::StoreWrite<'_>,
) -> Option<bbx_component::ExportedWrite> {
    EXPORTED.exported_write(agent, write)
}

/// Replaces the agent's context with `records`. Its id sequence never goes
/// back: an item put after the export keeps an id nobody else gets.
pub(crate) fn import(tx: &mut GroupTx<'_>, agent: &AgentId, records: &[bbx_component::Exported]) -> Result<()> {
    let sequence = crate::item::agent_key(agent, crate::contexts::SEQUENCE);
    let current = crate::item::counter(tx.read(crate::CONTEXT_AGENTS, &sequence)?);
    let incoming = EXPORTED.stored(agent, records, "context")?;
    for (keyspace, key) in EXPORTED.keys(tx, agent)? {
        if keyspace == crate::CONTEXT_BLOCKS {
            replaced_objects(tx, agent, &key, &incoming)?;
        }
        tx.remove(keyspace, key);
    }
    check_items(agent, &incoming)?;
    let mut imported_sequence = 0;
    for (keyspace, key, value) in incoming {
        if keyspace == crate::CONTEXT_AGENTS && key == sequence {
            imported_sequence = crate::item::counter(Some(&value));
            continue;
        }
        tx.put(keyspace, key, value);
    }
    tx.put(
        crate::CONTEXT_AGENTS,
        sequence,
        current.max(imported_sequence).to_be_bytes().to_vec(),
    );
    // What was held in memory of the agent before is stale: writes made from
    // it (a saved window) check the epoch and give way.
    let epoch_key = crate::item::agent_key(agent, crate::contexts::EPOCH);
    let epoch = crate::item::counter(tx.read(crate::CONTEXT_AGENTS, &epoch_key)?) + 1;
    tx.put(crate::CONTEXT_AGENTS, epoch_key, epoch.to_be_bytes().to_vec());
    Ok(())
}

/// An import's items are what this crate wrote: each record decodes, names
/// the id of its key, and its block decodes to content of its size.
/// An import writes over the block at `key`: the object it names, unless the
/// import keeps naming it, goes (a chore).
fn replaced_objects(
    tx: &mut GroupTx<'_>,
    agent: &AgentId,
    key: &[u8],
    incoming: &[bbx_component::StoredRecord],
) -> Result<()> {
    let Some(old) = tx.read(crate::CONTEXT_BLOCKS, key)? else {
        return Ok(());
    };
    let Some(name) = crate::codec::remote_name(&old) else {
        return Ok(());
    };
    let kept = incoming
        .iter()
        .any(|(k, _, v)| *k == crate::CONTEXT_BLOCKS && crate::codec::remote_name(v) == Some(name));
    match (kept, crate::item::parse_item_key(key)) {
        (false, Some(id)) => crate::chores::overwritten(tx, agent, id),
        _ => Ok(()),
    }
}

fn check_items(agent: &AgentId, incoming: &[bbx_component::StoredRecord]) -> Result<()> {
    let bad = |why: String| bbx_core::Error::invalid_field("parts", format!("a context item does not import: {why}"));
    let blocks: std::collections::HashMap<&[u8], &[u8]> = incoming
        .iter()
        .filter(|(k, _, _)| *k == crate::CONTEXT_BLOCKS)
        .map(|(_, key, value)| (key.as_slice(), value.as_slice()))
        .collect();
    for (keyspace, key, value) in incoming {
        if *keyspace != crate::CONTEXT_ITEMS {
            continue;
        }
        let record = crate::item::Record::decode(value).map_err(|e| bad(e.message))?;
        if crate::item::parse_item_key(key) != Some(record.id) {
            return Err(bad(format!("item {} is filed under another id", record.id)));
        }
        let block = blocks
            .get(key.as_slice())
            .ok_or_else(|| bad(format!("item {} has no block", record.id)))?;
        if let Some(name) = crate::codec::remote_name(block) {
            // A stub (a recovery to a moment replays the writes that made
            // it): the agent's own object, checked when it is read.
            bbx_objects::check_name(name).map_err(|e| bad(e.message))?;
            if !name.starts_with(&format!("{agent}/")) {
                return Err(bad(format!("item {} names another agent's object", record.id)));
            }
            continue;
        }
        let content = crate::codec::decode(block).map_err(|e| bad(e.message))?;
        if block.len() != record.stored_bytes as usize || content.len() != record.bytes as usize {
            return Err(bad(format!("item {}'s sizes do not match its block", record.id)));
        }
    }
    Ok(())
}
