//! The AgentRing wired into the kernel: submission, journal, scheduling, execution
//! and completion of ops.
//!
//! The life of an op:
//! 1. **Submit.** A batch is checked whole (kinds, arguments, sizes, timeouts,
//!    dependencies, idempotency keys) and admitted whole into the scheduler's bounded
//!    queue, or refused whole (429 when full): nothing of a refused batch remains.
//! 2. **Journal.** Ops with effects are appended to the journal and acknowledged after
//!    its group `fdatasync`; ops without effects are acknowledged at once.
//! 3. **Run.** The dispatcher takes ops in scheduler order while it holds a running
//!    slot and a completion slot, passes them through their target's circuit
//!    breaker, and runs them; a timeout or a cancel drops the executor's future, and a
//!    retry waits on a timer, holding no slot.
//! 4. **Complete.** A kernel-service op's effect, its completion and its idempotency
//!    key commit in one atomic store write; other journaled or keyed ops write their
//!    completion alone. Only then is the completion visible, and the journal record
//!    released for the checkpoint.
//!
//! Recovery re-queues every journaled op without a durable completion. Because the
//! effect of a kernel-service op commits with its completion, such an op was either
//! completed (and is not re-run) or had no effect (and is run once now).

mod complete;
mod exec;
mod metrics;
mod open;
mod preread;
mod query;
mod run;
mod submit;

pub use metrics::RingMetrics;

use crate::auth::Caller;
use crate::store::{
    self, Applied, Store, Write, decode_completion, decode_idempotency, idempotency_key, storage_error,
};
use bbx_core::config::RingConfig;
use bbx_core::op::{
    BreakerInfo, Completion, CompletionStatus, OpInfo, OpState, Priority, Resolution, RingStats, SubmitBatch, SubmitOp,
    Submitted, SubmittedOp, WalStatus,
};
use bbx_core::quota::{Node, QuotaLimits, Reservation};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_journal::Lsn;
use bbx_quota::{Quotas, spend_key};
use bbx_ring::batch::{self, Dependency};
use bbx_ring::{
    Admission, BreakerConfig, BreakerState, Breakers, Effects, Entry, Idempotency, OpRecord, Refused, Tracked,
};
use bbx_ring::{Scheduler, SchedulerConfig};
use bbx_store::JournalWriter;
use bbx_store::journal::percentiles;
use bbx_tools::{Call, Context as ToolContext, Spend, Tools};
use chrono::{DateTime, Utc};
use exec::Exec;
use fjall::Readable;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use preread::{KeyEpochs, KeyedOp, Preread};
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest timeout an op may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Most ops the dispatcher takes from the scheduler under one lock.
const DISPATCH_BATCH: usize = 64;
/// What a refused submission is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Completions sent to event streams that a slow reader may fall behind by.
const EVENT_BUFFER: usize = 4096;

pub(crate) struct Ring {
    config: RingConfig,
    store: Arc<Store>,
    journal: JournalWriter,
    state: Mutex<RingState>,
    /// Wakes the dispatcher: an op was queued, or a slot freed.
    work: Arc<Notify>,
    /// Wakes submitters waiting for room in the queue.
    room: tokio::sync::Notify,
    room_waiters: AtomicUsize,
    running: Arc<Capacity>,
    completing: Arc<Capacity>,
    breakers: Breakers,
    /// See [`preread`].
    key_epochs: KeyEpochs,
    events: broadcast::Sender<Arc<Completion>>,
    closing: AtomicBool,
    /// Set by a panic while the state was locked (see [`StateGuard`]).
    poisoned: AtomicBool,
    /// Cancelled at shutdown: timers and executors stop without completing, and
    /// release the kernel's store.
    stopping: CancellationToken,
    started: Instant,
    metrics: RingMetrics,
    /// Every task the ring spawns, so that shutdown can wait for them to let go of
    /// the store.
    tasks: TaskTracker,
    tools: Arc<Tools>,
    quotas: Arc<Quotas>,
    /// The components whose op kinds the ring runs.
    components: Arc<bbx_component::Components>,
}

/// What the ring runs ops with, and the quotas it reserves and gives back.
pub(crate) struct Services {
    pub tools: Arc<Tools>,
    pub quotas: Arc<Quotas>,
    pub components: Arc<bbx_component::Components>,
}

/// Maps keyed by op id hash with Fx: ids are random UUIDv7s the ring generates, so
/// SipHash's defence against chosen keys buys nothing there, and it took 4 % of the
/// ring's CPU in a profile. Keys that clients choose (idempotency keys) keep SipHash.
struct RingState {
    /// Boxed: an op's entry is a few hundred bytes, moved on every insert,
    /// removal and rehash otherwise.
    live: FxHashMap<OpId, Box<Live>>,
    /// Idempotency keys of live ops.
    keys: HashMap<(AgentId, String), OpId>,
    scheduler: Scheduler<AgentId, OpId>,
    /// Live op -> the live ops waiting for it.
    dependents: FxHashMap<OpId, Vec<OpId>>,
    /// Completions of ops that were not recorded in the store.
    recent: Recent,
    counters: Counters,
    /// In-doubt ops an operator is resolving right now.
    resolving: FxHashSet<OpId>,
}

struct Live {
    record: Arc<OpRecord>,
    exec: Exec,
    lsn: Option<Lsn>,
    /// The journal's mark that an op with external effects first ran.
    started: Option<Lsn>,
    /// The budget held for it while it runs, what one attempt can spend at most,
    /// and what its attempts have spent so far.
    reservation: Option<Reservation>,
    attempt_max: Spend,
    spent: Spend,
    state: OpState,
    /// Acknowledged to the submitter (journaled if it has effects); until then it
    /// must not run.
    active: bool,
    /// Holds an admitted scheduler slot without being queued (blocked, or not yet
    /// active); released if it ends that way.
    holds_slot: bool,
    /// A completion is being recorded; nothing else may happen to the op.
    finishing: bool,
    /// Queued by a quota's `queue` action: it starts when a timer lets it.
    delayed: bool,
    cancel_requested: bool,
    blocked_on: usize,
    failed_dependency: Option<String>,
    attempts: u32,
    accepted: Instant,
    first_start: Option<Instant>,
    exec_time: Duration,
    cancel: Option<CancellationToken>,
    /// The completion queue of the submission that created the op: kept apart from
    /// `waiters`, which most ops never have, so that it costs no allocation.
    reaper: Option<Sink>,
    waiters: Vec<Waiter>,
}

/// The ring's state, locked. A panic while it is held may leave the state half
/// changed (an op counted but not queued, a slot never given back): the guard
/// notices the unwinding, and the ring then refuses new work and reports itself
/// not ready, so the operator restarts the kernel and recovery rebuilds the state
/// from the journal and the store.
struct StateGuard<'a> {
    state: parking_lot::MutexGuard<'a, RingState>,
    poisoned: &'a AtomicBool,
    /// Taken while the thread was already unwinding (a lock in a `Drop`): a
    /// panic then is not one that struck while the state was being changed.
    unwinding: bool,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = RingState;

    fn deref(&self) -> &RingState {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut RingState {
        &mut self.state
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.unwinding && !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(
                "a panic while the ring's state was locked: it may be half changed, so the kernel \
                 refuses new ops and reports not ready; restart it to recover from the journal"
            );
        }
    }
}

/// Removes the waiters of an op whose callers stopped waiting.
struct ForgetWaiter<'a> {
    ring: &'a Ring,
    id: OpId,
    /// A waiter was pushed and not taken by an answer.
    armed: bool,
}

impl Drop for ForgetWaiter<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(live) = self.ring.lock().live.get_mut(&self.id) {
            live.waiters.retain(|waiter| !waiter.abandoned());
        }
    }
}

/// Someone to hand an op's completion to.
enum Waiter {
    /// A caller of [`Ring::wait`].
    Once(oneshot::Sender<Arc<Completion>>),
    /// A submitter that reaps all of its ops' completions in one place.
    Sink(Sink),
}

/// Takes the completions of the ops of one submitter (a shared-memory session, or
/// an in-process completion queue); called outside the ring's lock.
pub(crate) type Sink = Arc<dyn Fn(Arc<Completion>) + Send + Sync>;

impl Waiter {
    /// A caller of [`Ring::wait`] that gave up.
    fn abandoned(&self) -> bool {
        matches!(self, Self::Once(sender) if sender.is_closed())
    }

    fn answer(self, completion: Arc<Completion>) {
        match self {
            Self::Once(sender) => {
                let _ = sender.send(completion);
            }
            Self::Sink(sink) => sink(completion),
        }
    }
}

struct Counters {
    latency: [Histogram<u64>; 4],
    /// (second since start, completions in it), the last 10 seconds.
    window: VecDeque<(u64, u64)>,
}

/// How one attempt ended.
enum Attempt {
    Ok(Value),
    Failed(Error),
    TimedOut,
    Cancelled,
}

impl Attempt {
    /// Whether the attempt failed in a way worth retrying, which is also what
    /// counts against its target's circuit breaker.
    fn transient(&self) -> bool {
        match self {
            Self::TimedOut => true,
            Self::Failed(e) => matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout),
            Self::Ok(_) | Self::Cancelled => false,
        }
    }
}

/// An attempt that ended, with what it holds until its op is handled.
struct Ended {
    id: OpId,
    attempt: Attempt,
    took: Duration,
    admission: Option<Breaker>,
    slots: Slots,
    /// At least this long before a retry (an open breaker says how long).
    retry_after: Option<Duration>,
}

impl Ended {
    /// An attempt that the breaker let through and that ran for `took`.
    fn ran(id: OpId, attempt: Attempt, took: Duration, admission: Breaker, slots: Slots) -> Self {
        Self {
            id,
            attempt,
            took,
            admission: Some(admission),
            slots,
            retry_after: None,
        }
    }
}

/// A breaker and how it let an attempt through.
type Breaker = (Arc<Tracked>, Admission);

/// A completion to record in the store before it settles, with the effect it
/// commits with and the slots it holds until then.
struct Pending {
    completion: Arc<Completion>,
    digest: Option<String>,
    effect: Option<Arc<dyn bbx_component::EffectOp>>,
    /// For an `in_doubt` completion: the op, kept so it can be retried.
    doubt: Option<Arc<OpRecord>>,
    /// The budget charge that commits with the completion.
    charge: Option<Charge>,
    admission: Option<Breaker>,
    slots: Slots,
}

/// What an op with a budget reservation is charged when it completes.
struct Charge {
    tenant: Arc<str>,
    agent: AgentId,
    reservation: Reservation,
    spent: Spend,
}

impl Charge {
    /// Its micro-dollars, never more than were reserved.
    fn micros(&self) -> u64 {
        self.spent.micros.min(self.reservation.micros)
    }

    /// The stored spend counters it adds to: each node it was reserved on, in
    /// each window.
    fn keys(&self) -> Vec<String> {
        let nodes: Vec<String> = if self.reservation.nodes.is_empty() {
            vec![
                Node::Tenant(self.tenant.to_string()).to_string(),
                Node::Agent(self.agent).to_string(),
            ]
        } else {
            self.reservation.nodes.clone()
        };
        nodes
            .iter()
            .flat_map(|node| {
                [&self.reservation.day, &self.reservation.month]
                    .into_iter()
                    .map(move |window| spend_key(node, window))
            })
            .collect()
    }
}

/// One reading of both clocks, for every op handled in one batch: a clock read per
/// op was a measurable share of the dispatch path.
#[derive(Clone, Copy)]
struct Moment {
    now: Instant,
    wall: DateTime<Utc>,
}

impl Moment {
    fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// What settling ops under the lock leaves to do once it is dropped.
struct Outbox {
    /// When the ops handled with this outbox ended.
    at: Moment,
    answers: Vec<(Waiter, Arc<Completion>)>,
    /// Whether anyone subscribed to the event stream (looked up once, since it
    /// takes the stream's lock): if not, no completion is collected for it.
    publish: bool,
    events: Vec<Arc<Completion>>,
    released: Vec<Lsn>,
    /// Ops no longer in flight, per agent (a record of one of them, and how
    /// many): their quota is given back once per agent, at the end of the lock
    /// scope that settled them.
    settled: Vec<(Arc<OpRecord>, u64)>,
    to_record: Vec<Pending>,
    /// A dependent was queued: the dispatcher has work.
    queued: bool,
    /// Completions the ring stopped remembering, dropped outside its lock.
    forgotten: Option<FxHashMap<OpId, Arc<Completion>>>,
}

impl Outbox {
    fn new(events: &broadcast::Sender<Arc<Completion>>) -> Self {
        Self {
            at: Moment::read(),
            answers: Vec::new(),
            publish: events.receiver_count() > 0,
            events: Vec::new(),
            released: Vec::new(),
            settled: Vec::new(),
            to_record: Vec::new(),
            queued: false,
            forgotten: None,
        }
    }
}

/// The completions of ops that left no record in the store (no effects, no key),
/// kept readable for a while: the newest `capacity` to `2 × capacity`, in two
/// generations. Forgetting them costs no removal per op (a random access into a
/// large table): a whole old generation is dropped at once.
struct Recent {
    current: FxHashMap<OpId, Arc<Completion>>,
    previous: FxHashMap<OpId, Arc<Completion>>,
    generation: usize,
}

impl Recent {
    fn new(capacity: usize) -> Self {
        Self {
            current: FxHashMap::default(),
            previous: FxHashMap::default(),
            generation: capacity.max(1),
        }
    }

    fn get(&self, id: &OpId) -> Option<&Arc<Completion>> {
        self.current.get(id).or_else(|| self.previous.get(id))
    }

    /// Remembers a completion; returns the generation it pushed out, if any.
    fn insert(&mut self, id: OpId, completion: Arc<Completion>) -> Option<FxHashMap<OpId, Arc<Completion>>> {
        self.current.insert(id, completion);
        if self.current.len() < self.generation {
            return None;
        }
        // Sized for a whole generation at once: growing by doubling would rehash it
        // a dozen times under the ring's lock.
        let next = FxHashMap::with_capacity_and_hasher(self.generation, Default::default());
        let full = std::mem::replace(&mut self.current, next);
        Some(std::mem::replace(&mut self.previous, full))
    }
}

/// The slots a running op holds: freed when its attempt ends (running) and when its
/// completion is durable (completing).
struct Slots {
    running: Option<Permit>,
    completing: Option<Permit>,
}

/// A bounded number of slots, claimed with a compare-and-swap (the dispatcher and
/// shared-memory sessions both start ops). A claimer that got none announces it in
/// `starved`; whoever gives slots back after that wakes the dispatcher.
struct Capacity {
    used: AtomicUsize,
    limit: usize,
    starved: AtomicBool,
    wake: Arc<Notify>,
}

impl Capacity {
    fn new(limit: usize, wake: Arc<Notify>) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            starved: AtomicBool::new(false),
            wake,
        })
    }

    /// Claims up to `max` free slots; how many it got.
    fn claim(&self, max: usize) -> usize {
        let got = self.try_claim(max);
        if got > 0 || max == 0 {
            return got;
        }
        // None free: announce it, then look once more. A slot given back in
        // between is either seen here or its giver sees the announcement (both
        // sides are SeqCst), so the dispatcher cannot sleep past a free slot that
        // another claimer held for a moment.
        self.starved.store(true, Ordering::SeqCst);
        self.try_claim(max)
    }

    fn try_claim(&self, max: usize) -> usize {
        let mut got = 0;
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
            got = max.min(self.limit.saturating_sub(used));
            (got > 0).then_some(used + got)
        });
        got
    }

    /// Gives slots back (unused claims, or a finished op's permit), waking the
    /// dispatcher if a claimer went without.
    fn unclaim(&self, count: usize) {
        if count == 0 {
            return;
        }
        self.used.fetch_sub(count, Ordering::SeqCst);
        if self.starved.load(Ordering::SeqCst) && self.starved.swap(false, Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// A permit for one slot already claimed.
    fn permit(self: &Arc<Self>) -> Permit {
        Permit(self.clone())
    }
}

/// One slot of a [`Capacity`], given back when dropped.
struct Permit(Arc<Capacity>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.unclaim(1);
    }
}

/// An op of a batch after the checks: its record, built from the submitted op
/// before the ring's lock is taken (its id is used only if the op turns out new,
/// and its dependencies are filled in when they are resolved, under the lock).
struct Checked {
    record: Arc<OpRecord>,
    exec: Exec,
}

/// A batch after admission: what each entry turned into, and the records of the
/// new ops with effects, to journal.
type Admitted = (Vec<Slot>, Vec<(OpId, Arc<OpRecord>)>);

/// An op the dispatcher starts: its record, executor and, if its executor can be
/// cancelled while running, the token that does it.
type Start = (OpId, Arc<OpRecord>, Exec, Option<CancellationToken>);

/// What a batch entry turned into.
#[derive(Clone, Copy)]
enum Slot {
    New(OpId),
    Existing(OpId),
}

impl Slot {
    fn id(self) -> OpId {
        match self {
            Self::New(id) | Self::Existing(id) => id,
        }
    }
}

impl Ring {
    fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            state: self.state.lock(),
            poisoned: &self.poisoned,
            unwinding: std::thread::panicking(),
        }
    }

    /// Whether a panic struck while the state was locked (see [`StateGuard`]).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn metrics(&self) -> &RingMetrics {
        &self.metrics
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Completion>> {
        self.events.subscribe()
    }

    /// See [`JournalWriter::replay_horizon`].
    pub fn replay_horizon(&self) -> DateTime<Utc> {
        self.journal.replay_horizon()
    }

    pub async fn wal_status(&self) -> Result<WalStatus> {
        self.journal.status().await
    }

    /// Refuses new submissions, stops the dispatcher and syncs the journal.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.stopping.cancel();
        self.work.notify_one();
    }

    /// Cancelled when the ring closes.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }
}

/// A journaled op without a completion, found at start.
struct Recovered {
    lsn: Lsn,
    /// Its start mark and the budget it reserved, if it had started (an op with
    /// external effects).
    started: Option<(Lsn, Option<Reservation>)>,
    op: OpRecord,
}

/// An op picked to be journaled again: its id, its records (acceptance, start
/// mark) when picked, and the entries to append.
type CopyForward = (OpId, (Option<Lsn>, Option<Lsn>), Vec<Vec<u8>>);

/// An op about to end.
struct Finish {
    id: OpId,
    status: CompletionStatus,
    result: Option<Value>,
    error: Option<Error>,
    slot: Option<Permit>,
}

impl Finish {
    fn new(id: OpId, status: CompletionStatus, result: Option<Value>, error: Option<Error>) -> Self {
        Self {
            id,
            status,
            result,
            error,
            slot: None,
        }
    }

    fn cancelled(id: OpId, reason: &str) -> Self {
        Self::new(
            id,
            CompletionStatus::Cancelled,
            None,
            Some(Error::new(ErrorCode::FailedPrecondition, reason.to_owned())),
        )
    }

    /// An op with external effects that was running when the kernel stopped.
    fn in_doubt(id: OpId) -> Self {
        Self::new(
            id,
            CompletionStatus::InDoubt,
            None,
            Some(Error::new(
                ErrorCode::InDoubt,
                "the op was running when the kernel stopped; its effect may or may not have happened. \
                 It is not run again on its own: settle it with `bbx ring resolve OP --as ok|failed|retry`",
            )),
        )
    }

    fn with_slot(mut self, slot: Option<Permit>) -> Self {
        self.slot = slot;
        self
    }
}

/// The length of a value's JSON text, without building the text.
fn json_size(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// What a submitter that reaps is handed for an entry of its batch whose op it
/// cannot follow: an `unavailable` error naming the op, which `GET /v1/ops/{id}` may
/// still know.
fn untracked(id: OpId, op: &OpRecord, why: String) -> Arc<Completion> {
    let now = Utc::now();
    Arc::new(Completion {
        op_id: id,
        agent: op.agent,
        tenant: op.tenant.clone(),
        kind: op.kind.clone(),
        status: CompletionStatus::Error,
        result: None,
        error: Some(
            Error::unavailable(format!("the outcome of op {id} is unknown to this submission: {why}"))
                .with_details(serde_json::json!({ "op_id": id })),
        ),
        attempts: 0,
        queue_us: 0,
        exec_us: 0,
        total_us: 0,
        submitted_at: now,
        completed_at: now,
        idempotency_key: op.idempotency.as_ref().map(|i| i.key.clone()),
        user_data: op.user_data.clone(),
        trace: op.trace.clone(),
    })
}

fn dependency_failure(dep: &OpId, status: &str) -> String {
    format!("dependency {dep} ended with status {status}")
}

#[cfg(test)]
mod tests;
