//! The embedded vector store: one HNSW graph (usearch) for every agent's
//! vectors, each id tagged with its namespace. A namespace, or the part of it a
//! filter leaves, smaller than `exact_below` is searched exactly (the graph
//! serves a small slice of itself badly); a larger one through the graph with a
//! predicate on the namespace. Changes are queued and applied to the graph by
//! the indexer thread, so neither an add nor a delete waits for the graph: a new
//! vector waits in a pending set, searched exactly, and a removed id leaves the
//! namespace at once (the predicate no longer admits it) and the graph when the
//! indexer gets to it. The graph is saved beside the store now and then and at
//! shutdown; on open, what the store holds decides what the graph must hold
//! (the saved graph is only a head start).

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
use std::time::Duration;
use usearch::{Index, IndexOptions, MetricKind, ScalarKind};

/// Threads that may use the graph at once (usearch reserves per-thread state).
const GRAPH_THREADS: usize = 64;
/// Vectors the indexer puts in the graph per turn.
const INDEX_BATCH: usize = 256;

pub struct Embedded(Arc<Inner>);

struct Inner {
    graph: RwLock<Index>,
    dimensions: usize,
    exact_below: usize,
    members: RwLock<Members>,
    queue: Mutex<Queue>,
    work: Condvar,
    /// The ids in the graph, kept by the indexer (and saved with the graph).
    /// Held while the indexer changes the graph and while it is saved.
    in_graph: Mutex<FxHashSet<u64>>,
    stopping: AtomicBool,
    /// Whether the graph changed since it was saved.
    dirty: AtomicBool,
    saved: Saved,
    /// The ids the loaded graph was saved with, until reconciled.
    loaded_ids: Mutex<Vec<u64>>,
}

/// What the graph is yet to take in or let go of.
#[derive(Default)]
struct Queue {
    /// Vectors not yet in the graph: searched exactly meanwhile.
    adds: FxHashMap<u64, Vec<f32>>,
    /// Ids to take out of the graph.
    removals: Vec<u64>,
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
    /// saved there was built for `model` with these dimensions and settings.
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
        let saved = Saved::at(dir, model, dimensions, settings);
        let mut loaded_ids = Vec::new();
        if let Some((path, ids)) = saved.compatible() {
            match graph.load(&path) {
                Ok(()) if graph.dimensions() == dimensions => loaded_ids = ids,
                loaded => {
                    tracing::warn!(?loaded, "the saved vector index does not fit: it is rebuilt");
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
            queue: Mutex::default(),
            work: Condvar::new(),
            in_graph: Mutex::default(),
            stopping: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            saved,
            loaded_ids: Mutex::new(loaded_ids),
        });
        let indexer = inner.clone();
        std::thread::Builder::new()
            .name("bbx-memory-index".into())
            .spawn(move || indexer.index_queued())
            .map_err(|e| Error::internal(format!("cannot start the indexer: {e}")))?;
        Ok(Self(inner))
    }

    /// Makes the graph hold exactly `members` (id, namespace): what the saved
    /// graph holds and the store does not is removed, what the store holds and
    /// the graph does not is queued with its vector from `vector_of`.
    pub fn reconcile(&self, members: Vec<(u64, AgentId)>, vector_of: impl Fn(u64) -> Option<Vec<f32>>) -> Result<()> {
        let mut holding = Members::default();
        for &(id, namespace) in &members {
            holding.insert(id, namespace);
        }
        let loaded = std::mem::take(&mut *self.0.loaded_ids.lock());
        let (kept, strays): (Vec<u64>, Vec<u64>) =
            loaded.into_iter().partition(|id| holding.namespace_of.contains_key(id));
        let queued: Vec<(u64, Vec<f32>)> = {
            let mut in_graph = self.0.in_graph.lock();
            let graph = self.0.graph.read();
            for &id in &strays {
                graph.remove(id).map_err(|e| graph_error("remove a vector", e))?;
            }
            in_graph.extend(kept.iter().filter(|id| graph.contains(**id)));
            members
                .iter()
                .filter(|(id, _)| !in_graph.contains(id))
                .filter_map(|&(id, _)| Some((id, vector_of(id)?)))
                .collect()
        };
        if !strays.is_empty() {
            self.0.dirty.store(true, Ordering::Release);
        }
        *self.0.members.write() = holding;
        let mut queue = self.0.queue.lock();
        queue.adds.extend(queued);
        self.0.work.notify_one();
        Ok(())
    }

    /// Vectors waiting for the graph.
    pub fn pending(&self) -> usize {
        self.0.queue.lock().adds.len()
    }

    /// The namespace's vectors, and how many of them wait for the graph.
    pub fn namespace_counts(&self, namespace: &AgentId) -> (usize, usize) {
        let members = self.0.members.read();
        let Some(ids) = members.by_namespace.get(namespace) else {
            return (0, 0);
        };
        let queue = self.0.queue.lock();
        let waiting = if queue.adds.len() < ids.len() {
            queue.adds.keys().filter(|id| ids.contains(id)).count()
        } else {
            ids.iter().filter(|id| queue.adds.contains_key(id)).count()
        };
        (ids.len(), waiting)
    }

    /// Waits until every queued change is in the graph.
    pub fn wait_indexed(&self) {
        loop {
            {
                let queue = self.0.queue.lock();
                if queue.adds.is_empty() && queue.removals.is_empty() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Saves the graph, and the ids in it, if it changed.
    pub fn save(&self) -> Result<()> {
        if !self.0.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        // The indexer waits while the graph and its ids are written; searches,
        // adds and deletes do not.
        let in_graph = self.0.in_graph.lock();
        let graph = self.0.graph.read();
        let ids: Vec<u64> = in_graph.iter().copied().collect();
        let written = self.0.saved.write(&graph, &ids);
        if written.is_err() {
            self.0.dirty.store(true, Ordering::Release);
        }
        written
    }

    /// Whether the graph itself holds `id` (not only the queue), for checks.
    pub fn in_graph(&self, id: MemoryId) -> bool {
        self.0.graph.read().contains(id.0)
    }

    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::Release);
        let _queue = self.0.queue.lock();
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
        let admits = |id: u64| {
            members.namespace_of.get(&id) == Some(&query.namespace)
                && query.allowed.is_none_or(|allowed| allowed.contains(&id))
        };
        let candidates = query
            .allowed
            .map_or(namespace.len(), |allowed| allowed.len().min(namespace.len()));
        let mut found = if candidates < inner.exact_below {
            let ids = namespace.iter().copied().filter(|id| admits(*id));
            inner.exact(ids, query.vector, query.k)
        } else {
            // Taken before the graph is searched: a vector that moves into the
            // graph meanwhile is found in one or the other.
            let queued: Vec<u64> = inner
                .queue
                .lock()
                .adds
                .keys()
                .copied()
                .filter(|id| admits(*id))
                .collect();
            // A namespace that is the whole graph needs no predicate (the
            // graph's own search is the faster one).
            let whole = query.allowed.is_none() && namespace.len() == members.namespace_of.len();
            let graph = inner.graph.read();
            let matches = if whole {
                graph.search(query.vector, query.k)
            } else {
                graph.filtered_search(query.vector, query.k, admits)
            }
            .map_err(|e| graph_error("search", e))?;
            drop(graph);
            let mut found: Vec<(u64, f32)> = matches
                .keys
                .iter()
                .zip(&matches.distances)
                .filter(|(id, _)| !queued.contains(id) && admits(**id))
                .map(|(&id, &distance)| (id, 1.0 - distance))
                .collect();
            if !queued.is_empty() {
                found.extend(inner.exact(queued.into_iter(), query.vector, query.k));
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
        let queue = self.queue.lock();
        let mut buffer = vec![0f32; self.dimensions];
        let mut scored: Vec<(u64, f32)> = ids
            .filter_map(|id| {
                let vector = match queue.adds.get(&id) {
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

    /// The indexer thread: takes removed ids out of the graph, then puts queued
    /// vectors in, a batch at a time, growing the graph as it fills.
    fn index_queued(&self) {
        loop {
            let (removals, batch) = {
                let mut queue = self.queue.lock();
                while queue.adds.is_empty() && queue.removals.is_empty() && !self.stopping.load(Ordering::Acquire) {
                    self.work.wait(&mut queue);
                }
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                let removals = std::mem::take(&mut queue.removals);
                let batch: Vec<(u64, Vec<f32>)> = queue
                    .adds
                    .iter()
                    .take(INDEX_BATCH)
                    .map(|(id, v)| (*id, v.clone()))
                    .collect();
                (removals, batch)
            };
            self.make_room(batch.len());
            let mut in_graph = self.in_graph.lock();
            let graph = self.graph.read();
            for id in removals {
                if in_graph.remove(&id)
                    && let Err(e) = graph.remove(id)
                {
                    tracing::error!(error = %e, "a vector could not leave the graph (it is never found: out of its namespace)");
                }
                self.dirty.store(true, Ordering::Release);
            }
            let mut failed = false;
            for (id, vector) in batch {
                // Removed or replaced since it was taken: the queue says what holds.
                if self.queue.lock().adds.get(&id) != Some(&vector) {
                    continue;
                }
                if in_graph.remove(&id) {
                    let _ = graph.remove(id);
                }
                if let Err(e) = graph.add(id, &vector) {
                    tracing::error!(error = %e, "a vector could not be indexed: it stays queued (searched exactly)");
                    failed = true;
                    continue;
                }
                in_graph.insert(id);
                self.dirty.store(true, Ordering::Release);
                let mut queue = self.queue.lock();
                if queue.adds.get(&id) == Some(&vector) {
                    queue.adds.remove(&id);
                }
            }
            drop((graph, in_graph));
            if failed {
                std::thread::sleep(Duration::from_secs(1));
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
        let mut queue = self.0.queue.lock();
        for point in points {
            members.insert(point.id.0, point.namespace);
            queue.adds.insert(point.id.0, point.vector);
        }
        self.0.work.notify_one();
        Ok(())
    }

    fn remove(&self, ids: &[MemoryId]) {
        let mut members = self.0.members.write();
        let mut queue = self.0.queue.lock();
        for id in ids {
            members.remove(id.0);
            queue.adds.remove(&id.0);
            queue.removals.push(id.0);
        }
        self.0.work.notify_one();
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
    fn at(dir: &Path, model: &str, dimensions: usize, settings: &IndexSettings) -> Self {
        Self {
            graph: dir.join("vectors.usearch"),
            about: dir.join("vectors.about"),
            ids: dir.join("vectors.ids"),
            built_for: format!(
                "{model} d{dimensions} {:?} m{} ef{}",
                settings.quantization, settings.connectivity, settings.expansion_add
            ),
        }
    }
    /// The saved graph's path and ids, if it was built for this model, these
    /// dimensions and these settings.
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn unit(rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        let v: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }

    fn settings() -> IndexSettings {
        IndexSettings {
            exact_below: 50,
            ..IndexSettings::default()
        }
    }

    async fn nearest(store: &Embedded, namespace: AgentId, vector: &[f32]) -> Vec<u64> {
        let query = VectorQuery {
            namespace,
            vector,
            k: 5,
            allowed: None,
        };
        store.search(query).await.unwrap().iter().map(|m| m.id.0).collect()
    }

    #[tokio::test]
    async fn namespaces_stay_apart_in_the_graph_and_exactly_and_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (big, small) = (AgentId::generate(), AgentId::generate());
        let store = Embedded::open(dir.path(), "m", 16, &settings()).unwrap();
        let mut points = Vec::new();
        for id in 0..300u64 {
            let namespace = if id < 280 { big } else { small };
            points.push(Point {
                id: MemoryId(id),
                namespace,
                vector: unit(&mut rng),
            });
        }
        store.upsert(points.clone()).unwrap();
        // Searchable at once (pending, exactly), then from the graph.
        for waited in [false, true] {
            if waited {
                store.wait_indexed();
                assert!(store.in_graph(MemoryId(5)));
            }
            for point in [&points[5], &points[290]] {
                let found = nearest(&store, point.namespace, &point.vector).await;
                assert_eq!(found[0], point.id.0, "waited: {waited}");
                let expected = if point.namespace == big { 0..280 } else { 280..300 };
                assert!(found.iter().all(|id| expected.contains(id)), "{found:?}");
            }
        }
        store.remove(&[MemoryId(5)]);
        assert!(!nearest(&store, big, &points[5].vector).await.contains(&5));
        assert!(
            store
                .search(VectorQuery {
                    namespace: big,
                    vector: &[1.0],
                    k: 1,
                    allowed: None
                })
                .await
                .is_err()
        );
        store.save().unwrap();
        drop(store);

        // Reopened from the saved graph; the store no longer holds id 6: it goes.
        let reopened = Embedded::open(dir.path(), "m", 16, &settings()).unwrap();
        assert!(reopened.in_graph(MemoryId(6)));
        let members: Vec<(u64, AgentId)> = points
            .iter()
            .filter(|p| p.id.0 != 5 && p.id.0 != 6)
            .map(|p| (p.id.0, p.namespace))
            .collect();
        reopened
            .reconcile(members, |id| Some(points[id as usize].vector.clone()))
            .unwrap();
        assert!(!reopened.in_graph(MemoryId(6)), "a stray leaves the graph");
        assert_eq!(reopened.pending(), 0, "the saved graph held the rest");
        assert_eq!(nearest(&reopened, big, &points[7].vector).await[0], 7);
        assert!(!nearest(&reopened, big, &points[6].vector).await.contains(&6));
        // Built for another model: not loaded, rebuilt from the store.
        let other = Embedded::open(dir.path(), "other", 16, &settings()).unwrap();
        assert!(!other.in_graph(MemoryId(7)));
    }
}
