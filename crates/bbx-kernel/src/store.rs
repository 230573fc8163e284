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

/// Applies a kernel-service op's effect and returns its result. Like `apply`,
/// every fallible step comes before the one `put`.
pub(crate) fn apply_effect(tx: &mut GroupTx, agent: &AgentId, effect: &Effect, at: DateTime<Utc>) -> Result<Value> {
    // Existence is all an effect needs of its agent; decoding the record per op
    // would cost the committer more than the effect itself.
    if !tx.cache::<KnownAgents>().0.contains(agent) {
        if tx.read(AGENTS, agent.as_bytes())?.is_none() {
            return Err(Error::not_found("agent", agent));
        }
        tx.cache::<KnownAgents>().0.insert(*agent);
    }
    match effect {
        Effect::Set { key, value } => {
            let storage_key = state_key(agent, key);
            let version = state_version(tx, &storage_key)?.version + 1;
            tx.put(STATE, storage_key, encode_state(version, at, value));
            Ok(json!({ "key": key, "version": version }))
        }
        Effect::Incr { key, by } => {
            let storage_key = state_key(agent, key);
            let (current, version) = match tx.read(STATE, &storage_key)? {
                None => (serde_json::Number::from(0), 0),
                Some(bytes) => {
                    let stored = decode_state(&bytes)?;
                    if stored.is_tombstone() {
                        (serde_json::Number::from(0), stored.version)
                    } else {
                        match serde_json::from_slice::<Value>(stored.json) {
                            Ok(Value::Number(n)) => (n, stored.version),
                            _ => {
                                return Err(Error::new(
                                    ErrorCode::FailedPrecondition,
                                    format!("state key {key:?} does not hold a number"),
                                ));
                            }
                        }
                    }
                }
            };
            let sum = add_numbers(&current, by).ok_or_else(|| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!("adding {by} to {current} overflows state key {key:?}"),
                )
            })?;
            let value = serde_json::to_vec(&sum).map_err(|e| Error::internal(e.to_string()))?;
            tx.put(STATE, storage_key, encode_state(version + 1, at, &value));
            Ok(json!({ "key": key, "value": sum, "version": version + 1 }))
        }
        Effect::Delete { key } => {
            let storage_key = state_key(agent, key);
            let current = state_version(tx, &storage_key)?;
            if !current.exists {
                return Err(Error::not_found("state key", key));
            }
            tx.put(STATE, storage_key, encode_state(current.version, at, &[]));
            Ok(json!({ "key": key, "version": current.version }))
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

#[derive(Clone, Copy)]
struct StateVersion {
    version: u64,
    exists: bool,
}

/// `expected` 0 means "must not exist"; any other number, "must exist at this version".
fn check_version(key: &str, expected: Option<u64>, current: StateVersion) -> Result<()> {
    let Some(expected) = expected else { return Ok(()) };
    let holds = if expected == 0 {
        !current.exists
    } else {
        current.exists && current.version == expected
    };
    if holds {
        return Ok(());
    }
    let actual = if current.exists { current.version } else { 0 };
    let message = if current.exists {
        format!("state key {key:?} is at version {actual}, expected {expected}")
    } else {
        format!("state key {key:?} does not exist, expected version {expected}")
    };
    Err(Error::new(ErrorCode::VersionConflict, message)
        .with_details(serde_json::json!({ "key": key, "expected": expected, "actual": actual })))
}

/// Exact integer addition when both are integers, floating point otherwise; `None`
/// on integer overflow or a result JSON cannot hold.
fn add_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Option<Value> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.checked_add(y).map(Value::from);
    }
    let sum = a.as_f64()? + b.as_f64()?;
    serde_json::Number::from_f64(sum).map(Value::Number)
}

pub(crate) fn idempotency_key(agent: &AgentId, key: &str) -> Vec<u8> {
    state_key(agent, key)
}

/// A recorded idempotency key: the op it belongs to and that op's args digest.
pub(crate) fn decode_idempotency(bytes: &[u8]) -> Result<(OpId, String)> {
    let (id, digest) = bytes
        .split_at_checked(16)
        .ok_or_else(|| Error::internal("a stored idempotency record is too short"))?;
    Ok((
        OpId::from_bytes(id.try_into().expect("16 bytes")),
        String::from_utf8_lossy(digest).into_owned(),
    ))
}

/// The first byte of a completion stored in its compact form ([`bbx_core::compact`]);
/// one stored as JSON (any with a rarely set field, and all that earlier versions
/// stored) starts with `{`.
const COMPACT_COMPLETION: u8 = 1;

/// A completion as the store keeps it: compact where it can be, JSON otherwise. The
/// compact form is under half the bytes, and each stored completion is written three
/// times or more (the journal's redo record, fjall's journal, its tables).
pub(crate) fn encode_completion(completion: &Completion) -> Result<Vec<u8>> {
    let mut bytes = vec![COMPACT_COMPLETION];
    if bbx_core::compact::encode_completion(completion, &mut bytes) {
        return Ok(bytes);
    }
    serde_json::to_vec(completion).map_err(|e| Error::internal(e.to_string()))
}

pub(crate) fn decode_completion(bytes: &[u8]) -> Result<Completion> {
    match bytes.split_first() {
        Some((&COMPACT_COMPLETION, compact)) => bbx_core::compact::decode_completion(compact)
            .ok_or_else(|| Error::internal("a stored completion is unreadable: its compact form is damaged")),
        _ => serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("a stored completion is unreadable: {e}"))),
    }
}

pub(crate) fn tenant_index_key(tenant: &str, id: &AgentId) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 17);
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub(crate) fn state_key(agent: &AgentId, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len());
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

const STATE_HEADER: usize = 16;

/// A stored state value: version, time of the write, and the JSON. An empty JSON
/// part marks a tombstone (a deleted key keeping its version); no JSON text is empty.
pub(crate) struct StoredState<'a> {
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    pub json: &'a [u8],
}

impl StoredState<'_> {
    pub fn is_tombstone(&self) -> bool {
        self.json.is_empty()
    }
}

pub(crate) fn encode_state(version: u64, at: DateTime<Utc>, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_HEADER + json.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&at.timestamp_millis().to_be_bytes());
    out.extend_from_slice(json);
    out
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<StoredState<'_>> {
    let (Some(version), Some(millis)) = (bytes.get(0..8), bytes.get(8..STATE_HEADER)) else {
        return Err(Error::internal("a stored state value is shorter than its header"));
    };
    let version = u64::from_be_bytes(version.try_into().expect("8 bytes"));
    let millis = i64::from_be_bytes(millis.try_into().expect("8 bytes"));
    Ok(StoredState {
        version,
        updated_at: DateTime::from_timestamp_millis(millis).unwrap_or_default(),
        json: &bytes[STATE_HEADER..],
    })
}

pub(crate) fn decode_agent(bytes: &[u8]) -> Result<Agent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("stored agent is unreadable: {e}")))
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_core::model::AgentStatus;
    use bbx_store::DetachedStore;

    fn agent() -> Agent {
        Agent {
            id: AgentId::generate(),
            name: "a".into(),
            tenant: "t".into(),
            labels: Default::default(),
            status: AgentStatus::Idle,
            created_at: Utc::now(),
            tools: Default::default(),
        }
    }

    fn set(agent: &Agent, key: &str, if_version: Option<u64>) -> Write {
        Write::SetState {
            agent: agent.id,
            key: key.into(),
            value: b"1".to_vec(),
            if_version,
            at: Utc::now(),
        }
    }

    fn delete(agent: &Agent, key: &str, if_version: Option<u64>) -> Write {
        Write::DeleteState {
            agent: agent.id,
            key: key.into(),
            if_version,
            at: Utc::now(),
        }
    }

    fn code(result: Result<Applied>) -> ErrorCode {
        result.unwrap_err().code
    }

    /// The kernel's keyspaces without a committer: groups are driven by hand.
    fn fresh() -> (tempfile::TempDir, DetachedStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = DetachedStore::open(dir.path(), &KEYSPACES).unwrap();
        (dir, store)
    }

    fn count(store: &DetachedStore) -> u64 {
        store
            .keyspace(META)
            .get(AGENT_COUNT)
            .unwrap()
            .map_or(0, |v| decode_u64(&v))
    }

    #[test]
    fn writes_in_one_group_see_each_other() {
        let (_dir, mut store) = fresh();
        let a = agent();
        store
            .group(usize::MAX, |tx| {
                assert_eq!(Write::CreateAgent(a.clone()).stage(tx).unwrap(), Applied::Done);
                assert_eq!(set(&a, "k", Some(0)).stage(tx).unwrap(), Applied::Version(1));
                // A second create-only CAS in the same group sees the first.
                assert_eq!(code(set(&a, "k", Some(0)).stage(tx)), ErrorCode::VersionConflict);
                assert_eq!(set(&a, "k", Some(1)).stage(tx).unwrap(), Applied::Version(2));
            })
            .unwrap();
        let stored = store.keyspace(STATE).get(state_key(&a.id, "k")).unwrap().unwrap();
        assert_eq!(decode_state(&stored).unwrap().version, 2);
        assert_eq!(count(&store), 1);
    }

    #[test]
    fn a_deleted_agents_state_is_purged_in_bounded_steps() {
        let (_dir, mut store) = fresh();
        let a = agent();
        store
            .group(usize::MAX, |tx| {
                Write::CreateAgent(a.clone()).stage(tx).unwrap();
                for i in 0..5 {
                    set(&a, &format!("k{i}"), None).stage(tx).unwrap();
                }
            })
            .unwrap();
        let purge = Write::PurgeState {
            agent: a.id,
            max_keys: 2,
        };
        store
            .group(usize::MAX, |tx| {
                set(&a, "staged-in-the-same-group", None).stage(tx).unwrap();
                Write::DeleteAgent(a.id).stage(tx).unwrap();
                // Once deleted, the agent takes no more writes in the same group.
                assert_eq!(code(set(&a, "after", None).stage(tx)), ErrorCode::NotFound);
                assert_eq!(purge.stage(tx).unwrap(), Applied::More, "a bounded step");
            })
            .unwrap();
        assert!(store.keyspace(AGENTS).get(a.id.as_bytes()).unwrap().is_none());
        assert_eq!(count(&store), 0);
        assert!(
            store.keyspace(META).get(purge_marker(&a.id)).unwrap().is_some(),
            "the purge is remembered"
        );

        let mut steps = 1;
        loop {
            let applied = store.group(usize::MAX, |tx| purge.stage(tx).unwrap()).unwrap();
            steps += 1;
            if applied == Applied::Done {
                break;
            }
        }
        assert_eq!(steps, 3, "6 keys, 2 per step, and a last step that finds fewer than 2");
        assert_eq!(store.keyspace(STATE).prefix(a.id.as_bytes()).count(), 0);
        assert!(store.keyspace(META).get(purge_marker(&a.id)).unwrap().is_none());
    }

    #[test]
    fn a_refused_write_stages_nothing() {
        let (_dir, mut store) = fresh();
        let a = agent();
        store
            .group(usize::MAX, |tx| {
                assert_eq!(code(set(&a, "k", None).stage(tx)), ErrorCode::NotFound);
                assert_eq!(code(Write::DeleteAgent(a.id).stage(tx)), ErrorCode::NotFound);
                assert!(tx.is_empty());
                Write::CreateAgent(a.clone()).stage(tx).unwrap();
                let staged: Vec<_> = tx
                    .writes()
                    .map(|(i, k, v)| (i, k.to_vec(), v.map(<[u8]>::to_vec)))
                    .collect();
                assert_eq!(code(set(&a, "k", Some(3)).stage(tx)), ErrorCode::VersionConflict);
                assert_eq!(code(delete(&a, "k", None).stage(tx)), ErrorCode::NotFound);
                let after: Vec<_> = tx
                    .writes()
                    .map(|(i, k, v)| (i, k.to_vec(), v.map(<[u8]>::to_vec)))
                    .collect();
                assert_eq!(after, staged);
            })
            .unwrap();
    }

    #[test]
    fn versions_survive_deletion_so_stale_cas_cannot_win() {
        let (_dir, mut store) = fresh();
        let a = agent();
        store
            .group(usize::MAX, |tx| {
                Write::CreateAgent(a.clone()).stage(tx).unwrap();
                set(&a, "k", None).stage(tx).unwrap();
                delete(&a, "k", Some(1)).stage(tx).unwrap();
            })
            .unwrap();
        store
            .group(usize::MAX, |tx| {
                // A client still holding version 1 must not overwrite a re-created key.
                assert_eq!(code(set(&a, "k", Some(1)).stage(tx)), ErrorCode::VersionConflict);
                assert_eq!(code(delete(&a, "k", None).stage(tx)), ErrorCode::NotFound);
                assert_eq!(set(&a, "k", Some(0)).stage(tx).unwrap(), Applied::Version(2));
                assert_eq!(code(set(&a, "k", Some(1)).stage(tx)), ErrorCode::VersionConflict);
            })
            .unwrap();
    }

    #[tokio::test]
    async fn readers_see_a_write_once_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 1 << 20).await;
        let a = agent();
        let visible = |store: &Store| {
            store
                .view()
                .get(store.keyspace(AGENTS), a.id.as_bytes())
                .unwrap()
                .is_some()
        };
        assert!(!visible(&store));
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        assert!(visible(&store), "an acknowledged write is in the published snapshot");
        assert_eq!(agent_count(&store).unwrap(), 1);
        store.close().await;
        assert_eq!(
            store.write(Write::DeleteAgent(a.id)).await.unwrap_err().code,
            ErrorCode::Unavailable
        );
    }

    /// A store on `dir/db` journaling to `dir/journal`, and the journal's first
    /// record, held so that no checkpoint passes the records after it.
    async fn open_store(dir: &std::path::Path, max_record: usize) -> (Store, bbx_journal::Lsn) {
        let (journal, recovery) =
            bbx_journal::Journal::open(&dir.join("journal"), bbx_journal::JournalOptions::default()).unwrap();
        let held = recovery.records.iter().map(|r| r.lsn).collect();
        let writer = bbx_store::JournalWriter::start(journal, held, Default::default(), 0).unwrap();
        let pin = writer.append(vec![b"{}".to_vec()]).await.unwrap()[0];
        let db = bbx_store::open_database(&dir.join("db")).unwrap();
        let options = bbx_store::StoreOptions {
            commit_max_batch: 16,
            max_record,
            committer_nice: 0,
        };
        let store = Store::open(db, &KEYSPACES, writer, &recovery.records, options).unwrap();
        (store, pin)
    }

    #[tokio::test]
    async fn the_journal_alone_rebuilds_every_acknowledged_write() {
        let live = tempfile::tempdir().unwrap();
        let (store, _) = open_store(live.path(), 1 << 20).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        let big = vec![b'7'; 300_000];
        let writes = (0..50)
            .map(|i| set(&a, &format!("k{i}"), None))
            .chain([Write::SetState {
                agent: a.id,
                key: "big".into(),
                value: big.clone(),
                if_version: None,
                at: Utc::now(),
            }])
            .map(|write| Box::new(write) as Box<dyn Staged>)
            .collect();
        assert!(store.write_all(writes).await.iter().all(Result::is_ok));
        store.write(delete(&a, "k3", Some(1))).await.unwrap();

        // A copy of the journal as it is now, next to an empty database: what a
        // crash that lost every unsynced write of fjall would leave.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crashed.path().join("journal");
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(live.path().join("journal")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let (rebuilt, _) = open_store(crashed.path(), 1 << 20).await;
        let view = rebuilt.view();
        assert!(view.get(rebuilt.keyspace(AGENTS), a.id.as_bytes()).unwrap().is_some());
        assert_eq!(agent_count(&rebuilt).unwrap(), 1);
        let state = |key: &str| {
            view.get(rebuilt.keyspace(STATE), state_key(&a.id, key))
                .unwrap()
                .map(|v| decode_state(&v).unwrap().is_tombstone())
        };
        assert_eq!(state("k0"), Some(false));
        assert_eq!(state("k49"), Some(false));
        assert_eq!(state("k3"), Some(true), "the delete is replayed after the set");
        let stored = view
            .get(rebuilt.keyspace(STATE), state_key(&a.id, "big"))
            .unwrap()
            .unwrap();
        assert_eq!(decode_state(&stored).unwrap().json, big.as_slice());
        store.close().await;
        rebuilt.close().await;
    }

    /// Each write its own group: versions come from what the committer recorded
    /// after earlier groups, and must agree with what fjall holds.
    #[tokio::test]
    async fn versions_carried_between_groups_match_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 1 << 20).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        assert_eq!(store.write(set(&a, "k", None)).await.unwrap(), Applied::Version(1));
        assert_eq!(store.write(set(&a, "k", Some(1))).await.unwrap(), Applied::Version(2));
        store.write(delete(&a, "k", Some(2))).await.unwrap();
        // Deleted keeps its version: the key must not exist, and then goes on from 2.
        assert_eq!(
            code(store.write(set(&a, "k", Some(2))).await),
            ErrorCode::VersionConflict
        );
        assert_eq!(store.write(set(&a, "k", Some(0))).await.unwrap(), Applied::Version(3));
        // A refused write leaves the version where it was.
        assert_eq!(
            code(store.write(set(&a, "k", Some(9))).await),
            ErrorCode::VersionConflict
        );
        assert_eq!(store.write(set(&a, "k", Some(3))).await.unwrap(), Applied::Version(4));
        let stored = store
            .view()
            .get(store.keyspace(STATE), state_key(&a.id, "k"))
            .unwrap()
            .unwrap();
        assert_eq!(decode_state(&stored).unwrap().version, 4);
        store.close().await;
    }

    #[tokio::test]
    async fn a_write_too_large_for_the_journal_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 4096).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        let big = Write::SetState {
            agent: a.id,
            key: "big".into(),
            value: vec![b'1'; 8192],
            if_version: None,
            at: Utc::now(),
        };
        assert_eq!(store.write(big).await.unwrap_err().code, ErrorCode::PayloadTooLarge);
        assert!(!store.has_failed());
        assert_eq!(store.write(set(&a, "small", None)).await.unwrap(), Applied::Version(1));
        store.close().await;
    }

    #[test]
    fn a_completion_too_large_to_journal_is_recorded_as_an_error() {
        let (_dir, mut store) = fresh();
        let completion = Completion {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "t".into(),
            kind: "tool.http".into(),
            status: CompletionStatus::Ok,
            result: Some(json!("x".repeat(5000))),
            error: None,
            attempts: 1,
            queue_us: 0,
            exec_us: 0,
            total_us: 0,
            submitted_at: Utc::now(),
            completed_at: Utc::now(),
            idempotency_key: None,
            user_data: None,
            trace: None,
        };
        let write = Write::Complete {
            completion: Arc::new(completion),
            effect: None,
            digest: None,
            doubt: None,
            charge: None,
        };
        let recorded: Box<Completion> = store
            .group(1000, |tx| {
                let recorded = write.stage(tx).unwrap().into_output().unwrap();
                assert!(tx.writes().all(|(_, _, v)| v.is_none_or(|v| v.len() <= 1000)));
                recorded
            })
            .unwrap();
        assert_eq!(recorded.status, CompletionStatus::Error);
        assert_eq!(recorded.error.unwrap().code, ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn completions_are_stored_compact_where_they_can_be_and_read_in_either_form() {
        let plain = Completion {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "t".into(),
            kind: "state.set".into(),
            status: CompletionStatus::Ok,
            result: Some(json!({"key": "k", "version": 3})),
            error: None,
            attempts: 1,
            queue_us: 5,
            exec_us: 6,
            total_us: 11,
            submitted_at: Utc::now(),
            completed_at: Utc::now(),
            idempotency_key: None,
            user_data: None,
            trace: None,
        };
        let compact = encode_completion(&plain).unwrap();
        assert_eq!(compact[0], COMPACT_COMPLETION);
        assert_eq!(decode_completion(&compact).unwrap(), plain);
        // What earlier versions stored, and what a completion with a rare field is.
        let json = serde_json::to_vec(&plain).unwrap();
        assert!(
            compact.len() * 2 < json.len(),
            "{} against {}",
            compact.len(),
            json.len()
        );
        assert_eq!(decode_completion(&json).unwrap(), plain);
        let keyed = Completion {
            idempotency_key: Some("k1".into()),
            ..plain
        };
        let stored = encode_completion(&keyed).unwrap();
        assert_eq!(stored[0], b'{');
        assert_eq!(decode_completion(&stored).unwrap(), keyed);
        assert!(decode_completion(&compact[..compact.len() / 2]).is_err());
    }

    #[test]
    fn short_stored_values_are_errors_not_panics() {
        assert!(decode_state(&[0u8; 15]).is_err());
        assert!(decode_state(&[]).is_err());
        let tombstone = encode_state(7, Utc::now(), &[]);
        let decoded = decode_state(&tombstone).unwrap();
        assert!(decoded.is_tombstone());
        assert_eq!(decoded.version, 7);
    }
}
