//! The journal's writer thread: group commit of every record, and the checkpoint.
//!
//! Two kinds of record share it: the ring's op entries (an accepted op, a tool's
//! start mark) and the store's redo records (see [`crate::redo`]), so the disk sees
//! one stream of `fdatasync`s. Writers encode their records on their own threads
//! and send them here; the thread takes whatever has queued up, appends it, makes
//! it durable with one `fdatasync`, and only then answers, so an acknowledged op
//! or store write is on disk and 1024 concurrent submitters cost a handful of
//! syncs. The thread also owns the set of records still needed (accepted ops
//! without a durable completion, redo records the store has not yet made durable
//! itself): keeping it here, where lsns are assigned, means a checkpoint can never
//! pass a record that was synced but not yet registered. It asks the scheduler for
//! prompt wakeups ([`crate::sched`]): on busy cores, waiting for one after each
//! `fdatasync` cost it as much time as the syncs.

use bbx_core::op::{Percentiles, WalStatus};
use bbx_core::{Error, Result};
use bbx_journal::{Journal, Lsn};
use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How often the checkpoint moves up (and old segments are deleted).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most records appended before one sync.
const MAX_GROUP: usize = 16_384;

/// Records to append, and where to send their lsns once they are durable.
/// Records, the latest time their group may be stamped with (see
/// [`JournalWriter::append_copies`]), and where to send their lsns.
type Append = (Vec<Vec<u8>>, Option<u64>, oneshot::Sender<Result<Vec<Lsn>>>);

enum Message {
    Append {
        records: Vec<Vec<u8>>,
        stamp_by: Option<u64>,
        reply: oneshot::Sender<Result<Vec<Lsn>>>,
    },
    /// These records' ops have durable completions: the records may go.
    Release(Vec<Lsn>),
    Status(oneshot::Sender<WalStatus>),
    Shutdown,
}

/// The journal's figures in `/metrics`.
#[derive(Clone)]
pub struct JournalMetrics {
    records: Counter,
    syncs: Counter,
    sync_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for JournalMetrics {
    fn default() -> Self {
        Self {
            records: Counter::default(),
            syncs: Counter::default(),
            sync_seconds: prometheus_client::metrics::histogram::Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
        }
    }
}

impl JournalMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bbx_journal_records",
            "Records made durable in the journal",
            self.records.clone(),
        );
        registry.register("bbx_journal_syncs", "Journal group fdatasyncs", self.syncs.clone());
        registry.register(
            "bbx_journal_sync_seconds",
            "Time to append and fdatasync one journal group",
            self.sync_seconds.clone(),
        );
    }
}

#[derive(Clone)]
pub struct JournalWriter {
    sender: Sender<Message>,
    thread: Arc<parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>>,
    horizon: Arc<AtomicU64>,
}

impl JournalWriter {
    /// Starts the writer on an opened journal; `held` are the recovered records that
    /// are still needed. The thread asks for the nice value `nice` (see
    /// [`crate::sched`]); 0 leaves it as the process has it.
    pub fn start(journal: Journal, held: BTreeSet<Lsn>, metrics: JournalMetrics, nice: i32) -> Result<Self> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        // With nothing held, no record of this journal is replayed any more.
        let horizon = Arc::new(AtomicU64::new(if held.is_empty() { wall_millis() } else { 0 }));
        let writer = Writer {
            journal,
            stamps: VecDeque::new(),
            horizon: horizon.clone(),
            held,
            last_checkpoint: Instant::now(),
            syncs: 0,
            sync_micros: 0,
            records: 0,
            bytes: 0,
            metrics,
            sync_latency: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds"),
        };
        let thread = std::thread::Builder::new()
            .name("bbx-journal".into())
            .spawn(move || {
                if nice != 0 {
                    let in_force = crate::sched::raise_priority(nice);
                    if in_force.is_some_and(|now| now > nice) {
                        tracing::info!(asked = nice, in_force = ?in_force,
                            "the journal thread may not raise its priority (needs CAP_SYS_NICE or RLIMIT_NICE)");
                    }
                }
                let slice = crate::sched::prefer_prompt_wakeups();
                tracing::debug!(slice_ns = ?slice, "journal thread's time slice");
                writer.run(receiver)
            })
            .map_err(|e| Error::internal(format!("cannot start the journal thread: {e}")))?;
        Ok(Self {
            sender,
            thread: Arc::new(parking_lot::Mutex::new(Some(thread))),
            horizon,
        })
    }

    /// Every op that completed before this time has its records behind the
    /// journal's durable checkpoint: recovery will not replay them, so its
    /// completion may expire without the op running again. It moves only when a
    /// checkpoint succeeds.
    pub fn replay_horizon(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.horizon.load(Ordering::Acquire) as i64).unwrap_or_default()
    }

    /// Appends the records and waits until they are durable; returns their lsns.
    pub async fn append(&self, records: Vec<Vec<u8>>) -> Result<Vec<Lsn>> {
        self.send_append(records, None)?.await.map_err(|_| stopped())?
    }

    /// [`Self::append`] for copies of records of ops that may complete before the
    /// copies are written (the ring's copy-forward of long-running ops): their group
    /// is stamped no later than `picked`, the time the ops were last seen running,
    /// so that the replay horizon cannot pass a copy of an op completed after it.
    pub async fn append_copies(&self, records: Vec<Vec<u8>>, picked: DateTime<Utc>) -> Result<Vec<Lsn>> {
        let picked = picked.timestamp_millis().max(0) as u64;
        self.send_append(records, Some(picked))?.await.map_err(|_| stopped())?
    }

    /// [`Self::append`] for a thread outside the async runtime (the store's committer).
    pub fn append_blocking(&self, records: Vec<Vec<u8>>) -> Result<Vec<Lsn>> {
        self.send_append(records, None)?
            .blocking_recv()
            .map_err(|_| stopped())?
    }

    fn send_append(&self, records: Vec<Vec<u8>>, stamp_by: Option<u64>) -> Result<oneshot::Receiver<Result<Vec<Lsn>>>> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Message::Append {
                records,
                stamp_by,
                reply,
            })
            .map_err(|_| Error::unavailable("the kernel is shutting down"))?;
        Ok(answer)
    }

    pub fn release(&self, lsns: Vec<Lsn>) {
        // After shutdown nothing is released; recovery sorts it out from the records.
        let _ = self.sender.send(Message::Release(lsns));
    }

    pub async fn status(&self) -> Result<WalStatus> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(Message::Status(reply))
            .map_err(|_| Error::unavailable("the kernel is shutting down"))?;
        answer.await.map_err(|_| stopped())
    }

    /// Syncs what is queued and stops the thread.
    pub async fn close(&self) {
        let _ = self.sender.send(Message::Shutdown);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct Writer {
    journal: Journal,
    held: BTreeSet<Lsn>,
    /// (first lsn, wall-clock ms) of each group synced since the checkpoint: a
    /// group's time is read before its records are acknowledged, so an op that
    /// completed before it has all its records in earlier groups.
    stamps: VecDeque<(Lsn, u64)>,
    /// See [`JournalWriter::replay_horizon`].
    horizon: Arc<AtomicU64>,
    last_checkpoint: Instant,
    syncs: u64,
    sync_micros: u64,
    records: u64,
    bytes: u64,
    metrics: JournalMetrics,
    sync_latency: Histogram<u64>,
}

impl Writer {
    fn run(mut self, receiver: Receiver<Message>) {
        let mut group = Vec::new();
        loop {
            let first = match receiver.recv_timeout(CHECKPOINT_EVERY) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut shutdown = false;
            let mut queued = 0;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Append {
                        records,
                        stamp_by,
                        reply,
                    } => {
                        queued += records.len();
                        group.push((records, stamp_by, reply));
                    }
                    Message::Release(lsns) => {
                        for lsn in lsns {
                            self.held.remove(&lsn);
                        }
                    }
                    Message::Status(reply) => {
                        let _ = reply.send(self.status());
                    }
                    Message::Shutdown => shutdown = true,
                }
                if queued < MAX_GROUP && !shutdown {
                    next = receiver.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(&mut group);
            }
            self.maybe_checkpoint();
            if shutdown {
                return;
            }
        }
    }

    fn commit(&mut self, group: &mut Vec<Append>) {
        // A record too large for a segment is refused with its own Append, before
        // anything of that Append is buffered: the rest of the group, whose
        // records are fine, is not failed with it.
        let max = self.journal.max_payload();
        group.retain_mut(|(records, _, reply)| {
            let Some(size) = records.iter().map(Vec::len).find(|len| *len > max) else {
                return true;
            };
            let refused = Error::new(
                bbx_core::ErrorCode::PayloadTooLarge,
                format!("a journal record of {size} bytes does not fit in a segment ({max} bytes at most)"),
            );
            // The sender is taken, so the Append is dropped unanswered otherwise.
            let _ = std::mem::replace(reply, oneshot::channel().0).send(Err(refused));
            false
        });
        if group.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut assigned = Vec::with_capacity(group.len());
        let mut failure = None;
        for (records, _, _) in group.iter() {
            let mut lsns = Vec::with_capacity(records.len());
            for record in records {
                match self.journal.append(record) {
                    Ok(lsn) => lsns.push(lsn),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            assigned.push(lsns);
        }
        let synced = match failure {
            Some(e) => Err(e),
            None => self.journal.sync(),
        };
        let outcome = synced.map_err(|e| {
            tracing::error!(error = %e, "the journal failed; refusing further submissions");
            Error::unavailable(format!("the journal failed: {e}"))
        });
        if outcome.is_ok() {
            if let Some(first) = assigned.iter().find_map(|lsns| lsns.first()) {
                let stamp_by = group.iter().filter_map(|(_, by, _)| *by).min();
                let now = wall_millis();
                self.stamps.push_back((*first, stamp_by.map_or(now, |by| by.min(now))));
            }
            let took = started.elapsed();
            self.syncs += 1;
            self.sync_micros += took.as_micros() as u64;
            self.metrics.syncs.inc();
            self.metrics.sync_seconds.observe(took.as_secs_f64());
            let _ = self.sync_latency.record(took.as_micros() as u64);
        }
        for ((records, _, reply), lsns) in group.drain(..).zip(assigned) {
            match &outcome {
                Ok(_) => {
                    self.records += records.len() as u64;
                    self.metrics.records.inc_by(records.len() as u64);
                    self.bytes += records
                        .iter()
                        .map(|r| bbx_journal::record::framed_len(r.len()) as u64)
                        .sum::<u64>();
                    self.held.extend(lsns.iter().copied());
                    let _ = reply.send(Ok(lsns));
                }
                Err(e) => {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn maybe_checkpoint(&mut self) {
        if self.last_checkpoint.elapsed() < CHECKPOINT_EVERY {
            return;
        }
        self.last_checkpoint = Instant::now();
        let upto = self.held.first().copied().unwrap_or(self.journal.status().next_lsn);
        // Read before the checkpoint: nothing completed by now is replayed once it
        // succeeds, if no record is held.
        let now = wall_millis();
        if let Err(e) = self.journal.checkpoint(upto) {
            // The horizon stays where it was, and with it every completion the
            // records still behind it could be replayed against.
            tracing::error!(error = %e, "journal checkpoint failed");
            return;
        }
        // The oldest replayed record is in the last group starting at or below it;
        // every group from there on is replayed. Their earliest stamp bounds the
        // horizon: stamps need not grow (copies are stamped early, and the wall
        // clock may step back).
        while self.stamps.len() > 1 && self.stamps[1].0 <= upto {
            self.stamps.pop_front();
        }
        let horizon = match self.stamps.front() {
            _ if self.held.is_empty() => Some(now),
            Some((first, _)) if *first <= upto => self.stamps.iter().map(|(_, ms)| *ms).min(),
            // Held since before this start: when it was written is not known.
            _ => None,
        };
        // Stored even when it moved back (a copy stamped early): what counts is
        // what is replayed now.
        if let Some(horizon) = horizon {
            self.horizon.store(horizon, Ordering::Release);
        }
    }

    fn status(&self) -> WalStatus {
        let journal = self.journal.status();
        let latency = &self.sync_latency;
        WalStatus {
            segments: journal.segments as u64,
            bytes: journal.bytes,
            next_lsn: journal.next_lsn,
            synced_lsn: journal.synced_lsn,
            checkpoint_lsn: journal.checkpoint_lsn,
            history_segments: journal.history_segments as u64,
            history_bytes: journal.history_bytes,
            history_secs: journal.history_secs,
            records_total: self.records,
            bytes_total: self.bytes,
            syncs_total: self.syncs,
            sync_micros_total: self.sync_micros,
            sync_latency: percentiles(latency),
            // Read now, on the writer thread itself: what is in force, not what
            // was asked for.
            writer_nice: crate::sched::nice_of_caller(),
            writer_slice_us: crate::sched::slice_of_caller().map(|ns| ns / 1000),
            // The store's thread: the kernel fills it in.
            committer_nice: None,
        }
    }
}

fn wall_millis() -> u64 {
    Utc::now().timestamp_millis().max(0) as u64
}

fn stopped() -> Error {
    Error::unavailable("the journal writer stopped")
}

pub fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    Percentiles {
        count: histogram.len(),
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_journal::JournalOptions;

    #[tokio::test]
    async fn a_record_too_large_refuses_its_own_append_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let options = JournalOptions {
            segment_bytes: 4096,
            ..Default::default()
        };
        let (journal, _) = Journal::open(dir.path(), options.clone()).unwrap();
        let writer = JournalWriter::start(journal, BTreeSet::new(), JournalMetrics::default(), 0).unwrap();
        let refused = writer.append(vec![b"small".to_vec(), vec![b'x'; 8192]]).await;
        assert_eq!(refused.unwrap_err().code, bbx_core::ErrorCode::PayloadTooLarge);
        writer.append(vec![b"next".to_vec()]).await.unwrap();
        writer.close().await;

        // Nothing of the refused append reached the disk, not even its small record.
        let (_, recovery) = Journal::open(dir.path(), options).unwrap();
        let payloads: Vec<_> = recovery.records.iter().map(|r| r.payload.as_slice()).collect();
        assert_eq!(payloads, [b"next".as_slice()]);
    }

    /// The replay horizon never passes a record still held: an op completed after
    /// that record was written could be replayed, so its completion must stay.
    #[tokio::test]
    async fn the_replay_horizon_stops_at_the_oldest_held_record() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        let writer = JournalWriter::start(journal, BTreeSet::new(), JournalMetrics::default(), 0).unwrap();
        let before_held = Utc::now();
        let held = writer.append(vec![b"held".to_vec()]).await.unwrap();
        let after_held = Utc::now();
        // Later records, released at once, do not move it past the held one.
        for _ in 0..3 {
            let lsns = writer.append(vec![b"later".to_vec()]).await.unwrap();
            writer.release(lsns);
            tokio::time::sleep(CHECKPOINT_EVERY / 2).await;
        }
        assert!(
            writer.replay_horizon() <= after_held,
            "it stays at or before the held record"
        );
        writer.release(held);
        let mut moved = false;
        for _ in 0..50 {
            writer.append(vec![]).await.unwrap();
            if writer.replay_horizon() > after_held {
                moved = true;
                break;
            }
            tokio::time::sleep(CHECKPOINT_EVERY / 10).await;
        }
        assert!(moved, "released, it moves on with the next checkpoint");
        assert!(writer.replay_horizon() > before_held);
        writer.close().await;
    }

    /// Copies of records of ops that may have completed meanwhile are stamped with
    /// the time their ops were picked: while such a copy is replayed, the horizon
    /// stays before that time, whatever the clock says when it is written.
    #[tokio::test]
    async fn a_copy_stamped_early_holds_the_horizon_back() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), JournalOptions::default()).unwrap();
        let writer = JournalWriter::start(journal, BTreeSet::new(), JournalMetrics::default(), 0).unwrap();
        let picked = Utc::now() - chrono::Duration::hours(1);
        let copy = writer.append_copies(vec![b"copy".to_vec()], picked).await.unwrap();
        for _ in 0..3 {
            let lsns = writer.append(vec![b"later".to_vec()]).await.unwrap();
            writer.release(lsns);
            tokio::time::sleep(CHECKPOINT_EVERY / 2).await;
        }
        assert!(
            writer.replay_horizon() <= picked,
            "{} after {picked}",
            writer.replay_horizon()
        );
        writer.release(copy);
        let mut moved = false;
        for _ in 0..50 {
            writer.append(vec![]).await.unwrap();
            if writer.replay_horizon() > picked + chrono::Duration::minutes(59) {
                moved = true;
                break;
            }
            tokio::time::sleep(CHECKPOINT_EVERY / 10).await;
        }
        assert!(moved, "released, the copy no longer holds it back");
        writer.close().await;
    }
}
