//! An agent's data carried out of its components and back in (snapshots,
//! forks): each component's export ([`Exported`] records, together an
//! [`AgentData`]), how one store write changes an export ([`StoreWrite`],
//! for replaying the journal's history), the atomic [`Import`], and what the
//! kernel does for a component that saves and restores whole agents
//! ([`AgentHost`]).

use crate::{Component, Pending};
use bbx_auth::Caller;
use bbx_core::{AgentId, Result};
use bbx_store::GroupTx;
use fjall::{Readable, Snapshot};
use std::sync::Arc;

/// One record of an agent's data as its component exports it: opaque to anyone
/// else, given back to the same component's [`Component::import`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// A store write as the journal's history holds it: keyspace id, key, and the
/// new value (`None` removes the key).
#[derive(Debug, Clone, Copy)]
pub struct StoreWrite<'a> {
    pub keyspace: u8,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// What a store write does to an export: the record's key, and its new value
/// (`None` removes the record).
pub type ExportedWrite = (Vec<u8>, Option<Vec<u8>>);

/// What the kernel does for a component that saves and restores whole agents
/// (snapshots, forks): implemented by the kernel, handed over in [`Context`].
pub trait AgentHost: Send + Sync {
    /// The agent's record (`not_found` if there is none). Not checked against
    /// a caller: an endpoint asks [`Submitter::may_read`] first.
    fn agent(&self, agent: &AgentId) -> Result<bbx_core::model::Agent>;

    /// Every component's data of the agent, read in `view`.
    fn export(&self, view: &Snapshot, agent: &AgentId) -> Result<AgentData>;

    /// Maps a store write to the export part (by component name) it changes.
    fn exported_write(&self, agent: &AgentId, write: StoreWrite<'_>) -> Option<(&'static str, ExportedWrite)>;

    /// The name of every component: the parts an import may have.
    fn parts(&self) -> Vec<&'static str>;

    /// The write that imports `data` into every component that has a part of it.
    fn import(&self, data: AgentData) -> Result<Box<dyn bbx_store::Staged>>;

    /// An import of `data`'s parts committed: the components drop what they
    /// hold in memory of the agent.
    fn imported(&self, data: &AgentData);

    /// Creates an agent as `caller`.
    fn create_agent<'a>(
        &'a self,
        caller: &'a Caller,
        request: bbx_core::model::CreateAgent,
    ) -> Pending<'a, bbx_core::model::Agent>;

    /// Deletes an agent as `caller` (a fork that failed half way).
    fn delete_agent<'a>(&'a self, caller: &'a Caller, agent: AgentId) -> Pending<'a, ()>;

    /// The agent's own quota limits.
    fn quota_limits(&self, agent: &AgentId) -> bbx_core::quota::QuotaLimits;

    /// Sets the agent's quota limits as `caller`.
    fn set_quota_limits<'a>(
        &'a self,
        caller: &'a Caller,
        agent: AgentId,
        limits: bbx_core::quota::QuotaLimits,
    ) -> Pending<'a, ()>;

    /// The agent's workspace directory (where its file tools work), made if
    /// it is not there.
    fn workspace(&self, agent: &AgentId) -> Result<std::path::PathBuf>;

    /// Announces a capture of the agent's workspace now: its file and program
    /// ops that begin after this wait until the capture is dropped (call
    /// [`crate::workspace_gate::WorkspaceCapture::quiet`] before reading it).
    fn capture_workspace(&self, agent: &AgentId) -> Result<crate::workspace_gate::WorkspaceCapture>;
}

/// An agent's data, as each component exported it (by component name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentData {
    pub agent: AgentId,
    pub parts: Vec<(String, Vec<Exported>)>,
}

/// Imports an agent's data into every component that exported a part of it, in
/// one group: all of it, or (if any part fails) none.
pub struct Import {
    pub(crate) data: AgentData,
    pub(crate) components: Vec<Arc<dyn Component>>,
}

impl std::fmt::Debug for Import {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Import")
            .field("agent", &self.data.agent)
            .finish_non_exhaustive()
    }
}

impl bbx_store::Staged for Import {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<bbx_store::Applied> {
        tx.all_or_nothing(|tx| {
            for (component, (_, records)) in self.components.iter().zip(&self.data.parts) {
                component.import(tx, &self.data.agent, records)?;
            }
            Ok(bbx_store::Applied::Done)
        })
    }
}

/// Keyspaces whose keys start with the agent's id, exported as records keyed
/// by the keyspace's id and the rest of the key: what most components export
/// (see `bbx-context` and `bbx-memory`).
#[derive(Debug, Clone, Copy)]
pub struct AgentKeyspaces(pub &'static [bbx_store::KeyspaceDef]);

/// A record of [`AgentKeyspaces`] as the store keeps it: keyspace, key, value.
pub type StoredRecord = (bbx_store::KeyspaceDef, Vec<u8>, Vec<u8>);

impl AgentKeyspaces {
    /// Every record of the agent, as read in `view`.
    pub fn export(&self, store: &bbx_store::Store, view: &Snapshot, agent: &AgentId) -> Result<Vec<Exported>> {
        let mut records = Vec::new();
        for keyspace in self.0 {
            for kv in view.prefix(store.keyspace(*keyspace), agent.as_bytes()) {
                let (key, value) = kv
                    .into_inner()
                    .map_err(|e| bbx_store::storage_error("export an agent's records", e))?;
                let mut exported = vec![keyspace.id];
                exported.extend_from_slice(&key[16..]);
                records.push(Exported {
                    key: exported,
                    value: value.to_vec(),
                });
            }
        }
        Ok(records)
    }

    /// How a store write changes the agent's export, if it is of these keyspaces
    /// and the agent.
    pub fn exported_write(&self, agent: &AgentId, write: StoreWrite<'_>) -> Option<ExportedWrite> {
        let rest = write.key.strip_prefix(agent.as_bytes().as_slice())?;
        self.0.iter().find(|keyspace| keyspace.id == write.keyspace)?;
        let mut key = vec![write.keyspace];
        key.extend_from_slice(rest);
        Some((key, write.value.map(<[u8]>::to_vec)))
    }

    /// The agent's store records that exported `records` stand for; a record
    /// of no keyspace here is `invalid_argument` naming `what` exported it.
    pub fn stored(&self, agent: &AgentId, records: &[Exported], what: &str) -> Result<Vec<StoredRecord>> {
        records
            .iter()
            .map(|record| {
                let keyspace = self
                    .0
                    .iter()
                    .find(|k| record.key.first() == Some(&k.id))
                    .ok_or_else(|| {
                        bbx_core::Error::invalid_field("parts", format!("a {what} record names no {what} keyspace"))
                    })?;
                let mut key = agent.as_bytes().to_vec();
                key.extend_from_slice(&record.key[1..]);
                Ok((*keyspace, key, record.value.clone()))
            })
            .collect()
    }

    /// The agent's keys in each keyspace as `tx` leaves them so far.
    pub fn keys(&self, tx: &GroupTx<'_>, agent: &AgentId) -> Result<Vec<(bbx_store::KeyspaceDef, Vec<u8>)>> {
        let mut keys = Vec::new();
        for keyspace in self.0 {
            let held = tx.keys_with_prefix(*keyspace, agent.as_bytes())?;
            keys.extend(held.into_iter().map(|key| (*keyspace, key)));
        }
        Ok(keys)
    }
}
