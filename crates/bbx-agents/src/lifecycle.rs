//! The state component's part in an agent's life: a deleted agent's state purged
//! in the background (resumed after a crash), and an agent's state exported and
//! imported whole.

use crate::{AgentWrite, STATE, decode_state, encode_labelled_state, pending_purges};
use bbx_component::{Context, Exported, ExportedWrite, StoreWrite};
use bbx_core::{AgentId, Result};
use bbx_store::{Applied, GroupTx, Store, storage_error};
use fjall::Readable;

/// State keys removed per committer group when purging a deleted agent.
const PURGE_STEP: usize = 1024;

/// Resumes the purges a crash interrupted.
pub(crate) fn resume_purges(ctx: &Context) -> Result<()> {
    for agent in pending_purges(&ctx.store)? {
        purge(ctx, agent);
    }
    Ok(())
}

/// Removes a deleted agent's state in bounded steps, each its own group, so that
/// other writers interleave. Stops early if the kernel shuts down; the durable
/// purge marker makes the next start resume it.
pub(crate) fn purge(ctx: &Context, agent: AgentId) {
    let store = ctx.store.clone();
    ctx.tasks.spawn(async move {
        loop {
            let step = AgentWrite::PurgeState {
                agent,
                max_keys: PURGE_STEP,
            };
            match store.write(step).await {
                Ok(Applied::More) => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::info!(%agent, error = %e, "purge of a deleted agent's state paused until the next start");
                    break;
                }
            }
        }
    });
}

/// Every state key of the agent (tombstones left out) with its stored value,
/// as read in `view`.
pub(crate) fn export(store: &Store, view: &fjall::Snapshot, agent: &AgentId) -> Result<Vec<Exported>> {
    let prefix = agent.as_bytes();
    let mut records = Vec::new();
    for item in view.prefix(store.keyspace(STATE), prefix) {
        let (key, value) = item.into_inner().map_err(|e| storage_error("export state", e))?;
        if decode_state(&value)?.is_tombstone() {
            continue;
        }
        records.push(Exported {
            key: key[prefix.len()..].to_vec(),
            value: value.to_vec(),
        });
    }
    Ok(records)
}

/// How a write to the state keyspace changes the agent's export: a tombstone
/// (or a value that does not decode) removes the key's record.
pub(crate) fn exported_write(agent: &AgentId, write: StoreWrite<'_>) -> Option<ExportedWrite> {
    let key = write.key.strip_prefix(agent.as_bytes().as_slice())?;
    if write.keyspace != STATE.id || key.is_empty() {
        return None;
    }
    let value = write
        .value
        .filter(|value| decode_state(value).is_ok_and(|stored| !stored.is_tombstone()));
    Some((key.to_vec(), value.map(<[u8]>::to_vec)))
}

/// Replaces the agent's state with `records`. A key whose value (and labels)
/// it already has is left as it is; any other moves its version on past the one
/// it has now (a restored key never goes back to a version a client has seen
/// with another value); keys not in `records` are removed.
pub(crate) fn import(tx: &mut GroupTx<'_>, agent: &AgentId, records: &[Exported]) -> Result<()> {
    let prefix = agent.as_bytes().to_vec();
    let mut current: std::collections::HashMap<Vec<u8>, Vec<u8>> = std::collections::HashMap::new();
    for item in tx.keyspace(STATE)?.prefix(&prefix) {
        let (key, value) = item.into_inner().map_err(|e| storage_error("read state", e))?;
        current.insert(key.to_vec(), value.to_vec());
    }
    let staged: Vec<(Vec<u8>, Option<Vec<u8>>)> = tx
        .staged(STATE)
        .range(prefix.clone()..)
        .take_while(|(key, _)| key.starts_with(&prefix))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    for (key, value) in staged {
        match value {
            Some(value) => current.insert(key, value),
            None => current.remove(&key),
        };
    }
    let mut restored = Vec::with_capacity(records.len());
    for record in records {
        let stored = decode_state(&record.value)?;
        let mut key = prefix.clone();
        key.extend_from_slice(&record.key);
        let now = current.remove(&key);
        let now = now.as_deref().map(decode_state).transpose()?;
        if now
            .as_ref()
            .is_some_and(|now| !now.is_tombstone() && now.json == stored.json && now.labels == stored.labels)
        {
            continue;
        }
        let version = stored.version.max(now.map_or(0, |now| now.version + 1));
        if version >= crate::codec::MAX_VERSION {
            return Err(bbx_core::Error::invalid_field(
                "state",
                format!("an imported state value's version {version} is out of range"),
            ));
        }
        // The labels come back with the value: an imported tainted value stays so.
        let value = encode_labelled_state(version, stored.updated_at, &stored.labels, stored.json);
        restored.push((key, value));
    }
    for key in current.into_keys() {
        tx.remove(STATE, key);
    }
    for (key, value) in restored {
        tx.put(STATE, key, value);
    }
    Ok(())
}
