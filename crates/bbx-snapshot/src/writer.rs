//! The snapshot writer: turns an agent's parts into chunks on a blocking
//! thread (cut, hashed, compressed once, added to a pack per store that lacks
//! the chunk), while an async task uploads each sealed pack. The channel
//! between them holds two packs, so a snapshot of any size holds a bounded
//! number of packs in memory and uploads while it chunks.

use crate::chunk::{self, ChunkId, ChunkRef, Chunker};
use crate::manifest::{PartRef, Stats, encode_record};
use crate::pack::{PackBuilder, SealedPack};
use crate::repo::{ChunkIndex, Repository};
use bbx_core::{Error, Result};
use std::collections::HashSet;
use std::sync::Arc;

/// Packs waiting to be uploaded, at most.
const QUEUED_PACKS: usize = 2;
/// The nice value a snapshot's reading and chunking run at: on busy cores the
/// ring's durable path (journal, committer) goes first.
const SNAPSHOT_NICE: i32 = 10;

/// Starts `work` now on a thread of its own at [`SNAPSHOT_NICE`]; what it
/// gives comes with the future. `work` is told whether the future was dropped
/// (its op timed out or was cancelled), to stop early.
pub(crate) fn in_background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce(&dyn Fn() -> bool) -> Result<T> + Send + 'static,
) -> impl std::future::Future<Output = Result<T>> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        bbx_store::sched::lower_priority(SNAPSHOT_NICE);
        let outcome = work(&|| answer.is_closed());
        let _ = answer.send(outcome);
    });
    async move {
        started.map_err(|e| Error::internal(format!("cannot start the snapshot writer: {e}")))?;
        answered
            .await
            .map_err(|_| Error::internal("the snapshot writer stopped"))?
    }
}

/// How chunks are cut and compressed.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSettings {
    pub avg_bytes: u32,
    pub zstd_level: i32,
    /// The most bytes chunked per second (0: no limit).
    pub bytes_per_sec: u64,
}

/// One part to write: its name and its records, in key order.
pub struct PartData {
    pub name: String,
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What was written: each part's reference, the stats, and the stores that
/// hold every chunk the parts need.
pub struct Written {
    pub parts: Vec<PartRef>,
    pub stats: Stats,
    pub stores: Vec<usize>,
}

/// Writes the parts' chunks to every readable store that lacks them.
pub async fn write_parts(repo: &Arc<Repository>, parts: Vec<PartData>, settings: ChunkSettings) -> Result<Written> {
    let indexes = repo.indexes().await;
    let targets: Vec<usize> = (0..indexes.len()).filter(|&i| indexes[i].is_some()).collect();
    repo.check_quorum(targets.len(), &["the other stores cannot be read".to_owned()])?;
    let (packs, mut sealed) = tokio::sync::mpsc::channel::<(usize, SealedPack)>(QUEUED_PACKS);
    let known: Vec<Arc<ChunkIndex>> = targets
        .iter()
        .map(|&i| indexes[i].clone().expect("targets are readable"))
        .collect();
    let chunking = in_background("bbx-snapshot", {
        let targets = targets.clone();
        move |abandoned| {
            let mut writer = PartWriter {
                abandoned,
                pace: Pace::new(settings.bytes_per_sec),
                settings,
                builders: targets.iter().map(|_| PackBuilder::default()).collect(),
                targets,
                known,
                added: HashSet::new(),
                packs,
                stats: Stats::default(),
            };
            let mut refs = Vec::with_capacity(parts.len());
            for part in parts {
                refs.push(writer.part(part)?);
            }
            writer.flush_all()?;
            Ok::<_, Error>((refs, writer.stats))
        }
    });
    let mut failed: Vec<(usize, String)> = Vec::new();
    let mut written_bytes = vec![0u64; repo.replicas.len()];
    while let Some((replica, pack)) = sealed.recv().await {
        if failed.iter().any(|(f, _)| *f == replica) {
            continue;
        }
        match repo.put_pack(replica, &pack).await {
            Ok(()) => written_bytes[replica] += pack.bytes.len() as u64,
            Err(e) => failed.push((replica, e.to_string())),
        }
    }
    let (parts, mut stats) = chunking.await?;
    let stores: Vec<usize> = targets
        .into_iter()
        .filter(|t| !failed.iter().any(|(f, _)| f == t))
        .collect();
    let failures: Vec<String> = failed.into_iter().map(|(_, e)| e).collect();
    repo.check_quorum(stores.len(), &failures)?;
    stats.bytes_written = stores.iter().map(|&s| written_bytes[s]).max().unwrap_or(0);
    Ok(Written { parts, stats, stores })
}

/// Holds a writer to a rate: after each piece, it sleeps until the bytes so
/// far are due.
struct Pace {
    bytes_per_sec: u64,
    started: std::time::Instant,
    done: u64,
}

impl Pace {
    fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec,
            started: std::time::Instant::now(),
            done: 0,
        }
    }

    fn took(&mut self, bytes: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.done += bytes as u64;
        let due = std::time::Duration::from_secs_f64(self.done as f64 / self.bytes_per_sec as f64);
        let early = due.saturating_sub(self.started.elapsed());
        // Slept in steps of a few ms: sleeping after every small record costs more than it saves.
        if early >= std::time::Duration::from_millis(2) {
            std::thread::sleep(early);
        }
    }
}

struct PartWriter<'a> {
    /// Whether the snapshot's op no longer waits for it.
    abandoned: &'a dyn Fn() -> bool,
    settings: ChunkSettings,
    pace: Pace,
    /// Stores being written to, and what each held before.
    targets: Vec<usize>,
    known: Vec<Arc<ChunkIndex>>,
    builders: Vec<PackBuilder>,
    /// Chunks this snapshot already added.
    added: HashSet<ChunkId>,
    packs: tokio::sync::mpsc::Sender<(usize, SealedPack)>,
    stats: Stats,
}

impl PartWriter<'_> {
    fn part(&mut self, part: PartData) -> Result<PartRef> {
        let mut data = Vec::new();
        let mut bytes = 0u64;
        let mut chunker = Chunker::new(self.settings.avg_bytes);
        let mut record = Vec::new();
        for (key, value) in &part.records {
            if (self.abandoned)() {
                return Err(Error::unavailable("the snapshot was abandoned (its op ended)"));
            }
            record.clear();
            encode_record(key, value, &mut record);
            bytes += record.len() as u64;
            self.pace.took(record.len());
            chunker.push(&record, &mut |raw: &[u8]| {
                data.push(self.chunk(raw)?);
                Ok(())
            })?;
        }
        chunker.finish(&mut |raw: &[u8]| {
            data.push(self.chunk(raw)?);
            Ok(())
        })?;
        let mut list_bytes = Vec::with_capacity(data.len() * chunk::REF_BYTES);
        data.iter().for_each(|reference| reference.encode(&mut list_bytes));
        // A list's chunks are smaller: an edit then rewrites less of it.
        let mut list = Vec::new();
        let mut chunker = Chunker::new((self.settings.avg_bytes / 4).max(1024));
        chunker.push(&list_bytes, &mut |raw: &[u8]| {
            list.push(self.chunk(raw)?);
            Ok(())
        })?;
        chunker.finish(&mut |raw: &[u8]| {
            list.push(self.chunk(raw)?);
            Ok(())
        })?;
        self.stats.bytes += bytes;
        Ok(PartRef {
            name: part.name,
            records: part.records.len() as u64,
            bytes,
            list,
        })
    }

    fn chunk(&mut self, raw: &[u8]) -> Result<ChunkRef> {
        let reference = ChunkRef {
            id: ChunkId::of(raw),
            len: raw.len() as u32,
        };
        self.stats.chunks += 1;
        if !self.added.insert(reference.id) {
            return Ok(reference);
        }
        let lacking: Vec<usize> = (0..self.targets.len())
            .filter(|&t| !self.known[t].contains_key(&reference.id))
            .collect();
        if lacking.is_empty() {
            return Ok(reference);
        }
        let stored = chunk::compress(raw, self.settings.zstd_level)?;
        self.stats.new_chunks += 1;
        for t in lacking {
            self.builders[t].add(reference, &stored);
            if self.builders[t].is_full() {
                self.send(t)?;
            }
        }
        Ok(reference)
    }

    fn send(&mut self, t: usize) -> Result<()> {
        let sealed = std::mem::take(&mut self.builders[t]).seal();
        self.packs
            .blocking_send((self.targets[t], sealed))
            .map_err(|_| Error::internal("the snapshot uploader stopped"))
    }

    fn flush_all(&mut self) -> Result<()> {
        for t in 0..self.targets.len() {
            if !self.builders[t].is_empty() {
                self.send(t)?;
            }
        }
        Ok(())
    }
}

/// Reads a part's records back from the repository.
pub async fn read_part(repo: &Repository, part: &PartRef) -> Result<crate::manifest::Records> {
    let list: Vec<u8> = repo.read_chunks(&part.list).await?.concat();
    let refs = ChunkRef::decode_list(&list)?;
    // The list's lengths are checked (its chunks are); the manifest's total
    // must agree before anything is sized by it.
    // Chunks are never larger than this (four times the largest average): a
    // list that says otherwise is damaged, and sizes nothing.
    if refs.iter().any(|r| r.len > 4 << 20) {
        return Err(chunk::corrupt(&format!(
            "part {} lists a chunk larger than any chunk",
            part.name
        )));
    }
    let total: u64 = refs.iter().map(|r| r.len as u64).sum();
    if total != part.bytes {
        return Err(chunk::corrupt(&format!(
            "part {} is not as long as its manifest says",
            part.name
        )));
    }
    let mut stream = Vec::with_capacity(total as usize);
    // In slices, so a large part is not read in one go.
    for slice in refs.chunks(4096) {
        for raw in repo.read_chunks(slice).await? {
            stream.extend_from_slice(&raw);
        }
    }
    crate::manifest::decode_records(&stream)
}
