//! What a snapshot is: its manifest (who, when, at which journal position, and
//! the chunks of each part), and how a part's records are laid out as the
//! stream that is cut into chunks.
//!
//! A part is one component's export of the agent (`state`, `context`, ...) or
//! its workspace files (`files`): records `(key, value)` in key order, each
//! written as `key length u32 | key | value length u64 | value`. The part's
//! chunk list (36 bytes per chunk) is itself cut into chunks, so a snapshot
//! whose data barely changed also writes little of its list.

use crate::chunk::{ChunkRef, corrupt};
use bbx_core::quota::QuotaLimits;
use bbx_core::{AgentId, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const FORMAT: u32 = 1;
/// The part that holds the workspace's files.
pub const FILES: &str = "files";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: uuid::Uuid,
    pub agent: AgentId,
    pub tenant: String,
    pub created_at: DateTime<Utc>,
    /// The journal position the agent's data was read at: every store write
    /// after it has a higher lsn (where a point-in-time recovery replays from).
    pub position: u64,
    /// What took it: `manual`, `schedule`, `every_ops` or `policy`.
    pub trigger: String,
    /// The agent's record (name, labels, tool settings) as it was.
    pub agent_record: Value,
    pub quota: QuotaLimits,
    pub parts: Vec<PartRef>,
    /// The components the snapshot holds the data of (those the kernel had;
    /// one that exported nothing has no part): a restore leaves the data of
    /// any other as it is. `None` in a snapshot taken before this was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components: Option<Vec<String>>,
    pub stats: Stats,
}

/// The components a snapshot that does not name them holds: all but memory,
/// unless it has a part of it (memory's data came to snapshots just before
/// they named their components).
const BEFORE_MEMORY: &str = "memory";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartRef {
    pub name: String,
    pub records: u64,
    /// The part's stream, in bytes.
    pub bytes: u64,
    /// The chunks of its chunk list.
    pub list: Vec<ChunkRef>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes of every part's stream.
    pub bytes: u64,
    pub chunks: u64,
    /// Chunks no store had before.
    pub new_chunks: u64,
    /// Bytes this snapshot wrote to a store: its new chunks (compressed), pack
    /// indexes and its manifest.
    pub bytes_written: u64,
}

impl Manifest {
    /// Whether the snapshot holds the data of `component` (an empty part when
    /// it has none of it).
    pub fn holds(&self, component: &str) -> bool {
        match &self.components {
            Some(components) => components.iter().any(|c| c == component),
            None => component != BEFORE_MEMORY || self.part(component).is_some(),
        }
    }

    pub fn part(&self, name: &str) -> Option<&PartRef> {
        self.parts.iter().find(|part| part.name == name)
    }
}

/// A part's records, read back.
pub type Records = Vec<(Vec<u8>, Vec<u8>)>;

pub fn encode_record(key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
}

/// The records of a part's stream.
pub fn decode_records(stream: &[u8]) -> Result<Records> {
    fn take<'a>(stream: &'a [u8], at: &mut usize, len: usize) -> Result<&'a [u8]> {
        let end = at
            .checked_add(len)
            .ok_or_else(|| corrupt("a record's length is out of range"))?;
        let bytes = stream
            .get(*at..end)
            .ok_or_else(|| corrupt("a part's records are cut short"))?;
        *at = end;
        Ok(bytes)
    }
    let mut records = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let key_len = u32::from_le_bytes(take(stream, &mut at, 4)?.try_into().expect("4 bytes")) as usize;
        let key = take(stream, &mut at, key_len)?.to_vec();
        let value_len = u64::from_le_bytes(take(stream, &mut at, 8)?.try_into().expect("8 bytes"));
        let value_len = usize::try_from(value_len).map_err(|_| corrupt("a record's length is out of range"))?;
        let value = take(stream, &mut at, value_len)?.to_vec();
        records.push((key, value));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_snapshot_holds_the_components_it_names_and_an_older_one_all_but_memory() {
        let mut manifest: Manifest = serde_json::from_value(serde_json::json!({
            "format": FORMAT, "id": uuid::Uuid::now_v7(), "agent": AgentId::generate(), "tenant": "t",
            "created_at": chrono::Utc::now(), "position": 0, "trigger": "manual", "agent_record": {},
            "quota": QuotaLimits::default(), "parts": [], "stats": Stats::default(),
        }))
        .unwrap();
        assert!(manifest.holds("state") && manifest.holds("context") && !manifest.holds("memory"));
        manifest.parts.push(PartRef {
            name: "memory".into(),
            records: 1,
            bytes: 1,
            list: Vec::new(),
        });
        assert!(
            manifest.holds("memory"),
            "one taken as memory came, before components were named"
        );
        manifest.components = Some(vec!["state".into(), "memory".into()]);
        assert!(manifest.holds("memory") && !manifest.holds("context"));
    }

    proptest! {
        #[test]
        fn records_round_trip(records in proptest::collection::vec((proptest::collection::vec(any::<u8>(), 0..40), proptest::collection::vec(any::<u8>(), 0..300)), 0..40)) {
            let mut stream = Vec::new();
            for (key, value) in &records {
                encode_record(key, value, &mut stream);
            }
            prop_assert_eq!(decode_records(&stream).unwrap(), records);
        }

        #[test]
        fn a_damaged_stream_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_records(&bytes);
        }
    }
}
