//! What the memory component keeps in RAM of every memory: its namespace, times,
//! validity, metadata and access (what filters, decay and forgetting read
//! without touching the disk), and each namespace's keyword index. Rebuilt from
//! the store on start; changed only as ops complete.

use crate::keyword::Keywords;
use crate::record::{Access, Memory, MemoryId};
use bbx_core::AgentId;
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};
use std::sync::Arc;

/// One memory, as searches and forgetting see it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub agent: AgentId,
    pub created_ms: i64,
    pub valid_from_ms: i64,
    pub valid_to_ms: Option<i64>,
    /// Embedded by the model in use: only such memories are vector-searched.
    pub current_model: bool,
    pub metadata: Option<Arc<Map<String, Value>>>,
    pub access: Access,
    pub bytes: usize,
}

impl Entry {
    pub fn valid_at(&self, at_ms: i64) -> bool {
        self.valid_from_ms <= at_ms && self.valid_to_ms.is_none_or(|to| at_ms < to)
    }

    /// Whether every key of `filter` is in the metadata with an equal value (a
    /// list in the filter: any of its values).
    pub fn matches(&self, filter: &Map<String, Value>) -> bool {
        filter.iter().all(|(key, wanted)| {
            let have = self.metadata.as_ref().and_then(|m| m.get(key));
            match (wanted, have) {
                (Value::Array(any), Some(have)) => any.contains(have),
                (wanted, Some(have)) => wanted == have,
                (_, None) => false,
            }
        })
    }
}

#[derive(Debug, Default)]
pub struct Namespace {
    pub keywords: Keywords,
    /// Its memories' ids.
    pub ids: rustc_hash::FxHashSet<u64>,
}

#[derive(Debug, Default)]
pub struct Catalog {
    pub entries: FxHashMap<u64, Entry>,
    pub namespaces: FxHashMap<AgentId, Namespace>,
}

pub fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

impl Catalog {
    pub fn insert(&mut self, agent: AgentId, memory: &Memory, access: Access, model: &str) {
        let id = memory.id.0;
        self.entries.insert(
            id,
            Entry {
                agent,
                created_ms: millis(memory.created),
                valid_from_ms: millis(memory.valid_from),
                valid_to_ms: memory.valid_to.map(millis),
                current_model: memory.model == model,
                metadata: (!memory.metadata.is_empty()).then(|| Arc::new(memory.metadata.clone())),
                access,
                bytes: memory.text.len(),
            },
        );
        let namespace = self.namespaces.entry(agent).or_default();
        namespace.ids.insert(id);
        namespace.keywords.insert(id, &memory.text);
    }

    pub fn remove(&mut self, id: MemoryId) -> Option<Entry> {
        let entry = self.entries.remove(&id.0)?;
        if let Some(namespace) = self.namespaces.get_mut(&entry.agent) {
            namespace.ids.remove(&id.0);
            namespace.keywords.remove(id.0);
            if namespace.ids.is_empty() {
                self.namespaces.remove(&entry.agent);
            }
        }
        Some(entry)
    }

    /// The namespace's memories, as (id, entry).
    pub fn of(&self, agent: &AgentId) -> impl Iterator<Item = (u64, &Entry)> {
        self.namespaces
            .get(agent)
            .into_iter()
            .flat_map(|ns| ns.ids.iter())
            .filter_map(|id| self.entries.get(id).map(|e| (*id, e)))
    }

    pub fn count(&self, agent: &AgentId) -> usize {
        self.namespaces.get(agent).map_or(0, |ns| ns.ids.len())
    }
}
