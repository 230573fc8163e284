//! Agents and their versioned state: the kernel objects an agent is, stored in
//! their own keyspaces of [`bbx_store`], and the `state.*` op kinds served through
//! the component contract ([`StateOps`]).
//!
//! What it guarantees:
//! - an agent's record, its tenant index entry and the agent count change together,
//!   in one store group ([`AgentWrite`]);
//! - state writes are compare-and-swap on versions that only grow, across deletes
//!   too (a deleted key keeps its version in a tombstone), so a stale version never
//!   matches a re-created key;
//! - deleting an agent removes it at once and its state in bounded steps
//!   ([`AgentWrite::PurgeState`]), resumed after a restart from a durable marker;
//! - a `state.*` op's effect commits in the same group as its completion.
//!
//! Layout (all keys big-endian or raw bytes, so key order is the listing order):
//! - `agents`:   agent id (16 bytes)                 -> Agent as JSON
//! - `tenants`:  tenant, 0x00, agent id               -> empty (index for listing by tenant)
//! - `state`:    agent id (16 bytes), state key bytes -> version u64, updated_at ms i64, JSON
//! - `meta`:     name                                 -> value (agent count as u64, purge markers)

mod codec;
mod effect;
mod lifecycle;
mod ops;

pub use codec::{
    StoredState, decode_agent, decode_state, decode_u64, encode_labelled_state, encode_state, state_key,
    tenant_index_key,
};
pub use effect::Effect;
pub use ops::StateOps;

use bbx_core::model::Agent;
use bbx_core::{AgentId, Error, Result};
use bbx_store::{Applied, CommitterCache, GroupTx, KeyspaceDef, Staged, StagedWrites, Store, storage_error};
use chrono::{DateTime, Utc};
use effect::{StateVersion, check_version};
use fjall::Readable;
use rustc_hash::FxHashSet;

/// The keyspaces of agents and their state. Their ids are what redo records
/// carry: never change one.
pub const AGENTS: KeyspaceDef = KeyspaceDef { id: 0, name: "agents" };
pub const TENANTS: KeyspaceDef = KeyspaceDef { id: 1, name: "tenants" };
pub const STATE: KeyspaceDef = KeyspaceDef { id: 2, name: "state" };
pub const META: KeyspaceDef = KeyspaceDef { id: 4, name: "meta" };
pub const KEYSPACES: [KeyspaceDef; 4] = [AGENTS, TENANTS, STATE, META];

const AGENT_COUNT: &[u8] = b"agent_count";
const PURGE_PREFIX: &[u8] = b"purge/";

/// The `meta` key that says a deleted agent's state is still to be removed.
fn purge_marker(agent: &AgentId) -> Vec<u8> {
    [PURGE_PREFIX, agent.as_bytes()].concat()
}

/// A write to agents and their state, applied atomically or not at all.
#[derive(Debug)]
pub enum AgentWrite {
    Create(Agent),
    Delete(AgentId),
    SetState {
        agent: AgentId,
        key: String,
        value: Vec<u8>,
        if_version: Option<u64>,
        at: DateTime<Utc>,
        /// What the components said of the value (its taint).
        labels: Vec<String>,
    },
    DeleteState {
        agent: AgentId,
        key: String,
        if_version: Option<u64>,
        at: DateTime<Utc>,
    },
    /// Removes up to `max_keys` state keys of a deleted agent; done when fewer remain.
    PurgeState {
        agent: AgentId,
        max_keys: usize,
    },
}

impl Staged for AgentWrite {
    /// Checks the write's preconditions, then stages it. Every fallible read comes
    /// before the first `put`, so a write that fails stages nothing.
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        stage(tx, self)
    }
}

/// Deleted agents whose state is still being removed.
pub fn pending_purges(store: &Store) -> Result<Vec<AgentId>> {
    let mut agents = Vec::new();
    for item in store.view().prefix(store.keyspace(META), PURGE_PREFIX) {
        let key = item.key().map_err(|e| storage_error("read purges", e))?;
        let id: [u8; 16] = key[PURGE_PREFIX.len()..]
            .try_into()
            .map_err(|_| Error::internal("corrupt purge marker"))?;
        agents.push(AgentId::from_bytes(id));
    }
    Ok(agents)
}

/// An agent as the store's durable view holds it.
pub fn stored_agent(store: &Store, id: &AgentId) -> Result<Agent> {
    let bytes = store
        .view()
        .get(store.keyspace(AGENTS), id.as_bytes())
        .map_err(|e| storage_error("read agents", e))?
        .ok_or_else(|| Error::not_found("agent", id))?;
    decode_agent(&bytes)
}

pub fn agent_count(store: &Store) -> Result<u64> {
    Ok(store
        .view()
        .get(store.keyspace(META), AGENT_COUNT)
        .map_err(|e| storage_error("read", e))?
        .map(|v| decode_u64(&v))
        .unwrap_or(0))
}

/// The versions of state keys as the committer last wrote them, so that a write
/// need not look its key's version up in fjall. The committer is the only writer
/// of the `state` keyspace, so after each durable group this holds exactly what a
/// lookup would find. The lookup it saves was the store's largest cost in
/// `durable`: a memtable holding every version of a hot key is a deep skip list,
/// and finding the newest cost about a fifth of the committer's time. Bounded:
/// cleared whole when full, and when a group fails. SipHash, not Fx: callers choose
/// the keys, and colliding ones must not stall the committer.
#[derive(Default)]
struct StateVersions(std::collections::HashMap<Vec<u8>, StateVersion>);

impl StateVersions {
    const CAPACITY: usize = 65_536;
}

impl CommitterCache for StateVersions {
    /// Records what a durable group wrote: a key's new version, or, for a key
    /// removed (a deleted agent's state, purged), nothing.
    fn committed(&mut self, writes: &StagedWrites) {
        let written: Vec<(&[u8], Option<StateVersion>)> = writes
            .keyspace(STATE)
            .map(|(key, value)| {
                let version = value
                    .and_then(|bytes| decode_state(bytes).ok())
                    .map(|stored| StateVersion {
                        version: stored.version,
                        exists: !stored.is_tombstone(),
                    });
                (key, version)
            })
            .collect();
        if self.0.len() + written.len() > Self::CAPACITY {
            self.0.clear();
        }
        for (key, version) in written {
            match version {
                Some(version) => self.0.insert(key.to_vec(), version),
                None => self.0.remove(key),
            };
        }
    }

    fn invalidate(&mut self) {
        self.0.clear();
    }
}

/// Agents found to exist earlier in the group: an effect needs only that, and a
/// group is mostly one agent's ops. Forgotten after every group; a deletion in the
/// group removes its agent.
#[derive(Default)]
struct KnownAgents(FxHashSet<AgentId>);

impl CommitterCache for KnownAgents {
    fn committed(&mut self, _: &StagedWrites) {
        self.0.clear();
    }

    fn invalidate(&mut self) {
        self.0.clear();
    }
}

fn load_agent(tx: &GroupTx, id: &AgentId) -> Result<Agent> {
    let bytes = tx
        .read(AGENTS, id.as_bytes())?
        .ok_or_else(|| Error::not_found("agent", id))?;
    decode_agent(&bytes)
}

fn staged_agent_count(tx: &GroupTx) -> Result<u64> {
    Ok(tx.read(META, AGENT_COUNT)?.map(|v| decode_u64(&v)).unwrap_or(0))
}

/// The stored version of a state key, and whether the key currently exists
/// (a deleted key keeps its last version in a tombstone).
fn state_version(tx: &mut GroupTx, storage_key: &[u8]) -> Result<StateVersion> {
    if !tx.staged(STATE).contains_key(storage_key)
        && let Some(known) = tx.cache::<StateVersions>().0.get(storage_key)
    {
        return Ok(*known);
    }
    match tx.read(STATE, storage_key)? {
        None => Ok(StateVersion {
            version: 0,
            exists: false,
        }),
        Some(bytes) => {
            let stored = decode_state(&bytes)?;
            Ok(StateVersion {
                version: stored.version,
                exists: !stored.is_tombstone(),
            })
        }
    }
}

fn stage(tx: &mut GroupTx, write: &AgentWrite) -> Result<Applied> {
    match write {
        AgentWrite::Create(agent) => {
            let json = serde_json::to_vec(agent).map_err(|e| Error::internal(e.to_string()))?;
            let count = staged_agent_count(tx)?;
            tx.put(AGENTS, agent.id.as_bytes().to_vec(), json);
            tx.put(TENANTS, tenant_index_key(&agent.tenant, &agent.id), Vec::new());
            tx.put(META, AGENT_COUNT.to_vec(), (count + 1).to_be_bytes().to_vec());
            Ok(Applied::Done)
        }
        AgentWrite::Delete(id) => {
            // The agent goes at once, with a durable note that its state is still
            // to be removed; the state goes in bounded `PurgeState` groups, so that
            // deleting a large agent never holds up everyone else's writes.
            let agent = load_agent(tx, id)?;
            let count = staged_agent_count(tx)?;
            tx.cache::<KnownAgents>().0.remove(id);
            tx.remove(AGENTS, id.as_bytes().to_vec());
            tx.remove(TENANTS, tenant_index_key(&agent.tenant, id));
            tx.put(
                META,
                AGENT_COUNT.to_vec(),
                count.saturating_sub(1).to_be_bytes().to_vec(),
            );
            tx.put(META, purge_marker(id), Vec::new());
            Ok(Applied::Done)
        }
        AgentWrite::PurgeState { agent, max_keys } => {
            let prefix = agent.as_bytes().to_vec();
            let mut keys: Vec<Vec<u8>> = Vec::new();
            for item in tx.keyspace(STATE)?.prefix(&prefix).take(*max_keys) {
                keys.push(item.key().map_err(|e| storage_error("scan state", e))?.to_vec());
            }
            let staged: Vec<Vec<u8>> = tx
                .staged(STATE)
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .map(|(k, _)| k.clone())
                .collect();
            let finished = keys.len() < *max_keys;
            for key in keys.into_iter().chain(staged) {
                tx.remove(STATE, key);
            }
            if finished {
                tx.remove(META, purge_marker(agent));
            }
            Ok(if finished { Applied::Done } else { Applied::More })
        }
        AgentWrite::SetState {
            agent,
            key,
            value,
            if_version,
            at,
            labels,
        } => {
            let (storage_key, current) = existing_agents_key(tx, agent, key)?;
            check_version(key, *if_version, current)?;
            // Versions only grow, across deletes too, so a stale version can never
            // match a key that was deleted and written again (no ABA).
            let version = current.version + 1;
            tx.put(STATE, storage_key, encode_labelled_state(version, *at, labels, value));
            Ok(Applied::Version(version))
        }
        AgentWrite::DeleteState {
            agent,
            key,
            if_version,
            at,
        } => {
            let (storage_key, current) = existing_agents_key(tx, agent, key)?;
            if !current.exists {
                return Err(Error::not_found("state key", key));
            }
            check_version(key, *if_version, current)?;
            tx.put(STATE, storage_key, encode_state(current.version, *at, &[]));
            Ok(Applied::Done)
        }
    }
}

/// A state key of an agent that exists, and the key's version as the group
/// leaves it so far.
fn existing_agents_key(tx: &mut GroupTx, agent: &AgentId, key: &str) -> Result<(Vec<u8>, StateVersion)> {
    load_agent(tx, agent)?;
    let storage_key = state_key(agent, key);
    let current = state_version(tx, &storage_key)?;
    Ok((storage_key, current))
}

#[cfg(test)]
mod tests;
