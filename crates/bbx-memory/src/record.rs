//! A memory as it is stored: its record (text, model, metadata, bi-temporal
//! validity), its vector, and the keys that find it. Every key starts with the
//! agent, so an agent's memories are one prefix (and its namespace).

use bbx_core::{AgentId, Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// A memory's id: 63 random bits, shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemoryId(pub u64);

impl MemoryId {
    pub fn random() -> Self {
        // 63 bits: it fits a signed 64-bit column (pgvector's bigint) as it is.
        Self(rand::random::<u64>() >> 1)
    }
}

impl std::fmt::Display for MemoryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for MemoryId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid_field(
                "id",
                format!("{s:?} is not a memory id (16 hex digits)"),
            ));
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| Error::invalid_field("id", format!("{s:?} is not a memory id (16 hex digits)")))
    }
}

impl Serialize for MemoryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemoryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: Error| serde::de::Error::custom(e.message))
    }
}

impl schemars::JsonSchema for MemoryId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "MemoryId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^[0-9a-f]{16}$" })
    }
}

/// A memory's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    pub id: MemoryId,
    pub text: String,
    /// The model that embedded it.
    pub model: String,
    /// The sha256 of its normalized text: an exact duplicate has the same.
    pub hash: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
    /// What it is about: a newer memory with the same subject supersedes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub created: DateTime<Utc>,
    /// From when it holds.
    pub valid_from: DateTime<Utc>,
    /// Until when it held: set when a newer memory superseded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<MemoryId>,
    /// Duplicates merged into it.
    #[serde(default)]
    pub merged: u64,
    /// For a chunk of a longer text: its place, and how many there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<(u32, u32)>,
    /// The taint labels of the op that wrote it (FlowIntegrity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl Memory {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("a stored memory does not decode: {e}")))
    }

    /// Whether it held at `at`.
    pub fn valid_at(&self, at: DateTime<Utc>) -> bool {
        self.valid_from <= at && self.valid_to.is_none_or(|to| at < to)
    }
}

/// When a memory was last found or merged into, and how often: kept apart from
/// the record, so reading a memory does not rewrite its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub at_ms: i64,
    pub hits: u64,
}

impl Access {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.hits.to_be_bytes());
        out
    }

    /// What [`Access::encode`] writes.
    pub const BYTES: usize = 16;

    pub fn decode(bytes: &[u8]) -> Self {
        let at_ms = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, i64::from_be_bytes);
        let hits = bytes
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_be_bytes);
        Self { at_ms, hits }
    }
}

/// The agent's memory `id` as the store's durable view holds it.
pub fn stored(store: &bbx_store::Store, agent: &AgentId, id: MemoryId) -> Result<Option<Memory>> {
    use fjall::Readable;
    let bytes = store
        .view()
        .get(store.keyspace(crate::MEMORY_ITEMS), memory_key(agent, id))
        .map_err(|e| bbx_store::storage_error("read a memory", e))?;
    bytes.map(|b| Memory::decode(&b)).transpose()
}

/// The agent's memory `id` as JSON, or `not_found`: what `memory.get` answers.
pub fn get(store: &bbx_store::Store, agent: &AgentId, id: MemoryId) -> Result<serde_json::Value> {
    let memory = stored(store, agent, id)?
        .ok_or_else(|| Error::new(bbx_core::ErrorCode::NotFound, format!("the agent has no memory {id}")))?;
    serde_json::to_value(memory).map_err(|e| Error::internal(e.to_string()))
}

/// agent, id: the key of a memory's record, vector and access.
pub fn memory_key(agent: &AgentId, id: MemoryId) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(agent.as_bytes());
    key.extend_from_slice(&id.0.to_be_bytes());
    key
}

/// The agent and id a memory key names.
pub fn parse_memory_key(key: &[u8]) -> Option<(AgentId, MemoryId)> {
    let agent: [u8; 16] = key.get(..16)?.try_into().ok()?;
    let id: [u8; 8] = key.get(16..24)?.try_into().ok()?;
    (key.len() == 24).then(|| (AgentId::from_bytes(agent), MemoryId(u64::from_be_bytes(id))))
}

/// agent, text hash: where an exact duplicate is found.
pub fn hash_key(agent: &AgentId, hash: &str) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.extend_from_slice(hash.as_bytes());
    key
}

/// agent, subject: the memory that holds for a subject now.
pub fn subject_key(agent: &AgentId, subject: &str) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.extend_from_slice(subject.as_bytes());
    key
}

/// The sha256 of a text with its whitespace runs made one space and its ends
/// trimmed: texts that differ only there are exact duplicates.
pub fn text_hash(text: &str) -> String {
    let mut hasher = Sha256::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            hasher.update(b" ");
        }
        hasher.update(word.as_bytes());
    }
    hex::encode(hasher.finalize())
}

pub fn encode_vector(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn decode_vector(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ids_keys_and_vectors_round_trip(id in 0u64..(1 << 63), vector in proptest::collection::vec(any::<f32>(), 0..64), at_ms in any::<i64>(), hits in any::<u64>()) {
            let id = MemoryId(id);
            prop_assert_eq!(id.to_string().parse::<MemoryId>().unwrap(), id);
            let agent = AgentId::generate();
            prop_assert_eq!(parse_memory_key(&memory_key(&agent, id)), Some((agent, id)));
            let decoded = decode_vector(&encode_vector(&vector));
            prop_assert_eq!(decoded.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), vector.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            let access = Access { at_ms, hits };
            prop_assert_eq!(Access::decode(&access.encode()), access);
        }

        #[test]
        fn ids_parse_only_from_sixteen_hex_digits(s in "\\PC{0,20}") {
            if let Ok(id) = s.parse::<MemoryId>() {
                prop_assert_eq!(id.to_string(), s.to_lowercase());
            }
        }
    }

    #[test]
    fn whitespace_does_not_make_a_text_new() {
        assert_eq!(text_hash("  the cat\n sat "), text_hash("the cat sat"));
        assert_ne!(text_hash("the cat sat"), text_hash("The cat sat"));
        assert!(MemoryId::random().0 < 1 << 63);
    }
}
