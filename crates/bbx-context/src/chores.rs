//! What a write leaves to do outside the store, recorded in that same write
//! so no crash loses it ([`CONTEXT_CHORES`], one per item): an item that
//! reached COLD is to be added to its agent's SemanticMemory (where
//! `context.search` finds it); a deleted item is to be taken back out of
//! memory and its object removed from the bucket; an object a demotion
//! replaced is to be removed.
//!
//! One task does the chores, one at a time, so a deletion's chore, which
//! replaces a pending add, never races it. A chore that fails is tried again
//! later (30 s, doubling to an hour), under a new idempotency key, while the
//! others go on; one that can never succeed (the agent went, the item is
//! damaged, memory refuses it) is dropped and logged.

use crate::Contexts;
use crate::codec;
use crate::item::{ItemId, Record, item_key, parse_item_key};
use crate::{CONTEXT_CHORES, CONTEXT_ITEMS};
use bbx_auth::Caller;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::{Applied, GroupTx, Staged, storage_error};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What memory's metadata says of an item it holds for context.
pub(crate) const SOURCE: &str = "context";

/// Chores looked at per round at most.
const BATCH: usize = 64;

/// How long the task rests when no chore is due: at least, and at most.
const IDLE: Duration = Duration::from_secs(1);
const MAX_REST: Duration = Duration::from_secs(60);

/// The wait after a failure, doubled each time up to [`MAX_BACKOFF`]: a
/// bucket that blinks is tried again within seconds, one that is down about
/// once an hour.
const BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How long one op of a chore may take (an add embeds the item).
const OP_WAIT: Duration = Duration::from_secs(120);

/// An item's chore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Chore {
    /// Add the item to memory.
    #[serde(default)]
    pub add: bool,
    /// Take the item's memories back (it was deleted).
    #[serde(default)]
    pub forget: bool,
    /// Objects to remove from the bucket.
    #[serde(default)]
    pub objects: Vec<String>,
    /// Tries that failed so far.
    #[serde(default)]
    pub failures: u32,
    /// Not before this (ms since the epoch).
    #[serde(default)]
    pub not_before_ms: i64,
}

impl Chore {
    fn read(tx: &GroupTx<'_>, key: &[u8]) -> Result<Self> {
        Ok(tx
            .read(CONTEXT_CHORES, key)?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default())
    }

    fn write(&self, tx: &mut GroupTx<'_>, key: Vec<u8>) {
        if let Ok(bytes) = serde_json::to_vec(self) {
            tx.put(CONTEXT_CHORES, key, bytes);
        }
    }

    /// New work is due now, whatever the old waited for.
    fn due_now(mut self) -> Self {
        self.failures = 0;
        self.not_before_ms = 0;
        self
    }

    fn is_empty(&self) -> bool {
        !self.add && !self.forget && self.objects.is_empty()
    }
}

/// An item that reached COLD: to be added to memory.
pub(crate) fn cold(tx: &mut GroupTx<'_>, agent: &AgentId, id: ItemId) -> Result<()> {
    let key = item_key(agent, id);
    let mut chore = Chore::read(tx, &key)?.due_now();
    chore.add = true;
    chore.write(tx, key);
    Ok(())
}

/// A deleted item: its memories to forget (where memory holds COLD items),
/// and the object its stored block names, to remove. Call before the block
/// is removed.
pub(crate) fn deleted(tx: &mut GroupTx<'_>, agent: &AgentId, id: ItemId, forget: bool) -> Result<()> {
    let key = item_key(agent, id);
    let mut chore = Chore::read(tx, &key)?.due_now();
    chore.add = false;
    chore.forget = forget;
    replaced(tx, &key, &mut chore)?;
    if !chore.is_empty() {
        chore.write(tx, key);
    } else {
        tx.remove(CONTEXT_CHORES, key);
    }
    Ok(())
}

/// A block about to be written over: the object it names, if any, to remove.
pub(crate) fn overwritten(tx: &mut GroupTx<'_>, agent: &AgentId, id: ItemId) -> Result<()> {
    let key = item_key(agent, id);
    let mut chore = Chore::read(tx, &key)?;
    if replaced(tx, &key, &mut chore)? {
        chore.due_now().write(tx, key);
    }
    Ok(())
}

/// Adds the object the stored block at `key` names to `chore`; whether it did.
fn replaced(tx: &GroupTx<'_>, key: &[u8], chore: &mut Chore) -> Result<bool> {
    let block = tx.read(crate::CONTEXT_BLOCKS, key)?;
    let Some(name) = block.as_deref().and_then(codec::remote_name) else {
        return Ok(false);
    };
    chore.objects.push(name.to_owned());
    Ok(true)
}

/// Settles a chore: removes it once done, or sets its next try, unless a
/// write since changed it (then the new chore stands).
#[derive(Debug)]
struct Settle {
    key: Vec<u8>,
    seen: Chore,
    next: Option<Chore>,
}

impl Staged for Settle {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        if Chore::read(tx, &self.key)? != self.seen {
            return Ok(Applied::Done);
        }
        match &self.next {
            Some(next) => next.write(tx, self.key.clone()),
            None => tx.remove(CONTEXT_CHORES, self.key.clone()),
        }
        Ok(Applied::Done)
    }
}

/// An error a later try would meet again.
fn is_final(error: &Error) -> bool {
    matches!(
        error.code,
        ErrorCode::InvalidArgument
            | ErrorCode::NotFound
            | ErrorCode::PayloadTooLarge
            | ErrorCode::PolicyDenied
            | ErrorCode::PermissionDenied
            | ErrorCode::AlreadyExists
            | ErrorCode::Internal
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Contexts {
    pub(crate) async fn do_chores_until(self, stopping: CancellationToken) {
        loop {
            let pause = match self.do_chores().await {
                Ok((BATCH, _)) => Duration::ZERO,
                // All were looked at: rest until the first is due, or a new
                // chore is written.
                Ok((_, first_due_ms)) => {
                    let until = first_due_ms.map_or(IDLE, |due| {
                        Duration::from_millis(due.saturating_sub(now_ms()).max(0) as u64)
                    });
                    until.clamp(IDLE, MAX_REST)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "context chores could not be read; trying again");
                    MAX_REST / 2
                }
            };
            tokio::select! {
                _ = stopping.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.0.chores_written.notified() => {}
            }
        }
    }

    /// Does up to [`BATCH`] due chores; how many it did, and when the first
    /// of those not yet due is.
    pub(crate) async fn do_chores(&self) -> Result<(usize, Option<i64>)> {
        let store = self.store()?.clone();
        let now = now_ms();
        let mut first_due: Option<i64> = None;
        let due: Vec<(Vec<u8>, Chore)> = store
            .view()
            .iter(store.keyspace(CONTEXT_CHORES))
            .filter_map(|kv| {
                let (key, value) = kv.into_inner().ok()?;
                let chore: Chore = serde_json::from_slice(&value).unwrap_or_default();
                if chore.not_before_ms > now {
                    first_due = Some(first_due.map_or(chore.not_before_ms, |f| f.min(chore.not_before_ms)));
                    return None;
                }
                Some((key.to_vec(), chore))
            })
            .take(BATCH)
            .collect();
        let done = due.len();
        for (key, chore) in due {
            let agent = key
                .get(..16)
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .map(AgentId::from_bytes);
            let Some((agent, id)) = agent.zip(parse_item_key(&key)) else {
                store
                    .write(Settle {
                        key,
                        seen: chore,
                        next: None,
                    })
                    .await?;
                continue;
            };
            let left = self.do_chore(agent, id, &chore).await;
            let next = (!left.is_empty()).then(|| {
                let failures = chore.failures + 1;
                let wait = BACKOFF.saturating_mul(1 << failures.min(12)).min(MAX_BACKOFF);
                Chore {
                    failures,
                    not_before_ms: now + wait.as_millis() as i64,
                    ..left
                }
            });
            store.write(Settle { key, seen: chore, next }).await?;
        }
        Ok((done, first_due))
    }

    /// Does each part of a chore on its own; what is left to try again (a
    /// part that failed for now: one that never can is dropped, and logged).
    async fn do_chore(&self, agent: AgentId, id: ItemId, chore: &Chore) -> Chore {
        let kept = |part: &str, outcome: Result<()>| match outcome {
            Ok(()) => false,
            Err(e) if is_final(&e) => {
                tracing::warn!(%agent, id, part, error = %e, "a context chore cannot be done; it is dropped");
                false
            }
            Err(e) => {
                tracing::info!(%agent, id, part, error = %e, "a context chore failed; it is tried again later");
                true
            }
        };
        let mut left = Chore::default();
        for name in &chore.objects {
            if kept("remove an object", self.remove_object(&agent, name).await) {
                left.objects.push(name.clone());
            }
        }
        if chore.forget {
            let args = json!({ "strategy": "matching", "filter": { "source": SOURCE, "item": id } });
            let forgot = self
                .run_as_agent(agent, SubmitOp::new(agent, "memory.forget", args))
                .await;
            left.forget = kept("forget in memory", forgot.map(drop));
        }
        if chore.add {
            left.add = kept("add to memory", self.add_to_memory(agent, id, chore.failures).await);
        }
        left
    }

    /// Runs one op as the agent itself (what it does with its own data).
    async fn run_as_agent(&self, agent: AgentId, op: SubmitOp) -> Result<serde_json::Value> {
        let ctx = self.context()?;
        let caller = Caller::of_agent(agent, ctx.agents.agent(&agent)?.tenant);
        bbx_component::run_op(&*ctx.submitter, &caller, op, OP_WAIT).await
    }

    async fn add_to_memory(&self, agent: AgentId, id: ItemId, failures: u32) -> Result<()> {
        let store = self.store()?.clone();
        let key = item_key(&agent, id);
        let Some(record) = store
            .view()
            .get(store.keyspace(CONTEXT_ITEMS), &key)
            .map_err(|e| storage_error("read a context item", e))?
        else {
            return Ok(()); // deleted since
        };
        let record = Record::decode(&record)?;
        let this = self.clone();
        let (content, crc) = tokio::task::spawn_blocking(move || {
            let block = this
                .read_block(&agent, id)?
                .ok_or_else(|| Error::not_found("context item", id))?;
            Ok::<_, Error>((codec::decode(&block)?, codec::content_crc(&block).unwrap_or_default()))
        })
        .await
        .map_err(|e| Error::internal(format!("reading a COLD item failed: {e}")))??;
        let args = json!({
            "text": content,
            "metadata": { "source": SOURCE, "item": id, "kind": record.kind },
            "subject": format!("{SOURCE}:{id}"),
            "on_near_duplicate": "keep",
        });
        // A failed try's outcome stays under its key: the next try has its own.
        let op = SubmitOp {
            idempotency_key: Some(format!("context-cold:{id}:{crc:08x}:{failures}")),
            ..SubmitOp::new(agent, "memory.add", args)
        };
        self.run_as_agent(agent, op).await.map(drop)
    }
}
