//! The effects of `state.*` ops on an agent's keys, and the version rules they
//! and the state writes share.

use super::*;
use bbx_component::Staging;
use bbx_core::ErrorCode;
use serde_json::{Value, json};

/// What a kernel-service op does to its agent's state.
#[derive(Debug, Clone)]
pub enum Effect {
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

/// Applies a kernel-service op's effect and returns its result. Like `apply`,
/// every fallible step comes before the one `put`.
pub(crate) fn apply_effect(tx: &mut GroupTx, agent: &AgentId, effect: &Effect, staging: &Staging<'_>) -> Result<Value> {
    let at = staging.at;
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
            // A value written from tainted content keeps the taint, and its sources.
            let labels: Vec<String> = staging
                .labels
                .iter()
                .filter(|l| l.starts_with("tainted"))
                .cloned()
                .collect();
            tx.put(STATE, storage_key, encode_labelled_state(version, at, &labels, value));
            if labels.is_empty() {
                Ok(json!({ "key": key, "version": version }))
            } else {
                Ok(json!({ "key": key, "version": version, "labels": labels }))
            }
        }
        Effect::Incr { key, by } => {
            let storage_key = state_key(agent, key);
            let (current, version, labels) = match tx.read(STATE, &storage_key)? {
                None => (serde_json::Number::from(0), 0, Vec::new()),
                Some(bytes) => {
                    let stored = decode_state(&bytes)?;
                    if stored.is_tombstone() {
                        (serde_json::Number::from(0), stored.version, Vec::new())
                    } else {
                        match serde_json::from_slice::<Value>(stored.json) {
                            // A counter keeps the labels its value has.
                            Ok(Value::Number(n)) => (n, stored.version, stored.labels),
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
            tx.put(
                STATE,
                storage_key,
                encode_labelled_state(version + 1, at, &labels, &value),
            );
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

#[derive(Clone, Copy)]
pub(crate) struct StateVersion {
    pub(crate) version: u64,
    pub(crate) exists: bool,
}

/// `expected` 0 means "must not exist"; any other number, "must exist at this version".
pub(crate) fn check_version(key: &str, expected: Option<u64>, current: StateVersion) -> Result<()> {
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
