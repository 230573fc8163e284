//! The committer thread: group commit of every store write, and the persister
//! thread that makes fjall durable behind it.

use crate::group::{Caches, GroupTx};
use crate::{Applied, JournalWriter, Keyspaces, Staged, StoreMetrics, StoreOptions, redo, storage_error};
use bbx_core::{Error, Result};
use fjall::{Database, PersistMode};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How often fjall is made durable, so that the journal can drop the redo records
/// it holds for it.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Writes sent together, answered together: each is applied on its own (one may
/// fail while the others land) but all of them commit in the same group.
pub(crate) struct Request {
    pub writes: Vec<Box<dyn Staged>>,
    pub reply: oneshot::Sender<Vec<Result<Applied>>>,
}

pub(crate) enum Message {
    Write(Request),
    /// Make fjall durable if a checkpoint is due.
    Checkpoint,
    /// Commit what is queued, refuse what comes after, and stop.
    Shutdown,
}

pub(crate) struct Committer {
    db: Database,
    keyspaces: Keyspaces,
    failed: Arc<crate::Failure>,
    metrics: StoreMetrics,
    durable: crate::DurableView,
    max_batch: usize,
    journal: JournalWriter,
    max_record: usize,
    /// Redo records of groups applied to fjall since it was last made durable.
    unpersisted: Vec<bbx_journal::Lsn>,
    last_persist: Instant,
    persister: Persister,
    /// What components keep on this thread across groups.
    caches: Caches,
}

impl Committer {
    pub fn new(
        db: Database,
        keyspaces: Keyspaces,
        failed: Arc<crate::Failure>,
        metrics: StoreMetrics,
        durable: crate::DurableView,
        journal: JournalWriter,
        options: &StoreOptions,
    ) -> Result<Self> {
        Ok(Self {
            persister: Persister::start(db.clone(), journal.clone())?,
            db,
            keyspaces,
            failed,
            metrics,
            durable,
            max_batch: options.commit_max_batch,
            journal,
            max_record: options.max_record,
            unpersisted: Vec::new(),
            last_persist: Instant::now(),
            caches: Caches::default(),
        })
    }

    pub fn run(mut self, mut messages: mpsc::Receiver<Message>) {
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
                    self.failed.fail("the storage writer panicked");
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
        if self.failed.has_failed() {
            for request in group.drain(..) {
                let refused = request
                    .writes
                    .iter()
                    .map(|_| Err(Error::unavailable(format!("{}; restart the kernel", self.failed))))
                    .collect();
                let _ = request.reply.send(refused);
            }
            return;
        }
        let started = Instant::now();
        let mut tx = GroupTx::new(&self.keyspaces, self.max_record / 2, &mut self.caches);
        let outcomes: Vec<Vec<Result<Applied>>> = group
            .iter()
            .map(|r| r.writes.iter().map(|w| w.stage(&mut tx)).collect())
            .collect();
        let writes: usize = outcomes.iter().map(Vec::len).sum();
        let wrote = !tx.is_empty();
        let durable = if wrote {
            Self::journal_and_apply(
                &self.db,
                &self.keyspaces,
                &self.journal,
                &self.failed,
                &tx,
                self.max_record,
            )
        } else {
            Ok(Vec::new())
        };
        let staged = tx.into_staged();
        match &durable {
            Ok(lsns) => {
                self.unpersisted.extend(lsns);
                self.caches.committed(&staged);
            }
            // What reached fjall is unknown: lookups decide from now on.
            Err(_) => self.caches.invalidate(),
        }
        // A failure was logged, and the store marked failed, where it happened.
        if durable.is_ok() && wrote {
            // Publish before answering: a writer that got its acknowledgement reads
            // its own write.
            let position = durable
                .as_ref()
                .ok()
                .and_then(|lsns| lsns.last())
                .map_or(0, |lsn| lsn + 1);
            let mut view = self.durable.write();
            *view = (Arc::new(self.db.snapshot()), position.max(view.1));
            self.metrics.syncs.inc();
            self.metrics.sync_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.group_size.observe(writes as f64);
        }
        for (request, outcome) in group.drain(..).zip(outcomes) {
            // When the group did not reach disk, every answer is that failure: a
            // conflict computed against writes that never landed would mislead.
            let outcome: Vec<Result<Applied>> = match &durable {
                Err(e) => outcome.into_iter().map(|_| Err(e.clone())).collect(),
                Ok(_) => outcome,
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
    fn journal_and_apply(
        db: &Database,
        keyspaces: &Keyspaces,
        journal: &JournalWriter,
        failed: &crate::Failure,
        tx: &GroupTx,
        max_record: usize,
    ) -> Result<Vec<bbx_journal::Lsn>> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_micros() as u64);
        let records = redo::encode(tx.writes(), stamp, max_record / 2, max_record)?;
        let logged = journal.append_blocking(records);
        let lsns = logged.inspect_err(|e| {
            tracing::error!(error = %e, "journaling a store write failed; refusing further writes");
            failed.fail(format!("journaling a write failed: {}", e.message));
        })?;
        apply(db, keyspaces, tx.writes()).map_err(|e| {
            tracing::error!(error = %e, "storage write failed; refusing further writes");
            let why = format!(
                "applying a journaled write failed ({}); it is applied again when the kernel restarts",
                e.message
            );
            failed.fail(why.clone());
            Error::unavailable(why)
        })?;
        Ok(lsns)
    }
}

/// Applies writes to fjall as one atomic batch, not synced: the journal already
/// holds them. A keyspace id that names none fails the batch whole.
pub(crate) fn apply<'a>(
    db: &Database,
    keyspaces: &Keyspaces,
    writes: impl Iterator<Item = (u8, &'a [u8], Option<&'a [u8]>)>,
) -> Result<()> {
    let mut batch = db.batch();
    for (index, key, value) in writes {
        let keyspace = keyspaces.get(index)?;
        match value {
            Some(value) => batch.insert(keyspace, key, value),
            None => batch.remove(keyspace, key),
        }
    }
    batch.commit().map_err(|e| storage_error("commit", e))
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
