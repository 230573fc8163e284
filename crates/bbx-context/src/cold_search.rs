//! COLD items, searchable through SemanticMemory (when the kernel serves it
//! and `context.cold_search` is on). An item that reaches COLD is marked in
//! the same write that moves it ([`CONTEXT_COLD_INDEX`]); a task adds each
//! marked item to its agent's memory (`memory.add` as the agent itself, keyed
//! by the item and its content, so a retry adds nothing) and unmarks it once
//! memory has it. A crash loses no mark. Deleting items takes their memories
//! back (`memory.forget`, strategy `matching`); `context.search` asks memory
//! and answers with the items that are still there.

use crate::Contexts;
use crate::codec;
use crate::item::{ItemId, Record, item_key, parse_item_key};
use crate::{CONTEXT_COLD_INDEX, CONTEXT_ITEMS};
use bbx_auth::Caller;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::{Applied, GroupTx, Staged, storage_error};
use fjall::Readable;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What memory's metadata says of an item it holds for context.
const SOURCE: &str = "context";

/// Items added to memory per round at most.
const BATCH: usize = 64;

/// How long the task rests when nothing is marked, and after memory refused
/// (no model installed, a quota).
const IDLE: Duration = Duration::from_secs(1);
const BACKOFF: Duration = Duration::from_secs(30);

/// How long one `memory.add` may take (it embeds the item).
const ADD_WAIT: Duration = Duration::from_secs(120);

/// Marks an item that reached COLD, for memory.
pub(crate) fn mark(tx: &mut GroupTx<'_>, agent: &AgentId, id: ItemId) {
    tx.put(CONTEXT_COLD_INDEX, item_key(agent, id), Vec::new());
}

/// Unmarks items memory has (or never will).
#[derive(Debug)]
struct Unmark(Vec<Vec<u8>>);

impl Staged for Unmark {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        for key in &self.0 {
            tx.remove(CONTEXT_COLD_INDEX, key.clone());
        }
        Ok(Applied::Done)
    }
}

/// An error that a later try would meet again: the mark goes.
fn is_final(error: &Error) -> bool {
    matches!(
        error.code,
        ErrorCode::InvalidArgument | ErrorCode::NotFound | ErrorCode::PayloadTooLarge
    )
}

impl Contexts {
    /// Whether COLD items go to memory: set at start.
    pub(crate) fn cold_search(&self) -> bool {
        self.0.cold_search.load(Ordering::Relaxed)
    }

    /// The agent's COLD items yet to reach memory.
    pub(crate) fn cold_pending(&self, agent: &AgentId) -> Result<usize> {
        let store = self.store()?;
        store
            .view()
            .prefix(store.keyspace(CONTEXT_COLD_INDEX), agent.as_bytes())
            .try_fold(0, |n, kv| kv.key().map(|_| n + 1))
            .map_err(|e| storage_error("count COLD items for memory", e))
    }

    pub(crate) async fn index_cold_until(self, stopping: CancellationToken) {
        let mut pause = IDLE;
        let mut last_error = String::new();
        loop {
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = match self.index_cold_once().await {
                Ok(taken) => {
                    last_error.clear();
                    if taken == BATCH { Duration::ZERO } else { IDLE }
                }
                Err(e) => {
                    if e.message != last_error {
                        tracing::warn!(error = %e, "COLD context items could not be added to memory; trying again in 30 s");
                        last_error = e.message;
                    }
                    BACKOFF
                }
            };
        }
    }

    /// Adds up to [`BATCH`] marked items to memory; how many it took.
    pub(crate) async fn index_cold_once(&self) -> Result<usize> {
        let store = self.store()?.clone();
        let marked: Vec<Vec<u8>> = store
            .view()
            .iter(store.keyspace(CONTEXT_COLD_INDEX))
            .take(BATCH)
            .map(|kv| kv.key().map(|k| k.to_vec()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| storage_error("list COLD items for memory", e))?;
        let taken = marked.len();
        let mut done = Vec::with_capacity(taken);
        let mut failed = None;
        for key in marked {
            let agent = key
                .get(..16)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(AgentId::from_bytes);
            let Some((agent, id)) = agent.zip(parse_item_key(&key)) else {
                done.push(key);
                continue;
            };
            match self.add_to_memory(agent, id).await {
                Ok(()) => done.push(key),
                Err(e) if is_final(&e) => {
                    tracing::debug!(%agent, id, error = %e, "a COLD context item is not added to memory");
                    done.push(key);
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if !done.is_empty() {
            store.write(Unmark(done)).await?;
        }
        failed.map_or(Ok(taken), Err)
    }

    async fn add_to_memory(&self, agent: AgentId, id: ItemId) -> Result<()> {
        let ctx = self.context()?;
        let key = item_key(&agent, id);
        let view = ctx.store.view();
        let Some(record) = view
            .get(ctx.store.keyspace(CONTEXT_ITEMS), &key)
            .map_err(|e| storage_error("read a context item", e))?
        else {
            return Ok(()); // deleted since
        };
        let record = Record::decode(&record)?;
        let block = self
            .read_block(&agent, id)?
            .ok_or_else(|| Error::not_found("context item", id))?;
        let content = match codec::decode(&block) {
            Ok(content) => content,
            Err(e) => {
                tracing::error!(%agent, id, error = %e, "a damaged COLD context item is not added to memory");
                return Ok(());
            }
        };
        let caller = Caller::of_agent(agent, ctx.agents.agent(&agent)?.tenant);
        let args = json!({
            "text": content,
            "metadata": { "source": SOURCE, "item": id, "kind": record.kind },
            "subject": format!("{SOURCE}:{id}"),
            "on_near_duplicate": "keep",
        });
        let op = SubmitOp {
            idempotency_key: Some(format!(
                "context-cold:{agent}:{id}:{:08x}",
                codec::content_crc(&block).unwrap_or_default()
            )),
            ..SubmitOp::new(agent, "memory.add", args)
        };
        bbx_component::run_op(&*ctx.submitter, &caller, op, ADD_WAIT).await?;
        Ok(())
    }

    /// Takes deleted items' memories back, on a task.
    pub(crate) fn forget_in_memory(&self, agent: AgentId, ids: Vec<u64>) {
        let Ok(ctx) = self.context() else { return };
        let (submitter, agents) = (ctx.submitter.clone(), ctx.agents.clone());
        ctx.tasks.spawn(async move {
            let forget = async {
                let caller = Caller::of_agent(agent, agents.agent(&agent)?.tenant);
                let args = json!({ "strategy": "matching", "filter": { "source": SOURCE, "item": ids } });
                bbx_component::run_op(
                    &*submitter,
                    &caller,
                    SubmitOp::new(agent, "memory.forget", args),
                    ADD_WAIT,
                )
                .await
            };
            if let Err(e) = forget.await {
                tracing::warn!(%agent, error = %e, "deleted context items could not be taken out of memory");
            }
        });
    }

    /// `context.search`: memory's results for the agent's context items, as
    /// `caller` may read them, each with the item's place now.
    pub(crate) async fn search(&self, agent: AgentId, query: String, k: usize) -> Result<Value> {
        if !self.cold_search() {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "context search needs SemanticMemory and context.cold_search = true",
            ));
        }
        let ctx = self.context()?;
        let caller = Caller::of_agent(agent, ctx.agents.agent(&agent)?.tenant);
        let args = json!({ "query": query, "k": k, "filter": { "source": SOURCE } });
        let found = bbx_component::run_op(
            &*ctx.submitter,
            &caller,
            SubmitOp::new(agent, "memory.search", args),
            ADD_WAIT,
        )
        .await?;
        let this = self.clone();
        let results = found["results"].as_array().cloned().unwrap_or_default();
        tokio::task::spawn_blocking(move || this.search_results(agent, &results))
            .await
            .map_err(|e| Error::internal(format!("context search failed: {e}")))?
    }

    fn search_results(&self, agent: AgentId, results: &[Value]) -> Result<Value> {
        self.with(agent, |ctx| {
            let items: Vec<Value> = results
                .iter()
                .filter_map(|found| {
                    let id = found["metadata"]["item"].as_u64()?;
                    let entry = ctx.items.get(&id)?;
                    let record = &entry.record;
                    Some(json!({
                        "id": id, "score": found["score"], "tier": entry.tier(), "kind": record.kind,
                        "role": record.role, "tokens": record.tokens, "content": found["text"],
                    }))
                })
                .collect();
            json!({ "items": items })
        })
    }
}
