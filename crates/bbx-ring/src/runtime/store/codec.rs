//! How the ring's keys and values are laid out in bytes.

use super::*;

/// An idempotency key's storage key: the agent's id, then the key.
pub fn idempotency_key(agent: &AgentId, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len());
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

/// A recorded idempotency key: the op it belongs to and that op's args digest.
pub fn decode_idempotency(bytes: &[u8]) -> Result<(OpId, String)> {
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
pub fn encode_completion(completion: &Completion) -> Result<Vec<u8>> {
    let mut bytes = vec![COMPACT_COMPLETION];
    if bbx_core::compact::encode_completion(completion, &mut bytes) {
        return Ok(bytes);
    }
    serde_json::to_vec(completion).map_err(|e| Error::internal(e.to_string()))
}

pub fn decode_completion(bytes: &[u8]) -> Result<Completion> {
    match bytes.split_first() {
        Some((&COMPACT_COMPLETION, compact)) => bbx_core::compact::decode_completion(compact)
            .ok_or_else(|| Error::internal("a stored completion is unreadable: its compact form is damaged")),
        _ => serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("a stored completion is unreadable: {e}"))),
    }
}
