//! The repository: snapshots' packs and manifests over every configured store.
//!
//! - **Writes reach a quorum.** Each pack goes to every store that lacks one of
//!   its chunks, each manifest to every store; a write counts once `quorum`
//!   stores have it. A store that is down is skipped (and lags until a later
//!   snapshot or a repair writes what it lacks).
//! - **Reads are checked.** Every chunk read is decompressed and hashed against
//!   its name; a missing or damaged chunk is read from the next store that has
//!   it, and written back to the store that failed (in a new pack), so replicas
//!   heal as they are read.
//! - **Each store's chunk index** (chunk → pack and offset) is read from its
//!   packs' indexes when first needed and kept in memory after.

use crate::chunk::{self, ChunkId, ChunkRef, corrupt};
use crate::pack::{self, Location, PackBuilder, SealedPack};
use crate::store::SnapshotStore;
use bbx_core::{Error, Result};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub type ChunkIndex = HashMap<ChunkId, Location>;

pub struct Replica {
    pub store: Box<dyn SnapshotStore>,
    index: tokio::sync::Mutex<Option<Arc<ChunkIndex>>>,
    /// When its index last failed to load: it is not asked again for
    /// [`DOWN_FOR`], so a store that is down costs one timeout, not one per read.
    failed: parking_lot::Mutex<Option<(std::time::Instant, Error)>>,
}

/// How long a store whose index did not load counts as down.
const DOWN_FOR: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Repository {
    pub replicas: Vec<Replica>,
    pub quorum: usize,
}

/// A store's state, for `list-replicas`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaState {
    pub store: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub packs: usize,
    pub bytes: u64,
    pub manifests: usize,
}

pub fn manifest_name(id: &uuid::Uuid) -> String {
    format!("manifests/{}.json", id.simple())
}

impl Repository {
    pub fn new(stores: Vec<Box<dyn SnapshotStore>>, quorum: usize) -> Self {
        Self {
            replicas: stores
                .into_iter()
                .map(|store| Replica {
                    store,
                    index: tokio::sync::Mutex::new(None),
                    failed: parking_lot::Mutex::new(None),
                })
                .collect(),
            quorum,
        }
    }

    /// The store's chunk index, read from its packs the first time.
    pub async fn index(&self, replica: usize) -> Result<Arc<ChunkIndex>> {
        if let Some((at, e)) = &*self.replicas[replica].failed.lock()
            && at.elapsed() < DOWN_FOR
        {
            return Err(e.clone());
        }
        let loaded = self.load_index(replica).await;
        *self.replicas[replica].failed.lock() = loaded.as_ref().err().map(|e| (std::time::Instant::now(), e.clone()));
        loaded
    }

    async fn load_index(&self, replica: usize) -> Result<Arc<ChunkIndex>> {
        let mut held = self.replicas[replica].index.lock().await;
        if let Some(index) = &*held {
            return Ok(index.clone());
        }
        let store = &self.replicas[replica].store;
        let mut index = ChunkIndex::new();
        for (name, size) in store.list("packs/").await? {
            if size < pack::TAIL {
                tracing::warn!(pack = %name, store = %store.describe(), "a pack too short to hold an index is skipped");
                continue;
            }
            let read = async {
                let tail = store
                    .get_range(&name, size - pack::TAIL..size)
                    .await?
                    .ok_or_else(|| corrupt("a listed pack is gone"))?;
                let range = pack::index_range(&tail, size)?;
                let bytes = store
                    .get_range(&name, range.clone())
                    .await?
                    .ok_or_else(|| corrupt("a listed pack is gone"))?;
                pack::read_index(&name.as_str().into(), &bytes, range.start)
            };
            match read.await {
                Ok(entries) => index.extend(entries),
                Err(e) => {
                    tracing::warn!(pack = %name, store = %store.describe(), error = %e, "a pack whose index cannot be read is skipped")
                }
            }
        }
        let index = Arc::new(index);
        *held = Some(index.clone());
        Ok(index)
    }

    /// Every store's index, `None` for a store that cannot be read now.
    pub async fn indexes(&self) -> Vec<Option<Arc<ChunkIndex>>> {
        let mut indexes = Vec::with_capacity(self.replicas.len());
        for replica in 0..self.replicas.len() {
            match self.index(replica).await {
                Ok(index) => indexes.push(Some(index)),
                Err(e) => {
                    tracing::warn!(store = %self.replicas[replica].store.describe(), error = %e, "a snapshot store cannot be read");
                    indexes.push(None);
                }
            }
        }
        indexes
    }

    /// Writes a sealed pack to a store and adds its chunks to that store's index.
    pub async fn put_pack(&self, replica: usize, sealed: &SealedPack) -> Result<()> {
        self.replicas[replica]
            .store
            .put(&sealed.name, sealed.bytes.clone())
            .await?;
        let mut held = self.replicas[replica].index.lock().await;
        if let Some(index) = held.as_mut() {
            let index = Arc::make_mut(index);
            index.extend(sealed.locations.iter().cloned());
        }
        Ok(())
    }

    /// Writes an object to every store in `to`; fails unless `quorum` of them
    /// took it. Answers which did.
    pub async fn put_everywhere(&self, to: &[usize], name: &str, bytes: Bytes) -> Result<Vec<usize>> {
        let writes = to.iter().map(|&replica| {
            let bytes = bytes.clone();
            async move { (replica, self.replicas[replica].store.put(name, bytes).await) }
        });
        let mut done = Vec::new();
        let mut failures = Vec::new();
        for (replica, outcome) in futures::future::join_all(writes).await {
            match outcome {
                Ok(()) => done.push(replica),
                Err(e) => failures.push(e.to_string()),
            }
        }
        self.check_quorum(done.len(), &failures)?;
        Ok(done)
    }

    pub fn check_quorum(&self, copies: usize, failures: &[String]) -> Result<()> {
        if copies >= self.quorum {
            return Ok(());
        }
        Err(Error::unavailable(format!(
            "a snapshot reached {copies} of its stores, and {} must take it: {}",
            self.quorum,
            failures.join("; ")
        )))
    }

    /// The object from the first store whose copy `check` accepts (a copy
    /// it refuses, or a store that cannot be read, sends it to the next);
    /// `None` if no store has it.
    pub async fn get_checked<T>(&self, name: &str, check: impl Fn(&[u8]) -> Result<T>) -> Result<Option<T>> {
        let (mut damaged, mut unreachable) = (Vec::new(), Vec::new());
        for replica in &self.replicas {
            match replica.store.get(name).await {
                Ok(Some(bytes)) => match check(&bytes) {
                    Ok(value) => return Ok(Some(value)),
                    Err(e) => damaged.push(format!("{}: {e}", replica.store.describe())),
                },
                Ok(None) => {}
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        match (damaged.is_empty(), unreachable.is_empty()) {
            (true, true) => Ok(None),
            // Maybe whole where it could not be read: worth a retry.
            (true, false) => Err(Error::unavailable(format!(
                "no store that may have {name} can be read: {}",
                unreachable.join("; ")
            ))),
            _ => Err(corrupt(&format!(
                "no store has a good copy of {name}: {}",
                [damaged, unreachable].concat().join("; ")
            ))),
        }
    }

    /// The chunks' bytes, in order, each checked against its name. A chunk
    /// missing or damaged in one store is read from another and written back
    /// to the stores that failed it.
    pub async fn read_chunks(&self, refs: &[ChunkRef]) -> Result<Vec<Vec<u8>>> {
        let indexes = self.indexes().await;
        let mut found: Vec<Option<Vec<u8>>> = vec![None; refs.len()];
        let mut repairs: Vec<Vec<usize>> = vec![Vec::new(); self.replicas.len()];
        for (replica, index) in indexes.iter().enumerate() {
            let Some(index) = index else { continue };
            let wanted: Vec<usize> = (0..refs.len()).filter(|&i| found[i].is_none()).collect();
            if wanted.is_empty() {
                break;
            }
            let store = &self.replicas[replica].store;
            let mut located: Vec<(usize, &Location)> = Vec::new();
            for i in wanted {
                match index.get(&refs[i].id) {
                    Some(location) => located.push((i, location)),
                    None => repairs[replica].push(i),
                }
            }
            for (i, bytes) in read_located(store.as_ref(), &located).await {
                match bytes.and_then(|stored| chunk::decompress(&refs[i], &stored)) {
                    Ok(raw) => found[i] = Some(raw),
                    Err(e) => {
                        tracing::warn!(store = %store.describe(), chunk = ?refs[i].id, error = %e, "a chunk is read from another store");
                        repairs[replica].push(i);
                    }
                }
            }
        }
        let chunks: Vec<Vec<u8>> = found
            .into_iter()
            .zip(refs)
            .map(|(raw, reference)| {
                raw.ok_or_else(|| {
                    corrupt(&format!(
                        "chunk {:?} is in no store, or damaged in every one",
                        reference.id
                    ))
                })
            })
            .collect::<Result<_>>()?;
        self.repair(&indexes, &repairs, refs, &chunks).await;
        Ok(chunks)
    }

    /// Writes the chunks a store failed to give back to it, in one pack.
    async fn repair(
        &self,
        indexes: &[Option<Arc<ChunkIndex>>],
        repairs: &[Vec<usize>],
        refs: &[ChunkRef],
        chunks: &[Vec<u8>],
    ) {
        for (replica, wanted) in repairs.iter().enumerate() {
            if wanted.is_empty() || indexes[replica].is_none() {
                continue;
            }
            let mut builder = PackBuilder::default();
            let mut seen = HashSet::new();
            for &i in wanted {
                if seen.insert(refs[i].id)
                    && let Ok(stored) = chunk::compress(&chunks[i], 3)
                {
                    builder.add(refs[i], &stored);
                }
            }
            let sealed = builder.seal();
            match self.put_pack(replica, &sealed).await {
                Ok(()) => {
                    tracing::info!(store = %self.replicas[replica].store.describe(), chunks = seen.len(), "repaired chunks a snapshot store had lost")
                }
                Err(e) => tracing::warn!(error = %e, "repairing a snapshot store failed"),
            }
        }
    }

    /// Every store's state.
    pub async fn states(&self) -> Vec<ReplicaState> {
        let mut states = Vec::new();
        for replica in &self.replicas {
            let store = &replica.store;
            let listed = async { Ok::<_, Error>((store.list("packs/").await?, store.list("manifests/").await?)) };
            states.push(match listed.await {
                Ok((packs, manifests)) => ReplicaState {
                    store: store.describe(),
                    reachable: true,
                    error: None,
                    packs: packs.len(),
                    bytes: packs.iter().chain(&manifests).map(|(_, size)| size).sum(),
                    manifests: manifests.len(),
                },
                Err(e) => ReplicaState {
                    store: store.describe(),
                    reachable: false,
                    error: Some(e.to_string()),
                    packs: 0,
                    bytes: 0,
                    manifests: 0,
                },
            });
        }
        states
    }

    /// Forgets every store's index (a pack was removed): read again when next needed.
    pub async fn forget_indexes(&self) {
        for replica in &self.replicas {
            *replica.index.lock().await = None;
        }
    }
}

/// Reads chunks from a store, ranges of neighbouring chunks of a pack in one
/// read: (position, stored bytes or the read's error) for each.
async fn read_located(store: &dyn SnapshotStore, located: &[(usize, &Location)]) -> Vec<(usize, Result<Vec<u8>>)> {
    /// Neighbours closer than this are read together.
    const GAP: u64 = 256 << 10;
    const MAX_READ: u64 = 8 << 20;
    let mut sorted: Vec<&(usize, &Location)> = located.iter().collect();
    sorted.sort_by(|a, b| (&a.1.pack, a.1.offset).cmp(&(&b.1.pack, b.1.offset)));
    let mut out = Vec::with_capacity(located.len());
    let mut at = 0;
    while at < sorted.len() {
        let first = sorted[at].1;
        let mut end = at + 1;
        let mut range_end = first.offset + first.stored as u64;
        while end < sorted.len() {
            let next = sorted[end].1;
            if next.pack != first.pack
                || next.offset > range_end + GAP
                || next.offset + next.stored as u64 - first.offset > MAX_READ
            {
                break;
            }
            range_end = range_end.max(next.offset + next.stored as u64);
            end += 1;
        }
        let read = store.get_range(&first.pack, first.offset..range_end).await;
        for &&(i, location) in &sorted[at..end] {
            let piece = match &read {
                Ok(Some(bytes)) => {
                    let start = (location.offset - first.offset) as usize;
                    Ok(bytes[start..start + location.stored as usize].to_vec())
                }
                Ok(None) => Err(corrupt(&format!("pack {} is gone", first.pack))),
                Err(e) => Err(e.clone()),
            };
            out.push((i, piece));
        }
        at = end;
    }
    out
}
