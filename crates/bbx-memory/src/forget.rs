//! Forgetting: which of an agent's memories go, by LRU, decay, age or capacity,
//! and their deletion from the store (record, vector, access, and the hash and
//! subject keys that point at them) in one write, then from the index. On
//! demand (`memory.forget`, `memory.delete`) and on a schedule
//! (`[memory.forget]`).

use crate::Memories;
use crate::catalog::{Catalog, Entry, millis};
use crate::record::{Memory, MemoryId, hash_key, memory_key, subject_key};
use crate::{MEMORY_ACCESS, MEMORY_HASHES, MEMORY_ITEMS, MEMORY_SUBJECTS, MEMORY_VECTORS};
use bbx_component::{EffectOp, Pending, Staging};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::{Applied, GroupTx, Staged};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::{Arc, OnceLock};

/// Memories deleted in one write at most: 1,000 memories of 16 KiB fit a
/// journal record with room to spare.
const MAX_PER_WRITE: usize = 1000;

/// How memories are chosen to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Keep the `max` most recently used.
    Lru,
    /// Keep at most `max`: superseded memories go first, then the least
    /// recently used.
    Capacity,
    /// Forget those created more than `max_age_secs` ago.
    Age,
    /// Forget those whose weight, 0.5^(time since last use / half-life) times
    /// (1 + ln(1 + uses)), is below `min_weight`.
    Decay,
    /// Forget those whose metadata matches `filter`, as a search's filter
    /// does (what another component added, and now takes back).
    Matching,
}

/// `memory.forget`'s args.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgetArgs {
    pub strategy: Strategy,
    /// lru, capacity: how many to keep.
    #[serde(default)]
    pub max: Option<u64>,
    /// age: the oldest a memory may be.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
    /// decay: the half-life of a memory's weight [default: 7 days].
    #[serde(default)]
    pub half_life_secs: Option<f64>,
    /// decay: the weight below which a memory goes [default: 0.05].
    #[serde(default)]
    pub min_weight: Option<f64>,
    /// matching: metadata every memory that goes has.
    #[serde(default)]
    pub filter: Option<serde_json::Map<String, Value>>,
    /// Say what would go, and forget nothing.
    #[serde(default)]
    pub dry_run: bool,
}

impl ForgetArgs {
    pub fn check(&self) -> Result<()> {
        let need = |field: &str| {
            Err(Error::invalid_field(
                field,
                format!("strategy {:?} needs {field}", self.strategy),
            ))
        };
        match self.strategy {
            Strategy::Lru | Strategy::Capacity if self.max.is_none() => need("max"),
            Strategy::Age if self.max_age_secs.is_none() => need("max_age_secs"),
            Strategy::Matching if self.filter.as_ref().is_none_or(serde_json::Map::is_empty) => need("filter"),
            Strategy::Decay
                if self.half_life_secs.is_some_and(|h| !(h.is_finite() && h > 0.0))
                    || self.min_weight.is_some_and(|w| !w.is_finite()) =>
            {
                Err(Error::invalid_field(
                    "half_life_secs",
                    "half_life_secs must be above 0 and min_weight a number",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The ids of `agent`'s memories this forgets, as the catalog stands.
    pub fn choose(&self, catalog: &Catalog, agent: &AgentId, now_ms: i64) -> Vec<MemoryId> {
        let entries: Vec<(u64, &Entry)> = catalog.of(agent).collect();
        let chosen: Vec<u64> = match self.strategy {
            Strategy::Lru | Strategy::Capacity => {
                let keep = self.max.unwrap_or(0) as usize;
                if entries.len() <= keep {
                    return Vec::new();
                }
                let capacity = self.strategy == Strategy::Capacity;
                let mut ranked = entries;
                // Least worth keeping first.
                ranked.sort_by_key(|(id, e)| (capacity && e.valid_at(now_ms), e.access.at_ms, e.access.hits, *id));
                let excess = ranked.len() - keep;
                ranked.into_iter().take(excess).map(|(id, _)| id).collect()
            }
            Strategy::Age => {
                let oldest = now_ms
                    .saturating_sub(self.max_age_secs.unwrap_or(u64::MAX).min(i64::MAX as u64 / 1000) as i64 * 1000);
                entries
                    .into_iter()
                    .filter(|(_, e)| e.created_ms < oldest)
                    .map(|(id, _)| id)
                    .collect()
            }
            Strategy::Matching => {
                let filter = self.filter.clone().unwrap_or_default();
                entries
                    .into_iter()
                    .filter(|(_, e)| e.matches(&filter))
                    .map(|(id, _)| id)
                    .collect()
            }
            Strategy::Decay => {
                let half_life = self.half_life_secs.unwrap_or(7.0 * 24.0 * 3600.0);
                let min = self.min_weight.unwrap_or(0.05);
                entries
                    .into_iter()
                    .filter(|(_, e)| {
                        let idle = (now_ms - e.access.at_ms).max(0) as f64 / 1000.0;
                        let weight = 0.5f64.powf(idle / half_life) * (1.0 + (1.0 + e.access.hits as f64).ln());
                        weight < min
                    })
                    .map(|(id, _)| id)
                    .collect()
            }
        };
        let mut chosen: Vec<MemoryId> = chosen.into_iter().map(MemoryId).collect();
        chosen.sort();
        chosen
    }
}

/// Deletes one memory of `agent` from the store; whether it was there.
pub fn delete_memory(tx: &mut GroupTx<'_>, agent: &AgentId, id: MemoryId) -> Result<bool> {
    let key = memory_key(agent, id);
    let Some(bytes) = tx.read(MEMORY_ITEMS, &key)? else {
        return Ok(false);
    };
    let memory = Memory::decode(&bytes)?;
    let points_here = Some(id.0.to_be_bytes().to_vec());
    if tx.read(MEMORY_HASHES, &hash_key(agent, &memory.hash))? == points_here {
        tx.remove(MEMORY_HASHES, hash_key(agent, &memory.hash));
    }
    if let Some(subject) = &memory.subject
        && tx.read(MEMORY_SUBJECTS, &subject_key(agent, subject))? == points_here
    {
        tx.remove(MEMORY_SUBJECTS, subject_key(agent, subject));
    }
    tx.remove(MEMORY_ITEMS, key.clone());
    tx.remove(MEMORY_VECTORS, key.clone());
    tx.remove(MEMORY_ACCESS, key);
    Ok(true)
}

/// `memory.delete`: the ids given, all of which must exist.
#[derive(Debug)]
pub struct Delete {
    pub ids: Vec<MemoryId>,
}

impl EffectOp for Delete {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        tx.all_or_nothing(|tx| {
            for id in &self.ids {
                if !delete_memory(tx, staging.agent, *id)? {
                    return Err(Error::new(ErrorCode::NotFound, format!("the agent has no memory {id}")));
                }
            }
            Ok(json!({ "deleted": self.ids }))
        })
    }
}

/// `memory.forget`: the ids chosen when it runs.
#[derive(Debug)]
pub struct Forget {
    pub memories: Memories,
    pub args: ForgetArgs,
    pub chosen: Arc<OnceLock<Vec<MemoryId>>>,
}

impl EffectOp for Forget {
    fn ready(&self, agent: AgentId) -> Option<Pending<'static, ()>> {
        let memories = self.memories.clone();
        let args = self.args.clone();
        let cell = self.chosen.clone();
        // On a task: choosing ranks the whole namespace.
        Some(Box::pin(async move {
            memories.started().await;
            let chosen = args.choose(&memories.0.catalog.read(), &agent, millis(Utc::now()));
            let _ = cell.set(chosen);
            Ok(())
        }))
    }

    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let chosen = self
            .chosen
            .get()
            .ok_or_else(|| Error::internal("memory.forget was staged before it chose"))?;
        if self.args.dry_run {
            return Ok(json!({ "forgotten": [], "would_forget": chosen, "count": chosen.len() }));
        }
        // One op forgets a bounded number (its write must fit one journal
        // record); `more` says to run it again.
        let more = chosen.len() > MAX_PER_WRITE;
        tx.all_or_nothing(|tx| {
            let mut forgotten = Vec::with_capacity(chosen.len().min(MAX_PER_WRITE));
            for id in chosen.iter().take(MAX_PER_WRITE) {
                if delete_memory(tx, staging.agent, *id)? {
                    forgotten.push(*id);
                }
            }
            Ok(json!({ "forgotten": forgotten, "count": forgotten.len(), "more": more }))
        })
    }
}

/// Memories deleted outside an op (the schedule).
#[derive(Debug)]
struct Forgetting(Vec<(AgentId, MemoryId)>);

impl Staged for Forgetting {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.all_or_nothing(|tx| {
            let mut gone = Vec::new();
            for (agent, id) in &self.0 {
                if delete_memory(tx, agent, *id)? {
                    gone.push(*id);
                }
            }
            Ok(Applied::output(gone))
        })
    }
}

/// Deletes memories outside an op, `MAX_PER_WRITE` a write, each batch then
/// out of the index.
async fn forget_in_steps(memories: &Memories, chosen: Vec<(AgentId, MemoryId)>) -> Result<usize> {
    let mut forgotten = 0;
    for step in chosen.chunks(MAX_PER_WRITE) {
        let gone: Vec<MemoryId> = memories
            .store()?
            .write(Forgetting(step.to_vec()))
            .await?
            .into_output()?;
        memories.unlearn(&gone)?;
        forgotten += gone.len();
    }
    Ok(forgotten)
}

/// Forgetting on the schedule: each agent over `max_per_agent` or holding
/// memories past `max_age_secs`.
pub async fn on_schedule(memories: &Memories) {
    let schedule = memories.0.config.forget.clone();
    if schedule.max_per_agent.is_none() && schedule.max_age_secs.is_none() {
        return;
    }
    let now = millis(Utc::now());
    let chosen: Vec<(AgentId, MemoryId)> = {
        let catalog = memories.0.catalog.read();
        let agents: Vec<AgentId> = catalog.namespaces.keys().copied().collect();
        let mut chosen = Vec::new();
        for agent in agents {
            let mut ids = Vec::new();
            if let Some(max) = schedule.max_per_agent {
                ids.extend(strategy(Strategy::Capacity, Some(max), None).choose(&catalog, &agent, now));
            }
            if let Some(age) = schedule.max_age_secs {
                ids.extend(strategy(Strategy::Age, None, Some(age)).choose(&catalog, &agent, now));
            }
            ids.sort();
            ids.dedup();
            chosen.extend(ids.into_iter().map(|id| (agent, id)));
        }
        chosen
    };
    if chosen.is_empty() {
        return;
    }
    match forget_in_steps(memories, chosen).await {
        Ok(count) => tracing::info!(count, "forgot memories on schedule"),
        Err(e) => tracing::warn!(error = %e, "forgetting on schedule failed"),
    }
}

impl Memories {
    /// Deletes every memory of a deleted agent.
    pub(crate) async fn forget_agent(&self, agent: AgentId) -> Result<()> {
        let ids: Vec<(AgentId, MemoryId)> = self
            .0
            .catalog
            .read()
            .of(&agent)
            .map(|(id, _)| (agent, MemoryId(id)))
            .collect();
        forget_in_steps(self, ids).await.map(drop)
    }

    /// The recovery step of agent deletion: deletes the memories of agents that
    /// no longer exist (a deletion a crash cut short).
    pub(crate) async fn forget_orphans(&self, agent_exists: impl Fn(&AgentId) -> bool) -> Result<()> {
        let orphans: Vec<AgentId> = self
            .0
            .catalog
            .read()
            .namespaces
            .keys()
            .filter(|agent| !agent_exists(agent))
            .copied()
            .collect();
        for agent in orphans {
            self.forget_agent(agent).await?;
        }
        Ok(())
    }
}

fn strategy(strategy: Strategy, max: Option<u64>, max_age_secs: Option<u64>) -> ForgetArgs {
    ForgetArgs {
        strategy,
        max,
        max_age_secs,
        half_life_secs: None,
        min_weight: None,
        filter: None,
        dry_run: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(agent: AgentId, metadata: Value) -> Entry {
        Entry {
            agent,
            created_ms: 0,
            valid_from_ms: 0,
            valid_to_ms: None,
            current_model: true,
            metadata: metadata.as_object().cloned().map(Arc::new),
            access: crate::record::Access::default(),
            bytes: 1,
        }
    }

    #[test]
    fn matching_takes_what_its_filter_names_of_the_agent_only() {
        let (agent, other) = (AgentId::generate(), AgentId::generate());
        let mut catalog = Catalog::default();
        let memories = [
            (1, agent, json!({"source": "context", "item": 4})),
            (2, agent, json!({"source": "context", "item": 5})),
            (3, agent, json!({"source": "user"})),
            (4, other, json!({"source": "context", "item": 4})),
            (5, agent, Value::Null),
        ];
        for (id, owner, metadata) in memories {
            catalog.entries.insert(id, entry(owner, metadata));
            catalog.namespaces.entry(owner).or_default().ids.insert(id);
        }
        let mut args = strategy(Strategy::Matching, None, None);
        assert!(args.check().is_err(), "matching needs a filter");
        args.filter = json!({"source": "context", "item": [4, 5]}).as_object().cloned();
        args.check().unwrap();
        assert_eq!(args.choose(&catalog, &agent, 0), vec![MemoryId(1), MemoryId(2)]);
    }
}
