//! The catalog: which snapshots are complete, in the kernel's store. A
//! snapshot is listed only once its chunks and manifest reached a quorum of
//! stores, and its entry commits with the completion of the op that took it:
//! an interrupted snapshot is never listed (its leftovers go at the next
//! garbage collection).

use bbx_core::{AgentId, Error, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// agent (16) + snapshot id (16) → [`Summary`] as JSON.
pub const SNAPSHOTS: KeyspaceDef = KeyspaceDef {
    id: 43,
    name: "snapshots",
};
/// snapshot id (16) → agent (16).
pub const SNAPSHOT_OWNERS: KeyspaceDef = KeyspaceDef {
    id: 44,
    name: "snapshot_owners",
};

/// A complete snapshot, as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub id: Uuid,
    pub agent: AgentId,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    pub position: u64,
    pub trigger: String,
    pub bytes: u64,
    pub bytes_written: u64,
    pub chunks: u64,
    pub new_chunks: u64,
    /// Each part and its record count.
    pub parts: Vec<(String, u64)>,
    /// Stores that hold it whole when it was taken.
    pub stores: usize,
}

fn key(agent: &AgentId, id: &Uuid) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.extend_from_slice(id.as_bytes());
    key
}

fn decode(bytes: &[u8]) -> Result<Summary> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("a snapshot's catalog entry is damaged: {e}")))
}

/// The agent's snapshots, oldest first.
pub fn list(store: &Store, agent: &AgentId) -> Result<Vec<Summary>> {
    store
        .view()
        .prefix(store.keyspace(SNAPSHOTS), agent.as_bytes())
        .map(|kv| {
            let (_, value) = kv.into_inner().map_err(|e| storage_error("list snapshots", e))?;
            decode(&value)
        })
        .collect()
}

/// A snapshot by id.
pub fn get(store: &Store, id: &Uuid) -> Result<Option<Summary>> {
    let view = store.view();
    let Some(owner) = view
        .get(store.keyspace(SNAPSHOT_OWNERS), id.as_bytes())
        .map_err(|e| storage_error("read a snapshot", e))?
    else {
        return Ok(None);
    };
    let agent = AgentId::from_bytes(
        owner
            .as_ref()
            .try_into()
            .map_err(|_| Error::internal("a snapshot's owner is damaged"))?,
    );
    view.get(store.keyspace(SNAPSHOTS), key(&agent, id))
        .map_err(|e| storage_error("read a snapshot", e))?
        .map(|bytes| decode(&bytes))
        .transpose()
}

/// Every snapshot id in the catalog (what garbage collection keeps).
pub fn all_ids(store: &Store) -> Result<Vec<Uuid>> {
    store
        .view()
        .iter(store.keyspace(SNAPSHOT_OWNERS))
        .map(|kv| {
            let key = kv.key().map_err(|e| storage_error("list snapshots", e))?;
            Uuid::from_slice(&key).map_err(|_| Error::internal("a snapshot id in the catalog is damaged"))
        })
        .collect()
}

/// Lists a snapshot.
pub fn stage_put(tx: &mut GroupTx<'_>, summary: &Summary) -> Result<()> {
    let value = serde_json::to_vec(summary).map_err(|e| Error::internal(e.to_string()))?;
    tx.put(SNAPSHOTS, key(&summary.agent, &summary.id), value);
    tx.put(
        SNAPSHOT_OWNERS,
        summary.id.as_bytes().to_vec(),
        summary.agent.as_bytes().to_vec(),
    );
    Ok(())
}

/// Unlists a snapshot.
pub fn stage_remove(tx: &mut GroupTx<'_>, agent: &AgentId, id: &Uuid) {
    tx.remove(SNAPSHOTS, key(agent, id));
    tx.remove(SNAPSHOT_OWNERS, id.as_bytes().to_vec());
}

/// Lists a snapshot built outside a `snapshot.create` op: one a flow policy
/// asked for before an op ran.
#[derive(Debug)]
pub struct List(pub Summary);

impl Staged for List {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        stage_put(tx, &self.0)?;
        Ok(Applied::Done)
    }
}

/// Unlists snapshots (retention, a deleted agent's), in one write.
#[derive(Debug)]
pub struct Unlist(pub Vec<(AgentId, Uuid)>);

impl Staged for Unlist {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        for (agent, id) in &self.0 {
            stage_remove(tx, agent, id);
        }
        Ok(Applied::Done)
    }
}
