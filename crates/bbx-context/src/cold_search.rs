//! COLD items, searchable through SemanticMemory (when the kernel has it and
//! `context.cold_search` is on): an item that reaches COLD is added to its
//! agent's memory as a chore ([`crate::chores`]); `context.search` asks
//! memory, in process, and answers with the items that are still there, read
//! from context (so their content and taint are the item's), one entry per
//! item.

use crate::Contexts;
use crate::chores::{Chore, SOURCE};
use crate::{CONTEXT_CHORES, views};
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::storage_error;
use fjall::Readable;
use serde_json::{Value, json};

impl Contexts {
    /// Whether COLD items go to memory: set at start.
    pub(crate) fn cold_search(&self) -> bool {
        self.0.cold_search.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The agent's COLD items yet to reach memory.
    pub(crate) fn cold_pending(&self, agent: &AgentId) -> Result<usize> {
        let store = self.store()?;
        let mut pending = 0;
        for kv in store.view().prefix(store.keyspace(CONTEXT_CHORES), agent.as_bytes()) {
            let (_, value) = kv
                .into_inner()
                .map_err(|e| storage_error("count COLD items for memory", e))?;
            let chore: Chore = serde_json::from_slice(&value).unwrap_or_default();
            pending += usize::from(chore.add);
        }
        Ok(pending)
    }

    /// `context.search`: memory's best matches among the agent's COLD items
    /// (read in process: the caller's right to read was checked), each the
    /// item as context holds it now, with memory's score.
    pub(crate) async fn search(&self, agent: AgentId, query: String, k: usize) -> Result<Value> {
        let memory = match (self.cold_search(), self.0.memory.get()) {
            (true, Some(memory)) => memory.clone(),
            _ => {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    "context search needs SemanticMemory and context.cold_search = true",
                ));
            }
        };
        let mut filter = serde_json::Map::new();
        filter.insert("source".into(), json!(SOURCE));
        let found = memory.search(agent, query, k, filter).await?;
        let mut hits: Vec<(u64, Value)> = Vec::new();
        for result in found["results"].as_array().into_iter().flatten() {
            // A long item is several memories: the item once, at its best score.
            if let Some(item) = result["metadata"]["item"].as_u64()
                && !hits.iter().any(|(id, _)| *id == item)
            {
                hits.push((item, result["score"].clone()));
            }
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.search_results(agent, hits))
            .await
            .map_err(|e| Error::internal(format!("context search failed: {e}")))?
    }

    fn search_results(&self, agent: AgentId, hits: Vec<(u64, Value)>) -> Result<Value> {
        let mut items = Vec::with_capacity(hits.len());
        for (id, score) in hits {
            let found = self.with(agent, |ctx| ctx.items.get(&id).map(|e| (e.record.clone(), e.tier())))?;
            // Deleted since, or unreadable now (the bucket down): left out.
            let Some((record, tier)) = found else { continue };
            let Ok(content) = self.content(agent, id) else { continue };
            let mut item = views::described(&record, tier);
            item["content"] = json!(&*content);
            item["score"] = score;
            items.push(item);
        }
        Ok(json!({ "items": items }))
    }
}
