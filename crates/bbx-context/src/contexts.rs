//! The runtime: each agent's context in memory while the agent is in use
//! (loaded from the store on first use, let go when idle), reads through the
//! tiers, what completions change, and the importance model's training.

use crate::codec::{self, Codec, Tier};
use crate::importance::{self, Features, Model, TrainingSet};
use crate::item::{Access, ItemId, Record, agent_key, item_key, parse_item_key};
use crate::state::{AgentContext, Entry, MemoryTotals, Resident};
use crate::tokens::TokenCounter;
use crate::{CONTEXT_ACCESS, CONTEXT_AGENTS, CONTEXT_BLOCKS, CONTEXT_ITEMS, CONTEXT_MODEL};
use bbx_component::Context;
use bbx_core::config::ContextConfig;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::{Store, storage_error};
use fjall::Readable;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The nice value the importance model trains at.
const TRAINING_NICE: i32 = 10;

/// The context component.
#[derive(Clone)]
pub struct Contexts(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Contexts")
    }
}

pub(crate) struct Inner {
    pub config: ContextConfig,
    pub counter: TokenCounter,
    pub agents: RwLock<FxHashMap<AgentId, Arc<Slot>>>,
    pub totals: Arc<MemoryTotals>,
    ctx: OnceLock<Context>,
    pub model: RwLock<Option<Arc<Model>>>,
    pub training: Mutex<TrainingSet>,
    pub training_busy: AtomicBool,
    /// Moves down a tier that failed (a damaged block, a full disk), for
    /// the logs and metrics: not any one agent's figure.
    pub demote_failures: AtomicU64,
    /// Agents let go with items whose block on disk is still lz4: the
    /// migrator rewrites those as COOL (zstd), a batch a round.
    pub recode: Mutex<std::collections::VecDeque<AgentId>>,
    /// COLD items go to memory ([`crate::cold_search`]): `context.cold_search`
    /// and a kernel that serves `memory.add`.
    pub cold_search: AtomicBool,
    /// Where COLD blocks go when not to the local disk ([`crate::cold_objects`]).
    pub cold_objects: Option<Arc<bbx_objects::S3Store>>,
    /// The kernel's runtime, for reads from object storage on threads of
    /// their own (a snapshot's export).
    pub runtime: OnceLock<tokio::runtime::Handle>,
    /// Where COLD items are searched (SemanticMemory), when the kernel has it.
    pub memory: OnceLock<Arc<dyn bbx_component::MemorySearch>>,
    /// Told when an op may have written a chore: the chores task, resting
    /// until a later chore is due, looks again at once.
    pub chores_written: tokio::sync::Notify,
}

/// An agent's place in memory.
#[derive(Default)]
pub(crate) struct Slot {
    /// Held by the one loading it.
    load: Mutex<()>,
    pub state: Mutex<SlotState>,
}

pub(crate) enum SlotState {
    /// Items whose completions arrived while it loaded, to read again after.
    Loading(Vec<ItemId>),
    Loaded(Box<AgentContext>),
}

impl Default for SlotState {
    fn default() -> Self {
        Self::Loading(Vec::new())
    }
}

/// An item as a get found it.
#[derive(Debug, Clone)]
pub struct Got {
    pub record: Record,
    pub content: Arc<str>,
    /// The tier it was served from (an access then makes it HOT).
    pub tier: Tier,
    pub access: Access,
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn not_found(id: ItemId) -> Error {
    Error::new(ErrorCode::NotFound, format!("the agent's context has no item {id}"))
}

impl Contexts {
    pub fn new(config: &ContextConfig) -> Result<Self> {
        let cold_objects = config
            .cold_objects
            .as_ref()
            .map(|bucket| {
                bbx_objects::S3Store::new(bucket, crate::cold_objects::DEFAULT_PREFIX, "context.cold_objects")
            })
            .transpose()?
            .map(Arc::new);
        Ok(Self(Arc::new(Inner {
            counter: TokenCounter::new(&config.tokenizer)?,
            config: config.clone(),
            agents: RwLock::default(),
            totals: Arc::default(),
            ctx: OnceLock::new(),
            model: RwLock::new(None),
            training: Mutex::default(),
            training_busy: AtomicBool::new(false),
            demote_failures: AtomicU64::new(0),
            recode: Mutex::default(),
            cold_search: AtomicBool::new(false),
            cold_objects,
            runtime: OnceLock::new(),
            memory: OnceLock::new(),
            chores_written: tokio::sync::Notify::new(),
        })))
    }

    /// Hands over where COLD items are searched; before the kernel starts.
    pub fn set_memory(&self, memory: Arc<dyn bbx_component::MemorySearch>) {
        let _ = self.0.memory.set(memory);
    }

    pub(crate) fn context(&self) -> Result<&Context> {
        self.0
            .ctx
            .get()
            .ok_or_else(|| Error::unavailable("the context component has not started"))
    }

    pub(crate) fn store(&self) -> Result<&Arc<Store>> {
        Ok(&self.context()?.store)
    }

    /// The item's block as the store keeps it now: the block, or its stub.
    pub(crate) fn stored_block(&self, agent: &AgentId, id: ItemId) -> Result<Option<Vec<u8>>> {
        let store = self.store()?;
        Ok(store
            .view()
            .get(store.keyspace(CONTEXT_BLOCKS), item_key(agent, id))
            .map_err(|e| storage_error("read a context block", e))?
            .map(|block| block.to_vec()))
    }

    /// The item's block as durable now, fetched from object storage where
    /// the store keeps a stub of it. Never under an agent's lock: it may wait
    /// for the bucket.
    pub(crate) fn read_block(&self, agent: &AgentId, id: ItemId) -> Result<Option<Vec<u8>>> {
        self.stored_block(agent, id)?
            .map(|block| self.resolve(agent, block))
            .transpose()
    }

    pub fn counter(&self) -> &TokenCounter {
        &self.0.counter
    }

    /// Whether the importance model is being trained now, on a thread of its
    /// own (what a benchmark waits out before it times reads).
    pub fn is_training(&self) -> bool {
        self.0.training_busy.load(Ordering::Acquire)
    }

    /// How many agents' contexts are in memory now.
    pub fn agents_in_memory(&self) -> usize {
        self.0.agents.read().len()
    }

    /// Takes the kernel's context, loads the persisted model, and starts the
    /// migrator. Agents are loaded when first used.
    pub fn start(&self, ctx: &Context) -> Result<()> {
        if self.0.ctx.set(ctx.clone()).is_err() {
            return Err(Error::internal("the context component was started twice"));
        }
        let _ = self.0.runtime.set(tokio::runtime::Handle::current());
        let stored = ctx
            .store
            .view()
            .get(ctx.store.keyspace(CONTEXT_MODEL), b"importance")
            .map_err(|e| storage_error("read the importance model", e))?;
        if let Some(model) = stored.and_then(|bytes| Model::from_json(&bytes)) {
            *self.0.model.write() = Some(Arc::new(model));
        }
        let this = self.clone();
        let stopping = ctx.stopping.clone();
        ctx.tasks.spawn(async move { this.migrate_until(stopping).await });
        let memory = ctx.kinds.iter().any(|(kind, _)| kind.name == "memory.add");
        let searches = self.0.memory.get().is_some();
        self.0
            .cold_search
            .store(self.0.config.cold_search && memory && searches, Ordering::Relaxed);
        let this = self.clone();
        let stopping = ctx.stopping.clone();
        ctx.tasks.spawn(async move { this.do_chores_until(stopping).await });
        let store = ctx.store.clone();
        ctx.tasks.spawn(async move {
            if let Err(e) = crate::lifecycle::forget_orphans(&store).await {
                tracing::warn!(error = %e, "the context of deleted agents could not be removed (the next start tries again)");
            }
        });
        Ok(())
    }

    /// The agent's slot, loaded.
    fn slot(&self, agent: AgentId) -> Result<Arc<Slot>> {
        let existing = self.0.agents.read().get(&agent).cloned();
        let slot = existing.unwrap_or_else(|| self.0.agents.write().entry(agent).or_default().clone());
        if matches!(*slot.state.lock(), SlotState::Loaded(_)) {
            return Ok(slot);
        }
        {
            let _loading = slot.load.lock();
            if matches!(*slot.state.lock(), SlotState::Loaded(_)) {
                return Ok(slot.clone());
            }
            let mut loaded = match self.load(agent) {
                Ok(loaded) => loaded,
                Err(e) => {
                    // The next use tries again from scratch.
                    self.0.agents.write().remove(&agent);
                    return Err(e);
                }
            };
            let mut state = slot.state.lock();
            if let SlotState::Loading(arrived) = std::mem::take(&mut *state) {
                // What committed after the load's view is read again.
                self.refresh_loaded(&agent, &mut loaded, &arrived, Change::Changed)?;
            }
            *state = SlotState::Loaded(Box::new(loaded));
        }
        Ok(slot)
    }

    /// Runs `f` on the agent's context, loading it first if need be: a use
    /// of the agent (it is not idle).
    pub(crate) fn with<T>(&self, agent: AgentId, f: impl FnOnce(&mut AgentContext) -> T) -> Result<T> {
        let slot = self.slot(agent)?;
        let mut state = slot.state.lock();
        match &mut *state {
            SlotState::Loaded(ctx) => {
                ctx.used = std::time::Instant::now();
                Ok(f(ctx))
            }
            SlotState::Loading(_) => Err(Error::unavailable("the agent's context is loading; try again")),
        }
    }

    /// Runs `f` on the agent's context if it is in memory, without making it
    /// used: the migrator's way in (it never loads an agent, nor brings back
    /// one that was let go or deleted).
    pub(crate) fn with_loaded(&self, agent: AgentId, f: impl FnOnce(&mut AgentContext)) {
        let Some(slot) = self.0.agents.read().get(&agent).cloned() else {
            return;
        };
        if let SlotState::Loaded(ctx) = &mut *slot.state.lock() {
            f(ctx);
        }
    }

    /// The agent's items from the store: records and accesses. Pinned items
    /// come back HOT; of the others that were in memory (lz4 on disk), the
    /// newest come back HOT, as many as the agent's HOT budget holds, and the
    /// rest WARM. A block that does not decode stays where it is, and a read
    /// of it reports the damage.
    fn load(&self, agent: AgentId) -> Result<AgentContext> {
        let store = self.store()?;
        let view = store.view();
        let prefix = agent.as_bytes();
        let mut accesses: FxHashMap<ItemId, Access> = FxHashMap::default();
        for kv in view.prefix(store.keyspace(CONTEXT_ACCESS), prefix) {
            let (key, value) = kv.into_inner().map_err(|e| storage_error("load a context", e))?;
            if let Some(id) = parse_item_key(&key) {
                accesses.insert(id, Access::decode(&value));
            }
        }
        let mut records = Vec::new();
        for kv in view.prefix(store.keyspace(CONTEXT_ITEMS), prefix) {
            let (key, value) = kv.into_inner().map_err(|e| storage_error("load a context", e))?;
            let Some(id) = parse_item_key(&key) else { continue };
            match Record::decode(&value) {
                Ok(record) => records.push(record),
                Err(e) => tracing::error!(error = %e, %agent, id, "a context item does not decode: it is left out"),
            }
        }
        // What memory may take: the agent's budgets, and what is left of the
        // global ones.
        let (agent_budget, global) = (self.0.config.agent, self.0.config.global);
        let mut hot_room = agent_budget.hot_bytes.min(
            global
                .hot_bytes
                .saturating_sub(self.0.totals.hot.load(Ordering::Relaxed)),
        );
        let mut warm_room = agent_budget.warm_bytes.min(
            global
                .warm_bytes
                .saturating_sub(self.0.totals.warm.load(Ordering::Relaxed)),
        );
        let mut residents = Vec::with_capacity(records.len());
        for record in records.iter().rev() {
            let fits_hot = u64::from(record.bytes) <= hot_room;
            let fits_warm = u64::from(record.stored_bytes) <= warm_room;
            // Blocks are read from this load's view, so they match its records.
            let in_memory = record.pinned || (record.codec == Codec::Lz4 && (fits_hot || fits_warm));
            let block = if in_memory {
                view.get(store.keyspace(CONTEXT_BLOCKS), item_key(&agent, record.id))
                    .map_err(|e| storage_error("load a context", e))?
                    .map(|b| b.to_vec())
            } else {
                None
            };
            residents.push(match block {
                // In the bucket: read when it is needed, never under the lock.
                Some(block) if codec::remote_name(&block).is_some() => Resident::None,
                Some(block) if record.pinned || fits_hot => match codec::decode(&block) {
                    Ok(content) => {
                        if !record.pinned {
                            hot_room = hot_room.saturating_sub(u64::from(record.bytes));
                        }
                        Resident::Hot(content.into())
                    }
                    Err(e) => {
                        tracing::error!(error = %e, %agent, id = record.id, "a context block is damaged");
                        Resident::None
                    }
                },
                Some(block) => {
                    warm_room = warm_room.saturating_sub(block.len() as u64);
                    Resident::Warm(block.into())
                }
                None => Resident::None,
            });
        }
        let mut ctx = AgentContext::new(self.0.totals.clone());
        // Oldest first, so each item finds the items it refers to.
        for (record, resident) in records.into_iter().zip(residents.into_iter().rev()) {
            let access = accesses.get(&record.id).copied().unwrap_or_default();
            ctx.step = ctx.step.max(access.step);
            ctx.insert(entry(record, access, 0, resident));
        }
        ctx.epoch = epoch(&view, store, &agent)?;
        if let Some(bytes) = view
            .get(store.keyspace(CONTEXT_AGENTS), agent_key(&agent, ASSEMBLY))
            .map_err(|e| storage_error("load a context", e))?
        {
            ctx.last_assembly = serde_json::from_slice(&bytes).ok();
        }
        Ok(ctx)
    }

    /// What committed ops changed for `ids` of `agent`: read again from the
    /// store, if the agent is in memory.
    pub(crate) fn refresh(&self, agent: &AgentId, ids: &[ItemId], change: Change) {
        let Some(slot) = self.0.agents.read().get(agent).cloned() else {
            return;
        };
        let mut state = slot.state.lock();
        let outcome = match &mut *state {
            SlotState::Loading(arrived) => {
                arrived.extend_from_slice(ids);
                Ok(())
            }
            SlotState::Loaded(ctx) => self.refresh_loaded(agent, ctx, ids, change),
        };
        if let Err(e) = outcome {
            // The next load reads it right: let this one go.
            tracing::warn!(error = %e, %agent, "a context change could not be applied in memory; the agent is reloaded");
            drop(state);
            self.0.agents.write().remove(agent);
        }
    }

    fn refresh_loaded(&self, agent: &AgentId, ctx: &mut AgentContext, ids: &[ItemId], change: Change) -> Result<()> {
        let added = change == Change::Added;
        if added {
            ctx.used = std::time::Instant::now();
        }
        let store = self.store()?;
        let mut outcomes = Vec::new();
        for &id in ids {
            let Some(record) = read_record(store, agent, id)? else {
                ctx.remove(id);
                ctx.coaccess.forget(id);
                continue;
            };
            match ctx.items.get(&id) {
                Some(known) => {
                    let mut updated = known.clone();
                    let moved = updated.record.codec != record.codec;
                    if change == Change::Demoted || (moved && !matches!(updated.resident, Resident::Hot(_))) {
                        updated.resident = Resident::None;
                    }
                    if record.pinned && !matches!(updated.resident, Resident::Hot(_)) {
                        // A pinned item is always in the window: keep it at hand
                        // (one in the bucket is read when it is needed: not
                        // under the lock).
                        let stored = self
                            .stored_block(agent, id)?
                            .filter(|b| codec::remote_name(b).is_none());
                        if let Some(content) = stored.map(|b| codec::decode(&b)).transpose()? {
                            updated.resident = Resident::Hot(content.into());
                        }
                    }
                    updated.disk_bytes = record.stored_bytes;
                    updated.record = record;
                    ctx.insert(updated);
                }
                None => {
                    let resident = match record.codec {
                        Codec::Lz4 => match self.stored_block(agent, id)? {
                            Some(block) => Resident::Hot(codec::decode(&block)?.into()),
                            None => Resident::None,
                        },
                        _ => Resident::None,
                    };
                    if added {
                        ctx.step += 1;
                    }
                    let step = ctx.step;
                    let mut new = entry(record, Access::default(), step, resident);
                    new.generation = ctx.generation();
                    ctx.insert(new);
                    if added {
                        importance::observe(ctx, self.0.config.reaccess_steps, &mut outcomes);
                    }
                }
            }
        }
        self.learn(outcomes);
        Ok(())
    }

    /// An item of the agent, through its tier; an access (the item becomes
    /// HOT, and what usually follows it is prefetched).
    pub fn get(&self, agent: AgentId, id: ItemId) -> Result<Got> {
        let mut outcomes = Vec::new();
        let (record, resident, tier, access, follower) = self.with(agent, |ctx| {
            if !ctx.touch(id, now_ms()) {
                return Err(not_found(id));
            }
            let previous = ctx.last_accessed.replace(id);
            if let Some(previous) = previous {
                ctx.coaccess.record(previous, id);
            }
            let follower = ctx.coaccess.predict(id).filter(|f| {
                ctx.items
                    .get(f)
                    .is_some_and(|e| !matches!(e.resident, Resident::Hot(_)))
            });
            importance::observe(ctx, self.0.config.reaccess_steps, &mut outcomes);
            let entry = ctx.items.get_mut(&id).ok_or_else(|| not_found(id))?;
            let hit = std::mem::take(&mut entry.prefetched);
            let found = (
                entry.record.clone(),
                entry.resident.clone(),
                entry.tier(),
                entry.access,
                follower,
            );
            if hit {
                ctx.prefetch.1 += 1;
            }
            Ok(found)
        })??;
        self.learn(outcomes);
        let content: Arc<str> = match resident {
            Resident::Hot(content) => content,
            Resident::Warm(block) => self.promote(agent, id, codec::decode(&block)?.into(), false),
            Resident::None => {
                let block = self.read_block(&agent, id)?.ok_or_else(|| not_found(id))?;
                self.promote(agent, id, codec::decode(&block)?.into(), false)
            }
        };
        if let Some(follower) = follower.filter(|_| self.0.config.prefetch) {
            self.prefetch_later(agent, vec![follower]);
        }
        Ok(Got {
            record,
            content,
            tier,
            access,
        })
    }

    /// An item of the agent as [`Contexts::get`] serves it, without an access:
    /// a grantee's read of another agent's context is no use of it, so it
    /// moves nothing between tiers and teaches the importance model nothing.
    pub fn peek(&self, agent: AgentId, id: ItemId) -> Result<Got> {
        let (record, tier, access) = self
            .with(agent, |ctx| {
                ctx.items.get(&id).map(|e| (e.record.clone(), e.tier(), e.access))
            })?
            .ok_or_else(|| not_found(id))?;
        let content = self.content(agent, id)?;
        Ok(Got {
            record,
            content,
            tier,
            access,
        })
    }

    /// Makes an item HOT with `content` (unless it went meanwhile).
    pub(crate) fn promote(&self, agent: AgentId, id: ItemId, content: Arc<str>, prefetched: bool) -> Arc<str> {
        let _ = self.with(agent, |ctx| {
            let Some(entry) = ctx.items.get_mut(&id) else { return };
            if matches!(entry.resident, Resident::Hot(_)) {
                return;
            }
            entry.prefetched = prefetched;
            if prefetched {
                ctx.prefetch.0 += 1;
            }
            ctx.set_resident(id, Resident::Hot(content.clone()), None);
        });
        content
    }

    /// The content of an item, from wherever it is, without an access.
    pub(crate) fn content(&self, agent: AgentId, id: ItemId) -> Result<Arc<str>> {
        let resident = self.with(agent, |ctx| ctx.items.get(&id).map(|e| e.resident.clone()))?;
        match resident.ok_or_else(|| not_found(id))? {
            Resident::Hot(content) => Ok(content),
            Resident::Warm(block) => Ok(codec::decode(&block)?.into()),
            Resident::None => {
                let block = self.read_block(&agent, id)?.ok_or_else(|| not_found(id))?;
                Ok(codec::decode(&block)?.into())
            }
        }
    }

    /// Brings items into HOT now; answers how many were not there.
    pub fn prefetch(&self, agent: AgentId, ids: &[ItemId]) -> Result<usize> {
        let mut promoted = 0;
        for &id in ids {
            let resident = self.with(agent, |ctx| ctx.items.get(&id).map(|e| e.resident.clone()))?;
            let content: Arc<str> = match resident.ok_or_else(|| not_found(id))? {
                Resident::Hot(_) => continue,
                Resident::Warm(block) => codec::decode(&block)?.into(),
                Resident::None => match self.read_block(&agent, id)? {
                    Some(block) => codec::decode(&block)?.into(),
                    None => continue,
                },
            };
            self.promote(agent, id, content, true);
            promoted += 1;
        }
        Ok(promoted)
    }

    fn prefetch_later(&self, agent: AgentId, ids: Vec<ItemId>) {
        let Ok(ctx) = self.context() else { return };
        let this = self.clone();
        ctx.tasks.spawn_blocking(move || {
            if let Err(e) = this.prefetch(agent, &ids) {
                tracing::debug!(error = %e, %agent, "a prefetch failed");
            }
        });
    }

    /// Outcomes observed: kept for the next training, which starts once
    /// enough are new.
    fn learn(&self, outcomes: Vec<(Features, bool)>) {
        if outcomes.is_empty() {
            return;
        }
        let due = {
            let mut training = self.0.training.lock();
            for (features, accessed) in outcomes {
                training.push(features, accessed);
            }
            training.fresh >= self.0.config.retrain_every
        };
        if due && !self.0.training_busy.swap(true, Ordering::AcqRel) {
            self.train_later();
        }
    }

    fn train_later(&self) {
        let Ok(ctx) = self.context() else {
            self.0.training_busy.store(false, Ordering::Release);
            return;
        };
        let samples: Vec<(Features, bool)> = {
            let mut training = self.0.training.lock();
            training.fresh = 0;
            training.samples.iter().copied().collect()
        };
        let this = self.clone();
        let store = ctx.store.clone();
        let (done, trained) = tokio::sync::oneshot::channel();
        // On a thread of its own at a lower priority: training takes a core
        // for a while, and the agents' reads and writes come first.
        let started = std::thread::Builder::new()
            .name("bbx-context-train".to_owned())
            .spawn(move || {
                bbx_store::sched::lower_priority(TRAINING_NICE);
                let _ = done.send(Model::train(&samples));
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "the context importance model could not be trained");
            self.0.training_busy.store(false, Ordering::Release);
            return;
        }
        ctx.tasks.spawn(async move {
            let trained = trained.await.ok().flatten();
            if let Some(model) = trained {
                tracing::info!(
                    samples = model.samples,
                    auc = model.auc,
                    "the context importance model was trained"
                );
                let bytes = model.to_json();
                *this.0.model.write() = Some(Arc::new(model));
                if let Err(e) = store.write(crate::migrate::PutModel(bytes)).await {
                    tracing::warn!(error = %e, "the context importance model could not be saved");
                }
            }
            this.0.training_busy.store(false, Ordering::Release);
        });
    }

    /// How important items are now: the model's chance of an access within
    /// the window, or the formula's score before there is a model.
    pub(crate) fn scores(&self, ctx: &AgentContext, ids: &[ItemId]) -> Vec<f64> {
        let newest = ctx.items.keys().next_back().copied().unwrap_or(0);
        let rows: Vec<Features> = ids
            .iter()
            .map(|id| {
                ctx.items.get(id).map_or([0.0; importance::FEATURES], |e| {
                    importance::features(e, ctx.step, newest)
                })
            })
            .collect();
        importance::scores(self.0.model.read().as_deref(), &rows)
    }

    pub(crate) fn model(&self) -> Option<Arc<Model>> {
        self.0.model.read().clone()
    }
}

/// What a committed op did to the items it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Put: a step of the agent, and the item HOT.
    Added,
    /// Pinned, unpinned or deleted.
    Changed,
    /// Demoted by an operator: memory lets go of it.
    Demoted,
}

/// The key under which an agent's last assembly is kept.
pub(crate) const ASSEMBLY: &[u8] = b"/assembly";
/// The key of an agent's id sequence.
pub(crate) const SEQUENCE: &[u8] = b"/sequence";
/// The key of an agent's import count: what memory loaded is stale once it
/// moves.
pub(crate) const EPOCH: &[u8] = b"/epoch";

pub(crate) fn entry(record: Record, access: Access, created_step: u64, resident: Resident) -> Entry {
    Entry {
        disk_bytes: record.stored_bytes,
        record,
        access,
        created_step,
        previous_step: None,
        referenced_by: 0,
        generation: 0,
        resident,
        prefetched: false,
    }
}

/// The agent's import count, as `view` holds it.
pub(crate) fn epoch(view: &fjall::Snapshot, store: &Store, agent: &AgentId) -> Result<u64> {
    Ok(crate::item::counter(
        view.get(store.keyspace(CONTEXT_AGENTS), agent_key(agent, EPOCH))
            .map_err(|e| storage_error("read a context", e))?,
    ))
}

pub(crate) fn read_record(store: &Store, agent: &AgentId, id: ItemId) -> Result<Option<Record>> {
    store
        .view()
        .get(store.keyspace(CONTEXT_ITEMS), item_key(agent, id))
        .map_err(|e| storage_error("read a context item", e))?
        .map(|bytes| Record::decode(&bytes))
        .transpose()
}
