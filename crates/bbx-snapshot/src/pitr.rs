//! Point-in-time recovery: the agent's parts as they were at a moment, from
//! the latest snapshot before it (or, for an agent younger than the journal's
//! history, from nothing) plus the store writes the journal's history holds
//! from the snapshot's position up to that moment, each mapped by its
//! component to the record of the export it changes.

use bbx_component::{AgentHost, StoreWrite};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::redo::RedoGroup;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};

/// Each part's records by key.
pub type Parts = HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Applies to `parts` every write of `agent` in the history's groups at or
/// after `position` committed at or before `at`. Answers how many groups
/// changed the agent.
pub fn replay(
    host: &dyn AgentHost,
    agent: &AgentId,
    parts: &mut Parts,
    history: &[RedoGroup],
    position: u64,
    at: DateTime<Utc>,
) -> Result<usize> {
    let until = at.timestamp_micros().max(0) as u64;
    let mut applied = 0;
    for group in history.iter().filter(|group| group.lsn >= position) {
        let Some(stamp) = group.stamp else {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "the journal's history holds store writes from before they carried their time; take a snapshot and recover to a time after it",
            ));
        };
        if stamp > until {
            break;
        }
        let mut touched = false;
        for (keyspace, key, value) in &group.writes {
            let write = StoreWrite {
                keyspace: *keyspace,
                key,
                value: value.as_deref(),
            };
            let Some((part, (record, value))) = host.exported_write(agent, write) else {
                continue;
            };
            touched = true;
            let records = parts.entry(part.to_owned()).or_default();
            match value {
                Some(value) => records.insert(record, value),
                None => records.remove(&record),
            };
        }
        applied += usize::from(touched);
    }
    Ok(applied)
}

/// The time a group was committed.
pub fn stamp_time(stamp: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(stamp as i64).unwrap_or_default()
}
