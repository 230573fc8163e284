//! The memory runtime: the embedder, the vector store, the catalog, and the
//! background work (the graph saved, accesses written, forgetting on schedule).

use crate::catalog::{Catalog, millis};
use crate::embed::{Embedder, LocalModel, RemoteModel};
use crate::embedded::Embedded;
use crate::record::{Access, Memory, MemoryId, decode_vector, memory_key, parse_memory_key};
use crate::search::{Legs, Mode, Search, rank};
use crate::vectors::{Match, Point, VectorQuery, VectorStore};
use crate::{MEMORY_ACCESS, MEMORY_ITEMS, MEMORY_VECTORS};
use bbx_component::Context;
use bbx_core::config::MemoryConfig;
use bbx_core::{AgentId, Error, Result};
use bbx_store::{PutWherePresent, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use parking_lot::{Mutex, RwLock};
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The memory component.
#[derive(Clone)]
pub struct Memories(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub config: MemoryConfig,
    index_dir: PathBuf,
    pub embedder: Arc<dyn Embedder>,
    vectors: OnceLock<Arc<Embedded>>,
    pub catalog: RwLock<Catalog>,
    ctx: OnceLock<Context>,
    /// Memories found or merged into since accesses were last written.
    touched: Mutex<FxHashSet<(AgentId, u64)>>,
    /// Set once the catalog and the index are built: recovered ops that need
    /// them wait for it.
    started: tokio::sync::watch::Sender<bool>,
    /// Completions seen before then, applied once the catalog is built (None
    /// after).
    early: Mutex<Option<Vec<Arc<bbx_core::op::Completion>>>>,
    /// Whether memories of another model are being embedded again.
    reembedding: std::sync::atomic::AtomicBool,
}

impl Memories {
    /// The component for a kernel whose data directory is `data_dir`.
    pub fn new(config: &MemoryConfig, data_dir: &Path) -> Result<Self> {
        let embedder: Arc<dyn Embedder> = match &config.remote {
            Some(remote) => Arc::new(RemoteModel::new(remote, config.embed_batch)?),
            None => Arc::new(LocalModel::new(
                crate::models::spec(&config.model)?,
                config.models_dir(data_dir),
                config.embed_threads,
                config.embed_batch,
            )?),
        };
        Ok(Self(Arc::new(Inner {
            config: config.clone(),
            index_dir: data_dir.join("memory"),
            embedder,
            vectors: OnceLock::new(),
            catalog: RwLock::default(),
            ctx: OnceLock::new(),
            touched: Mutex::default(),
            started: tokio::sync::watch::Sender::new(false),
            early: Mutex::new(Some(Vec::new())),
            reembedding: Default::default(),
        })))
    }

    pub(crate) fn context(&self) -> Result<&Context> {
        self.0
            .ctx
            .get()
            .ok_or_else(|| Error::unavailable("the memory component has not started"))
    }

    pub(crate) fn store(&self) -> Result<&Arc<Store>> {
        Ok(&self.context()?.store)
    }

    pub(crate) fn vectors(&self) -> Result<&Arc<Embedded>> {
        self.0
            .vectors
            .get()
            .ok_or_else(|| Error::unavailable("the memory component has not started"))
    }

    /// The recovery step: the catalog and the vector index from the store, and
    /// the background work started.
    pub(crate) fn start(&self, ctx: &Context) -> Result<()> {
        let store = &ctx.store;
        let model = self.0.embedder.model().to_owned();
        let vectors = Arc::new(Embedded::open(
            &self.0.index_dir,
            &model,
            self.0.embedder.dimensions(),
            &self.0.config.index,
        )?);
        let view = store.view();
        let mut access: FxHashMap<u64, Access> = FxHashMap::default();
        for item in view.iter(store.keyspace(MEMORY_ACCESS)) {
            let (key, value) = item.into_inner().map_err(|e| storage_error("load memories", e))?;
            if let Some((_, id)) = parse_memory_key(&key) {
                access.insert(id.0, Access::decode(&value));
            }
        }
        let mut catalog = Catalog::default();
        let mut members = Vec::new();
        for item in view.iter(store.keyspace(MEMORY_ITEMS)) {
            let (key, value) = item.into_inner().map_err(|e| storage_error("load memories", e))?;
            let Some((agent, id)) = parse_memory_key(&key) else {
                continue;
            };
            let memory = match Memory::decode(&value) {
                Ok(memory) => memory,
                Err(e) => {
                    tracing::error!(error = %e, %agent, id = %id, "a stored memory does not decode: it is left out");
                    continue;
                }
            };
            let seen = access.get(&id.0).copied().unwrap_or(Access {
                at_ms: millis(memory.created),
                hits: 0,
            });
            catalog.insert(agent, &memory, seen, &model);
            if memory.model == model {
                members.push((id.0, agent));
            }
        }
        let agents: FxHashMap<u64, AgentId> = members.iter().map(|(id, agent)| (*id, *agent)).collect();
        vectors.reconcile(members, |id| {
            let key = memory_key(agents.get(&id)?, MemoryId(id));
            let bytes = view.get(store.keyspace(MEMORY_VECTORS), key).ok()??;
            Some(decode_vector(&bytes))
        })?;
        *self.0.catalog.write() = catalog;
        let _ = self.0.vectors.set(vectors);
        let _ = self.0.ctx.set(ctx.clone());
        {
            let mut early = self.0.early.lock();
            for completion in early.take().unwrap_or_default() {
                self.apply(&completion);
            }
            self.0.started.send_replace(true);
        }
        self.spawn_background(ctx);
        let (this, store) = (self.clone(), ctx.store.clone());
        ctx.tasks.spawn(async move {
            let exists = |agent: &AgentId| {
                let agents = store.keyspace(bbx_agents::AGENTS);
                !matches!(store.view().get(agents, agent.as_bytes()), Ok(None))
            };
            if let Err(e) = this.forget_orphans(exists).await {
                tracing::warn!(error = %e, "the memories of deleted agents could not be removed");
            }
        });
        self.reembed_later();
        Ok(())
    }

    /// Embeds memories of another model again in the background, if there
    /// are any and it is not being done already, until the kernel stops.
    pub(crate) fn reembed_later(&self) {
        use std::sync::atomic::Ordering;
        let Ok(ctx) = self.context() else { return };
        if !self.0.catalog.read().entries.values().any(|e| !e.current_model)
            || self.0.reembedding.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let (this, stopping) = (self.clone(), ctx.stopping.clone());
        ctx.tasks.spawn(async move {
            let stopped = tokio::select! {
                () = stopping.cancelled() => true,
                () = this.reembed_all() => false,
            };
            this.0.reembedding.store(false, Ordering::Release);
            // Memories of another model imported since the last batch.
            if !stopped {
                this.reembed_later();
            }
        });
    }

    fn spawn_background(&self, ctx: &Context) {
        let this = self.clone();
        let stopping = ctx.stopping.clone();
        ctx.tasks.spawn(async move {
            let mut save = tokio::time::interval(Duration::from_secs(60));
            let mut flush = tokio::time::interval(Duration::from_secs(5));
            let forget_every = this.0.config.forget.every_secs;
            let mut forget = tokio::time::interval(Duration::from_secs(forget_every.max(1)));
            forget.reset();
            loop {
                tokio::select! {
                    () = stopping.cancelled() => break,
                    _ = save.tick() => this.save_graph().await,
                    _ = flush.tick() => this.flush_access().await,
                    _ = forget.tick(), if forget_every > 0 => crate::forget::on_schedule(&this).await,
                }
            }
            this.flush_access().await;
            this.save_graph().await;
            if let Ok(vectors) = this.vectors() {
                vectors.stop();
            }
        });
    }

    async fn save_graph(&self) {
        let Ok(vectors) = self.vectors().cloned() else { return };
        let saved = tokio::task::spawn_blocking(move || vectors.save()).await;
        if let Ok(Err(e)) = saved {
            tracing::warn!(error = %e, "the vector index could not be saved (it is rebuilt from the store on start)");
        }
    }

    /// Writes the accesses of touched memories that still exist.
    async fn flush_access(&self) {
        let touched: Vec<(AgentId, u64)> = self.0.touched.lock().drain().collect();
        if touched.is_empty() {
            return;
        }
        let writes: Vec<(Vec<u8>, Vec<u8>)> = {
            let catalog = self.0.catalog.read();
            touched
                .into_iter()
                .filter_map(|(agent, id)| {
                    let access = catalog.entries.get(&id)?.access;
                    Some((memory_key(&agent, MemoryId(id)), access.encode()))
                })
                .collect()
        };
        if let Ok(store) = self.store()
            && let Err(e) = store
                .write(PutWherePresent {
                    guard: MEMORY_ITEMS,
                    target: MEMORY_ACCESS,
                    writes,
                })
                .await
        {
            tracing::warn!(error = %e, "memories' accesses could not be written");
        }
    }

    /// Marks memories found or merged into at `at`.
    pub(crate) fn touch(&self, agent: AgentId, ids: &[MemoryId], at: DateTime<Utc>) {
        let mut catalog = self.0.catalog.write();
        let mut touched = self.0.touched.lock();
        for id in ids {
            if let Some(entry) = catalog.entries.get_mut(&id.0) {
                entry.access.at_ms = entry.access.at_ms.max(millis(at));
                entry.access.hits += 1;
                touched.insert((agent, id.0));
            }
        }
    }

    /// A memory's record, as durable now.
    pub(crate) fn read(&self, agent: &AgentId, id: MemoryId) -> Result<Option<Memory>> {
        crate::record::stored(self.store()?, agent, id)
    }

    fn vector(&self, agent: &AgentId, id: u64) -> Option<Vec<f32>> {
        let store = self.store().ok()?;
        let bytes = store
            .view()
            .get(store.keyspace(MEMORY_VECTORS), memory_key(agent, MemoryId(id)))
            .ok()??;
        Some(decode_vector(&bytes))
    }

    /// Waits until the catalog and the index are built.
    pub(crate) async fn started(&self) {
        let mut started = self.0.started.subscribe();
        let _ = started.wait_for(|s| *s).await;
    }

    /// Applies a completion now, or once started if the catalog is not built
    /// yet (a recovered op that completed during the start).
    pub(crate) fn completed_op(&self, completion: &Arc<bbx_core::op::Completion>) {
        let mut early = self.0.early.lock();
        match early.as_mut() {
            Some(waiting) => waiting.push(completion.clone()),
            None => {
                drop(early);
                self.apply(completion);
            }
        }
    }

    /// Puts a memory the store now holds into the catalog and the index (with
    /// the accesses the catalog had of it).
    pub(crate) fn learn(&self, agent: AgentId, id: MemoryId) -> Result<()> {
        let Some(memory) = self.read(&agent, id)? else {
            self.unlearn(&[id])?;
            return Ok(());
        };
        let model = self.0.embedder.model();
        let mut catalog = self.0.catalog.write();
        let indexed = catalog.entries.get(&id.0).is_some_and(|known| known.current_model);
        let access = catalog.entries.get(&id.0).map_or(
            Access {
                at_ms: millis(memory.created),
                hits: 0,
            },
            |known| known.access,
        );
        catalog.insert(agent, &memory, access, model);
        drop(catalog);
        if memory.model == model
            && !indexed
            && let Some(vector) = self.vector(&agent, id.0)
        {
            self.vectors()?.upsert(vec![Point {
                id,
                namespace: agent,
                vector,
            }])?;
        }
        Ok(())
    }

    /// Takes those of `ids` the store no longer holds out of the catalog and
    /// the index (a delete delivered after a restore put one back leaves it).
    pub(crate) fn unlearn(&self, ids: &[MemoryId]) -> Result<()> {
        let store = self.store()?;
        let view = store.view();
        let owners: Vec<(MemoryId, Option<AgentId>)> = {
            let catalog = self.0.catalog.read();
            ids.iter()
                .map(|id| (*id, catalog.entries.get(&id.0).map(|e| e.agent)))
                .collect()
        };
        // The store is read with no lock held, and before anything changes:
        // a read that fails leaves the catalog and the index as they were.
        let mut gone = Vec::with_capacity(ids.len());
        for (id, owner) in owners {
            let held = match owner {
                Some(agent) => view
                    .get(store.keyspace(MEMORY_ITEMS), memory_key(&agent, id))
                    .map_err(|e| storage_error("read a memory", e))?
                    .is_some(),
                None => false,
            };
            if !held {
                gone.push(id);
            }
        }
        {
            let mut catalog = self.0.catalog.write();
            for id in &gone {
                catalog.remove(*id);
            }
        }
        self.vectors()?.remove(&gone);
        Ok(())
    }

    /// The `k` nearest memories of `agent` to `vector` that `allow` lets through.
    pub(crate) async fn nearest(
        &self,
        agent: AgentId,
        vector: &[f32],
        k: usize,
        allowed: Option<&FxHashSet<u64>>,
    ) -> Result<Vec<Match>> {
        self.vectors()?
            .search(VectorQuery {
                namespace: agent,
                vector,
                k,
                allowed,
            })
            .await
    }

    /// A vector a caller embedded, checked: of the model in use, its dimensions,
    /// finite; scaled to length 1.
    pub(crate) fn given_vector(&self, vector: Vec<f32>, model: &str) -> Result<Vec<f32>> {
        let embedder = &self.0.embedder;
        if model != embedder.model() {
            return Err(Error::invalid_field(
                "model",
                format!(
                    "the vector is of {model}, but memories are embedded by {}",
                    embedder.model()
                ),
            ));
        }
        crate::embed::unit(vector, embedder.dimensions(), model).map_err(|e| Error::invalid_field("vector", e.message))
    }

    /// Runs a search of `agent`'s memories. Where `touches`, what it finds
    /// counts as used (recency and hits, which forgetting reads): not for a
    /// grantee's search of another agent's memory, which is no use of it.
    pub(crate) async fn search(&self, agent: AgentId, search: Search, touches: bool) -> Result<Value> {
        let now = Utc::now();
        let at = millis(search.as_of.unwrap_or(now));
        // Valid at the time asked, of the model in use for the vector leg, and
        // through the filter: materialized only when a filter or a past time
        // makes it worth it; otherwise checked on each leg's results.
        let restricted = search.filter.is_some() || search.as_of.is_some();
        let allowed: Option<FxHashSet<u64>> = restricted.then(|| {
            let catalog = self.0.catalog.read();
            catalog
                .of(&agent)
                .filter(|(_, e)| e.valid_at(at) && search.filter.as_ref().is_none_or(|f| e.matches(f)))
                .map(|(id, _)| id)
                .collect()
        });
        let wide = (search.k * 4).max(50);
        let mut legs = Legs::default();
        if search.mode != Mode::Keyword {
            let query = match &search.vector {
                Some((vector, model)) => self.given_vector(vector.clone(), model)?,
                None => self.0.embedder.embed(vec![search.query.clone()]).await?.remove(0),
            };
            let mut fetch = wide;
            loop {
                let found = self.nearest(agent, &query, fetch, allowed.as_ref()).await?;
                let exhausted = found.len() < fetch;
                let catalog = self.0.catalog.read();
                legs.vector = found
                    .into_iter()
                    .filter(|m| {
                        catalog
                            .entries
                            .get(&m.id.0)
                            .is_some_and(|e| e.agent == agent && e.current_model && e.valid_at(at))
                    })
                    .map(|m| (m.id.0, m.similarity))
                    .collect();
                // Superseded memories were filtered out after the index chose:
                // ask for more until there are enough or there is no more.
                if legs.vector.len() >= wide.min(catalog.count(&agent)) || exhausted || fetch >= 16 * wide {
                    break;
                }
                fetch *= 4;
            }
        }
        let catalog = self.0.catalog.read();
        if search.mode != Mode::Vector
            && let Some(namespace) = catalog.namespaces.get(&agent)
        {
            legs.keyword = namespace.keywords.search(&search.query, wide, |id| match &allowed {
                Some(allowed) => allowed.contains(&id),
                None => catalog.entries.get(&id).is_some_and(|e| e.valid_at(at)),
            });
        }
        let ranked = rank(&search, legs, &catalog, now, |id| self.vector(&agent, id));
        drop(catalog);
        let mut results = Vec::with_capacity(ranked.len());
        for scored in &ranked {
            if let Some(memory) = self.read(&agent, scored.id)? {
                let mut result = json!({
                    "id": memory.id,
                    "text": memory.text,
                    "score": scored.score,
                    "why": scored.why,
                    "created": memory.created,
                    "valid_from": memory.valid_from,
                });
                if !memory.metadata.is_empty() {
                    result["metadata"] = Value::Object(memory.metadata);
                }
                if let Some(subject) = memory.subject {
                    result["subject"] = json!(subject);
                }
                if let Some(valid_to) = memory.valid_to {
                    result["valid_to"] = json!(valid_to);
                }
                results.push(result);
            }
        }
        if touches {
            let found: Vec<MemoryId> = ranked.iter().map(|s| s.id).collect();
            self.touch(agent, &found, now);
        }
        Ok(json!({
            "results": results,
            "mode": search.mode,
            "model": self.0.embedder.model(),
        }))
    }

    /// An agent's figures.
    pub(crate) fn stats(&self, agent: &AgentId) -> Value {
        let catalog = self.0.catalog.read();
        let now = millis(Utc::now());
        let (mut count, mut valid, mut bytes, mut other_model) = (0u64, 0u64, 0u64, 0u64);
        for (_, entry) in catalog.of(agent) {
            count += 1;
            valid += u64::from(entry.valid_at(now));
            bytes += entry.bytes as u64;
            other_model += u64::from(!entry.current_model);
        }
        let (indexed, waiting) = self.vectors().map_or((0, 0), |v| v.namespace_counts(agent));
        json!({
            "count": count,
            "valid": valid,
            "superseded": count - valid,
            "text_bytes": bytes,
            "other_model": other_model,
            "model": self.0.embedder.model(),
            "dimensions": self.0.embedder.dimensions(),
            "backend": self.vectors().ok().map(|v| v.name()),
            "index": {
                "vectors": indexed,
                "pending": waiting,
            },
        })
    }
}
