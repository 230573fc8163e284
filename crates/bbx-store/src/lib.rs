//! Durable storage for every component: fjall keyspaces behind one group-commit
//! writer, sharing the AgentRing's write-ahead journal.
//!
//! `bbx-store` owns the one place anything is written, and guarantees:
//! - **Acknowledged means on disk.** A write is a [`Staged`] value sent to the
//!   committer thread, which drains whatever has queued up, lets each write check
//!   its preconditions against the database plus the writes staged before it in
//!   the same group ([`GroupTx`]), and stages those that hold. The group goes to
//!   the journal as redo records ([`redo`]), sharing the journal's `fdatasync` with
//!   op acceptances; only once that returns is it applied to fjall as one atomic
//!   batch, a new snapshot published, and every writer answered.
//! - **Atomic groups.** Writes sent together commit together: the ring records an
//!   op's completion and the effect a component staged for it in one group, so
//!   after a crash either both are there or neither is.
//! - **Linearized compare-and-swap.** Writes are checked one after another on one
//!   thread, so exactly one of many concurrent CAS writes on a key wins.
//! - **Recovery.** On open, the redo records after the journal's checkpoint are
//!   replayed (each sets keys to absolute values, so replaying twice is harmless).
//!   Once a second fjall is made durable on a thread of its own and the journal may
//!   drop the records it covered.
//!
//! Components plug in without touching this crate: each declares its keyspaces
//! ([`KeyspaceDef`], with an id fixed forever, since redo records carry it) and
//! implements [`Staged`] for its writes; state a component keeps on the committer
//! thread across groups (a cache of what it last wrote) is a [`CommitterCache`].
//! [`journal`] is the journal's writer thread, [`sched`] the thread priorities both
//! threads ask for.

mod committer;
mod group;
pub mod journal;
pub mod redo;
pub mod sched;

pub use group::{CommitterCache, GroupTx, StagedWrites};
pub use journal::{JournalMetrics, JournalWriter};

use bbx_core::{Error, Result};
use committer::{Committer, Message, Request};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Snapshot};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, oneshot};

/// A keyspace a component stores in. The id is what redo records name it by, so
/// it never changes once data was written with it; ids are unique across all
/// components (the store refuses to open with two alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyspaceDef {
    pub id: u8,
    pub name: &'static str,
}

/// A write the committer applies atomically, or not at all.
pub trait Staged: Send + std::fmt::Debug + 'static {
    /// Checks the write's preconditions against `tx`, then stages it. Every
    /// fallible read must come before the first `put`/`remove`, so that a write
    /// that fails stages nothing.
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied>;
}

/// Puts values into `target` under the keys that `guard` still holds, in one
/// write: what a component records beside a record that may have been
/// deleted since (when an item was last read, say).
#[derive(Debug)]
pub struct PutWherePresent {
    pub guard: KeyspaceDef,
    pub target: KeyspaceDef,
    pub writes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Staged for PutWherePresent {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        tx.all_or_nothing(|tx| {
            for (key, value) in &self.writes {
                if tx.read(self.guard, key)?.is_some() {
                    tx.put(self.target, key.clone(), value.clone());
                }
            }
            Ok(Applied::Done)
        })
    }
}

/// What a staged write reports back.
pub enum Applied {
    Done,
    /// A bounded step that has more to do.
    More,
    /// The new version of a versioned key.
    Version(u64),
    /// Anything else a component's write returns; see [`Applied::output`].
    Output(Box<dyn Any + Send>),
}

impl Applied {
    pub fn output(value: impl Any + Send) -> Self {
        Self::Output(Box::new(value))
    }

    /// The value an [`Applied::Output`] carries, if it is a `T`.
    pub fn into_output<T: Any>(self) -> Result<T> {
        match self {
            Self::Output(value) => value
                .downcast::<T>()
                .map(|boxed| *boxed)
                .map_err(|_| Error::internal("a store write answered with an unexpected type")),
            _ => Err(Error::internal("a store write answered without its output")),
        }
    }
}

impl std::fmt::Debug for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Done => f.write_str("Done"),
            Self::More => f.write_str("More"),
            Self::Version(version) => write!(f, "Version({version})"),
            Self::Output(_) => f.write_str("Output(..)"),
        }
    }
}

/// Outputs are compared by nothing: two are never equal.
impl PartialEq for Applied {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Done, Self::Done) | (Self::More, Self::More) => true,
            (Self::Version(a), Self::Version(b)) => a == b,
            _ => false,
        }
    }
}

/// Counters and histograms of the write path, shown in `/metrics` and `bbx status`.
#[derive(Clone)]
pub struct StoreMetrics {
    pub writes: Counter,
    pub syncs: Counter,
    pub group_size: Histogram,
    pub sync_seconds: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            writes: Counter::default(),
            syncs: Counter::default(),
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            sync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }
}

impl StoreMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bbx_store_writes",
            "Writes acknowledged once durable in the journal",
            self.writes.clone(),
        );
        registry.register(
            "bbx_store_syncs",
            "Groups the committer made durable (each one journal append)",
            self.syncs.clone(),
        );
        registry.register(
            "bbx_store_group_size",
            "Writes made durable by one journal append",
            self.group_size.clone(),
        );
        registry.register(
            "bbx_store_sync_seconds",
            "Time to journal and apply one group",
            self.sync_seconds.clone(),
        );
    }
}

/// The keyspaces the store opened, by id.
#[derive(Clone)]
pub(crate) struct Keyspaces {
    by_id: Arc<[Option<Keyspace>]>,
}

impl Keyspaces {
    fn open(db: &Database, defs: &[KeyspaceDef]) -> Result<Self> {
        let len = defs.iter().map(|d| usize::from(d.id) + 1).max().unwrap_or(0);
        let mut by_id: Vec<Option<Keyspace>> = vec![None; len];
        for def in defs {
            if by_id[usize::from(def.id)].is_some() || defs.iter().filter(|d| d.name == def.name).count() > 1 {
                return Err(Error::internal(format!(
                    "keyspace {} (id {}) is declared twice",
                    def.name, def.id
                )));
            }
            let keyspace = db
                .keyspace(def.name, KeyspaceCreateOptions::default)
                .map_err(|e| storage_error("open a keyspace", e))?;
            by_id[usize::from(def.id)] = Some(keyspace);
        }
        Ok(Self { by_id: by_id.into() })
    }

    /// The keyspace of `id`; an id that names none (only a bug or a corrupt redo
    /// record could carry one) is an error.
    pub(crate) fn get(&self, id: u8) -> Result<&Keyspace> {
        self.by_id
            .get(usize::from(id))
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::internal(format!("a store write names keyspace {id}, which does not exist")))
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// Opens the database, holding its lock: a second kernel on the same data directory
/// is refused with one clear error.
pub fn open_database(dir: &Path) -> Result<Database> {
    Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .map_err(|e| match e {
            fjall::Error::Locked => Error::unavailable(format!(
                "{} is in use by another BBX kernel; stop it or choose another --data-dir",
                dir.display()
            )),
            e => storage_error("open the database", e),
        })
}

/// How the store runs.
pub struct StoreOptions {
    /// Most writes one group takes.
    pub commit_max_batch: usize,
    /// The largest journal record (a group larger is split across several).
    pub max_record: usize,
    /// The committer thread's nice value where it is above the process's own (0
    /// leaves it as the process has it; see [`sched`]).
    pub committer_nice: i32,
    /// The lsn the journal gives its next record, as it opened: the position of
    /// the store's first view ([`Store::view_at`]).
    pub next_lsn: bbx_journal::Lsn,
}

/// The view readers use and its journal position, replaced by the committer
/// after each group.
type DurableView = Arc<parking_lot::RwLock<(Arc<Snapshot>, bbx_journal::Lsn)>>;

/// Whether storage failed, and why (the first failure): every write since is
/// refused, and the kernel says why it is not ready.
#[derive(Default)]
pub(crate) struct Failure {
    failed: AtomicBool,
    why: parking_lot::Mutex<Option<String>>,
}

impl Failure {
    pub(crate) fn fail(&self, why: impl Into<String>) {
        self.why.lock().get_or_insert_with(|| why.into());
        self.failed.store(true, Ordering::Release);
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub(crate) fn why(&self) -> Option<String> {
        self.has_failed().then(|| self.why.lock().clone()).flatten()
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.why() {
            Some(why) => write!(f, "storage failed earlier: {why}"),
            None => f.write_str("storage failed earlier"),
        }
    }
}

pub struct Store {
    db: Database,
    keyspaces: Keyspaces,
    writer: mpsc::Sender<Message>,
    committer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    failed: Arc<Failure>,
    metrics: StoreMetrics,
    /// The snapshot readers use, replaced by the committer after each group.
    durable: DurableView,
    journal: JournalWriter,
    /// The committer thread, whose nice value `wal_status` reads live.
    committer_thread: rustix::process::Pid,
}

impl Store {
    /// Opens `keyspaces` in `db` (opened, and so locked, with [`open_database`]
    /// before the journal was), replays the redo records among `recovered` (the
    /// journal's records after its checkpoint) and makes the result durable, then
    /// starts the committer, which journals through `journal`. Returns once the
    /// committer has taken its priority.
    pub fn open(
        db: Database,
        keyspaces: &[KeyspaceDef],
        journal: JournalWriter,
        recovered: &[bbx_journal::Record],
        options: StoreOptions,
    ) -> Result<Self> {
        let keyspaces = Keyspaces::open(&db, keyspaces)?;
        let groups = redo::groups(recovered.iter().map(|r| r.payload.as_slice()))?;
        if !groups.is_empty() {
            let replayed = groups.len();
            for group in groups {
                let writes = group
                    .iter()
                    .map(|(index, key, value)| (*index, key.as_slice(), value.as_deref()));
                committer::apply(&db, &keyspaces, writes)?;
            }
            db.persist(PersistMode::SyncData)
                .map_err(|e| storage_error("fdatasync", e))?;
            tracing::info!(groups = replayed, "replayed store writes from the journal");
        }
        // Everything the redo records said is durable in fjall now.
        let replayed: Vec<bbx_journal::Lsn> = recovered
            .iter()
            .filter(|r| redo::is_redo(&r.payload))
            .map(|r| r.lsn)
            .collect();
        journal.release(replayed);
        let (writer, requests) = mpsc::channel(options.commit_max_batch.max(1024));
        let failed = Arc::new(Failure::default());
        let metrics = StoreMetrics::default();
        let durable = Arc::new(parking_lot::RwLock::new((Arc::new(db.snapshot()), options.next_lsn)));
        let committer = Committer::new(
            db.clone(),
            keyspaces.clone(),
            failed.clone(),
            metrics.clone(),
            durable.clone(),
            journal.clone(),
            &options,
        )?;
        let nice = options.committer_nice;
        let (started, thread) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("bbx-committer".into())
            .spawn(move || {
                if nice > 0 {
                    let in_force = sched::lower_priority(nice);
                    tracing::debug!(asked = nice, in_force = ?in_force, "the committer's nice value");
                }
                let _ = started.send(rustix::thread::gettid());
                committer.run(requests)
            })
            .map_err(|e| Error::internal(format!("cannot start the committer thread: {e}")))?;
        let committer_thread = thread
            .recv()
            .map_err(|_| Error::internal("the committer thread stopped as it started"))?;
        Ok(Self {
            db,
            keyspaces,
            writer,
            committer: parking_lot::Mutex::new(Some(handle)),
            committer_thread,
            failed,
            metrics,
            durable,
            journal,
        })
    }

    /// The committer thread's nice value, read now; `None` where it cannot be read.
    /// Meaningful only while the store is open: once the thread is gone, its id may
    /// name another thread.
    pub fn committer_nice(&self) -> Option<i32> {
        rustix::process::getpriority_process(Some(self.committer_thread)).ok()
    }

    /// Asks the committer to make fjall durable if a checkpoint is due; a kernel
    /// calls this once a second so that an idle store still lets the journal go.
    pub fn checkpoint(&self) {
        let _ = self.writer.try_send(Message::Checkpoint);
    }

    /// Queues a write and waits until it is durable (or refused).
    pub async fn write(&self, write: impl Staged) -> Result<Applied> {
        self.write_all(vec![Box::new(write)])
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::internal("the committer answered no write")))
    }

    /// Writes that commit in one group, each with its own outcome, in order. The
    /// ring completes a whole dispatch batch this way: one message and one wakeup
    /// instead of one per op.
    pub async fn write_all(&self, writes: Vec<Box<dyn Staged>>) -> Vec<Result<Applied>> {
        let count = writes.len();
        let failed = |error: Error| (0..count).map(|_| Err(error.clone())).collect();
        let (reply, answer) = oneshot::channel();
        if self
            .writer
            .send(Message::Write(Request { writes, reply }))
            .await
            .is_err()
        {
            return failed(Error::unavailable("the kernel is shutting down"));
        }
        answer
            .await
            .unwrap_or_else(|_| failed(Error::unavailable("the storage writer stopped")))
    }

    /// Queues `write` now, behind every write queued before this call returns,
    /// and gives back what answers once it is durable (or refused). A caller that
    /// must keep its writes in order queues them under its lock and waits for
    /// them outside it, so that a sync does not hold the lock.
    pub async fn queue<W: Staged>(&self, write: W) -> impl Future<Output = Result<Applied>> + use<W> {
        let (reply, answer) = oneshot::channel();
        let queued = match self.writer.reserve().await {
            Ok(permit) => {
                permit.send(Message::Write(Request {
                    writes: vec![Box::new(write)],
                    reply,
                }));
                true
            }
            Err(_) => false,
        };
        async move {
            if !queued {
                return Err(Error::unavailable("the kernel is shutting down"));
            }
            answer
                .await
                .map_err(|_| Error::unavailable("the storage writer stopped"))?
                .pop()
                .unwrap_or_else(|| Err(Error::internal("the committer answered no write")))
        }
    }

    /// Stops accepting writes, lets the committer finish what is queued and make
    /// fjall durable, waits, and then stops the journal (the store is its last
    /// writer).
    pub async fn close(&self) {
        let _ = self.writer.send(Message::Shutdown).await;
        let handle = self.committer.lock().take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.journal.close().await;
    }

    /// The database as of the last journaled group: what readers may see. A write
    /// becomes visible here only once it is durable, so nobody can read a value that
    /// a crash would then take back.
    pub fn view(&self) -> Arc<Snapshot> {
        self.durable.read().0.clone()
    }

    /// [`Store::view`] with its position in the journal: every store write not
    /// in the view has an lsn at or above it (a point-in-time recovery replays
    /// the journal's history from there onto what was read in this view).
    pub fn view_at(&self) -> (Arc<Snapshot>, bbx_journal::Lsn) {
        let view = self.durable.read();
        (view.0.clone(), view.1)
    }

    /// A keyspace the store opened, for reads through [`Store::view`].
    pub fn keyspace(&self, def: KeyspaceDef) -> &Keyspace {
        self.keyspaces
            .get(def.id)
            .expect("components read only keyspaces the store was opened with")
    }

    /// The database itself, for reads that need no snapshot.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Whether a write failed in a way that leaves storage in doubt: every write
    /// since is refused, and the kernel reports itself not ready.
    pub fn has_failed(&self) -> bool {
        self.failed.has_failed()
    }

    /// Why storage failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.why()
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}

pub fn storage_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("storage failed to {what}: {e}"))
}

/// A database and its keyspaces with no committer thread and no journal: groups
/// are staged and applied by hand, so that a component can test its writes'
/// group semantics (what a write sees of the writes before it, what a refused one
/// leaves) one group at a time.
pub struct DetachedStore {
    db: Database,
    keyspaces: Keyspaces,
    caches: group::Caches,
}

impl DetachedStore {
    pub fn open(dir: &Path, keyspaces: &[KeyspaceDef]) -> Result<Self> {
        let db = Database::builder(dir)
            .open()
            .map_err(|e| storage_error("open the database", e))?;
        let keyspaces = Keyspaces::open(&db, keyspaces)?;
        Ok(Self {
            db,
            keyspaces,
            caches: group::Caches::default(),
        })
    }

    /// Runs `stage` on a new group with values up to `max_value` bytes, then
    /// applies what it staged to the database; returns what `stage` returned.
    pub fn group<T>(&mut self, max_value: usize, stage: impl FnOnce(&mut GroupTx<'_>) -> T) -> Result<T> {
        let mut tx = GroupTx::new(&self.keyspaces, max_value, &mut self.caches);
        let staged = stage(&mut tx);
        committer::apply(&self.db, &self.keyspaces, tx.writes())?;
        let writes = tx.into_staged();
        self.caches.committed(&writes);
        Ok(staged)
    }

    pub fn keyspace(&self, def: KeyspaceDef) -> &Keyspace {
        self.keyspaces
            .get(def.id)
            .expect("a keyspace this store was opened with")
    }

    pub fn database(&self) -> &Database {
        &self.db
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: KeyspaceDef = KeyspaceDef { id: 0, name: "one" };
    const TWO: KeyspaceDef = KeyspaceDef { id: 1, name: "two" };

    #[test]
    fn a_write_to_a_keyspace_that_does_not_exist_fails_the_batch_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = DetachedStore::open(dir.path(), &[ONE, TWO]).unwrap();
        let writes = [(0, b"k".as_slice(), Some(b"v".as_slice())), (7, b"k".as_slice(), None)];
        let error = committer::apply(&store.db, &store.keyspaces, writes.into_iter()).unwrap_err();
        assert!(error.message.contains("keyspace 7"), "{}", error.message);
        assert!(
            store.keyspace(ONE).get(b"k").unwrap().is_none(),
            "nothing of the batch landed"
        );
    }

    #[test]
    fn keyspaces_are_declared_once() {
        let dir = tempfile::tempdir().unwrap();
        let twin = KeyspaceDef { id: 0, name: "twin" };
        assert!(DetachedStore::open(dir.path(), &[ONE, twin]).is_err());
        let renamed = KeyspaceDef { id: 3, name: "one" };
        assert!(DetachedStore::open(dir.path(), &[ONE, renamed]).is_err());
    }

    #[test]
    fn a_group_reads_its_own_writes_over_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DetachedStore::open(dir.path(), &[ONE, TWO]).unwrap();
        store
            .group(usize::MAX, |tx| tx.put(ONE, b"k".to_vec(), b"1".to_vec()))
            .unwrap();
        let seen = store
            .group(usize::MAX, |tx| {
                let before = tx.read(ONE, b"k").unwrap();
                tx.remove(ONE, b"k".to_vec());
                (before, tx.read(ONE, b"k").unwrap(), tx.read(TWO, b"k").unwrap())
            })
            .unwrap();
        assert_eq!(seen, (Some(b"1".to_vec()), None, None));
        assert!(store.keyspace(ONE).get(b"k").unwrap().is_none());
    }

    #[test]
    fn keys_under_a_prefix_are_the_stored_ones_with_the_groups_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DetachedStore::open(dir.path(), &[ONE, TWO]).unwrap();
        store
            .group(usize::MAX, |tx| {
                for key in ["a/1", "a/2", "b/1"] {
                    tx.put(ONE, key.into(), b"v".to_vec());
                }
            })
            .unwrap();
        let keys = store
            .group(usize::MAX, |tx| {
                tx.remove(ONE, b"a/1".to_vec());
                tx.put(ONE, b"a/0".to_vec(), b"v".to_vec());
                tx.put(ONE, b"a/2".to_vec(), b"w".to_vec());
                tx.put(ONE, b"c/1".to_vec(), b"v".to_vec());
                tx.keys_with_prefix(ONE, b"a/").unwrap()
            })
            .unwrap();
        assert_eq!(keys, [b"a/0".to_vec(), b"a/2".to_vec()]);
    }

    #[test]
    fn a_part_that_fails_leaves_the_group_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = DetachedStore::open(dir.path(), &[ONE, TWO]).unwrap();
        let seen = store
            .group(usize::MAX, |tx| {
                tx.put(ONE, b"before".to_vec(), b"1".to_vec());
                let failed = tx.all_or_nothing(|tx| {
                    tx.put(ONE, b"part".to_vec(), b"2".to_vec());
                    tx.remove(ONE, b"before".to_vec());
                    Err::<(), _>(bbx_core::Error::internal("the second part failed"))
                });
                let kept = tx.all_or_nothing(|tx| {
                    tx.put(TWO, b"part".to_vec(), b"3".to_vec());
                    Ok(())
                });
                // Nested: what an inner part kept, its failing outer part undoes.
                let outer = tx.all_or_nothing(|tx| {
                    tx.all_or_nothing(|tx| {
                        tx.put(ONE, b"before".to_vec(), b"inner".to_vec());
                        Ok(())
                    })?;
                    tx.put(ONE, b"nested".to_vec(), b"4".to_vec());
                    Err::<(), _>(bbx_core::Error::internal("the outer part failed"))
                });
                (
                    (failed.is_err(), kept.is_ok(), outer.is_err()),
                    tx.read(ONE, b"before").unwrap(),
                    tx.read(ONE, b"part").unwrap(),
                    tx.read(ONE, b"nested").unwrap(),
                )
            })
            .unwrap();
        assert_eq!(seen, ((true, true, true), Some(b"1".to_vec()), None, None));
        assert_eq!(
            store.keyspace(TWO).get(b"part").unwrap().as_deref(),
            Some(b"3".as_slice())
        );
    }
}
