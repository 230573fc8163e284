//! The migrator: on a timer, off every reader's and writer's path, it ages
//! items down the tiers of each agent over its budgets (and of all agents
//! over the global ones), oldest generation and least important first;
//! writes the accesses it has seen; and lets idle agents go at once (every
//! item's block is on disk already), so that an idle agent costs no memory,
//! rewriting their lz4 blocks as COOL afterwards, a batch a round.
//!
//! Compression runs outside the agents' locks; an item is moved only if it
//! is still where it was when chosen. A demotion to disk is one store write
//! that replaces the block and the record together; if it fails (a full
//! disk), the items stay where they are and nothing is lost.

use crate::codec::{self, Codec, Tier};
use crate::contexts::{Contexts, Slot, SlotState};
use crate::item::{ItemId, Record, item_key};
use crate::state::{AgentContext, Resident};
use crate::{CONTEXT_ACCESS, CONTEXT_BLOCKS, CONTEXT_ITEMS, CONTEXT_MODEL};
use bbx_core::{AgentId, Result};
use bbx_store::{Applied, GroupTx, PutWherePresent, Staged};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Blocks put in object storage at once.
const OFFLOADS_AT_ONCE: usize = 16;

/// An item chosen to move down a tier.
struct Move {
    agent: AgentId,
    id: ItemId,
    from: Resident,
    /// How its block on disk is encoded now.
    disk: Codec,
    to: Tier,
}

/// A move within memory (or out of it, where the disk holds the tier's
/// block already): the agent, the item, where it was and where it goes.
type InMemory = (AgentId, ItemId, Resident, Resident);

/// A rewrite on disk, and where the item was in memory when it was chosen.
type ToDisk = (Recode, Resident);

/// A block rewritten on disk, with its record.
#[derive(Debug)]
struct Recode {
    agent: AgentId,
    id: ItemId,
    /// The codec the block had when it was chosen: if another write changed
    /// it since (an operator's demotion), this one gives way.
    was: Codec,
    codec: Codec,
    /// What the store keeps: the block, or its stub when COLD blocks go to
    /// object storage.
    block: Vec<u8>,
    /// The block's size, wherever it is kept.
    stored_bytes: u32,
}

/// Blocks rewritten on disk; those that reach COLD are marked for memory
/// when `index_cold` ([`crate::cold_search`]).
#[derive(Debug)]
struct Recodes {
    recodes: Vec<Recode>,
    index_cold: bool,
}

impl Staged for Recodes {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.all_or_nothing(|tx| {
            for recode in &self.recodes {
                let key = item_key(&recode.agent, recode.id);
                let Some(bytes) = tx.read(CONTEXT_ITEMS, &key)? else {
                    continue;
                };
                let mut record = Record::decode(&bytes)?;
                // Another write since (a demotion, an import) wins: this one
                // was encoded from what was there before.
                let current = tx.read(CONTEXT_BLOCKS, &key)?;
                let same_content = current.as_deref().and_then(codec::content_crc) == codec::content_crc(&recode.block);
                if record.codec != recode.was || !same_content {
                    continue;
                }
                record.codec = recode.codec;
                record.stored_bytes = recode.stored_bytes;
                tx.put(CONTEXT_ITEMS, key.clone(), record.encode());
                tx.put(CONTEXT_BLOCKS, key, recode.block.clone());
                if self.index_cold && recode.codec == Codec::ZstdHigh {
                    crate::chores::cold(tx, &recode.agent, recode.id)?;
                }
            }
            Ok(Applied::Done)
        })
    }
}

/// The importance model, saved.
#[derive(Debug)]
pub(crate) struct PutModel(pub Vec<u8>);

impl Staged for PutModel {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.put(CONTEXT_MODEL, b"importance".to_vec(), self.0.clone());
        Ok(Applied::Done)
    }
}

impl Contexts {
    pub(crate) async fn migrate_until(self, stopping: CancellationToken) {
        let every = Duration::from_millis(self.0.config.migrate_every_ms);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopping.cancelled() => break,
                _ = ticks.tick() => {}
            }
            if let Err(e) = self.migrate_once(false).await {
                tracing::warn!(error = %e, "the context migrator failed a round");
            }
        }
        // The accesses seen since the last round.
        let _ = self.migrate_once(true).await;
    }

    /// One round; `accesses_only` at shutdown.
    pub async fn migrate_once(&self, accesses_only: bool) -> Result<()> {
        let mut slots: Vec<(AgentId, Arc<Slot>)> = self.0.agents.read().iter().map(|(a, s)| (*a, s.clone())).collect();
        let idle_after = Duration::from_secs(self.0.config.idle_secs);
        let mut accesses = Vec::new();
        let mut flushed: Vec<(AgentId, Vec<ItemId>)> = Vec::new();
        let mut moves = Vec::new();
        let mut idle = Vec::new();
        let mut used: Vec<(std::time::Instant, usize)> = Vec::new();
        for (i, (agent, slot)) in slots.iter().enumerate() {
            let mut state = slot.state.lock();
            let SlotState::Loaded(ctx) = &mut *state else { continue };
            let mut dirty = std::mem::take(&mut ctx.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for id in &dirty {
                if let Some(entry) = ctx.items.get(id) {
                    accesses.push((item_key(agent, *id), entry.access.encode()));
                }
            }
            flushed.push((*agent, dirty));
            if accesses_only {
                continue;
            }
            if ctx.used.elapsed() >= idle_after {
                // Every item has its block on disk: memory lets go of the
                // copies at once (pinned items come back HOT with the agent),
                // and blocks still lz4 are rewritten as COOL later, a batch a
                // round, so an idle agent frees its memory without waiting.
                let copies: Vec<ItemId> = ctx
                    .items
                    .values()
                    .filter(|e| !e.record.pinned && !matches!(e.resident, Resident::None))
                    .map(|e| e.record.id)
                    .collect();
                for id in copies {
                    ctx.set_resident(id, Resident::None, None);
                }
                if ctx.items.values().any(|e| e.record.codec == Codec::Lz4) {
                    self.0.recode.lock().push_back(*agent);
                }
                idle.push(*agent);
                continue;
            }
            used.push((ctx.used, i));
            let budgets = self.0.config.agent;
            self.choose(agent, ctx, Tier::Hot, budgets.hot_bytes, &mut moves);
            self.choose(agent, ctx, Tier::Warm, budgets.warm_bytes, &mut moves);
            self.choose(agent, ctx, Tier::Cool, budgets.cool_bytes, &mut moves);
        }
        if !accesses_only {
            // Over the global budgets, the agents used longest ago give first.
            used.sort();
            for (tier, limit, total) in [
                (Tier::Hot, self.0.config.global.hot_bytes, &self.0.totals.hot),
                (Tier::Warm, self.0.config.global.warm_bytes, &self.0.totals.warm),
            ] {
                let mut excess = total.load(Ordering::Relaxed).saturating_sub(limit);
                for (_, i) in &used {
                    if excess == 0 {
                        break;
                    }
                    let (agent, slot) = &slots[*i];
                    let mut state = slot.state.lock();
                    let SlotState::Loaded(ctx) = &mut *state else { continue };
                    let held = ctx.bytes[tier as usize];
                    let keep = held.saturating_sub(excess);
                    excess -= held - keep;
                    self.choose(agent, ctx, tier, keep, &mut moves);
                }
            }
        }
        if !accesses.is_empty() {
            let put = PutWherePresent {
                guard: CONTEXT_ITEMS,
                target: CONTEXT_ACCESS,
                writes: accesses,
            };
            if let Err(e) = self.store()?.write(put).await {
                // Written with the next round's.
                for (agent, ids) in flushed {
                    self.with_loaded(agent, |ctx| ctx.dirty.extend(ids));
                }
                tracing::warn!(error = %e, "context accesses could not be written");
            }
        }
        // The global pass may pick what an agent's own pass picked.
        moves.sort_by_key(|m: &Move| (m.agent, m.id));
        moves.dedup_by_key(|m| (m.agent, m.id));
        self.apply(moves).await;
        if !accesses_only {
            self.let_go(&mut slots, &idle);
            self.recode_let_go().await;
        }
        Ok(())
    }

    /// Rewrites a batch of the lz4 blocks of an agent that was let go as COOL
    /// blocks; the agent goes back in the queue while it has more. An agent
    /// in memory again is its own migrator's.
    async fn recode_let_go(&self) {
        const BATCH: usize = 500;
        let Some(agent) = self.0.recode.lock().pop_front() else {
            return;
        };
        if self.0.agents.read().contains_key(&agent) {
            return;
        }
        let this = self.clone();
        let found = tokio::task::spawn_blocking(move || this.lz4_blocks(agent, BATCH)).await;
        let Ok(Ok(recodes)) = found else {
            tracing::warn!(%agent, "the lz4 blocks of an idle agent could not be read");
            return;
        };
        let more = recodes.len() == BATCH;
        if !recodes.is_empty()
            && let Ok(store) = self.store()
            && let Err(e) = store
                .write(Recodes {
                    recodes,
                    index_cold: false,
                })
                .await
        {
            self.0.demote_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, %agent, "an idle agent's blocks could not be rewritten as COOL");
            return;
        }
        if more {
            self.0.recode.lock().push_front(agent);
        }
    }

    /// Up to `batch` of the agent's lz4 blocks, encoded as COOL blocks.
    fn lz4_blocks(&self, agent: AgentId, batch: usize) -> Result<Vec<Recode>> {
        use fjall::Readable;
        let store = self.store()?;
        let view = store.view();
        let mut recodes = Vec::new();
        for kv in view.prefix(store.keyspace(CONTEXT_ITEMS), agent.as_bytes()) {
            let (key, value) = kv
                .into_inner()
                .map_err(|e| bbx_store::storage_error("read a context", e))?;
            let Ok(record) = Record::decode(&value) else { continue };
            if record.codec != Codec::Lz4 {
                continue;
            }
            let Some(block) = self.read_block(&agent, record.id)? else {
                continue;
            };
            let content = match codec::decode(&block) {
                Ok(content) => content,
                Err(e) => {
                    tracing::error!(error = %e, %agent, id = record.id, "a context block is damaged");
                    continue;
                }
            };
            let block = codec::encode(&content, Codec::Zstd, self.0.config.cool_level)?;
            recodes.push(Recode {
                agent,
                id: crate::item::parse_item_key(&key).unwrap_or(record.id),
                was: Codec::Lz4,
                codec: Codec::Zstd,
                stored_bytes: block.len() as u32,
                block,
            });
            if recodes.len() == batch {
                break;
            }
        }
        Ok(recodes)
    }

    /// Moves items down to `tier` now, as the migrator does on its own (a
    /// benchmark's way to place them); pinned items and items already there
    /// or lower stay.
    pub async fn move_down(&self, agent: AgentId, ids: &[ItemId], tier: Tier) -> Result<()> {
        let moves = self.with(agent, |ctx| {
            ids.iter()
                .filter_map(|id| ctx.items.get(id))
                .filter(|e| e.tier() < tier && !e.record.pinned)
                .map(|e| Move {
                    agent,
                    id: e.record.id,
                    from: e.resident.clone(),
                    disk: e.record.codec,
                    to: tier,
                })
                .collect::<Vec<_>>()
        })?;
        self.apply(moves).await;
        Ok(())
    }

    /// Chooses items of `tier` to move down until what it holds is within
    /// `limit`: the oldest generation first, then the least important.
    /// Pinned items stay HOT.
    fn choose(&self, agent: &AgentId, ctx: &AgentContext, tier: Tier, limit: u64, moves: &mut Vec<Move>) {
        let held = ctx.bytes[tier as usize];
        if held <= limit {
            return;
        }
        let candidates: Vec<ItemId> = ctx
            .items
            .values()
            .filter(|e| e.tier() == tier && !(e.record.pinned && tier == Tier::Hot))
            .map(|e| e.record.id)
            .collect();
        let scores = self.scores(ctx, &candidates);
        let mut order: Vec<(u64, f64, ItemId)> = candidates
            .iter()
            .zip(scores)
            .map(|(id, score)| (ctx.items[id].generation, score, *id))
            .collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut freed = 0;
        for (_, _, id) in order {
            if held.saturating_sub(freed) <= limit {
                break;
            }
            let entry = &ctx.items[&id];
            freed += entry.tier_bytes();
            let to = match tier {
                Tier::Hot => Tier::Warm,
                Tier::Warm => Tier::Cool,
                Tier::Cool | Tier::Cold => Tier::Cold,
            };
            moves.push(Move {
                agent: *agent,
                id,
                from: entry.resident.clone(),
                disk: entry.record.codec,
                to,
            });
        }
    }

    /// Carries out the moves: compresses outside the locks, writes what goes
    /// to disk in one write, and moves in memory only what is still where it
    /// was.
    async fn apply(&self, moves: Vec<Move>) {
        if moves.is_empty() {
            return;
        }
        let this = self.clone();
        let Ok((to_memory, to_disk)) = tokio::task::spawn_blocking(move || this.encode_moves(moves)).await else {
            return;
        };
        for (agent, id, from, to) in to_memory {
            self.with_loaded(agent, |ctx| {
                if ctx.items.get(&id).is_some_and(|e| same(&e.resident, &from)) {
                    ctx.set_resident(id, to, None);
                }
            });
        }
        if to_disk.is_empty() {
            return;
        }
        let to_disk = self.offload_cold(to_disk).await;
        if to_disk.is_empty() {
            return;
        }
        let Ok(store) = self.store() else { return };
        let recoded: Vec<(Recode, Resident)> = to_disk
            .iter()
            .map(|(r, from)| {
                let summary = Recode {
                    block: Vec::new(),
                    ..*r
                };
                (summary, from.clone())
            })
            .collect();
        let recodes = Recodes {
            recodes: to_disk.into_iter().map(|(r, _)| r).collect(),
            index_cold: self.cold_search(),
        };
        let sizes: Vec<u32> = recodes.recodes.iter().map(|r| r.stored_bytes).collect();
        if let Err(e) = store.write(recodes).await {
            self.0
                .demote_failures
                .fetch_add(recoded.len() as u64, Ordering::Relaxed);
            tracing::warn!(error = %e, items = recoded.len(), "context items could not be demoted to disk; they stay where they are");
            return;
        }
        for ((recode, from), bytes) in recoded.into_iter().zip(sizes) {
            self.with_loaded(recode.agent, |ctx| {
                let Some(entry) = ctx.items.get(&recode.id) else { return };
                if entry.record.codec != recode.was {
                    // Another write moved it meanwhile; this one gave way.
                    return;
                }
                let resident = if same(&entry.resident, &from) {
                    Resident::None
                } else {
                    // Accessed meanwhile: it stays in memory; its disk copy changed.
                    entry.resident.clone()
                };
                ctx.set_resident(recode.id, resident, Some((recode.codec, bytes)));
            });
        }
    }

    /// COLD blocks put in object storage (when it is configured), replaced by
    /// their stubs; a move whose block could not be put stays where it was.
    async fn offload_cold(&self, to_disk: Vec<ToDisk>) -> Vec<ToDisk> {
        use futures::StreamExt;
        if !self.offloads() {
            return to_disk;
        }
        let uploads = to_disk.into_iter().map(|(mut recode, from)| async move {
            if recode.codec != Codec::ZstdHigh {
                return Some((recode, from));
            }
            match self.offload(&recode.agent, recode.id, &recode.block).await {
                Ok(stub) => {
                    recode.block = stub;
                    Some((recode, from))
                }
                Err(e) => {
                    self.0.demote_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, agent = %recode.agent, id = recode.id, "a context item could not be put in object storage; it stays where it is");
                    None
                }
            }
        });
        futures::stream::iter(uploads)
            .buffer_unordered(OFFLOADS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// The moves, encoded; one that fails (a damaged block) is logged, counted
    /// and left where it is, and the others go on.
    fn encode_moves(&self, moves: Vec<Move>) -> (Vec<InMemory>, Vec<ToDisk>) {
        let mut to_memory = Vec::new();
        let mut to_disk = Vec::new();
        for chosen in moves {
            let (agent, id) = (chosen.agent, chosen.id);
            if let Err(e) = self.encode_move(chosen, &mut to_memory, &mut to_disk) {
                self.0.demote_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, %agent, id, "a context item could not be moved down a tier");
            }
        }
        (to_memory, to_disk)
    }

    fn encode_move(&self, chosen: Move, to_memory: &mut Vec<InMemory>, to_disk: &mut Vec<ToDisk>) -> Result<()> {
        let Move {
            agent,
            id,
            from,
            disk,
            to,
        } = chosen;
        let on_disk_already = match to {
            Tier::Cool => disk != Codec::Lz4,
            Tier::Cold => disk == Codec::ZstdHigh,
            Tier::Hot | Tier::Warm => false,
        };
        if on_disk_already {
            // Its block is already what the tier keeps: memory lets go.
            to_memory.push((agent, id, from, Resident::None));
            return Ok(());
        }
        let content: Arc<str> = match &from {
            Resident::Hot(content) => content.clone(),
            Resident::Warm(block) => codec::decode(block)?.into(),
            Resident::None => match self.read_block(&agent, id)? {
                Some(block) => codec::decode(&block)?.into(),
                None => return Ok(()),
            },
        };
        let config = &self.0.config;
        match to {
            Tier::Hot => {}
            Tier::Warm => {
                let block = codec::encode(&content, Codec::Lz4, 0)?;
                to_memory.push((agent, id, from, Resident::Warm(block.into())));
            }
            Tier::Cool | Tier::Cold => {
                let (codec, level) = if to == Tier::Cool {
                    (Codec::Zstd, config.cool_level)
                } else {
                    (Codec::ZstdHigh, config.cold_level)
                };
                let block = codec::encode(&content, codec, level)?;
                let recode = Recode {
                    agent,
                    id,
                    was: disk,
                    codec,
                    stored_bytes: block.len() as u32,
                    block,
                };
                to_disk.push((recode, from));
            }
        }
        Ok(())
    }

    /// Lets go of idle agents that hold nothing in memory but their pinned
    /// items and that nobody is using right now; a busy slot waits for the
    /// next round.
    fn let_go(&self, slots: &mut Vec<(AgentId, Arc<Slot>)>, idle: &[AgentId]) {
        let idle: rustc_hash::FxHashSet<&AgentId> = idle.iter().collect();
        slots.retain(|(agent, _)| idle.contains(agent));
        let mut agents = self.0.agents.write();
        for (agent, slot) in slots.drain(..) {
            let Some(state) = slot.state.try_lock() else { continue };
            let empty = match &*state {
                SlotState::Loaded(ctx) => {
                    ctx.bytes[Tier::Warm as usize] == 0 && ctx.unpinned_hot_bytes() == 0 && ctx.dirty.is_empty()
                }
                SlotState::Loading(_) => false,
            };
            drop(state);
            // Two holders: the map, and `slot` here.
            if empty && Arc::strong_count(&slot) == 2 {
                agents.remove(&agent);
            }
        }
    }
}

/// Whether two residencies are the same copy.
fn same(a: &Resident, b: &Resident) -> bool {
    match (a, b) {
        (Resident::Hot(a), Resident::Hot(b)) => Arc::ptr_eq(a, b),
        (Resident::Warm(a), Resident::Warm(b)) => Arc::ptr_eq(a, b),
        (Resident::None, Resident::None) => true,
        _ => false,
    }
}
