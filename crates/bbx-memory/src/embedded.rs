//! The embedded vector store: one HNSW graph (usearch) for every agent's
//! vectors, each id tagged with its namespace. A namespace, or the part of it a
//! filter leaves, smaller than `exact_below` is searched exactly (the graph
//! serves a small slice of itself badly); a larger one through the graph with a
//! predicate on the namespace. New vectors wait in a pending set, searched
//! exactly, until the indexer thread has put them in the graph, so an add never
//! waits for the graph and a search sees every acknowledged memory. The graph is
//! saved beside the store now and then and at shutdown; on open, what the store
//! holds decides what the graph must hold (the saved graph is only a head start).

use crate::record::MemoryId;
use crate::search::top_k;
use crate::vectors::{Match, Point, VectorQuery, VectorStore};
use bbx_component::Pending;
use bbx_core::config::{IndexSettings, Quantization};
use bbx_core::{AgentId, Error, Result};
use parking_lot::{Condvar, Mutex, RwLock};
use rustc_hash::{FxHashMap, FxHashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

/// Threads that may use the graph at once (usearch reserves per-thread state).
const GRAPH_THREADS: usize = 64;

pub struct Embedded(Arc<Inner>);

struct Inner {
    graph: RwLock<Index>,
    dimensions: usize,
    exact_below: usize,
    members: RwLock<Members>,
    /// Vectors not yet in the graph.
    pending: Mutex<FxHashMap<u64, Vec<f32>>>,
    work: Condvar,
    /// Held while a vector goes into the graph or out of it: a removal never
    /// passes an insertion of the same id.
    graph_writes: Mutex<()>,
    stopping: AtomicBool,
    /// Whether the graph changed since it was saved.
    dirty: AtomicBool,
    saved: Saved,
    /// The ids the loaded graph was saved with, until reconciled.
    loaded_ids: Mutex<Vec<u64>>,
}

#[derive(Default)]
struct Members {
    namespace_of: FxHashMap<u64, AgentId>,
    by_namespace: FxHashMap<AgentId, FxHashSet<u64>>,
}

impl Members {
    fn insert(&mut self, id: u64, namespace: AgentId) {
        if let Some(old) = self.namespace_of.insert(id, namespace)
            && old != namespace
        {
            self.drop_from(old, id);
        }
        self.by_namespace.entry(namespace).or_default().insert(id);
    }

    fn remove(&mut self, id: u64) {
        if let Some(namespace) = self.namespace_of.remove(&id) {
            self.drop_from(namespace, id);
        }
    }

    fn drop_from(&mut self, namespace: AgentId, id: u64) {
        if let Some(ids) = self.by_namespace.get_mut(&namespace) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_namespace.remove(&namespace);
            }
        }
    }
}

fn graph_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("the vector index cannot {what}: {e}"))
}

impl Embedded {
    /// A store for vectors of `dimensions`, its graph loaded from `dir` if one
    /// saved there was built for `model` with these settings.
    pub fn open(dir: &Path, model: &str, dimensions: usize, settings: &IndexSettings) -> Result<Self> {
        let options = IndexOptions {
            dimensions,
            metric: MetricKind::Cos,
            quantization: match settings.quantization {
                Quantization::F32 => ScalarKind::F32,
                Quantization::F16 => ScalarKind::F16,
                Quantization::I8 => ScalarKind::I8,
            },
            connectivity: settings.connectivity,
            expansion_add: settings.expansion_add,
            expansion_search: settings.expansion_search,
            multi: false,
        };
        let graph = Index::new(&options).map_err(|e| graph_error("be made", e))?;
        let saved = Saved::at(dir, model, settings);
        let mut loaded_ids = Vec::new();
        if let Some((path, ids)) = saved.compatible() {
            match graph.load(&path) {
                Ok(()) => loaded_ids = ids,
                Err(e) => {
                    tracing::warn!(error = %e, "the saved vector index does not load: it is rebuilt");
                    graph.reset().map_err(|e| graph_error("be reset", e))?;
                }
            }
            graph.change_expansion_search(settings.expansion_search);
        }
        graph
            .reserve_capacity_and_threads(graph.size().max(1024), GRAPH_THREADS)
            .map_err(|e| graph_error("reserve room", e))?;
        let inner = Arc::new(Inner {
            graph: RwLock::new(graph),
            dimensions,
            exact_below: settings.exact_below,
            members: RwLock::default(),
            pending: Mutex::default(),
            work: Condvar::new(),
            graph_writes: Mutex::new(()),
            stopping: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            saved,
            loaded_ids: Mutex::new(loaded_ids),
        });
        let indexer = inner.clone();
        std::thread::Builder::new()
            .name("bbx-memory-index".into())
            .spawn(move || indexer.index_pending())
            .map_err(|e| Error::internal(format!("cannot start the indexer: {e}")))?;
        Ok(Self(inner))
    }

    /// Makes the graph hold exactly `members` (id, namespace): what the saved
    /// graph holds and the store does not is removed, what the store holds and
    /// the graph does not is queued with its vector from `vector_of`.
    pub fn reconcile(&self, members: Vec<(u64, AgentId)>, vector_of: impl Fn(u64) -> Option<Vec<f32>>) -> Result<()> {
        let mut holding: Members = Members::default();
        for &(id, namespace) in &members {
            holding.insert(id, namespace);
        }
        let mut queued = Vec::new();
        {
            let graph = self.0.graph.read();
            for &(id, _) in &members {
                if !graph.contains(id)
                    && let Some(vector) = vector_of(id)
                {
                    queued.push((id, vector));
                }
            }
        }
        let strays: Vec<u64> = std::mem::take(&mut *self.0.loaded_ids.lock())
            .into_iter()
            .filter(|id| !holding.namespace_of.contains_key(id))
            .collect();
        {
            let graph = self.0.graph.read();
            for &id in &strays {
                graph.remove(id).map_err(|e| graph_error("remove a vector", e))?;
            }
        }
        if !strays.is_empty() {
            self.0.dirty.store(true, Ordering::Release);
        }
        *self.0.members.write() = holding;
        let mut pending = self.0.pending.lock();
        pending.extend(queued);
        self.0.work.notify_one();
        Ok(())
    }

    /// Vectors waiting for the graph.
    pub fn pending(&self) -> usize {
        self.0.pending.lock().len()
    }

    /// Waits until every pending vector is in the graph.
    pub fn wait_indexed(&self) {
        while self.pending() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Saves the graph, and the ids in it, if it changed.
    pub fn save(&self) -> Result<()> {
        if !self.0.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // No vector goes in or out while the graph and its ids are written (the
        // locks in the order every path takes them: members, writes, graph).
        let members = self.0.members.read();
        let _writing = self.0.graph_writes.lock();
        let graph = self.0.graph.read();
        let ids: Vec<u64> = members
            .namespace_of
            .keys()
            .copied()
            .filter(|id| graph.contains(*id))
            .collect();
        let written = self.0.saved.write(&graph, &ids);
        if written.is_err() {
            self.0.dirty.store(true, Ordering::Release);
        }
        written
    }

    /// Ids the graph itself holds (not those pending), for checks.
    pub fn in_graph(&self, id: MemoryId) -> bool {
        self.0.graph.read().contains(id.0)
    }

    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::Release);
        let _guard = self.0.pending.lock();
        self.0.work.notify_all();
    }

    fn search_now(&self, query: &VectorQuery<'_>) -> Result<Vec<Match>> {
        let inner = &self.0;
        if query.vector.len() != inner.dimensions {
            return Err(Error::invalid_field(
                "vector",
                format!(
                    "the query has {} dimensions; the index has {}",
                    query.vector.len(),
                    inner.dimensions
                ),
            ));
        }
        let members = inner.members.read();
        let Some(namespace) = members.by_namespace.get(&query.namespace) else {
            return Ok(Vec::new());
        };
        let candidates = query
            .allowed
            .map_or(namespace.len(), |allowed| allowed.len().min(namespace.len()));
        let mut found = if candidates < inner.exact_below {
            let ids = namespace
                .iter()
                .copied()
                .filter(|id| query.allowed.is_none_or(|allowed| allowed.contains(id)));
            inner.exact(ids, query.vector, query.k)
        } else {
            let admits = |id: u64| {
                members.namespace_of.get(&id) == Some(&query.namespace)
                    && query.allowed.is_none_or(|allowed| allowed.contains(&id))
            };
            let matches = inner
                .graph
                .read()
                .filtered_search(query.vector, query.k, admits)
                .map_err(|e| graph_error("search", e))?;
            let mut found: Vec<(u64, f32)> = matches
                .keys
                .iter()
                .zip(&matches.distances)
                .map(|(&id, &distance)| (id, 1.0 - distance))
                .collect();
            // What is not in the graph yet is searched exactly.
            let pending: Vec<u64> = inner.pending.lock().keys().copied().filter(|id| admits(*id)).collect();
            if !pending.is_empty() {
                found.retain(|(id, _)| !pending.contains(id));
                found.extend(inner.exact(pending.into_iter(), query.vector, query.k));
                top_k(&mut found, query.k);
            }
            found
        };
        found.truncate(query.k);
        Ok(found
            .into_iter()
            .map(|(id, similarity)| Match {
                id: MemoryId(id),
                similarity,
            })
            .collect())
    }
}

impl Inner {
    /// The `k` of `ids` nearest to `query`, by their exact cosine.
    fn exact(&self, ids: impl Iterator<Item = u64>, query: &[f32], k: usize) -> Vec<(u64, f32)> {
        let graph = self.graph.read();
        let pending = self.pending.lock();
        let mut buffer = vec![0f32; self.dimensions];
        let mut scored: Vec<(u64, f32)> = ids
            .filter_map(|id| {
                let vector = match pending.get(&id) {
                    Some(vector) => vector.as_slice(),
                    None => {
                        graph.get(id, &mut buffer).ok().filter(|n| *n > 0)?;
                        buffer.as_slice()
                    }
                };
                Some((id, cosine(vector, query)))
            })
            .collect();
        top_k(&mut scored, k);
        scored
    }

    /// The indexer thread: moves pending vectors into the graph, a batch at a
    /// time, growing the graph as it fills.
    fn index_pending(&self) {
        loop {
            let batch: Vec<(u64, Vec<f32>)> = {
                let mut pending = self.pending.lock();
                while pending.is_empty() && !self.stopping.load(Ordering::Acquire) {
                    self.work.wait(&mut pending);
                }
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                pending.iter().take(256).map(|(id, v)| (*id, v.clone())).collect()
            };
            self.make_room(batch.len());
            for (id, vector) in batch {
                let _writing = self.graph_writes.lock();
                let still_wanted = self.pending.lock().get(&id).is_some_and(|v| *v == vector);
                if !still_wanted {
                    continue;
                }
                let graph = self.graph.read();
                if graph.contains(id) {
                    let _ = graph.remove(id);
                }
                if let Err(e) = graph.add(id, &vector) {
                    tracing::error!(error = %e, "a vector could not be indexed: it stays pending (searched exactly)");
                    continue;
                }
                drop(graph);
                let mut pending = self.pending.lock();
                if pending.get(&id).is_some_and(|v| *v == vector) {
                    pending.remove(&id);
                }
                self.dirty.store(true, Ordering::Release);
            }
        }
    }

    fn make_room(&self, more: usize) {
        let graph = self.graph.read();
        if graph.size() + more <= graph.capacity() {
            return;
        }
        drop(graph);
        let graph = self.graph.write();
        let wanted = (graph.size() + more).max(graph.capacity() * 2);
        if let Err(e) = graph.reserve_capacity_and_threads(wanted, GRAPH_THREADS) {
            tracing::error!(error = %e, "the vector index cannot grow");
        }
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    // Vectors are unit: the dot product is the cosine.
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl VectorStore for Embedded {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn upsert(&self, points: Vec<Point>) -> Result<()> {
        if let Some(bad) = points.iter().find(|p| p.vector.len() != self.0.dimensions) {
            return Err(Error::invalid_field(
                "vector",
                format!(
                    "a vector has {} dimensions; the index has {}",
                    bad.vector.len(),
                    self.0.dimensions
                ),
            ));
        }
        let mut members = self.0.members.write();
        let mut pending = self.0.pending.lock();
        for point in points {
            members.insert(point.id.0, point.namespace);
            pending.insert(point.id.0, point.vector);
        }
        self.0.work.notify_one();
        Ok(())
    }

    fn remove(&self, ids: &[MemoryId]) {
        let mut members = self.0.members.write();
        let _writing = self.0.graph_writes.lock();
        let graph = self.0.graph.read();
        let mut pending = self.0.pending.lock();
        for id in ids {
            members.remove(id.0);
            pending.remove(&id.0);
            if graph.contains(id.0) {
                if let Err(e) = graph.remove(id.0) {
                    // Out of the members, it is never found; the next open drops it.
                    tracing::error!(error = %e, "a vector could not be removed from the graph");
                }
                self.0.dirty.store(true, Ordering::Release);
            }
        }
    }

    fn search<'a>(&'a self, query: VectorQuery<'a>) -> Pending<'a, Vec<Match>> {
        Box::pin(async move { self.search_now(&query) })
    }

    fn len(&self) -> usize {
        self.0.members.read().namespace_of.len()
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a graph is saved: the graph, and beside it what it was built for and
/// the ids in it.
struct Saved {
    graph: PathBuf,
    about: PathBuf,
    ids: PathBuf,
    built_for: String,
}

impl Saved {
    fn at(dir: &Path, model: &str, settings: &IndexSettings) -> Self {
        Self {
            graph: dir.join("vectors.usearch"),
            about: dir.join("vectors.about"),
            ids: dir.join("vectors.ids"),
            built_for: format!(
                "{model} {:?} m{} ef{}",
                settings.quantization, settings.connectivity, settings.expansion_add
            ),
        }
    }

    /// The saved graph's path and ids, if it was built for this model and
    /// these settings.
    fn compatible(&self) -> Option<(String, Vec<u64>)> {
        let about = std::fs::read_to_string(&self.about).ok()?;
        let ids = std::fs::read(&self.ids).ok()?;
        let ids = ids
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        (about.trim() == self.built_for && self.graph.is_file()).then(|| (self.graph.display().to_string(), ids))
    }

    fn write(&self, graph: &Index, ids: &[u64]) -> Result<()> {
        let dir = self.graph.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| graph_error("be saved", e))?;
        let staging = self.graph.with_extension("usearch.saving");
        graph
            .save(&staging.display().to_string())
            .map_err(|e| graph_error("be saved", e))?;
        let sync = |path: &Path| std::fs::File::open(path).and_then(|f| f.sync_all());
        sync(&staging).map_err(|e| graph_error("be saved", e))?;
        // The graph is a head start, not the truth: whatever a crash leaves here,
        // the next open reconciles with the store.
        // The about file goes first and last: a graph without its ids is not loaded.
        let _ = std::fs::remove_file(&self.about);
        std::fs::rename(&staging, &self.graph).map_err(|e| graph_error("be saved", e))?;
        let ids: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        std::fs::write(&self.ids, ids).map_err(|e| graph_error("be saved", e))?;
        std::fs::write(&self.about, &self.built_for).map_err(|e| graph_error("be saved", e))?;
        sync(&self.ids)
            .and_then(|()| sync(&self.about))
            .and_then(|()| sync(dir))
            .map_err(|e| graph_error("be saved", e))
    }
}
