//! An item of an agent's context as it is stored: its record (kind, role,
//! token count, pin, references, the codec of its block) under the agent's
//! prefix, its content block apart, and when it was last accessed.

use crate::codec::Codec;
use bbx_core::{AgentId, Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// An item's id: its place in the agent's context, from 1 up, never reused.
pub type ItemId = u64;

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Message,
    ToolResult,
    Document,
    Note,
    Summary,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Message,
        Kind::ToolResult,
        Kind::Document,
        Kind::Note,
        Kind::Summary,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Who said it, for a message (and whose turn a tool result answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub fn code(self) -> u8 {
        self as u8 + 1
    }
}

/// An item's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: ItemId,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub tokens: u32,
    /// Bytes of its content.
    pub bytes: u32,
    #[serde(default)]
    pub pinned: bool,
    /// How important the writer says it is, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importance: Option<f32>,
    pub created: DateTime<Utc>,
    /// Items it refers to (earlier ones of the same agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refs: Vec<ItemId>,
    /// How its block on disk is encoded, and its size.
    pub codec: Codec,
    pub stored_bytes: u32,
    /// The taint labels of the op that wrote it (FlowIntegrity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("a stored context item does not decode: {e}")))
    }
}

/// An item's accesses: when last (in the agent's steps and in time) and how
/// often, kept apart from the record so that reading does not rewrite it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Access {
    pub step: u64,
    pub at_ms: i64,
    pub count: u32,
}

impl Access {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.extend_from_slice(&self.step.to_be_bytes());
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Self {
        let int = |range: std::ops::Range<usize>| {
            bytes
                .get(range)
                .map(|b| b.iter().fold(0u64, |n, b| n << 8 | u64::from(*b)))
        };
        Self {
            step: int(0..8).unwrap_or(0),
            at_ms: int(8..16).unwrap_or(0) as i64,
            count: int(16..20).unwrap_or(0) as u32,
        }
    }
}

/// agent, id: the key of an item's record, block and access.
pub fn item_key(agent: &AgentId, id: ItemId) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(agent.as_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// The id an item key names.
pub fn parse_item_key(key: &[u8]) -> Option<ItemId> {
    let id: [u8; 8] = key.get(16..24)?.try_into().ok()?;
    (key.len() == 24).then(|| u64::from_be_bytes(id))
}

/// A counter an agent keeps (its id sequence, its import count) from its
/// stored bytes; 0 where there is none yet.
pub fn counter(bytes: Option<impl AsRef<[u8]>>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// agent, what: the key of one of the agent's own records (its id sequence,
/// its last assembly).
pub fn agent_key(agent: &AgentId, what: &[u8]) -> Vec<u8> {
    let mut key = agent.as_bytes().to_vec();
    key.extend_from_slice(what);
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn keys_and_accesses_round_trip(id in any::<u64>(), step in any::<u64>(), at_ms in any::<i64>(), count in any::<u32>()) {
            let agent = AgentId::generate();
            prop_assert_eq!(parse_item_key(&item_key(&agent, id)), Some(id));
            let access = Access { step, at_ms, count };
            prop_assert_eq!(Access::decode(&access.encode()), access);
        }
    }
}
