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
/// Set in a stored version when labels follow the header: a u16 length, then
/// the labels as a JSON array. Versions never come near it.
const LABELLED: u64 = 1 << 63;
/// Versions stay below this, so that none reaches the flag bit.
pub const MAX_VERSION: u64 = 1 << 62;

/// A stored state value: version, time of the write, the labels of what wrote
/// it (taint that follows data), and the JSON. An empty JSON part marks a
/// tombstone (a deleted key keeping its version); no JSON text is empty.
pub struct StoredState<'a> {
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    pub labels: Vec<String>,
    pub json: &'a [u8],
}

impl StoredState<'_> {
    pub fn is_tombstone(&self) -> bool {
        self.json.is_empty()
    }
}

pub fn encode_state(version: u64, at: DateTime<Utc>, json: &[u8]) -> Vec<u8> {
    encode_labelled_state(version, at, &[], json)
}

/// [`encode_state`] with labels (none: the same bytes). Labels past what a u16
/// length holds are dropped whole, never cut.
pub fn encode_labelled_state(version: u64, at: DateTime<Utc>, labels: &[String], json: &[u8]) -> Vec<u8> {
    let labels = (!labels.is_empty())
        .then(|| serde_json::to_vec(labels).ok())
        .flatten()
        .filter(|l| l.len() <= usize::from(u16::MAX));
    let mut out = Vec::with_capacity(STATE_HEADER + json.len() + labels.as_ref().map_or(0, |l| 2 + l.len()));
    debug_assert!(version & LABELLED == 0, "a version reached the labels' flag bit");
    let flag = if labels.is_some() { LABELLED } else { 0 };
    out.extend_from_slice(&(version | flag).to_be_bytes());
    out.extend_from_slice(&at.timestamp_millis().to_be_bytes());
    if let Some(labels) = labels {
        out.extend_from_slice(&(labels.len() as u16).to_be_bytes());
        out.extend_from_slice(&labels);
    }
    out.extend_from_slice(json);
    out
}

pub fn decode_state(bytes: &[u8]) -> Result<StoredState<'_>> {
    let (Some(version), Some(millis)) = (bytes.get(0..8), bytes.get(8..STATE_HEADER)) else {
        return Err(Error::internal("a stored state value is shorter than its header"));
    };
    let version = u64::from_be_bytes(version.try_into().expect("8 bytes"));
    let millis = i64::from_be_bytes(millis.try_into().expect("8 bytes"));
    let mut rest = &bytes[STATE_HEADER..];
    let mut labels = Vec::new();
    if version & LABELLED != 0 {
        let damaged = || Error::internal("a stored state value's labels are damaged");
        let len = rest.get(..2).ok_or_else(damaged)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let text = rest.get(2..2 + len).ok_or_else(damaged)?;
        labels = serde_json::from_slice(text).map_err(|_| damaged())?;
        rest = &rest[2 + len..];
    }
    Ok(StoredState {
        version: version & !LABELLED,
        updated_at: DateTime::from_timestamp_millis(millis).unwrap_or_default(),
        labels,
        json: rest,
    })
}

pub fn decode_agent(bytes: &[u8]) -> Result<Agent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("stored agent is unreadable: {e}")))
}

pub fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}
