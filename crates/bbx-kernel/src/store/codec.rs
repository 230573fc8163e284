//! How the kernel's keys and values are laid out in bytes.

use super::*;

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
pub(super) const COMPACT_COMPLETION: u8 = 1;

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

pub(super) fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}
