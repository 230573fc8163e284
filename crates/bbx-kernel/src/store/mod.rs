//! The kernel's writes, staged through [`bbx_store`]: agents, their state, API
//! keys, quotas, and the ring's completions, each a [`Write`] that checks its
//! preconditions against the group so far and stages its keys.
//!
//! Layout (all keys big-endian or raw bytes, so key order is the listing order):
//! - `agents`:   agent id (16 bytes)                 -> Agent as JSON
//! - `tenants`:  tenant, 0x00, agent id               -> empty (index for listing by tenant)
//! - `state`:    agent id (16 bytes), state key bytes -> version u64, updated_at ms i64, JSON
//! - `api_keys`: key id (16 bytes)                    -> StoredKey as JSON
//! - `meta`:     name                                 -> value (agent count as u64)
//! - `ops`:      op id (16 bytes, time-ordered)       -> Completion as JSON
//! - `idem`:     agent id (16 bytes), idempotency key -> op id (16 bytes), args digest
//! - `doubt`:    op id (16 bytes)                    -> the journal entry of an op in doubt
//! - `quotas`:   node (`tenant/NAME`, `agent/ID`)      -> QuotaLimits as JSON
//! - `spend`:    node `|` window (`2026-11-24`, `2026-11`) -> micro-dollars spent (u64)

use crate::auth::StoredKey;
use bbx_core::model::Agent;
use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
pub(crate) use bbx_store::{Applied, Store, storage_error};
use bbx_store::{CommitterCache, GroupTx, KeyspaceDef, Staged, StagedWrites};
use chrono::{DateTime, Utc};
use fjall::Readable;
use rustc_hash::FxHashSet;
use serde_json::{Value, json};
use std::sync::Arc;

mod codec;
mod effect;

use codec::decode_u64;
pub(crate) use codec::*;
pub(crate) use effect::apply_effect;
use effect::{StateVersion, check_version};

const AGENT_COUNT: &[u8] = b"agent_count";
const PURGE_PREFIX: &[u8] = b"purge/";

/// The `meta` key that says a deleted agent's state is still to be removed.
fn purge_marker(agent: &AgentId) -> Vec<u8> {
    [PURGE_PREFIX, agent.as_bytes()].concat()
}

/// A write the committer applies atomically, or not at all.
#[derive(Debug)]
pub(crate) enum Write {
    CreateAgent(Agent),
    DeleteAgent(AgentId),
    SetState {
        agent: AgentId,
        key: String,
        value: Vec<u8>,
        if_version: Option<u64>,
        at: DateTime<Utc>,
    },
    DeleteState {
        agent: AgentId,
        key: String,
        if_version: Option<u64>,
        at: DateTime<Utc>,
    },
    PutKey(StoredKey),
    /// Removes up to `max_keys` state keys of a deleted agent; done when fewer remain.
    PurgeState {
        agent: AgentId,
        max_keys: usize,
    },
    /// Records an op's completion and, for a kernel-service op, applies its effect in
    /// the same atomic batch: after a crash either both are there or neither is. An
    /// effect that fails turns the completion into that error and changes nothing.
    Complete {
        completion: Arc<Completion>,
        effect: Option<Arc<dyn bbx_component::EffectOp>>,
        /// The args digest, recorded with the key so a later duplicate is recognized.
        digest: Option<String>,
        /// For an `in_doubt` completion: the op's journal entry, kept until an
        /// operator resolves it.
        doubt: Option<Vec<u8>>,
        /// Micro-dollars to add to each of these spend counters.
        charge: Option<(Vec<String>, u64)>,
    },
    /// Settles an op in doubt: replaces its completion with `completion`, or, with
    /// none, removes it so the op can run again. Refused unless the op is in doubt.
    Resolve {
        op_id: OpId,
        completion: Option<Box<Completion>>,
    },
    /// Sets (or with `None` removes) a quota node's limits.
    PutQuota {
        node: String,
        limits: Option<Vec<u8>>,
    },
    /// Forgets up to `max` completions (and their idempotency keys) of ops that
    /// completed before `before`.
    ExpireOps {
        before: DateTime<Utc>,
        max: usize,
        /// Where the previous step of the sweep stopped: the ops before it that are
        /// left (in doubt, or completed late) are not read again.
        after: Option<OpId>,
    },
}

/// What a kernel-service op does to its agent's state.
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// Adds to a number, creating the key at 0.
    Incr {
        key: String,
        by: serde_json::Number,
    },
    Delete {
        key: String,
    },
}

/// The kernel's keyspaces. Their ids are what redo records carry: never change one.
pub(crate) const AGENTS: KeyspaceDef = KeyspaceDef { id: 0, name: "agents" };
pub(crate) const TENANTS: KeyspaceDef = KeyspaceDef { id: 1, name: "tenants" };
pub(crate) const STATE: KeyspaceDef = KeyspaceDef { id: 2, name: "state" };
pub(crate) const API_KEYS: KeyspaceDef = KeyspaceDef {
    id: 3,
    name: "api_keys",
};
pub(crate) const META: KeyspaceDef = KeyspaceDef { id: 4, name: "meta" };
pub(crate) const OPS: KeyspaceDef = KeyspaceDef { id: 5, name: "ops" };
pub(crate) const IDEM: KeyspaceDef = KeyspaceDef { id: 6, name: "idem" };
pub(crate) const DOUBT: KeyspaceDef = KeyspaceDef { id: 7, name: "doubt" };
pub(crate) const QUOTAS: KeyspaceDef = KeyspaceDef { id: 8, name: "quotas" };
pub(crate) const SPEND: KeyspaceDef = KeyspaceDef { id: 9, name: "spend" };
pub(crate) const KEYSPACES: [KeyspaceDef; 10] =
    [AGENTS, TENANTS, STATE, API_KEYS, META, OPS, IDEM, DOUBT, QUOTAS, SPEND];

/// Deleted agents whose state is still being removed.
pub(crate) fn pending_purges(store: &Store) -> Result<Vec<AgentId>> {
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

pub(crate) fn agent_count(store: &Store) -> Result<u64> {
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

impl Staged for Write {
    /// Checks the write's preconditions, then stages it. Every fallible read comes
    /// before the first `put`, so a write that fails stages nothing.
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        stage(tx, self)
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

fn stage(tx: &mut GroupTx, write: &Write) -> Result<Applied> {
    match write {
        Write::CreateAgent(agent) => {
            let json = serde_json::to_vec(agent).map_err(|e| Error::internal(e.to_string()))?;
            let count = staged_agent_count(tx)?;
            tx.put(AGENTS, agent.id.as_bytes().to_vec(), json);
            tx.put(TENANTS, tenant_index_key(&agent.tenant, &agent.id), Vec::new());
            tx.put(META, AGENT_COUNT.to_vec(), (count + 1).to_be_bytes().to_vec());
            Ok(Applied::Done)
        }
        Write::DeleteAgent(id) => {
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
        Write::PurgeState { agent, max_keys } => {
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
        Write::SetState {
            agent,
            key,
            value,
            if_version,
            at,
        } => {
            load_agent(tx, agent)?;
            let storage_key = state_key(agent, key);
            let current = state_version(tx, &storage_key)?;
            check_version(key, *if_version, current)?;
            // Versions only grow, across deletes too, so a stale version can never
            // match a key that was deleted and written again (no ABA).
            let version = current.version + 1;
            tx.put(STATE, storage_key, encode_state(version, *at, value));
            Ok(Applied::Version(version))
        }
        Write::DeleteState {
            agent,
            key,
            if_version,
            at,
        } => {
            load_agent(tx, agent)?;
            let storage_key = state_key(agent, key);
            let current = state_version(tx, &storage_key)?;
            if !current.exists {
                return Err(Error::not_found("state key", key));
            }
            check_version(key, *if_version, current)?;
            tx.put(STATE, storage_key, encode_state(current.version, *at, &[]));
            Ok(Applied::Done)
        }
        Write::PutKey(stored) => {
            let json = serde_json::to_vec(stored).map_err(|e| Error::internal(e.to_string()))?;
            tx.put(API_KEYS, stored.info.id.as_bytes().to_vec(), json);
            Ok(Applied::Done)
        }
        Write::Complete {
            completion,
            effect,
            digest,
            doubt,
            charge,
        } => {
            let mut completion = Box::new(Completion::clone(completion));
            if let Some(effect) = effect {
                match effect.stage(tx, &completion.agent, completion.completed_at) {
                    Ok(result) => completion.result = Some(result),
                    Err(error) => {
                        completion.status = CompletionStatus::Error;
                        completion.error = Some(error);
                    }
                }
            }
            let mut encoded = encode_completion(&completion)?;
            if encoded.len() > tx.max_value() && effect.is_none() {
                // Too large to journal (a tool's huge output): the op ends with
                // an error naming the size, instead of never ending at all.
                completion.status = CompletionStatus::Error;
                completion.result = None;
                completion.error = Some(Error::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the op's completion is {} bytes; at most {} bytes can be recorded",
                        encoded.len(),
                        tx.max_value()
                    ),
                ));
                encoded = encode_completion(&completion)?;
            }
            tx.put(OPS, completion.op_id.as_bytes().to_vec(), encoded);
            if let (Some(key), Some(digest)) = (&completion.idempotency_key, digest) {
                let mut value = completion.op_id.as_bytes().to_vec();
                value.extend_from_slice(digest.as_bytes());
                tx.put(IDEM, idempotency_key(&completion.agent, key), value);
            }
            if let Some(entry) = doubt {
                tx.put(DOUBT, completion.op_id.as_bytes().to_vec(), entry.clone());
            }
            if let Some((keys, micros)) = charge {
                for key in keys {
                    let spent = tx.read(SPEND, key.as_bytes())?.map_or(0, |v| decode_u64(&v));
                    tx.put(SPEND, key.as_bytes().to_vec(), (spent + micros).to_be_bytes().to_vec());
                }
            }
            Ok(Applied::output(completion))
        }
        Write::Resolve { op_id, completion } => {
            let key = op_id.as_bytes().to_vec();
            let current = tx
                .read(OPS, &key)?
                .map(|bytes| decode_completion(&bytes))
                .transpose()?
                .ok_or_else(|| Error::not_found("op", op_id))?;
            let entry = tx.read(DOUBT, &key)?;
            let (CompletionStatus::InDoubt, Some(entry)) = (current.status, entry) else {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {op_id} is not in doubt (it is {})", current.status.as_str()),
                ));
            };
            match completion {
                Some(completion) => tx.put(OPS, key.clone(), encode_completion(completion)?),
                None => tx.remove(OPS, key.clone()),
            }
            tx.remove(DOUBT, key);
            Ok(Applied::output(entry))
        }
        Write::PutQuota { node, limits } => {
            match limits {
                Some(json) => tx.put(QUOTAS, node.as_bytes().to_vec(), json.clone()),
                None => tx.remove(QUOTAS, node.as_bytes().to_vec()),
            }
            Ok(Applied::Done)
        }
        Write::ExpireOps { before, max, after } => {
            // An op in doubt waits for an operator, however old it is: it is
            // passed over, and the step ends only when `max` others are found
            // or the old ops run out (so old ops in doubt cannot stall expiry).
            // An op completes after it is submitted, and op ids are ordered by
            // submission: every op that completed in time is in this range; the
            // ones of it that completed later (long runs) are passed over too.
            let submitted_before = OpId::lowest_at(before.timestamp_millis().max(0) as u64);
            let start = match after {
                Some(id) => std::ops::Bound::Excluded(id.as_bytes().to_vec()),
                None => std::ops::Bound::Unbounded,
            };
            let end = std::ops::Bound::Excluded(submitted_before.as_bytes().to_vec());
            let mut expired = Vec::new();
            let mut resume = None;
            for item in tx.keyspace(OPS)?.range((start, end)) {
                let value = item.value().map_err(|e| storage_error("scan ops", e))?;
                let completion = decode_completion(&value)?;
                if completion.status == CompletionStatus::InDoubt || completion.completed_at >= *before {
                    continue;
                }
                expired.push(completion);
                if expired.len() == *max {
                    resume = expired.last().map(|c| c.op_id);
                    break;
                }
            }
            let count = expired.len();
            for completion in expired {
                if let Some(idempotency) = &completion.idempotency_key {
                    tx.remove(IDEM, idempotency_key(&completion.agent, idempotency));
                }
                tx.remove(OPS, completion.op_id.as_bytes().to_vec());
            }
            Ok(Applied::output(Expired { count, resume }))
        }
    }
}

/// What one expiry step forgot: how many completions, and where the next step
/// goes on (none: the sweep is done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    pub count: usize,
    pub resume: Option<OpId>,
}

#[cfg(test)]
mod tests;
