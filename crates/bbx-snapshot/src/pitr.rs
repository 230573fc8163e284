//! Point-in-time recovery: the agent's parts as they were at a moment, from
//! the latest snapshot before it (or, for an agent younger than the journal's
//! history, from nothing) plus the store writes the journal's history holds
//! from the snapshot's position up to that moment, each mapped by its
//! component to the record of the export it changes. The history is read a
//! segment at a time, and only up to the moment.

use bbx_component::{AgentHost, StoreWrite};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::redo::{GroupReader, RedoGroup};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Each part's records by key.
pub type Parts = HashMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

/// What a replay found in the history.
#[derive(Debug, Default)]
pub struct Replayed {
    /// The first record the history had at or after the position asked for.
    pub first_lsn: Option<u64>,
    /// When its first group was committed.
    pub oldest: Option<DateTime<Utc>>,
    /// Groups that changed the agent.
    pub groups: usize,
}

/// Applies to `parts` every write of `agent` in the journal's history (in
/// `journal`) at or after `position` committed at or before `at`.
pub fn replay(
    host: &dyn AgentHost,
    agent: &AgentId,
    parts: &mut Parts,
    journal: &Path,
    position: u64,
    at: DateTime<Utc>,
) -> Result<Replayed> {
    let until = at.timestamp_micros().max(0) as u64;
    let mut reader = GroupReader::default();
    let mut replayed = Replayed::default();
    let mut failure = None;
    let read = bbx_journal::each_in_history(journal, position, |record| {
        replayed.first_lsn.get_or_insert(record.lsn);
        let group = match reader.push(record.lsn, &record.payload) {
            Ok(Some(group)) => group,
            Ok(None) => return Ok(true),
            Err(e) => {
                failure = Some(e);
                return Ok(false);
            }
        };
        let Some(stamp) = group.stamp else {
            failure = Some(Error::new(
                ErrorCode::FailedPrecondition,
                "the journal's history holds store writes from before they carried their time; take a snapshot and recover to a time after it",
            ));
            return Ok(false);
        };
        replayed.oldest.get_or_insert(stamp_time(stamp));
        if stamp > until {
            return Ok(false);
        }
        replayed.groups += usize::from(apply(host, agent, parts, &group));
        Ok(true)
    });
    read.map_err(|e| Error::internal(format!("reading the journal's history failed: {e}")))?;
    match failure {
        Some(e) => Err(e),
        None => Ok(replayed),
    }
}

/// Applies a group's writes of the agent; whether there were any.
fn apply(host: &dyn AgentHost, agent: &AgentId, parts: &mut Parts, group: &RedoGroup) -> bool {
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
    touched
}

/// The time a group was committed.
pub fn stamp_time(stamp: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(stamp as i64).unwrap_or_default()
}
