//! How agents and their state are laid out in bytes.

use bbx_core::model::Agent;
use bbx_core::{AgentId, Error, Result};
use chrono::{DateTime, Utc};

pub fn tenant_index_key(tenant: &str, id: &AgentId) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 17);
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub fn state_key(agent: &AgentId, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len());
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

const STATE_HEADER: usize = 16;

/// A stored state value: version, time of the write, and the JSON. An empty JSON
/// part marks a tombstone (a deleted key keeping its version); no JSON text is empty.
pub struct StoredState<'a> {
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    pub json: &'a [u8],
}

impl StoredState<'_> {
    pub fn is_tombstone(&self) -> bool {
        self.json.is_empty()
    }
}

pub fn encode_state(version: u64, at: DateTime<Utc>, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_HEADER + json.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&at.timestamp_millis().to_be_bytes());
    out.extend_from_slice(json);
    out
}

pub fn decode_state(bytes: &[u8]) -> Result<StoredState<'_>> {
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

pub fn decode_agent(bytes: &[u8]) -> Result<Agent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("stored agent is unreadable: {e}")))
}

pub fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}
