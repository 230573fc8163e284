//! Durable storage: fjall keyspaces behind one group-commit writer.
//!
//! Reads go to a snapshot of fjall from any thread. Every write is a [`Write`] sent
//! to the committer thread, which drains whatever has queued up (up to
//! `commit_max_batch` writes), checks each write's preconditions against the
//! database plus the writes staged earlier in the same group, and stages the ones
//! that hold. The staged group goes to the journal as redo records
//! ([`crate::redo`]), sharing the journal's `fdatasync` with op acceptances; once
//! that returns, the group is applied to fjall as one atomic batch (not synced), a
//! new snapshot is published, and every writer is answered. So each acknowledged
//! write is on disk (in the journal), concurrent compare-and-swaps on one key are
//! linearized (exactly one wins per version), 256 concurrent writers cost a handful
//! of syncs, and the disk sees one stream of syncs, not two. Once a second the
//! committer makes fjall itself durable (a checkpoint) and lets the journal drop the
//! redo records that covered it; on open, the records after the checkpoint are
//! replayed.
//!
//! Layout (all keys big-endian or raw bytes, so key order is the listing order):
//! - `agents`:   agent id (16 bytes)                 -> Agent as JSON
//! - `tenants`:  tenant, 0x00, agent id               -> empty (index for listing by tenant)
//! - `state`:    agent id (16 bytes), state key bytes -> version u64, updated_at ms i64, JSON
//! - `api_keys`: key id (16 bytes)                    -> StoredKey as JSON
//! - `meta`:     name                                 -> value (agent count as u64)
//! - `ops`:      op id (16 bytes, time-ordered)       -> Completion as JSON
//! - `idem`:     agent id (16 bytes), idempotency key -> op id (16 bytes), args digest
//! - `doubt`:    op id (16 bytes)                    -> the journal entry of an op in doubt
//! - `quotas`:   node (`tenant/NAME`, `agent/ID`)      -> QuotaLimits as JSON
//! - `spend`:    node `|` window (`2026-11-24`, `2026-11`) -> micro-dollars spent (u64)

use crate::auth::StoredKey;
use crate::journal::JournalWriter;
use crate::redo;
use bbx_core::model::Agent;
use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use chrono::{DateTime, Utc};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rustc_hash::FxHashSet;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

const AGENT_COUNT: &[u8] = b"agent_count";
/// How often fjall is made durable, so that the journal can drop the redo records
/// it holds for it.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const PURGE_PREFIX: &[u8] = b"purge/";

/// The `meta` key that says a deleted agent's state is still to be removed.
fn purge_marker(agent: &AgentId) -> Vec<u8> {
    [PURGE_PREFIX, agent.as_bytes()].concat()
}

/// A write the committer applies atomically, or not at all.
#[derive(Debug)]
pub(crate) enum Write {
    CreateAgent(Agent),
    DeleteAgent(AgentId),
    SetState {
        agent: AgentId,
        key: String,
        value: Vec<u8>,
        if_version: Option<u64>,
        at: DateTime<Utc>,
    },
    DeleteState {
        agent: AgentId,
        key: String,
        if_version: Option<u64>,
        at: DateTime<Utc>,
    },
    PutKey(StoredKey),
    /// Removes up to `max_keys` state keys of a deleted agent; done when fewer remain.
    PurgeState {
        agent: AgentId,
        max_keys: usize,
    },
    /// Records an op's completion and, for a kernel-service op, applies its effect in
    /// the same atomic batch: after a crash either both are there or neither is. An
    /// effect that fails turns the completion into that error and changes nothing.
    Complete {
        completion: Arc<Completion>,
        effect: Option<Effect>,
        /// The args digest, recorded with the key so a later duplicate is recognized.
        digest: Option<String>,
        /// For an `in_doubt` completion: the op's journal entry, kept until an
        /// operator resolves it.
        doubt: Option<Vec<u8>>,
        /// Micro-dollars to add to each of these spend counters.
        charge: Option<(Vec<String>, u64)>,
    },
    /// Settles an op in doubt: replaces its completion with `completion`, or, with
    /// none, removes it so the op can run again. Refused unless the op is in doubt.
    Resolve {
        op_id: OpId,
        completion: Option<Box<Completion>>,
    },
    /// Sets (or with `None` removes) a quota node's limits.
    PutQuota {
        node: String,
        limits: Option<Vec<u8>>,
    },
    /// Forgets up to `max` completions (and their idempotency keys) of ops that
    /// completed before `before`.
    ExpireOps {
        before: DateTime<Utc>,
        max: usize,
    },
}

/// What a kernel-service op does to its agent's state.
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    Set {
        key: String,
        value: Vec<u8>,
    },
    /// Adds to a number, creating the key at 0.
    Incr {
        key: String,
        by: serde_json::Number,
    },
    Delete {
        key: String,
    },
}

/// What an applied write reports back.
#[derive(Debug, PartialEq)]
pub(crate) enum Applied {
    Done,
    /// A bounded step that has more to do.
    More,
    /// The new version of a state key.
    Version(u64),
    /// The completion as recorded.
    Completed(Box<Completion>),
    /// The journal entry of a resolved op.
    Resolved(Vec<u8>),
    /// Completions forgotten by one expiry step, and whether more are due.
    Expired {
        count: usize,
        more: bool,
    },
}

/// Writes sent together, answered together: each is applied on its own (one may
/// fail while the others land) but all of them commit in the same group.
struct Request {
    writes: Vec<Write>,
    reply: oneshot::Sender<Vec<Result<Applied>>>,
}

enum Message {
    Write(Request),
    /// Make fjall durable if a checkpoint is due.
    Checkpoint,
    /// Commit what is queued, refuse what comes after, and stop.
    Shutdown,
}

#[derive(Clone)]
pub(crate) struct Keyspaces {
    pub agents: Keyspace,
    pub tenants: Keyspace,
    pub state: Keyspace,
    pub api_keys: Keyspace,
    pub meta: Keyspace,
    pub ops: Keyspace,
    pub idem: Keyspace,
    pub doubt: Keyspace,
    pub quotas: Keyspace,
    pub spend: Keyspace,
}

impl Keyspaces {
    fn open(db: &Database) -> Result<Self> {
        let open = |name: &str| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(|e| storage_error("open a keyspace", e))
        };
        Ok(Self {
            agents: open("agents")?,
            tenants: open("tenants")?,
            state: open("state")?,
            api_keys: open("api_keys")?,
            meta: open("meta")?,
            ops: open("ops")?,
            idem: open("idem")?,
            doubt: open("doubt")?,
            quotas: open("quotas")?,
            spend: open("spend")?,
        })
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

impl StoreMetrics {
    fn new() -> Self {
        Self {
            writes: Counter::default(),
            syncs: Counter::default(),
            group_size: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            sync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }

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

/// Opens the database, holding its lock: a second kernel on the same data directory
/// is refused with one clear error.
pub(crate) fn open_database(dir: &Path) -> Result<Database> {
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

pub(crate) struct Store {
    pub db: Database,
    pub ks: Keyspaces,
    writer: mpsc::Sender<Message>,
    committer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    pub failed: Arc<AtomicBool>,
    pub metrics: StoreMetrics,
    /// The snapshot readers use, replaced by the committer after each group.
    durable: Arc<parking_lot::RwLock<Arc<Snapshot>>>,
    journal: JournalWriter,
    /// The committer thread, whose nice value `wal_status` reads live.
    committer_thread: rustix::process::Pid,
}

impl Store {
    /// Replays the redo records among `recovered` (the journal's records after its
    /// checkpoint) into the database (opened, and so locked, with [`open_database`]
    /// before the journal was) and makes the result durable, then starts the
    /// committer, which journals through `journal` in records of at most
    /// `max_record` bytes and runs at nice value `committer_nice` where that is
    /// above the process's own (0 leaves it as the process has it; see
    /// [`crate::sched`]). Returns once the committer has taken its priority.
    pub fn open(
        db: Database,
        commit_max_batch: usize,
        journal: JournalWriter,
        recovered: &[bbx_journal::Record],
        max_record: usize,
        committer_nice: i32,
    ) -> Result<Self> {
        let ks = Keyspaces::open(&db)?;
        let groups = redo::groups(recovered.iter().map(|r| r.payload.as_slice()))?;
        if !groups.is_empty() {
            let replayed = groups.len();
            for group in groups {
                let writes = group
                    .iter()
                    .map(|(index, key, value)| (*index, key.as_slice(), value.as_deref()));
                apply(&db, &ks, writes)?;
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
        let (writer, requests) = mpsc::channel(commit_max_batch.max(1024));
        let failed = Arc::new(AtomicBool::new(false));
        let metrics = StoreMetrics::new();
        let durable = Arc::new(parking_lot::RwLock::new(Arc::new(db.snapshot())));
        let committer = Committer {
            db: db.clone(),
            ks: ks.clone(),
            failed: failed.clone(),
            metrics: metrics.clone(),
            durable: durable.clone(),
            max_batch: commit_max_batch,
            journal: journal.clone(),
            max_record,
            unpersisted: Vec::new(),
            last_persist: Instant::now(),
            persister: Persister::start(db.clone(), journal.clone())?,
            versions: StateVersions::default(),
        };
        let (started, thread) = std::sync::mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("bbx-committer".into())
            .spawn(move || {
                if committer_nice > 0 {
                    let in_force = crate::sched::lower_priority(committer_nice);
                    tracing::debug!(asked = committer_nice, in_force = ?in_force, "the committer's nice value");
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
            ks,
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
    pub async fn write(&self, write: Write) -> Result<Applied> {
        self.write_all(vec![write])
            .await
            .pop()
            .unwrap_or_else(|| Err(Error::internal("the committer answered no write")))
    }

    /// Writes that commit in one group, each with its own outcome, in order. The
    /// ring completes a whole dispatch batch this way: one message and one wakeup
    /// instead of one per op.
    pub async fn write_all(&self, writes: Vec<Write>) -> Vec<Result<Applied>> {
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

    /// Deleted agents whose state is still being removed.
    pub fn pending_purges(&self) -> Result<Vec<AgentId>> {
        let mut agents = Vec::new();
        for item in self.view().prefix(&self.ks.meta, PURGE_PREFIX) {
            let key = item.key().map_err(|e| storage_error("read purges", e))?;
            let id: [u8; 16] = key[PURGE_PREFIX.len()..]
                .try_into()
                .map_err(|_| Error::internal("corrupt purge marker"))?;
            agents.push(AgentId::from_bytes(id));
        }
        Ok(agents)
    }

    pub fn agent_count(&self) -> Result<u64> {
        read_count(&*self.view(), &self.ks.meta)
    }

    /// The database as of the last journaled group: what readers may see. A write
    /// becomes visible here only once it is durable, so nobody can read a value that
    /// a crash would then take back.
    pub fn view(&self) -> Arc<Snapshot> {
        self.durable.read().clone()
    }
}

struct Committer {
    db: Database,
    ks: Keyspaces,
    failed: Arc<AtomicBool>,
    metrics: StoreMetrics,
    durable: Arc<parking_lot::RwLock<Arc<Snapshot>>>,
    max_batch: usize,
    journal: JournalWriter,
    max_record: usize,
    /// Redo records of groups applied to fjall since it was last made durable.
    unpersisted: Vec<bbx_journal::Lsn>,
    last_persist: Instant,
    persister: Persister,
    versions: StateVersions,
}

/// The versions of state keys as the committer last wrote them, so that a write
/// need not look its key's version up in fjall. The committer is the only writer
/// of the `state` keyspace, so after each durable group this holds exactly what a
/// lookup would find. The lookup it saves was the store's largest cost in
/// `durable`: a memtable holding every version of a hot key is a deep skip list,
/// and finding the newest cost about a fifth of the committer's time. Bounded:
/// cleared whole when full, and when a group fails. SipHash, not Fx: callers choose
/// the keys, and colliding ones must not stall the committer.
#[derive(Default)]
struct StateVersions(std::collections::HashMap<Vec<u8>, StateVersion>);

impl StateVersions {
    const CAPACITY: usize = 65_536;

    /// Records what a durable group wrote: a key's new version, or, for a key
    /// removed (a deleted agent's state, purged), nothing.
    fn record(&mut self, written: Vec<(Vec<u8>, Option<StateVersion>)>) {
        if self.0.len() + written.len() > Self::CAPACITY {
            self.0.clear();
        }
        for (key, version) in written {
            match version {
                Some(version) => self.0.insert(key, version),
                None => self.0.remove(&key),
            };
        }
    }
}

/// Makes fjall durable on a thread of its own: `persist` syncs fjall's journal,
/// and on the committer's thread it stalled every write behind it once a second.
/// Requests that queue up while one runs are served by the next, together.
struct Persister {
    sender: Option<crossbeam_channel::Sender<Vec<bbx_journal::Lsn>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Persister {
    fn start(db: Database, journal: JournalWriter) -> Result<Self> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Vec<bbx_journal::Lsn>>();
        let thread = std::thread::Builder::new()
            .name("bbx-persister".into())
            .spawn(move || {
                // Redo records whose groups fjall does not yet hold durably.
                let mut covered = Vec::new();
                while let Ok(lsns) = receiver.recv() {
                    covered.extend(lsns);
                    covered.extend(receiver.try_iter().flatten());
                    match db.persist(PersistMode::SyncData) {
                        Ok(()) => journal.release(std::mem::take(&mut covered)),
                        // The records stay in the journal, which is all a restart
                        // needs; the next request tries again.
                        Err(e) => tracing::error!(error = %e, "the store checkpoint failed"),
                    }
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the store's persister thread: {e}")))?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Asks for fjall to be made durable; the journal then drops `lsns`.
    fn persist(&self, lsns: Vec<bbx_journal::Lsn>) {
        if let Some(sender) = &self.sender {
            let _ = sender.send(lsns);
        }
    }

    /// Serves what was asked, then stops.
    fn finish(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Committer {
    fn run(mut self, mut messages: mpsc::Receiver<Message>) {
        let mut group = Vec::new();
        while let Some(first) = messages.blocking_recv() {
            let mut next = Some(first);
            let mut writes = 0;
            while let Some(message) = next.take() {
                match message {
                    Message::Write(request) => {
                        writes += request.writes.len();
                        group.push(request);
                    }
                    Message::Checkpoint => {}
                    // Closing the queue makes later sends fail with "shutting down"
                    // while everything already queued is still drained and committed.
                    Message::Shutdown => messages.close(),
                }
                if writes < self.max_batch {
                    next = messages.try_recv().ok();
                }
            }
            if !group.is_empty() {
                let committed =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit_group(&mut group)));
                if committed.is_err() {
                    // Nothing of this group is acknowledged (its reply channels drop,
                    // so each writer hears "the storage writer stopped"), and storage
                    // is marked failed so that /readyz says so and later writes are
                    // refused rather than risked.
                    tracing::error!("the committer panicked; refusing further writes");
                    self.failed.store(true, Ordering::Release);
                    group.clear();
                }
            }
            self.checkpoint(false);
        }
        self.checkpoint(true);
    }

    /// Has fjall made durable, if a checkpoint is due (or `last`, at shutdown, when
    /// it also waits for it), so the journal may drop the redo records that fjall
    /// then holds for good.
    fn checkpoint(&mut self, last: bool) {
        if !self.unpersisted.is_empty() && (last || self.last_persist.elapsed() >= CHECKPOINT_EVERY) {
            self.last_persist = Instant::now();
            self.persister.persist(std::mem::take(&mut self.unpersisted));
        }
        if last {
            self.persister.finish();
        }
    }

    fn commit_group(&mut self, group: &mut Vec<Request>) {
        if self.failed.load(Ordering::Acquire) {
            for request in group.drain(..) {
                let refused = request
                    .writes
                    .iter()
                    .map(|_| Err(Error::unavailable("storage failed earlier; restart the kernel")))
                    .collect();
                let _ = request.reply.send(refused);
            }
            return;
        }
        let started = Instant::now();
        let mut tx = GroupTx::new(&self.ks, self.max_record / 2).knowing(&self.versions);
        let outcomes: Vec<Vec<Result<Applied>>> = group
            .iter()
            .map(|r| r.writes.iter().map(|w| tx.apply(w)).collect())
            .collect();
        let writes: usize = outcomes.iter().map(Vec::len).sum();
        let wrote = !tx.is_empty();
        let versions = tx.state_versions();
        let durable = if wrote {
            self.journal_and_apply(tx).map(|lsns| self.unpersisted.extend(lsns))
        } else {
            Ok(())
        };
        match &durable {
            Ok(()) => self.versions.record(versions),
            // What reached fjall is unknown: its own lookups decide from now on.
            Err(_) => self.versions.0.clear(),
        }
        // A failure was logged, and the store marked failed, where it happened.
        if durable.is_ok() && wrote {
            // Publish before answering: a writer that got its acknowledgement reads
            // its own write.
            *self.durable.write() = Arc::new(self.db.snapshot());
            self.metrics.syncs.inc();
            self.metrics.sync_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.group_size.observe(writes as f64);
        }
        for (request, outcome) in group.drain(..).zip(outcomes) {
            // When the group did not reach disk, every answer is that failure: a
            // conflict computed against writes that never landed would mislead.
            let outcome: Vec<Result<Applied>> = match &durable {
                Err(e) => outcome.into_iter().map(|_| Err(e.clone())).collect(),
                Ok(()) => outcome,
            };
            self.metrics
                .writes
                .inc_by(outcome.iter().filter(|o| o.is_ok()).count() as u64);
            let _ = request.reply.send(outcome);
        }
    }

    /// Journals a group and, once that is durable, applies it to fjall. A group the
    /// journal refuses as too large fails alone; any other failure fails the store,
    /// since what reached the journal is then unknown (it is replayed on restart if
    /// it did).
    fn journal_and_apply(&self, tx: GroupTx) -> Result<Vec<bbx_journal::Lsn>> {
        let records = redo::encode(tx.writes(), self.max_record / 2, self.max_record)?;
        let logged = self.journal.append_blocking(records);
        let lsns = logged.inspect_err(|e| {
            tracing::error!(error = %e, "journaling a store write failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
        })?;
        apply(&self.db, &self.ks, tx.writes()).inspect_err(|e| {
            tracing::error!(error = %e, "storage write failed; refusing further writes");
            self.failed.store(true, Ordering::Release);
        })?;
        Ok(lsns)
    }
}

/// Applies writes to fjall as one atomic batch, not synced: the journal already
/// holds them. A keyspace index that names none (only a bug or a corrupt redo
/// record could carry one) fails the batch whole.
fn apply<'a>(
    db: &Database,
    ks: &Keyspaces,
    writes: impl Iterator<Item = (u8, &'a [u8], Option<&'a [u8]>)>,
) -> Result<()> {
    let mut batch = db.batch();
    for (index, key, value) in writes {
        if usize::from(index) >= KEYSPACES {
            return Err(Error::internal(format!(
                "a store write names keyspace {index}, which does not exist"
            )));
        }
        let keyspace = keyspace(ks, index);
        match value {
            Some(value) => batch.insert(keyspace, key, value),
            None => batch.remove(keyspace, key),
        }
    }
    batch.commit().map_err(|e| storage_error("commit", e))
}

fn keyspace(ks: &Keyspaces, index: u8) -> &Keyspace {
    match index {
        AGENTS => &ks.agents,
        TENANTS => &ks.tenants,
        STATE => &ks.state,
        API_KEYS => &ks.api_keys,
        OPS => &ks.ops,
        IDEM => &ks.idem,
        DOUBT => &ks.doubt,
        QUOTAS => &ks.quotas,
        SPEND => &ks.spend,
        _ => &ks.meta,
    }
}

/// One group's writes: an overlay of staged values over the database, so that a
/// write sees the effects of the writes before it in the same group.
struct GroupTx<'a> {
    ks: &'a Keyspaces,
    /// Per keyspace index: key -> Some(value) to insert, None to remove.
    staged: [BTreeMap<Vec<u8>, Option<Vec<u8>>>; KEYSPACES],
    /// Agents found to exist earlier in the group: an effect needs only that, and
    /// a group is mostly one agent's ops. A deletion in the group clears it.
    known_agents: FxHashSet<AgentId>,
    /// The largest completion that fits in a journal record with room to spare.
    max_completion: usize,
    /// State versions the committer knows without a lookup.
    versions: Option<&'a StateVersions>,
}

const AGENTS: u8 = 0;
const TENANTS: u8 = 1;
const STATE: u8 = 2;
const API_KEYS: u8 = 3;
const META: u8 = 4;
const OPS: u8 = 5;
const IDEM: u8 = 6;
const DOUBT: u8 = 7;
const QUOTAS: u8 = 8;
const SPEND: u8 = 9;
const KEYSPACES: usize = 10;

impl<'a> GroupTx<'a> {
    fn new(ks: &'a Keyspaces, max_completion: usize) -> Self {
        Self {
            max_completion,
            ks,
            staged: Default::default(),
            known_agents: FxHashSet::default(),
            versions: None,
        }
    }

    fn knowing(self, versions: &'a StateVersions) -> Self {
        Self {
            versions: Some(versions),
            ..self
        }
    }

    /// The version each staged state write leaves its key at (none for a removal).
    fn state_versions(&self) -> Vec<(Vec<u8>, Option<StateVersion>)> {
        self.staged[STATE as usize]
            .iter()
            .map(|(key, value)| {
                let version = value
                    .as_deref()
                    .and_then(|bytes| decode_state(bytes).ok())
                    .map(|stored| StateVersion {
                        version: stored.version,
                        exists: !stored.is_tombstone(),
                    });
                (key.clone(), version)
            })
            .collect()
    }

    fn keyspace(&self, index: u8) -> &Keyspace {
        keyspace(self.ks, index)
    }

    fn read(&self, index: u8, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(staged) = self.staged[index as usize].get(key) {
            return Ok(staged.clone());
        }
        let value = self.keyspace(index).get(key).map_err(|e| storage_error("read", e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn is_empty(&self) -> bool {
        self.staged.iter().all(BTreeMap::is_empty)
    }

    /// The staged writes, by keyspace and then key.
    fn writes(&self) -> impl Iterator<Item = (u8, &[u8], Option<&[u8]>)> + Clone {
        self.staged.iter().enumerate().flat_map(|(index, writes)| {
            writes
                .iter()
                .map(move |(key, value)| (index as u8, key.as_slice(), value.as_deref()))
        })
    }

    fn put(&mut self, index: u8, key: Vec<u8>, value: Vec<u8>) {
        self.staged[index as usize].insert(key, Some(value));
    }

    fn remove(&mut self, index: u8, key: Vec<u8>) {
        self.staged[index as usize].insert(key, None);
    }

    fn load_agent(&self, id: &AgentId) -> Result<Agent> {
        let bytes = self
            .read(AGENTS, id.as_bytes())?
            .ok_or_else(|| Error::not_found("agent", id))?;
        decode_agent(&bytes)
    }

    fn agent_count(&self) -> Result<u64> {
        Ok(self.read(META, AGENT_COUNT)?.map(|v| decode_u64(&v)).unwrap_or(0))
    }

    /// The stored version of a state key, and whether the key currently exists
    /// (a deleted key keeps its last version in a tombstone).
    fn state_version(&self, storage_key: &[u8]) -> Result<StateVersion> {
        if !self.staged[STATE as usize].contains_key(storage_key)
            && let Some(known) = self.versions.and_then(|versions| versions.0.get(storage_key))
        {
            return Ok(*known);
        }
        match self.read(STATE, storage_key)? {
            None => Ok(StateVersion {
                version: 0,
                exists: false,
            }),
            Some(bytes) => {
                let stored = decode_state(&bytes)?;
                Ok(StateVersion {
                    version: stored.version,
                    exists: !stored.is_tombstone(),
                })
            }
        }
    }

    /// Checks the write's preconditions, then stages it. Every fallible read comes
    /// before the first `put`, so a write that fails stages nothing.
    fn apply(&mut self, write: &Write) -> Result<Applied> {
        match write {
            Write::CreateAgent(agent) => {
                let json = serde_json::to_vec(agent).map_err(|e| Error::internal(e.to_string()))?;
                let count = self.agent_count()?;
                self.put(AGENTS, agent.id.as_bytes().to_vec(), json);
                self.put(TENANTS, tenant_index_key(&agent.tenant, &agent.id), Vec::new());
                self.put(META, AGENT_COUNT.to_vec(), (count + 1).to_be_bytes().to_vec());
                Ok(Applied::Done)
            }
            Write::DeleteAgent(id) => {
                // The agent goes at once, with a durable note that its state is still
                // to be removed; the state goes in bounded `PurgeState` groups, so that
                // deleting a large agent never holds up everyone else's writes.
                let agent = self.load_agent(id)?;
                let count = self.agent_count()?;
                self.known_agents.remove(id);
                self.remove(AGENTS, id.as_bytes().to_vec());
                self.remove(TENANTS, tenant_index_key(&agent.tenant, id));
                self.put(
                    META,
                    AGENT_COUNT.to_vec(),
                    count.saturating_sub(1).to_be_bytes().to_vec(),
                );
                self.put(META, purge_marker(id), Vec::new());
                Ok(Applied::Done)
            }
            Write::PurgeState { agent, max_keys } => {
                let prefix = agent.as_bytes().to_vec();
                let mut keys: Vec<Vec<u8>> = Vec::new();
                for item in self.ks.state.prefix(&prefix).take(*max_keys) {
                    keys.push(item.key().map_err(|e| storage_error("scan state", e))?.to_vec());
                }
                let staged: Vec<Vec<u8>> = self.staged[STATE as usize]
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, _)| k.clone())
                    .collect();
                let finished = keys.len() < *max_keys;
                for key in keys.into_iter().chain(staged) {
                    self.remove(STATE, key);
                }
                if finished {
                    self.remove(META, purge_marker(agent));
                }
                Ok(if finished { Applied::Done } else { Applied::More })
            }
            Write::SetState {
                agent,
                key,
                value,
                if_version,
                at,
            } => {
                self.load_agent(agent)?;
                let storage_key = state_key(agent, key);
                let current = self.state_version(&storage_key)?;
                check_version(key, *if_version, current)?;
                // Versions only grow, across deletes too, so a stale version can never
                // match a key that was deleted and written again (no ABA).
                let version = current.version + 1;
                self.put(STATE, storage_key, encode_state(version, *at, value));
                Ok(Applied::Version(version))
            }
            Write::DeleteState {
                agent,
                key,
                if_version,
                at,
            } => {
                self.load_agent(agent)?;
                let storage_key = state_key(agent, key);
                let current = self.state_version(&storage_key)?;
                if !current.exists {
                    return Err(Error::not_found("state key", key));
                }
                check_version(key, *if_version, current)?;
                self.put(STATE, storage_key, encode_state(current.version, *at, &[]));
                Ok(Applied::Done)
            }
            Write::PutKey(stored) => {
                let json = serde_json::to_vec(stored).map_err(|e| Error::internal(e.to_string()))?;
                self.put(API_KEYS, stored.info.id.as_bytes().to_vec(), json);
                Ok(Applied::Done)
            }
            Write::Complete {
                completion,
                effect,
                digest,
                doubt,
                charge,
            } => {
                let mut completion = Box::new(Completion::clone(completion));
                if let Some(effect) = effect {
                    match self.apply_effect(&completion.agent, effect, completion.completed_at) {
                        Ok(result) => completion.result = Some(result),
                        Err(error) => {
                            completion.status = CompletionStatus::Error;
                            completion.error = Some(error);
                        }
                    }
                }
                let mut encoded = encode_completion(&completion)?;
                if encoded.len() > self.max_completion && effect.is_none() {
                    // Too large to journal (a tool's huge output): the op ends with
                    // an error naming the size, instead of never ending at all.
                    completion.status = CompletionStatus::Error;
                    completion.result = None;
                    completion.error = Some(Error::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "the op's completion is {} bytes; at most {} bytes can be recorded",
                            encoded.len(),
                            self.max_completion
                        ),
                    ));
                    encoded = encode_completion(&completion)?;
                }
                self.put(OPS, completion.op_id.as_bytes().to_vec(), encoded);
                if let (Some(key), Some(digest)) = (&completion.idempotency_key, digest) {
                    let mut value = completion.op_id.as_bytes().to_vec();
                    value.extend_from_slice(digest.as_bytes());
                    self.put(IDEM, idempotency_key(&completion.agent, key), value);
                }
                if let Some(entry) = doubt {
                    self.put(DOUBT, completion.op_id.as_bytes().to_vec(), entry.clone());
                }
                if let Some((keys, micros)) = charge {
                    for key in keys {
                        let spent = self.read(SPEND, key.as_bytes())?.map_or(0, |v| decode_u64(&v));
                        self.put(SPEND, key.as_bytes().to_vec(), (spent + micros).to_be_bytes().to_vec());
                    }
                }
                Ok(Applied::Completed(completion))
            }
            Write::Resolve { op_id, completion } => {
                let key = op_id.as_bytes().to_vec();
                let current = self
                    .read(OPS, &key)?
                    .map(|bytes| decode_completion(&bytes))
                    .transpose()?
                    .ok_or_else(|| Error::not_found("op", op_id))?;
                let entry = self.read(DOUBT, &key)?;
                let (CompletionStatus::InDoubt, Some(entry)) = (current.status, entry) else {
                    return Err(Error::new(
                        ErrorCode::FailedPrecondition,
                        format!("op {op_id} is not in doubt (it is {})", current.status.as_str()),
                    ));
                };
                match completion {
                    Some(completion) => self.put(OPS, key.clone(), encode_completion(completion)?),
                    None => self.remove(OPS, key.clone()),
                }
                self.remove(DOUBT, key);
                Ok(Applied::Resolved(entry))
            }
            Write::PutQuota { node, limits } => {
                match limits {
                    Some(json) => self.put(QUOTAS, node.as_bytes().to_vec(), json.clone()),
                    None => self.remove(QUOTAS, node.as_bytes().to_vec()),
                }
                Ok(Applied::Done)
            }
            Write::ExpireOps { before, max } => {
                // An op in doubt waits for an operator, however old it is: it is
                // passed over, and the step ends only when `max` others are found
                // or the old ops run out (so old ops in doubt cannot stall expiry).
                // An op completes after it is submitted, and op ids are ordered by
                // submission: every op that completed in time is in this range; the
                // ones of it that completed later (long runs) are passed over too.
                let submitted_before = OpId::lowest_at(before.timestamp_millis().max(0) as u64);
                let mut expired = Vec::new();
                let mut finished = true;
                for item in self.ks.ops.range(..submitted_before.as_bytes().to_vec()) {
                    let (key, value) = item.into_inner().map_err(|e| storage_error("scan ops", e))?;
                    let completion = decode_completion(&value)?;
                    if completion.status == CompletionStatus::InDoubt || completion.completed_at >= *before {
                        continue;
                    }
                    if expired.len() == *max {
                        finished = false;
                        break;
                    }
                    expired.push((key.to_vec(), completion));
                }
                let count = expired.len();
                for (key, completion) in expired {
                    if let Some(idempotency) = &completion.idempotency_key {
                        self.remove(IDEM, idempotency_key(&completion.agent, idempotency));
                    }
                    self.remove(OPS, key);
                }
                Ok(Applied::Expired { count, more: !finished })
            }
        }
    }

    /// Applies a kernel-service op's effect and returns its result. Like `apply`,
    /// every fallible step comes before the one `put`.
    fn apply_effect(&mut self, agent: &AgentId, effect: &Effect, at: DateTime<Utc>) -> Result<Value> {
        // Existence is all an effect needs of its agent; decoding the record per op
        // would cost the committer more than the effect itself.
        if !self.known_agents.contains(agent) {
            if self.read(AGENTS, agent.as_bytes())?.is_none() {
                return Err(Error::not_found("agent", agent));
            }
            self.known_agents.insert(*agent);
        }
        match effect {
            Effect::Set { key, value } => {
                let storage_key = state_key(agent, key);
                let version = self.state_version(&storage_key)?.version + 1;
                self.put(STATE, storage_key, encode_state(version, at, value));
                Ok(json!({ "key": key, "version": version }))
            }
            Effect::Incr { key, by } => {
                let storage_key = state_key(agent, key);
                let (current, version) = match self.read(STATE, &storage_key)? {
                    None => (serde_json::Number::from(0), 0),
                    Some(bytes) => {
                        let stored = decode_state(&bytes)?;
                        if stored.is_tombstone() {
                            (serde_json::Number::from(0), stored.version)
                        } else {
                            match serde_json::from_slice::<Value>(stored.json) {
                                Ok(Value::Number(n)) => (n, stored.version),
                                _ => {
                                    return Err(Error::new(
                                        ErrorCode::FailedPrecondition,
                                        format!("state key {key:?} does not hold a number"),
                                    ));
                                }
                            }
                        }
                    }
                };
                let sum = add_numbers(&current, by).ok_or_else(|| {
                    Error::new(
                        ErrorCode::InvalidArgument,
                        format!("adding {by} to {current} overflows state key {key:?}"),
                    )
                })?;
                let value = serde_json::to_vec(&sum).map_err(|e| Error::internal(e.to_string()))?;
                self.put(STATE, storage_key, encode_state(version + 1, at, &value));
                Ok(json!({ "key": key, "value": sum, "version": version + 1 }))
            }
            Effect::Delete { key } => {
                let storage_key = state_key(agent, key);
                let current = self.state_version(&storage_key)?;
                if !current.exists {
                    return Err(Error::not_found("state key", key));
                }
                self.put(STATE, storage_key, encode_state(current.version, at, &[]));
                Ok(json!({ "key": key, "version": current.version }))
            }
        }
    }
}

#[derive(Clone, Copy)]
struct StateVersion {
    version: u64,
    exists: bool,
}

/// `expected` 0 means "must not exist"; any other number, "must exist at this version".
fn check_version(key: &str, expected: Option<u64>, current: StateVersion) -> Result<()> {
    let Some(expected) = expected else { return Ok(()) };
    let holds = if expected == 0 {
        !current.exists
    } else {
        current.exists && current.version == expected
    };
    if holds {
        return Ok(());
    }
    let actual = if current.exists { current.version } else { 0 };
    let message = if current.exists {
        format!("state key {key:?} is at version {actual}, expected {expected}")
    } else {
        format!("state key {key:?} does not exist, expected version {expected}")
    };
    Err(Error::new(ErrorCode::VersionConflict, message)
        .with_details(serde_json::json!({ "key": key, "expected": expected, "actual": actual })))
}

/// Exact integer addition when both are integers, floating point otherwise; `None`
/// on integer overflow or a result JSON cannot hold.
fn add_numbers(a: &serde_json::Number, b: &serde_json::Number) -> Option<Value> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x.checked_add(y).map(Value::from);
    }
    let sum = a.as_f64()? + b.as_f64()?;
    serde_json::Number::from_f64(sum).map(Value::Number)
}

pub(crate) fn idempotency_key(agent: &AgentId, key: &str) -> Vec<u8> {
    state_key(agent, key)
}

/// A recorded idempotency key: the op it belongs to and that op's args digest.
pub(crate) fn decode_idempotency(bytes: &[u8]) -> Result<(OpId, String)> {
    let (id, digest) = bytes
        .split_at_checked(16)
        .ok_or_else(|| Error::internal("a stored idempotency record is too short"))?;
    Ok((
        OpId::from_bytes(id.try_into().expect("16 bytes")),
        String::from_utf8_lossy(digest).into_owned(),
    ))
}

/// The first byte of a completion stored in its compact form ([`bbx_core::compact`]);
/// one stored as JSON (any with a rarely set field, and all that earlier versions
/// stored) starts with `{`.
const COMPACT_COMPLETION: u8 = 1;

/// A completion as the store keeps it: compact where it can be, JSON otherwise. The
/// compact form is under half the bytes, and each stored completion is written three
/// times or more (the journal's redo record, fjall's journal, its tables).
pub(crate) fn encode_completion(completion: &Completion) -> Result<Vec<u8>> {
    let mut bytes = vec![COMPACT_COMPLETION];
    if bbx_core::compact::encode_completion(completion, &mut bytes) {
        return Ok(bytes);
    }
    serde_json::to_vec(completion).map_err(|e| Error::internal(e.to_string()))
}

pub(crate) fn decode_completion(bytes: &[u8]) -> Result<Completion> {
    match bytes.split_first() {
        Some((&COMPACT_COMPLETION, compact)) => bbx_core::compact::decode_completion(compact)
            .ok_or_else(|| Error::internal("a stored completion is unreadable: its compact form is damaged")),
        _ => serde_json::from_slice(bytes)
            .map_err(|e| Error::internal(format!("a stored completion is unreadable: {e}"))),
    }
}

pub(crate) fn storage_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("storage failed to {what}: {e}"))
}

pub(crate) fn tenant_index_key(tenant: &str, id: &AgentId) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.len() + 17);
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

pub(crate) fn state_key(agent: &AgentId, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + key.len());
    out.extend_from_slice(agent.as_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

const STATE_HEADER: usize = 16;

/// A stored state value: version, time of the write, and the JSON. An empty JSON
/// part marks a tombstone (a deleted key keeping its version); no JSON text is empty.
pub(crate) struct StoredState<'a> {
    pub version: u64,
    pub updated_at: DateTime<Utc>,
    pub json: &'a [u8],
}

impl StoredState<'_> {
    pub fn is_tombstone(&self) -> bool {
        self.json.is_empty()
    }
}

pub(crate) fn encode_state(version: u64, at: DateTime<Utc>, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(STATE_HEADER + json.len());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&at.timestamp_millis().to_be_bytes());
    out.extend_from_slice(json);
    out
}

pub(crate) fn decode_state(bytes: &[u8]) -> Result<StoredState<'_>> {
    let (Some(version), Some(millis)) = (bytes.get(0..8), bytes.get(8..STATE_HEADER)) else {
        return Err(Error::internal("a stored state value is shorter than its header"));
    };
    let version = u64::from_be_bytes(version.try_into().expect("8 bytes"));
    let millis = i64::from_be_bytes(millis.try_into().expect("8 bytes"));
    Ok(StoredState {
        version,
        updated_at: DateTime::from_timestamp_millis(millis).unwrap_or_default(),
        json: &bytes[STATE_HEADER..],
    })
}

pub(crate) fn decode_agent(bytes: &[u8]) -> Result<Agent> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("stored agent is unreadable: {e}")))
}

fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn read_count(view: &impl Readable, meta: &Keyspace) -> Result<u64> {
    Ok(view
        .get(meta, AGENT_COUNT)
        .map_err(|e| storage_error("read", e))?
        .map(|v| decode_u64(&v))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_core::model::AgentStatus;

    fn agent() -> Agent {
        Agent {
            id: AgentId::generate(),
            name: "a".into(),
            tenant: "t".into(),
            labels: Default::default(),
            status: AgentStatus::Idle,
            created_at: Utc::now(),
            tools: Default::default(),
        }
    }

    fn set(agent: &Agent, key: &str, if_version: Option<u64>) -> Write {
        Write::SetState {
            agent: agent.id,
            key: key.into(),
            value: b"1".to_vec(),
            if_version,
            at: Utc::now(),
        }
    }

    fn delete(agent: &Agent, key: &str, if_version: Option<u64>) -> Write {
        Write::DeleteState {
            agent: agent.id,
            key: key.into(),
            if_version,
            at: Utc::now(),
        }
    }

    fn code(result: Result<Applied>) -> ErrorCode {
        result.unwrap_err().code
    }

    /// A database and its keyspaces, without a committer: groups are driven by hand.
    fn fresh() -> (tempfile::TempDir, Database, Keyspaces) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let ks = Keyspaces::open(&db).unwrap();
        (dir, db, ks)
    }

    #[test]
    fn writes_in_one_group_see_each_other() {
        let (_dir, db, ks) = fresh();
        let a = agent();
        let mut tx = GroupTx::new(&ks, usize::MAX);
        assert_eq!(tx.apply(&Write::CreateAgent(a.clone())).unwrap(), Applied::Done);
        assert_eq!(tx.apply(&set(&a, "k", Some(0))).unwrap(), Applied::Version(1));
        // A second create-only CAS in the same group sees the first.
        assert_eq!(code(tx.apply(&set(&a, "k", Some(0)))), ErrorCode::VersionConflict);
        assert_eq!(tx.apply(&set(&a, "k", Some(1))).unwrap(), Applied::Version(2));
        apply(&db, &ks, tx.writes()).unwrap();
        let stored = ks.state.get(state_key(&a.id, "k")).unwrap().unwrap();
        assert_eq!(decode_state(&stored).unwrap().version, 2);
        assert_eq!(read_count(&db.snapshot(), &ks.meta).unwrap(), 1);
    }

    #[test]
    fn a_write_to_a_keyspace_that_does_not_exist_fails_the_batch_whole() {
        let (_dir, db, ks) = fresh();
        let writes = [
            (STATE, b"k".as_slice(), Some(b"v".as_slice())),
            (KEYSPACES as u8, b"k".as_slice(), None),
        ];
        let error = apply(&db, &ks, writes.into_iter()).unwrap_err();
        assert!(error.message.contains("keyspace 10"), "{}", error.message);
        assert!(ks.state.get(b"k").unwrap().is_none(), "nothing of the batch landed");
    }

    #[test]
    fn a_deleted_agents_state_is_purged_in_bounded_steps() {
        let (_dir, db, ks) = fresh();
        let a = agent();
        let mut tx = GroupTx::new(&ks, usize::MAX);
        tx.apply(&Write::CreateAgent(a.clone())).unwrap();
        for i in 0..5 {
            tx.apply(&set(&a, &format!("k{i}"), None)).unwrap();
        }
        apply(&db, &ks, tx.writes()).unwrap();

        let mut tx = GroupTx::new(&ks, usize::MAX);
        tx.apply(&set(&a, "staged-in-the-same-group", None)).unwrap();
        tx.apply(&Write::DeleteAgent(a.id)).unwrap();
        // Once deleted, the agent takes no more writes in the same group.
        assert_eq!(code(tx.apply(&set(&a, "after", None))), ErrorCode::NotFound);
        let purge = Write::PurgeState {
            agent: a.id,
            max_keys: 2,
        };
        assert_eq!(tx.apply(&purge).unwrap(), Applied::More, "a bounded step");
        apply(&db, &ks, tx.writes()).unwrap();
        assert!(ks.agents.get(a.id.as_bytes()).unwrap().is_none());
        assert_eq!(read_count(&db.snapshot(), &ks.meta).unwrap(), 0);
        assert!(
            ks.meta.get(purge_marker(&a.id)).unwrap().is_some(),
            "the purge is remembered"
        );

        let mut steps = 1;
        loop {
            let mut tx = GroupTx::new(&ks, usize::MAX);
            let applied = tx.apply(&purge).unwrap();
            apply(&db, &ks, tx.writes()).unwrap();
            steps += 1;
            if applied == Applied::Done {
                break;
            }
        }
        assert_eq!(steps, 3, "6 keys, 2 per step, and a last step that finds fewer than 2");
        assert_eq!(ks.state.prefix(a.id.as_bytes()).count(), 0);
        assert!(ks.meta.get(purge_marker(&a.id)).unwrap().is_none());
    }

    #[test]
    fn a_refused_write_stages_nothing() {
        let (_dir, _db, ks) = fresh();
        let a = agent();
        let mut tx = GroupTx::new(&ks, usize::MAX);
        assert_eq!(code(tx.apply(&set(&a, "k", None))), ErrorCode::NotFound);
        assert_eq!(code(tx.apply(&Write::DeleteAgent(a.id))), ErrorCode::NotFound);
        assert!(tx.is_empty());
        tx.apply(&Write::CreateAgent(a.clone())).unwrap();
        let staged = tx.staged.clone();
        assert_eq!(code(tx.apply(&set(&a, "k", Some(3)))), ErrorCode::VersionConflict);
        assert_eq!(code(tx.apply(&delete(&a, "k", None))), ErrorCode::NotFound);
        assert_eq!(tx.staged, staged);
    }

    #[test]
    fn versions_survive_deletion_so_stale_cas_cannot_win() {
        let (_dir, db, ks) = fresh();
        let a = agent();
        let mut tx = GroupTx::new(&ks, usize::MAX);
        tx.apply(&Write::CreateAgent(a.clone())).unwrap();
        tx.apply(&set(&a, "k", None)).unwrap();
        tx.apply(&delete(&a, "k", Some(1))).unwrap();
        apply(&db, &ks, tx.writes()).unwrap();

        let mut tx = GroupTx::new(&ks, usize::MAX);
        // A client still holding version 1 must not overwrite a re-created key.
        assert_eq!(code(tx.apply(&set(&a, "k", Some(1)))), ErrorCode::VersionConflict);
        assert_eq!(code(tx.apply(&delete(&a, "k", None))), ErrorCode::NotFound);
        assert_eq!(tx.apply(&set(&a, "k", Some(0))).unwrap(), Applied::Version(2));
        assert_eq!(code(tx.apply(&set(&a, "k", Some(1)))), ErrorCode::VersionConflict);
    }

    #[tokio::test]
    async fn readers_see_a_write_once_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 1 << 20).await;
        let a = agent();
        let visible = |store: &Store| store.view().get(&store.ks.agents, a.id.as_bytes()).unwrap().is_some();
        assert!(!visible(&store));
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        assert!(visible(&store), "an acknowledged write is in the published snapshot");
        assert_eq!(store.agent_count().unwrap(), 1);
        store.close().await;
        assert_eq!(
            store.write(Write::DeleteAgent(a.id)).await.unwrap_err().code,
            ErrorCode::Unavailable
        );
    }

    /// A store on `dir/db` journaling to `dir/journal`, and the journal's first
    /// record, held so that no checkpoint passes the records after it.
    async fn open_store(dir: &Path, max_record: usize) -> (Store, bbx_journal::Lsn) {
        let (journal, recovery) =
            bbx_journal::Journal::open(&dir.join("journal"), bbx_journal::JournalOptions::default()).unwrap();
        let held = recovery.records.iter().map(|r| r.lsn).collect();
        let writer = JournalWriter::start(journal, held, crate::ring::RingMetrics::new(), 0).unwrap();
        let pin = writer.append(vec![b"{}".to_vec()]).await.unwrap()[0];
        let db = open_database(&dir.join("db")).unwrap();
        let store = Store::open(db, 16, writer, &recovery.records, max_record, 0).unwrap();
        (store, pin)
    }

    #[tokio::test]
    async fn the_journal_alone_rebuilds_every_acknowledged_write() {
        let live = tempfile::tempdir().unwrap();
        let (store, _) = open_store(live.path(), 1 << 20).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        let big = vec![b'7'; 300_000];
        let writes = (0..50)
            .map(|i| set(&a, &format!("k{i}"), None))
            .chain([Write::SetState {
                agent: a.id,
                key: "big".into(),
                value: big.clone(),
                if_version: None,
                at: Utc::now(),
            }])
            .collect();
        assert!(store.write_all(writes).await.iter().all(Result::is_ok));
        store.write(delete(&a, "k3", Some(1))).await.unwrap();

        // A copy of the journal as it is now, next to an empty database: what a
        // crash that lost every unsynced write of fjall would leave.
        let crashed = tempfile::tempdir().unwrap();
        let copy = crashed.path().join("journal");
        std::fs::create_dir(&copy).unwrap();
        for entry in std::fs::read_dir(live.path().join("journal")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let (rebuilt, _) = open_store(crashed.path(), 1 << 20).await;
        let view = rebuilt.view();
        assert!(view.get(&rebuilt.ks.agents, a.id.as_bytes()).unwrap().is_some());
        assert_eq!(rebuilt.agent_count().unwrap(), 1);
        let state = |key: &str| {
            view.get(&rebuilt.ks.state, state_key(&a.id, key))
                .unwrap()
                .map(|v| decode_state(&v).unwrap().is_tombstone())
        };
        assert_eq!(state("k0"), Some(false));
        assert_eq!(state("k49"), Some(false));
        assert_eq!(state("k3"), Some(true), "the delete is replayed after the set");
        let stored = view.get(&rebuilt.ks.state, state_key(&a.id, "big")).unwrap().unwrap();
        assert_eq!(decode_state(&stored).unwrap().json, big.as_slice());
        store.close().await;
        rebuilt.close().await;
    }

    /// Each write its own group: versions come from what the committer recorded
    /// after earlier groups, and must agree with what fjall holds.
    #[tokio::test]
    async fn versions_carried_between_groups_match_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 1 << 20).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        assert_eq!(store.write(set(&a, "k", None)).await.unwrap(), Applied::Version(1));
        assert_eq!(store.write(set(&a, "k", Some(1))).await.unwrap(), Applied::Version(2));
        store.write(delete(&a, "k", Some(2))).await.unwrap();
        // Deleted keeps its version: the key must not exist, and then goes on from 2.
        assert_eq!(
            code(store.write(set(&a, "k", Some(2))).await),
            ErrorCode::VersionConflict
        );
        assert_eq!(store.write(set(&a, "k", Some(0))).await.unwrap(), Applied::Version(3));
        // A refused write leaves the version where it was.
        assert_eq!(
            code(store.write(set(&a, "k", Some(9))).await),
            ErrorCode::VersionConflict
        );
        assert_eq!(store.write(set(&a, "k", Some(3))).await.unwrap(), Applied::Version(4));
        let stored = store
            .view()
            .get(&store.ks.state, state_key(&a.id, "k"))
            .unwrap()
            .unwrap();
        assert_eq!(decode_state(&stored).unwrap().version, 4);
        store.close().await;
    }

    #[tokio::test]
    async fn a_write_too_large_for_the_journal_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_store(dir.path(), 4096).await;
        let a = agent();
        store.write(Write::CreateAgent(a.clone())).await.unwrap();
        let big = Write::SetState {
            agent: a.id,
            key: "big".into(),
            value: vec![b'1'; 8192],
            if_version: None,
            at: Utc::now(),
        };
        assert_eq!(store.write(big).await.unwrap_err().code, ErrorCode::PayloadTooLarge);
        assert!(!store.failed.load(Ordering::Acquire));
        assert_eq!(store.write(set(&a, "small", None)).await.unwrap(), Applied::Version(1));
        store.close().await;
    }

    #[test]
    fn a_completion_too_large_to_journal_is_recorded_as_an_error() {
        let (_dir, _db, ks) = fresh();
        let mut tx = GroupTx::new(&ks, 1000);
        let completion = Completion {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "t".into(),
            kind: "tool.http".into(),
            status: CompletionStatus::Ok,
            result: Some(json!("x".repeat(5000))),
            error: None,
            attempts: 1,
            queue_us: 0,
            exec_us: 0,
            total_us: 0,
            submitted_at: Utc::now(),
            completed_at: Utc::now(),
            idempotency_key: None,
            user_data: None,
            trace: None,
        };
        let write = Write::Complete {
            completion: Arc::new(completion),
            effect: None,
            digest: None,
            doubt: None,
            charge: None,
        };
        let Applied::Completed(recorded) = tx.apply(&write).unwrap() else {
            panic!("not a completion")
        };
        assert_eq!(recorded.status, CompletionStatus::Error);
        assert_eq!(recorded.error.unwrap().code, ErrorCode::PayloadTooLarge);
        assert!(tx.writes().all(|(_, _, v)| v.is_none_or(|v| v.len() <= 1000)));
    }

    #[test]
    fn completions_are_stored_compact_where_they_can_be_and_read_in_either_form() {
        let plain = Completion {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "t".into(),
            kind: "state.set".into(),
            status: CompletionStatus::Ok,
            result: Some(json!({"key": "k", "version": 3})),
            error: None,
            attempts: 1,
            queue_us: 5,
            exec_us: 6,
            total_us: 11,
            submitted_at: Utc::now(),
            completed_at: Utc::now(),
            idempotency_key: None,
            user_data: None,
            trace: None,
        };
        let compact = encode_completion(&plain).unwrap();
        assert_eq!(compact[0], COMPACT_COMPLETION);
        assert_eq!(decode_completion(&compact).unwrap(), plain);
        // What earlier versions stored, and what a completion with a rare field is.
        let json = serde_json::to_vec(&plain).unwrap();
        assert!(
            compact.len() * 2 < json.len(),
            "{} against {}",
            compact.len(),
            json.len()
        );
        assert_eq!(decode_completion(&json).unwrap(), plain);
        let keyed = Completion {
            idempotency_key: Some("k1".into()),
            ..plain
        };
        let stored = encode_completion(&keyed).unwrap();
        assert_eq!(stored[0], b'{');
        assert_eq!(decode_completion(&stored).unwrap(), keyed);
        assert!(decode_completion(&compact[..compact.len() / 2]).is_err());
    }

    #[test]
    fn short_stored_values_are_errors_not_panics() {
        assert!(decode_state(&[0u8; 15]).is_err());
        assert!(decode_state(&[]).is_err());
        let tombstone = encode_state(7, Utc::now(), &[]);
        let decoded = decode_state(&tombstone).unwrap();
        assert!(decoded.is_tombstone());
        assert_eq!(decoded.version, 7);
    }
}
