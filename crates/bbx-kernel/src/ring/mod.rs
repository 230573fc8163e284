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

mod exec;
mod metrics;
mod preread;

pub use exec::KINDS;
pub use metrics::RingMetrics;

use crate::auth::Caller;
use crate::store::{
    self, Applied, Effect, Store, Write, decode_completion, decode_idempotency, idempotency_key, storage_error,
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
        if std::thread::panicking() && !self.poisoned.swap(true, Ordering::AcqRel) {
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
}

impl Drop for ForgetWaiter<'_> {
    fn drop(&mut self) {
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
    effect: Option<Effect>,
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
    /// Starts the ring on a journal whose writer holds every record in `recovered`
    /// (the journal's records after its checkpoint): ops accepted but not completed
    /// are queued again and their records kept; the ring's other records are
    /// released. The store has already replayed its own records.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        config: RingConfig,
        store: Arc<Store>,
        journal: JournalWriter,
        metrics: RingMetrics,
        recovered: Vec<bbx_journal::Record>,
        tasks: TaskTracker,
        tools: Arc<Tools>,
        quotas: Arc<Quotas>,
    ) -> Result<Arc<Self>> {
        let view = store.view();
        // An op retried after it was in doubt is journaled again, one incarnation
        // up; only its latest incarnation and that one's start mark count.
        let mut accepted: FxHashMap<OpId, (Lsn, OpRecord)> = FxHashMap::default();
        let mut order = Vec::new();
        let mut started: FxHashMap<(OpId, u32), (Lsn, Option<Reservation>)> = FxHashMap::default();
        let mut released = Vec::new();
        for record in recovered {
            if bbx_store::redo::is_redo(&record.payload) {
                continue;
            }
            released.push(record.lsn);
            match Entry::decode(&record.payload)? {
                Entry::Accepted(op) => {
                    let newer = accepted
                        .get(&op.op_id)
                        .is_none_or(|(_, known)| op.incarnation >= known.incarnation);
                    if newer {
                        if !accepted.contains_key(&op.op_id) {
                            order.push(op.op_id);
                        }
                        accepted.insert(op.op_id, (record.lsn, op));
                    }
                }
                Entry::Started {
                    op_id,
                    incarnation,
                    reserved,
                } => {
                    started.insert((op_id, incarnation), (record.lsn, reserved));
                }
            }
        }
        let mut pending = Vec::new();
        let mut held = FxHashSet::default();
        for id in order {
            let Some((lsn, op)) = accepted.remove(&id) else {
                continue;
            };
            let done = view
                .get(store.keyspace(store::OPS), op.op_id.as_bytes())
                .map_err(|e| storage_error("read ops", e))?
                .is_some();
            if !done {
                let mark = started.remove(&(op.op_id, op.incarnation));
                held.insert(lsn);
                held.extend(mark.as_ref().map(|(lsn, _)| *lsn));
                pending.push(Recovered { lsn, started: mark, op });
            }
        }
        released.retain(|lsn| !held.contains(lsn));
        journal.release(released);
        let ring = Arc::new(Self::new(config, store, journal, metrics, tasks.clone(), tools, quotas));
        if !pending.is_empty() {
            tracing::info!(ops = pending.len(), "re-queued journaled ops that had not completed");
        }
        ring.recover(pending)?;
        tasks.spawn(ring.clone().dispatch());
        tasks.spawn(ring.clone().copy_forward_every());
        tasks.spawn(ring.clone().evict_idle_breakers());
        Ok(ring)
    }

    fn new(
        config: RingConfig,
        store: Arc<Store>,
        journal: JournalWriter,
        metrics: RingMetrics,
        tasks: TaskTracker,
        tools: Arc<Tools>,
        quotas: Arc<Quotas>,
    ) -> Self {
        let scheduler = Scheduler::new(SchedulerConfig {
            capacity: config.submission_capacity,
            agent_capacity: config.agent_capacity,
            aging: Duration::from_millis(config.aging_ms),
            shed_low_above: config.shed_low_above,
        });
        let breakers = Breakers::new(BreakerConfig {
            failure_threshold: config.breaker_failures,
            open_for: Duration::from_millis(config.breaker_open_ms),
            half_open_trials: config.breaker_trials,
        });
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
        let work = Arc::new(Notify::new());
        Self {
            running: Capacity::new(config.max_running, work.clone()),
            completing: Capacity::new(config.completion_capacity, work.clone()),
            work,
            state: Mutex::new(RingState {
                live: FxHashMap::default(),
                keys: HashMap::new(),
                scheduler,
                dependents: FxHashMap::default(),
                recent: Recent::new(config.recent_completions),
                resolving: FxHashSet::default(),
                counters: Counters {
                    latency: [histogram(), histogram(), histogram(), histogram()],
                    window: VecDeque::new(),
                },
            }),
            config,
            store,
            journal,
            room: tokio::sync::Notify::new(),
            room_waiters: AtomicUsize::new(0),
            breakers,
            key_epochs: KeyEpochs::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
            closing: AtomicBool::new(false),
            poisoned: AtomicBool::new(false),
            stopping: CancellationToken::new(),
            started: Instant::now(),
            metrics,
            tasks,
            tools,
            quotas,
        }
    }

    /// Puts recovered ops back, with their dependencies and idempotency keys. They
    /// were admitted before the crash, so they are not refused now. An op with
    /// external effects that had started is not run again: it completes `in_doubt`.
    fn recover(self: &Arc<Self>, pending: Vec<Recovered>) -> Result<()> {
        // Journal order, so that each agent's ops are queued again in the order they came.
        let order: Vec<(OpId, bool)> = pending.iter().map(|r| (r.op.op_id, r.started.is_some())).collect();
        let ids: FxHashSet<OpId> = order.iter().map(|(id, _)| *id).collect();
        let mut finish = Vec::new();
        let mut st = self.lock();
        let now = Instant::now();
        for Recovered { lsn, started, op } in pending {
            let exec = Exec::parse(&op.kind, &op.args)?;
            st.scheduler.readmit(op.agent);
            let id = op.op_id;
            self.quotas.reacquire(&op.tenant, op.agent, 1);
            let (started, reservation) = started.map_or((None, None), |(lsn, r)| (Some(lsn), r));
            if let Some(r) = &reservation {
                self.quotas.rereserve(&op.tenant, op.agent, r);
            }
            self.register(&mut st, (Arc::new(op), exec, Some(lsn)), &ids, now, &Preread::default())?;
            if let Some(live) = st.live.get_mut(&id) {
                live.started = started;
                live.reservation = reservation;
            }
        }
        for (id, in_doubt) in order {
            if in_doubt {
                finish.push(Finish::in_doubt(id));
            } else {
                Self::activate(&mut st, id, None, now, &mut finish);
            }
        }
        drop(st);
        self.work.notify_one();
        self.finish_all(finish);
        Ok(())
    }

    /// Submits a batch. The submitter starts its ops itself right after, with
    /// [`Self::dispatch_once`], which saves waking the dispatcher task; only ops
    /// accepted after a journal sync (when the submitter may be long gone) wake it.
    pub async fn submit(
        self: &Arc<Self>,
        caller: &Caller,
        ops: Vec<SubmitOp>,
        tenants: Vec<Arc<str>>,
        wait: Option<Duration>,
        start_after: Option<Duration>,
        reaper: Option<&Sink>,
    ) -> Result<Submitted> {
        if self.closing.load(Ordering::Acquire) {
            return Err(Error::unavailable("the kernel is shutting down"));
        }
        if self.is_poisoned() {
            return Err(Error::unavailable(
                "the ring's state may be inconsistent after an internal error; restart the kernel",
            ));
        }
        debug_assert_eq!(ops.len(), tenants.len(), "one tenant per op");
        if ops.is_empty() {
            return Err(Error::invalid_field("ops", "a submission needs at least one op"));
        }
        if wait.is_some_and(|wait| wait > Duration::from_millis(SubmitBatch::MAX_WAIT_MS)) {
            return Err(Error::invalid_field(
                "wait_ms",
                format!("wait_ms is at most {}", SubmitBatch::MAX_WAIT_MS),
            ));
        }
        if ops.len() > self.config.max_batch {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a submission holds at most {} ops; this one has {}",
                    self.config.max_batch,
                    ops.len()
                ),
            ));
        }
        let lists: Vec<&[String]> = ops.iter().map(|op| op.depends_on.as_slice()).collect();
        let deps = batch::dependencies(&lists)?;
        let submitted_at = Utc::now();
        let mut checked = ops
            .into_iter()
            .zip(tenants)
            .enumerate()
            .map(|(index, (op, tenant))| self.check(op, tenant, submitted_at).map_err(|e| batch::at_op(index, e)))
            .collect::<Result<Vec<_>>>()?;

        let keys = checked.iter().filter_map(|op| {
            let record = &op.record;
            record.idempotency.as_ref().map(|i| (record.agent, i.key.as_str()))
        });
        let preread = Preread::read(self, keys, &deps)?;
        let deadline = wait.map(|w| Instant::now() + w);
        let (slots, records) = loop {
            let room = self.room.notified();
            match self.admit(caller, &mut checked, &deps, &preread) {
                Ok(admitted) => break admitted,
                // Raised before any op of the batch is registered: a retry finds
                // none of them live, and reuses their ids and records as they are.
                Err(e) if e.code == ErrorCode::ResourceExhausted => {
                    let Some(left) = deadline.and_then(|d| d.checked_duration_since(Instant::now())) else {
                        self.metrics.refused.inc();
                        return Err(e);
                    };
                    self.room_waiters.fetch_add(1, Ordering::AcqRel);
                    let _ = tokio::time::timeout(left, room).await;
                    self.room_waiters.fetch_sub(1, Ordering::AcqRel);
                }
                Err(e) => return Err(e),
            }
        };

        let journaled: Vec<OpId> = records.iter().map(|(id, _)| *id).collect();
        let lsns = if records.is_empty() {
            Ok(Vec::new())
        } else {
            let encoded = records.iter().map(|(_, record)| record.encode_accepted()).collect();
            self.journal.append(encoded).await
        };
        let mut finish = Vec::new();
        // Completions owed to the reaper, or to submitters that joined an op of
        // this batch, handed over once the lock is let go.
        let mut answers: Vec<(Waiter, Arc<Completion>)> = Vec::new();
        {
            let mut st = self.lock();
            let now = Instant::now();
            match &lsns {
                Ok(lsns) => {
                    let lsn_of: FxHashMap<OpId, Lsn> = journaled.iter().copied().zip(lsns.iter().copied()).collect();
                    for (slot, op) in slots.iter().zip(&checked) {
                        match (slot, reaper) {
                            (Slot::New(id), _) => {
                                if let Some(live) = st.live.get_mut(id) {
                                    live.delayed = start_after.is_some();
                                    live.reaper = reaper.cloned();
                                }
                                Self::activate(&mut st, *id, lsn_of.get(id).copied(), now, &mut finish);
                            }
                            (Slot::Existing(id), Some(sink)) => match st.live.get_mut(id) {
                                Some(live) => live.waiters.push(Waiter::Sink(sink.clone())),
                                None => {
                                    // Done, or (rarely) gone between admission and now:
                                    // expired, or being retried after it was in doubt.
                                    let done = match self.completion(&st, id) {
                                        Ok(Some(done)) => done,
                                        Ok(None) => untracked(*id, &op.record, "it is no longer known here".into()),
                                        Err(e) => {
                                            untracked(*id, &op.record, format!("its completion cannot be read ({e})"))
                                        }
                                    };
                                    answers.push((Waiter::Sink(sink.clone()), done));
                                }
                            },
                            (Slot::Existing(_), None) => {}
                        }
                    }
                }
                Err(e) => {
                    // Nothing was acknowledged: the new ops go as if never submitted.
                    let why = format!("it was not accepted: its journal record could not be written ({e})");
                    for (slot, op) in slots.iter().zip(&checked) {
                        if let Slot::New(id) = slot {
                            for waiter in self.discard(&mut st, *id) {
                                answers.push((waiter, untracked(*id, &op.record, why.clone())));
                            }
                        }
                    }
                }
            }
            self.gauge_queues(&st);
        }
        if !journaled.is_empty() {
            self.work.notify_one();
        }
        self.finish_all(finish);
        for (waiter, completion) in answers {
            waiter.answer(completion);
        }
        lsns?;
        if let Some(delay) = start_after {
            let queued: Vec<OpId> = slots
                .iter()
                .filter_map(|slot| match slot {
                    Slot::New(id) => Some(*id),
                    Slot::Existing(_) => None,
                })
                .collect();
            let ring = self.clone();
            let stopping = self.stopping.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = stopping.cancelled() => {}
                    () = tokio::time::sleep(delay) => ring.start_delayed(queued),
                }
            });
        }
        Ok(Submitted {
            ops: slots
                .iter()
                .map(|slot| SubmittedOp {
                    op_id: slot.id(),
                    deduplicated: matches!(slot, Slot::Existing(_)),
                })
                .collect(),
        })
    }

    /// The checks of one op that need no shared state; makes its record.
    fn check(&self, op: SubmitOp, tenant: Arc<str>, submitted_at: DateTime<Utc>) -> Result<Checked> {
        let exec = Exec::parse(&op.kind, &op.args)?;
        let size = json_size(&op.args);
        if size > self.config.max_args_bytes {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!("args are {size} bytes; the limit is {}", self.config.max_args_bytes),
            ));
        }
        if let Some(policy) = &op.retries {
            policy.validate()?;
        }
        let timeout_ms = op.timeout_ms.unwrap_or(self.config.default_timeout_ms);
        if timeout_ms == 0 || Duration::from_millis(timeout_ms) > MAX_TIMEOUT {
            return Err(Error::invalid_field(
                "timeout_ms",
                "timeout_ms must be 1 ms to 24 hours",
            ));
        }
        let idempotency = batch::idempotency_key(&op)?.map(|key| Idempotency {
            key,
            digest: batch::args_digest(&op.kind, &op.args),
        });
        let record = OpRecord {
            op_id: OpId::generate_at(submitted_at),
            agent: op.agent,
            tenant,
            kind: exec::interned(op.kind),
            args: op.args,
            priority: op.priority,
            timeout_ms,
            retries: op.retries,
            depends_on: Vec::new(),
            idempotency,
            user_data: op.user_data,
            trace: op.trace,
            submitted_at,
            incarnation: 0,
        };
        Ok(Checked {
            record: Arc::new(record),
            exec,
        })
    }

    /// Resolves keys and dependencies and admits the new ops, all under one lock, so
    /// that two submissions of one key cannot both create an op. Returns each entry's
    /// op and the records of the new ops with effects, to journal.
    fn admit(
        &self,
        caller: &Caller,
        ops: &mut [Checked],
        deps: &[Vec<Dependency>],
        preread: &Preread,
    ) -> Result<Admitted> {
        let mut st = self.lock();
        let mut slots: Vec<Slot> = Vec::with_capacity(ops.len());
        // SipHash: the keys are the callers' own strings.
        let mut in_batch: HashMap<(AgentId, &str), usize> = HashMap::new();
        for (index, op) in ops.iter().enumerate() {
            let record = &op.record;
            let existing = match &record.idempotency {
                Some(Idempotency { key, digest }) => {
                    let earlier = in_batch.get(&(record.agent, key.as_str())).map(|&i| {
                        let digest = ops[i].record.idempotency.as_ref().map(|i| i.digest.clone());
                        (slots[i].id(), digest)
                    });
                    let known = match earlier {
                        Some(found) => Some(found),
                        None => self.known_key(&st, &record.agent, key, preread)?,
                    };
                    match known {
                        Some((id, Some(recorded))) if recorded == *digest => Some(id),
                        Some((id, _)) => {
                            return Err(batch::at_op(
                                index,
                                Error::new(
                                    ErrorCode::AlreadyExists,
                                    format!(
                                        "idempotency key {key:?} was already used for op {id} with a different kind or \
                                         different args; use a new key for a different op"
                                    ),
                                )
                                .with_details(serde_json::json!({ "op_id": id, "idempotency_key": key })),
                            ));
                        }
                        None => {
                            in_batch.insert((record.agent, key.as_str()), index);
                            None
                        }
                    }
                }
                None => None,
            };
            slots.push(match existing {
                Some(id) => Slot::Existing(id),
                None => Slot::New(record.op_id),
            });
        }

        // Dependencies: in-batch references become op ids; others must exist and be
        // visible to the caller.
        let mut resolved: Vec<Vec<OpId>> = Vec::with_capacity(ops.len());
        for (index, op_deps) in deps.iter().enumerate() {
            let mut ids = Vec::with_capacity(op_deps.len());
            for dep in op_deps {
                let id = match dep {
                    Dependency::InBatch(i) => slots[*i].id(),
                    Dependency::Op(id) => {
                        let tenant = match (st.live.get(id), st.recent.get(id)) {
                            (Some(live), _) => Some(live.record.tenant.clone()),
                            (None, Some(done)) => Some(done.tenant.clone()),
                            (None, None) => preread.completion(self, id)?.map(|c| c.tenant.clone()),
                        };
                        match tenant {
                            Some(tenant) => caller
                                .check_owner(&tenant, "op", id)
                                .map_err(|e| batch::at_op(index, e))?,
                            None => return Err(batch::at_op(index, Error::not_found("op", id))),
                        }
                        *id
                    }
                };
                ids.push(id);
            }
            resolved.push(ids);
        }

        let admitted: Vec<(AgentId, Priority)> = slots
            .iter()
            .zip(ops.iter())
            .filter(|(slot, _)| matches!(slot, Slot::New(_)))
            .map(|(_, op)| (op.record.agent, op.record.priority))
            .collect();
        // Ops in flight, per agent, against the quotas of the agent and its tenant.
        let mut per_agent: Vec<(&str, AgentId, u64)> = Vec::new();
        for (slot, op) in slots.iter().zip(ops.iter()) {
            if let Slot::New(_) = slot {
                match per_agent.iter_mut().find(|(_, agent, _)| *agent == op.record.agent) {
                    Some((_, _, n)) => *n += 1,
                    None => per_agent.push((&op.record.tenant, op.record.agent, 1)),
                }
            }
        }
        let release = |taken: &[(&str, AgentId, u64)]| {
            for (tenant, agent, n) in taken {
                self.quotas.release(tenant, *agent, *n);
            }
        };
        for (index, (tenant, agent, n)) in per_agent.iter().enumerate() {
            if let Err(exceeded) = self.quotas.acquire(tenant, *agent, *n) {
                release(&per_agent[..index]);
                return Err(exceeded.into());
            }
        }
        if let Err(refused) = st.scheduler.admit(&admitted) {
            release(&per_agent);
            let message = match refused {
                Refused::Full { .. } | Refused::AgentFull { .. } | Refused::Shed => refused.to_string(),
            };
            return Err(Error::resource_exhausted(message, RETRY_AFTER));
        }

        // Every new op takes its live entry now, so that a dependency on a later op
        // of the same batch waits for it like any other.
        let arriving: FxHashSet<OpId> = if resolved.iter().any(|ids| !ids.is_empty()) {
            slots
                .iter()
                .filter_map(|slot| match slot {
                    Slot::New(id) => Some(*id),
                    Slot::Existing(_) => None,
                })
                .collect()
        } else {
            FxHashSet::default()
        };
        let now = Instant::now();
        let mut records = Vec::new();
        for (index, dep_ids) in resolved.into_iter().enumerate() {
            let Slot::New(id) = slots[index] else {
                self.metrics.deduplicated.inc();
                continue;
            };
            let op = &mut ops[index];
            if !dep_ids.is_empty() {
                Arc::make_mut(&mut op.record).depends_on = dep_ids;
            }
            if op.exec.effects() != Effects::None {
                records.push((id, op.record.clone()));
            }
            let registered = self.register(
                &mut st,
                (op.record.clone(), op.exec.clone(), None),
                &arriving,
                now,
                preread,
            );
            if let Err(e) = registered {
                // Only a storage failure gets here; the batch still goes whole.
                // Discarding an op gives its quota back; those never registered
                // give theirs back here.
                for (slot, op) in slots.iter().zip(ops.iter()) {
                    if let Slot::New(id) = slot {
                        if st.live.contains_key(id) {
                            // Nobody joined it: the lock has been held since it was admitted.
                            self.discard(&mut st, *id);
                        } else {
                            self.quotas.release(&op.record.tenant, op.record.agent, 1);
                            st.scheduler.release(&op.record.agent);
                        }
                    }
                }
                return Err(e);
            }
            self.metrics.submitted.inc();
        }
        Ok((slots, records))
    }

    /// Makes an admitted op live: links it to its dependencies still in flight (live,
    /// or `arriving` with it), notes one that already ended without `ok`, and claims
    /// its idempotency key. The op holds its scheduler slot until it is queued.
    fn register(
        &self,
        st: &mut RingState,
        (record, exec, lsn): (Arc<OpRecord>, Exec, Option<Lsn>),
        arriving: &FxHashSet<OpId>,
        accepted: Instant,
        preread: &Preread,
    ) -> Result<()> {
        let id = record.op_id;
        let mut blocked_on = 0;
        let mut failed_dependency = None;
        for dep in &record.depends_on {
            if arriving.contains(dep) || st.live.contains_key(dep) {
                blocked_on += 1;
                st.dependents.entry(*dep).or_default().push(id);
                continue;
            }
            let done = match st.recent.get(dep) {
                Some(done) => Some(done.clone()),
                None => preread.completion(self, dep)?,
            };
            match done {
                Some(done) if done.status == CompletionStatus::Ok => {}
                Some(done) => failed_dependency = Some(dependency_failure(dep, done.status.as_str())),
                None => failed_dependency = Some(format!("dependency {dep} is no longer known (lost in a restart)")),
            }
        }
        if let Some(idempotency) = &record.idempotency {
            st.keys.insert((record.agent, idempotency.key.clone()), id);
        }
        st.live.insert(
            id,
            Box::new(Live {
                record,
                exec,
                lsn,
                started: None,
                reservation: None,
                attempt_max: Spend::default(),
                spent: Spend::default(),
                state: OpState::Blocked,
                active: false,
                holds_slot: true,
                finishing: false,
                delayed: false,
                cancel_requested: false,
                blocked_on,
                failed_dependency,
                attempts: 0,
                accepted,
                first_start: None,
                exec_time: Duration::ZERO,
                cancel: None,
                reaper: None,
                waiters: Vec::new(),
            }),
        );
        Ok(())
    }

    /// The op that a key names and the digest it was submitted with, if the key is in use.
    fn known_key(&self, st: &RingState, agent: &AgentId, key: &str, preread: &Preread) -> Result<Option<KeyedOp>> {
        if let Some(id) = st.keys.get(&(*agent, key.to_owned())) {
            let digest = st
                .live
                .get(id)
                .and_then(|l| l.record.idempotency.as_ref())
                .map(|i| i.digest.clone());
            return Ok(Some((*id, digest)));
        }
        preread.key(self, agent, key)
    }

    /// The op the store records for a key.
    fn stored_key(&self, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>> {
        let stored = self
            .store
            .view()
            .get(self.store.keyspace(store::IDEM), idempotency_key(agent, key))
            .map_err(|e| storage_error("read idempotency keys", e))?;
        stored
            .map(|bytes| decode_idempotency(&bytes).map(|(id, digest)| (id, Some(digest))))
            .transpose()
    }

    /// Makes an admitted op runnable once it is acknowledged, with its journal
    /// position if it was journaled.
    fn activate(st: &mut RingState, id: OpId, lsn: Option<Lsn>, now: Instant, finish: &mut Vec<Finish>) {
        let Some(live) = st.live.get_mut(&id) else { return };
        live.active = true;
        live.lsn = lsn.or(live.lsn);
        Self::release_if_ready(st, id, now, finish);
    }

    /// Forgets an admitted op that was never acknowledged; returns those who joined
    /// it meanwhile (deduplicated submissions that reap), to be told.
    fn discard(&self, st: &mut RingState, id: OpId) -> Vec<Waiter> {
        let Some(live) = st.live.remove(&id) else {
            return Vec::new();
        };
        self.quotas.release(&live.record.tenant, live.record.agent, 1);
        if live.holds_slot {
            st.scheduler.release(&live.record.agent);
        }
        st.dependents.remove(&id);
        if let Some(idempotency) = &live.record.idempotency {
            st.keys.remove(&(live.record.agent, idempotency.key.clone()));
            self.key_epochs.bump(&live.record.agent, &idempotency.key);
        }
        live.waiters
    }

    /// Queues an active op whose dependencies are done, or ends it if one failed or
    /// it was cancelled while it waited.
    fn release_if_ready(st: &mut RingState, id: OpId, now: Instant, finish: &mut Vec<Finish>) -> bool {
        let Some(live) = st.live.get_mut(&id) else { return false };
        if !live.active || live.finishing || !live.holds_slot || live.delayed {
            return false;
        }
        if live.cancel_requested {
            finish.push(Finish::cancelled(id, "cancelled before it started"));
        } else if let Some(reason) = live.failed_dependency.clone() {
            finish.push(Finish::cancelled(id, &reason));
        } else if live.blocked_on == 0 {
            live.holds_slot = false;
            live.state = OpState::Queued;
            let (agent, priority) = (live.record.agent, live.record.priority);
            st.scheduler.enqueue(agent, priority, id, now);
            return true;
        }
        false
    }

    /// Copies the journal records of ops that have been live for a whole pass
    /// forward, once every `ring.journal_copy_forward_secs`.
    async fn copy_forward_every(self: Arc<Self>) {
        let every = Duration::from_secs(self.config.journal_copy_forward_secs);
        let mut floor = 0;
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.copy_forward(floor).await {
                Ok(next) => floor = next,
                Err(e) => tracing::warn!(error = %e, "copying long-running ops forward in the journal failed"),
            }
        }
    }

    /// Re-journals every live op whose records are older than `floor` and releases
    /// the old records, so that the checkpoint (the oldest record still needed) can
    /// move on while the op runs. Recovery keeps the newest record of an
    /// incarnation, so either copy recovers the op. Returns the next pass's floor:
    /// where the journal ends now.
    pub(crate) async fn copy_forward(&self, floor: Lsn) -> Result<Lsn> {
        let next = self.journal.status().await?.next_lsn;
        let picked: Vec<CopyForward> = {
            let st = self.lock();
            st.live
                .iter()
                .filter(|(id, live)| {
                    let old = live.lsn.is_some_and(|lsn| lsn < floor) || live.started.is_some_and(|lsn| lsn < floor);
                    old && !live.finishing && !st.resolving.contains(id)
                })
                .map(|(id, live)| {
                    let mut entries = vec![live.record.encode_accepted()];
                    if live.started.is_some() {
                        let started = Entry::Started {
                            op_id: *id,
                            incarnation: live.record.incarnation,
                            reserved: live.reservation.clone(),
                        };
                        entries.push(started.encode());
                    }
                    (*id, (live.lsn, live.started), entries)
                })
                .collect()
        };
        if picked.is_empty() {
            return Ok(next);
        }
        let counts: Vec<usize> = picked.iter().map(|(_, _, entries)| entries.len()).collect();
        let records = picked
            .iter()
            .flat_map(|(_, _, entries)| entries.iter().cloned())
            .collect();
        let mut lsns = self.journal.append(records).await?.into_iter();
        let mut released = Vec::new();
        let mut st = self.lock();
        for ((id, before, _), count) in picked.into_iter().zip(counts) {
            let copies: Vec<Lsn> = lsns.by_ref().take(count).collect();
            match (st.live.get_mut(&id), copies.first()) {
                // Unchanged meanwhile: the copies replace the originals.
                (Some(live), Some(&accepted)) if (live.lsn, live.started) == before && !live.finishing => {
                    released.extend(live.lsn.replace(accepted));
                    if let Some(&started) = copies.get(1) {
                        released.extend(live.started.replace(started));
                    }
                }
                // Ended (its settling released what it held) or changed: the
                // copies are not needed.
                _ => released.extend(copies),
            }
        }
        drop(st);
        self.journal.release(released);
        Ok(next)
    }

    /// Takes ops in scheduler order while running and completion slots are free.
    async fn dispatch(self: Arc<Self>) {
        loop {
            let woken = self.work.notified();
            if self.closing.load(Ordering::Acquire) {
                return;
            }
            if !self.dispatch_once() {
                woken.await;
            }
        }
    }

    /// Starts the next batch of ops, as far as running and completion slots allow;
    /// false if there was nothing to start. A shared-memory session calls it right
    /// after it submits, so that an inline op completes on the submitting thread
    /// with no wakeup of another.
    pub fn dispatch_once(self: &Arc<Self>) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        let running = self.running.claim(DISPATCH_BATCH);
        let both = self.completing.claim(running);
        // Short of completion slots: freeing one of those wakes the dispatcher.
        self.running.unclaim(running - both);
        let (batch, more) = if both > 0 {
            self.next_batch(both)
        } else {
            (Vec::new(), false)
        };
        self.running.unclaim(both - batch.len());
        self.completing.unclaim(both - batch.len());
        if batch.is_empty() {
            return false;
        }
        self.run_batch(batch);
        if more {
            // Called by a session, this leaves the rest to the dispatcher task;
            // called by that task, it only makes it look once more.
            self.work.notify_one();
        }
        true
    }

    /// Up to `max` ops to start, in scheduler order, marked running; and whether
    /// more remain queued.
    fn next_batch(&self, max: usize) -> (Vec<Start>, bool) {
        let mut st = self.lock();
        let now = Instant::now();
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(next) = st.scheduler.pop(now) else { break };
            let Some(live) = st.live.get_mut(&next.item) else {
                continue;
            };
            if live.finishing {
                continue;
            }
            live.state = OpState::Running;
            live.attempts += 1;
            live.first_start.get_or_insert(now);
            // Only executors that await can be cancelled while running.
            let token = live.exec.cancellable().then(CancellationToken::new);
            live.cancel = token.clone();
            batch.push((next.item, live.record.clone(), live.exec.clone(), token));
        }
        self.gauge_queues(&st);
        // One waiting submitter per freed slot: waking them all would have every one
        // of them retry for the same few slots.
        let waiting = self.room_waiters.load(Ordering::Acquire);
        for _ in 0..batch.len().min(waiting) {
            self.room.notify_one();
        }
        (batch, !st.scheduler.is_empty())
    }

    /// Runs a dispatched batch through its breakers: inline executors at once, with
    /// their ends handled under one lock; kernel-service ops as one store write;
    /// each `sleep` on a task of its own.
    fn run_batch(self: &Arc<Self>, batch: Vec<Start>) {
        let mut ended = Vec::with_capacity(batch.len());
        let mut applying = Vec::new();
        let started = Instant::now();
        // A batch is mostly of one kind and tenant: look its breaker up once.
        let mut last_breaker: Option<(Arc<OpRecord>, Arc<Tracked>)> = None;
        for (id, record, exec, token) in batch {
            let slots = Slots {
                running: Some(self.running.permit()),
                completing: Some(self.completing.permit()),
            };
            let target = exec.breaker_target(&record.kind);
            let breaker = match (&target, &last_breaker) {
                (Cow::Borrowed(_), Some((last, breaker)))
                    if last.kind == record.kind && last.tenant == record.tenant =>
                {
                    breaker.clone()
                }
                _ => {
                    let breaker = self.breakers.get(&record.tenant, &target, started);
                    if let Cow::Borrowed(_) = target {
                        last_breaker = Some((record.clone(), breaker.clone()));
                    }
                    breaker
                }
            };
            let admission = match breaker.admit(started) {
                Ok(admission) => (breaker, admission),
                Err(rejected) => {
                    let error = Error::unavailable(format!("the circuit breaker of {target} is open"))
                        .with_details(serde_json::json!({ "retry_after_ms": rejected.retry_after.as_millis() as u64 }));
                    ended.push(Ended {
                        id,
                        attempt: Attempt::Failed(error),
                        took: Duration::ZERO,
                        admission: None,
                        slots,
                        retry_after: Some(rejected.retry_after),
                    });
                    continue;
                }
            };
            let (attempt, took) = match exec {
                // Nothing to time: a clock read would cost more than the op.
                Exec::Noop => (Attempt::Ok(Value::Null), Duration::ZERO),
                Exec::StateGet { key } => {
                    let reading = Instant::now();
                    let attempt = match self.read_state(&record.agent, &key) {
                        Ok(value) => Attempt::Ok(value),
                        Err(e) => Attempt::Failed(e),
                    };
                    (attempt, reading.elapsed())
                }
                Exec::Sleep(duration) => {
                    let ring = self.clone();
                    let timeout = Duration::from_millis(record.timeout_ms);
                    let stopping = self.stopping.clone();
                    let token = token.unwrap_or_default();
                    self.tasks.spawn(async move {
                        let attempt = tokio::select! {
                            () = stopping.cancelled() => return,
                            () = token.cancelled() => Attempt::Cancelled,
                            slept = tokio::time::timeout(timeout, tokio::time::sleep(duration)) => match slept {
                                Ok(()) => Attempt::Ok(serde_json::json!({ "slept_ms": duration.as_millis() as u64 })),
                                Err(_) => Attempt::TimedOut,
                            },
                        };
                        ring.attempts_done(vec![Ended::ran(id, attempt, started.elapsed(), admission, slots)]);
                    });
                    continue;
                }
                Exec::State(effect) => {
                    // Handed to the store, the op only waits for its group's sync:
                    // it gives its running slot back at once (its completion slot
                    // still bounds what waits), so the dispatcher keeps feeding the
                    // committer while a group is being journaled.
                    let slots = Slots {
                        running: None,
                        completing: slots.completing,
                    };
                    applying.push((id, effect, admission, slots));
                    continue;
                }
                Exec::Tool(call) => {
                    self.spawn_tool(record, call, token.unwrap_or_default(), admission, slots);
                    continue;
                }
            };
            // Ended here: the breaker hears of it at once, and the attempt's end
            // need not carry the breaker along.
            let (breaker, admission) = admission;
            breaker.record(admission, !attempt.transient(), started);
            ended.push(Ended {
                id,
                attempt,
                took,
                admission: None,
                slots,
                retry_after: None,
            });
        }
        if !ended.is_empty() {
            self.attempts_done(ended);
        }
        if !applying.is_empty() {
            self.apply_effects(applying);
        }
    }

    /// Runs a tool op on a task of its own. One with external effects is first
    /// marked started in the journal (once, on its first attempt): from then on a
    /// crash leaves it `in_doubt`, never run again unasked.
    fn spawn_tool(
        self: &Arc<Self>,
        record: Arc<OpRecord>,
        call: Arc<Call>,
        token: CancellationToken,
        admission: Breaker,
        slots: Slots,
    ) {
        let ring = self.clone();
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            let began = Instant::now();
            let id = record.op_id;
            // The reservation and the start mark are made whole before a cancel can
            // drop the attempt: dropped in between, both would be stranded.
            let begun = if call.has_external_effects() {
                ring.begin_external(&record, &call).await
            } else {
                Ok(())
            };
            let run = async {
                begun?;
                let ctx = ring.tool_context(&record)?;
                let timeout = Duration::from_millis(record.timeout_ms);
                match tokio::time::timeout(timeout, ring.tools.run(&call, &ctx)).await {
                    Ok(ran) => ran.map(Some),
                    Err(_) => Ok(None),
                }
            };
            let attempt = tokio::select! {
                () = stopping.cancelled() => return,
                () = token.cancelled() => Attempt::Cancelled,
                ran = run => match ran {
                    Ok(Some(result)) => Attempt::Ok(result),
                    Ok(None) => Attempt::TimedOut,
                    Err(e) => Attempt::Failed(e),
                },
            };
            ring.attempts_done(vec![Ended::ran(id, attempt, began.elapsed(), admission, slots)]);
        });
    }

    /// Before an op with external effects first runs: reserves the most all its
    /// attempts can spend on its path's budgets, then makes its start mark, with
    /// the reservation, durable. Later attempts find both done.
    async fn begin_external(&self, record: &OpRecord, call: &Call) -> Result<()> {
        let id = record.op_id;
        if self
            .state
            .lock()
            .live
            .get(&id)
            .is_none_or(|live| live.started.is_some())
        {
            return Ok(());
        }
        let attempt_max = self.tools.max_spend(call);
        let attempts = 1 + u64::from(record.retries.map_or(0, |r| r.count));
        let reservation = if attempt_max == Spend::default() {
            None
        } else {
            let micros = attempt_max.micros.saturating_mul(attempts);
            let tokens = attempt_max.tokens.saturating_mul(attempts);
            Some(
                self.quotas
                    .reserve(&record.tenant, record.agent, micros, tokens, Instant::now(), Utc::now())?,
            )
        };
        let unreserve = || {
            if let Some(r) = &reservation {
                self.quotas.settle(&record.tenant, record.agent, r, 0, 0);
            }
        };
        let mark = Entry::Started {
            op_id: id,
            incarnation: record.incarnation,
            reserved: reservation.clone(),
        };
        let lsn = match self.journal.append(vec![mark.encode()]).await {
            Ok(lsns) => lsns[0],
            Err(e) => {
                unreserve();
                return Err(e);
            }
        };
        let mut st = self.lock();
        match st.live.get_mut(&id) {
            Some(live) => {
                live.started = Some(lsn);
                live.reservation = reservation;
                live.attempt_max = attempt_max;
            }
            None => {
                unreserve();
                self.journal.release(vec![lsn]);
            }
        }
        Ok(())
    }

    /// What a tool needs to know of its agent: its tool settings, and the process
    /// limits of the agent within its tenant's.
    fn tool_context(&self, record: &OpRecord) -> Result<ToolContext> {
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(store::AGENTS), record.agent.as_bytes())
            .map_err(|e| storage_error("read agents", e))?
            .ok_or_else(|| Error::not_found("agent", record.agent))?;
        let agent = crate::store::decode_agent(&bytes)?;
        let own = self.quotas.limits(&Node::Agent(record.agent));
        let group = own.group.as_ref().map_or_else(QuotaLimits::default, |name| {
            self.quotas.limits(&Node::Group {
                tenant: record.tenant.to_string(),
                name: name.clone(),
            })
        });
        let limits = own
            .process_limits(&group)
            .within(&self.quotas.limits(&Node::Tenant(record.tenant.to_string())));
        Ok(ToolContext {
            op_id: record.op_id,
            agent: record.agent,
            idempotency_key: record.idempotency.as_ref().map(|i| i.key.clone()),
            settings: agent.tools,
            limits,
        })
    }

    /// Kernel-service ops: each one's effect and completion go to the store as one
    /// write, and the batch's writes as one request. The breaker judges the op by
    /// whether its write lands.
    fn apply_effects(self: &Arc<Self>, applying: Vec<(OpId, Effect, Breaker, Slots)>) {
        let mut pending = Vec::with_capacity(applying.len());
        {
            let mut st = self.lock();
            let at = Moment::read();
            for (id, effect, admission, slots) in applying {
                let Some((completion, digest, _)) =
                    Self::completion_of(&mut st, id, CompletionStatus::Ok, None, None, at)
                else {
                    continue;
                };
                pending.push(Pending {
                    completion,
                    digest,
                    effect: Some(effect),
                    doubt: None,
                    charge: None,
                    admission: Some(admission),
                    slots,
                });
            }
        }
        self.record(pending);
    }

    fn read_state(&self, agent: &AgentId, key: &str) -> Result<Value> {
        let bytes = self
            .store
            .view()
            .get(self.store.keyspace(store::STATE), crate::store::state_key(agent, key))
            .map_err(|e| storage_error("read", e))?;
        let stored = bytes.as_deref().map(crate::store::decode_state).transpose()?;
        match stored {
            Some(stored) if !stored.is_tombstone() => {
                let value: Value = serde_json::from_slice(stored.json)
                    .map_err(|e| Error::internal(format!("stored value is unreadable: {e}")))?;
                Ok(serde_json::json!({ "key": key, "value": value, "version": stored.version }))
            }
            _ => Err(Error::not_found("state key", key)),
        }
    }

    /// Ends attempts: records each with its breaker, then retries the op after its
    /// backoff (on a timer, holding no slot) or completes it. One lock for all.
    fn attempts_done(self: &Arc<Self>, ended: Vec<Ended>) {
        let mut retrying = Vec::new();
        let mut finish = Vec::with_capacity(ended.len());
        let mut out = Outbox::new(&self.events);
        {
            let mut st = self.lock();
            let now = Instant::now();
            for Ended {
                id,
                attempt,
                took,
                admission,
                slots,
                retry_after,
            } in ended
            {
                let transient = attempt.transient();
                if let Some((breaker, admission)) = admission {
                    breaker.record(admission, !transient, now);
                }
                let Some(live) = st.live.get_mut(&id) else { continue };
                live.exec_time += took;
                live.cancel = None;
                if live.reservation.is_some() {
                    // A call that timed out or was dropped may still be billed: it
                    // counts at the most it could have cost.
                    let spent = match &attempt {
                        Attempt::Ok(result) => Tools::spent(result),
                        Attempt::TimedOut | Attempt::Cancelled => live.attempt_max,
                        Attempt::Failed(e) if e.code == ErrorCode::Timeout => live.attempt_max,
                        Attempt::Failed(_) => Spend::default(),
                    };
                    live.spent.micros += spent.micros;
                    live.spent.tokens += spent.tokens;
                }
                if transient
                    && !live.cancel_requested
                    && let Some(policy) = live.record.retries
                    && live.attempts <= policy.count
                {
                    live.state = OpState::Backoff;
                    self.metrics.retries.inc();
                    retrying.push((id, policy.backoff(live.attempts).max(retry_after.unwrap_or_default())));
                    continue;
                }
                let Slots { running, completing } = slots;
                drop(running);
                finish.push(
                    match attempt {
                        Attempt::Ok(result) => Finish::new(id, CompletionStatus::Ok, Some(result), None),
                        // A tool that enforces a deadline of its own reports it as a timeout.
                        Attempt::Failed(error) if error.code == ErrorCode::Timeout => {
                            Finish::new(id, CompletionStatus::Timeout, None, Some(error))
                        }
                        Attempt::Failed(error) => Finish::new(id, CompletionStatus::Error, None, Some(error)),
                        Attempt::TimedOut => Finish::new(
                            id,
                            CompletionStatus::Timeout,
                            None,
                            Some(Error::new(ErrorCode::Timeout, "the op timed out")),
                        ),
                        Attempt::Cancelled => Finish::cancelled(id, "cancelled while running"),
                    }
                    .with_slot(completing),
                );
            }
            self.finish_locked(&mut st, finish, &mut out);
        }
        for (id, delay) in retrying {
            let ring = self.clone();
            let stopping = self.stopping.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    () = stopping.cancelled() => {}
                    () = tokio::time::sleep(delay) => ring.requeue(id),
                }
            });
        }
        self.deliver(out);
    }

    /// Lets ops held back by a quota's `queue` action start (once their
    /// dependencies are done).
    fn start_delayed(self: &Arc<Self>, ids: Vec<OpId>) {
        let mut finish = Vec::new();
        let mut queued = false;
        {
            let mut st = self.lock();
            let now = Instant::now();
            for id in ids {
                if let Some(live) = st.live.get_mut(&id) {
                    live.delayed = false;
                    queued |= Self::release_if_ready(&mut st, id, now, &mut finish);
                }
            }
            self.gauge_queues(&st);
        }
        if queued {
            self.work.notify_one();
        }
        self.finish_all(finish);
    }

    /// Puts an op back in the queue after its backoff.
    fn requeue(self: &Arc<Self>, id: OpId) {
        let mut finish = Vec::new();
        {
            let mut st = self.lock();
            let Some(live) = st.live.get_mut(&id) else { return };
            if live.finishing {
                return;
            }
            if live.cancel_requested {
                finish.push(Finish::cancelled(id, "cancelled while waiting to retry"));
            } else {
                live.state = OpState::Queued;
                let (agent, priority) = (live.record.agent, live.record.priority);
                st.scheduler.readmit(agent);
                st.scheduler.enqueue(agent, priority, id, Instant::now());
            }
        }
        self.work.notify_one();
        self.finish_all(finish);
    }

    /// The completion of a live op as it ends now, with the digest of its key and
    /// whether it must be recorded in the store; marks the op finishing. `None` if
    /// it is gone or already finishing.
    fn completion_of(
        st: &mut RingState,
        id: OpId,
        status: CompletionStatus,
        result: Option<Value>,
        error: Option<Error>,
        at: Moment,
    ) -> Option<(Arc<Completion>, Option<String>, bool)> {
        let live = st.live.get_mut(&id)?;
        if live.finishing {
            return None;
        }
        live.finishing = true;
        let record = &live.record;
        let total = at.now.saturating_duration_since(live.accepted);
        // Made in its shared allocation at once, whether it settles now or goes to
        // the store first: a completion is some 300 bytes, and each move of one
        // showed in the `inproc` profile.
        let completion = Arc::new(Completion {
            op_id: id,
            agent: record.agent,
            tenant: record.tenant.clone(),
            kind: record.kind.clone(),
            status,
            result,
            error,
            attempts: live.attempts,
            queue_us: live
                .first_start
                .map_or(total, |s| s.duration_since(live.accepted))
                .as_micros() as u64,
            exec_us: live.exec_time.as_micros() as u64,
            total_us: total.as_micros() as u64,
            submitted_at: record.submitted_at,
            completed_at: at.wall,
            idempotency_key: record.idempotency.as_ref().map(|i| i.key.clone()),
            user_data: record.user_data.clone(),
            trace: record.trace.clone(),
        });
        let digest = record.idempotency.as_ref().map(|i| i.digest.clone());
        let durable = live.lsn.is_some() || record.idempotency.is_some();
        Some((completion, digest, durable))
    }

    /// Completes ops under one lock, then delivers what that produced.
    fn finish_all(self: &Arc<Self>, finish: Vec<Finish>) {
        if finish.is_empty() {
            return;
        }
        let mut out = Outbox::new(&self.events);
        self.finish_locked(&mut self.lock(), finish, &mut out);
        self.deliver(out);
    }

    /// Completes ops: those that must outlive a restart (journaled, or with a key)
    /// are handed to the store first; the rest settle at once. Works through a list,
    /// not recursion, since ending an op may end its dependents.
    fn finish_locked(&self, st: &mut RingState, mut queue: Vec<Finish>, out: &mut Outbox) {
        while let Some(finish) = queue.pop() {
            let Some((completion, digest, durable)) =
                Self::completion_of(st, finish.id, finish.status, finish.result, finish.error, out.at)
            else {
                continue;
            };
            if durable {
                let in_doubt = finish.status == CompletionStatus::InDoubt;
                let live = st.live.get(&finish.id);
                let doubt = live.filter(|_| in_doubt).map(|live| live.record.clone());
                // In doubt, what it spent is unknown: it is charged all it reserved.
                let charge = live.and_then(|live| {
                    Some(Charge {
                        tenant: live.record.tenant.clone(),
                        agent: live.record.agent,
                        reservation: live.reservation.clone()?,
                        spent: if in_doubt {
                            Spend {
                                micros: u64::MAX,
                                tokens: u64::MAX,
                            }
                        } else {
                            live.spent
                        },
                    })
                });
                out.to_record.push(Pending {
                    completion,
                    digest,
                    effect: None,
                    doubt,
                    charge,
                    admission: None,
                    slots: Slots {
                        running: None,
                        completing: finish.slot,
                    },
                });
            } else {
                self.settle_locked(st, completion, false, &mut queue, out);
            }
        }
        // Still under the lock (the last thing each of its holders does): an op
        // that `wait`, `info` or a dependency can see done holds no quota.
        for (record, n) in out.settled.drain(..) {
            self.quotas.release(&record.tenant, record.agent, n);
        }
    }

    /// Does what settling left to do outside the lock: answers waiters, publishes
    /// events, releases journal records, records completions in the store and wakes
    /// the dispatcher.
    fn deliver(self: &Arc<Self>, out: Outbox) {
        let Outbox {
            at: _,
            publish: _,
            answers,
            events,
            released,
            settled: _,
            to_record,
            queued,
            forgotten,
        } = out;
        drop(forgotten);
        for (waiter, completion) in answers {
            waiter.answer(completion);
        }
        for completion in events {
            let _ = self.events.send(completion);
        }
        if !released.is_empty() {
            self.journal.release(released);
        }
        self.record(to_record);
        if queued {
            self.work.notify_one();
        }
    }

    /// Records completions (with their effects) in one store request, then settles
    /// them; their slots are held until then.
    fn record(self: &Arc<Self>, pending: Vec<Pending>) {
        if pending.is_empty() {
            return;
        }
        let ring = self.clone();
        self.tasks.spawn(async move {
            let mut writes = Vec::with_capacity(pending.len());
            let mut held = Vec::with_capacity(pending.len());
            let mut charges = Vec::with_capacity(pending.len());
            for p in pending {
                writes.push(Box::new(Write::Complete {
                    completion: p.completion,
                    effect: p.effect,
                    digest: p.digest,
                    doubt: p.doubt.map(|record| record.encode_accepted()),
                    charge: p.charge.as_ref().map(|c| (c.keys(), c.micros())),
                }) as Box<dyn bbx_store::Staged>);
                held.push((p.admission, p.slots));
                charges.push(p.charge);
            }
            let written = ring.store.write_all(writes).await;
            let mut out = Outbox::new(&ring.events);
            {
                let mut st = ring.lock();
                let mut follow_ups = Vec::new();
                for ((outcome, (admission, _)), charge) in written.into_iter().zip(&held).zip(charges) {
                    if let Some((breaker, admission)) = admission {
                        breaker.record(*admission, outcome.is_ok(), out.at.now);
                    }
                    // The charge is durable with the completion: the reservation
                    // becomes spend. Had the write failed, it stays held.
                    if let (Ok(_), Some(charge)) = (&outcome, charge) {
                        let tokens = charge.spent.tokens.min(charge.reservation.tokens);
                        ring.quotas.settle(
                            &charge.tenant,
                            charge.agent,
                            &charge.reservation,
                            charge.micros(),
                            tokens,
                        );
                    }
                    match outcome.and_then(Applied::into_output::<Box<Completion>>) {
                        Ok(completion) => {
                            ring.settle_locked(&mut st, Arc::new(*completion), true, &mut follow_ups, &mut out);
                        }
                        // The op stays journaled without a completion, so the next
                        // start runs it.
                        Err(e) => tracing::error!(error = %e, "an op's completion could not be recorded"),
                    }
                }
                ring.finish_locked(&mut st, follow_ups, &mut out);
            }
            drop(held);
            ring.deliver(out);
        });
    }

    /// Publishes a completion: removes the op, queues the answers to its waiters,
    /// releases its journal record and moves its dependents on; dependents that end
    /// now go to `follow_ups`.
    fn settle_locked(
        &self,
        st: &mut RingState,
        completion: Arc<Completion>,
        recorded: bool,
        follow_ups: &mut Vec<Finish>,
        out: &mut Outbox,
    ) {
        let Some(live) = st.live.remove(&completion.op_id) else {
            return;
        };
        match out.settled.last_mut() {
            Some((record, n)) if record.agent == live.record.agent => *n += 1,
            _ => out.settled.push((live.record.clone(), 1)),
        }
        if live.holds_slot {
            st.scheduler.release(&live.record.agent);
            if self.room_waiters.load(Ordering::Acquire) > 0 {
                self.room.notify_one();
            }
        }
        if let Some(idempotency) = &live.record.idempotency {
            let key = (live.record.agent, idempotency.key.clone());
            if st.keys.get(&key) == Some(&completion.op_id) {
                st.keys.remove(&key);
                self.key_epochs.bump(&key.0, &key.1);
            }
        }
        let second = out.at.now.saturating_duration_since(self.started).as_secs();
        let counters = &mut st.counters;
        self.metrics
            .completed(completion.status, live.record.priority, completion.total_us);
        let _ = counters.latency[live.record.priority.rank()].record(completion.total_us.max(1));
        match counters.window.back_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => counters.window.push_back((second, 1)),
        }
        while counters.window.front().is_some_and(|(s, _)| *s + 10 < second) {
            counters.window.pop_front();
        }
        if !recorded {
            out.forgotten = st
                .recent
                .insert(completion.op_id, completion.clone())
                .or(out.forgotten.take());
        }
        for dependent in st.dependents.remove(&completion.op_id).unwrap_or_default() {
            if let Some(waiting) = st.live.get_mut(&dependent) {
                waiting.blocked_on = waiting.blocked_on.saturating_sub(1);
                if completion.status != CompletionStatus::Ok {
                    waiting.failed_dependency = Some(dependency_failure(&completion.op_id, completion.status.as_str()));
                }
                out.queued |= Self::release_if_ready(st, dependent, out.at.now, follow_ups);
            }
        }
        if let Some(reaper) = live.reaper {
            out.answers.push((Waiter::Sink(reaper), completion.clone()));
        }
        for waiter in live.waiters {
            out.answers.push((waiter, completion.clone()));
        }
        out.released.extend(live.lsn);
        out.released.extend(live.started);
        if out.publish {
            out.events.push(completion);
        }
    }

    /// A completion, from memory or the store.
    fn completion(&self, st: &RingState, id: &OpId) -> Result<Option<Arc<Completion>>> {
        if let Some(done) = st.recent.get(id) {
            return Ok(Some(done.clone()));
        }
        Ok(self.stored_completion(id)?.map(Arc::new))
    }

    fn stored_completion(&self, id: &OpId) -> Result<Option<Completion>> {
        self.store
            .view()
            .get(self.store.keyspace(store::OPS), id.as_bytes())
            .map_err(|e| storage_error("read ops", e))?
            .map(|bytes| decode_completion(&bytes))
            .transpose()
    }

    pub fn info(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        let recent = {
            let st = self.lock();
            if let Some(live) = st.live.get(id) {
                caller.check_owner(&live.record.tenant, "op", id)?;
                return Ok(OpInfo {
                    op_id: *id,
                    agent: live.record.agent,
                    kind: live.record.kind.to_string(),
                    state: live.state,
                    attempts: live.attempts,
                    completion: None,
                });
            }
            st.recent.get(id).cloned()
        };
        // Read without the lock: an op that has left the ring was recorded before
        // it left, so the store has it if the ring did not.
        let done = match recent {
            Some(done) => done,
            None => Arc::new(self.stored_completion(id)?.ok_or_else(|| Error::not_found("op", id))?),
        };
        caller.check_owner(&done.tenant, "op", id)?;
        Ok(OpInfo::done((*done).clone()))
    }

    /// The op's completion, waiting up to `timeout` for it; the op as it stands if
    /// it is still not done by then.
    pub async fn wait(&self, caller: &Caller, id: &OpId, timeout: Duration) -> Result<OpInfo> {
        // Declared before the receiver, so dropped after it: however this wait ends
        // (answered, timed out, or its caller gone), its waiter leaves the op.
        let _forget = ForgetWaiter { ring: self, id: *id };
        let receiver = {
            let mut st = self.lock();
            match st.live.get_mut(id) {
                Some(live) => {
                    caller.check_owner(&live.record.tenant, "op", id)?;
                    let (sender, receiver) = oneshot::channel();
                    live.waiters.push(Waiter::Once(sender));
                    Some(receiver)
                }
                None => None,
            }
        };
        if let Some(receiver) = receiver
            && let Ok(Ok(done)) = tokio::time::timeout(timeout, receiver).await
        {
            return Ok(OpInfo::done((*done).clone()));
        }
        self.info(caller, id)
    }

    /// How many callers of [`Ring::wait`] an op holds; for tests.
    #[cfg(test)]
    fn waiting_on(&self, id: &OpId) -> usize {
        self.lock().live.get(id).map_or(0, |live| live.waiters.len())
    }

    /// Cancels an op: at once if it has not started, by dropping its executor if it
    /// is running. A kernel-service op that is already being applied, and an op that
    /// is done, cannot be cancelled (409).
    pub async fn cancel(self: &Arc<Self>, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        let finish = {
            let mut st = self.lock();
            let Some(live) = st.live.get_mut(id) else {
                drop(st);
                let info = self.info(caller, id)?;
                let status = info.completion.as_ref().map_or("done", |c| c.status.as_str());
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} has already completed ({status})"),
                ));
            };
            caller.check_owner(&live.record.tenant, "op", id)?;
            if live.finishing || (live.state == OpState::Running && matches!(live.exec, Exec::State(_))) {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} is already being completed"),
                ));
            }
            live.cancel_requested = true;
            match live.state {
                OpState::Running => {
                    if let Some(token) = &live.cancel {
                        token.cancel();
                    }
                    None
                }
                // Queued ops leave the scheduler lazily: the dispatcher skips them.
                OpState::Queued | OpState::Backoff => Some(Finish::cancelled(*id, "cancelled before it ran")),
                OpState::Blocked if live.active => Some(Finish::cancelled(*id, "cancelled before it started")),
                // Not yet acknowledged: it ends as soon as it is.
                OpState::Blocked | OpState::Done => None,
            }
        };
        if let Some(finish) = finish {
            self.finish_all(vec![finish]);
        }
        // A running executor notices the cancel at its next await point.
        self.wait(caller, id, Duration::from_secs(5)).await
    }

    /// Settles an op in doubt: completes it `ok` or `error` as the operator says,
    /// or runs it again. Only one resolution of an op at a time; the store refuses
    /// one for an op that is no longer in doubt.
    pub async fn resolve(self: &Arc<Self>, caller: &Caller, id: &OpId, resolution: Resolution) -> Result<OpInfo> {
        let current = self.stored_completion(id)?.ok_or_else(|| Error::not_found("op", id))?;
        caller.check_owner(&current.tenant, "op", id)?;
        if current.status != CompletionStatus::InDoubt {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("op {id} is not in doubt (it is {})", current.status.as_str()),
            ));
        }
        {
            let mut st = self.lock();
            // Its in-doubt completion is stored but not yet settled: the op is
            // still live, and a retry must not register a second one.
            if st.live.contains_key(id) || !st.resolving.insert(*id) {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} is already being resolved or completed; try again"),
                ));
            }
        }
        // On a task of its own, so that a caller who goes away mid-way (a closed
        // HTTP connection drops its handler) cannot leave it half done.
        let ring = self.clone();
        let op = *id;
        let resolution = self.tasks.spawn(async move {
            let resolved = match resolution {
                Resolution::Retry => ring.retry_in_doubt(&op).await,
                Resolution::Ok | Resolution::Failed => ring.settle_in_doubt(current, resolution).await,
            };
            ring.lock().resolving.remove(&op);
            resolved
        });
        resolution
            .await
            .map_err(|e| Error::internal(format!("resolving op {id} failed: {e}")))??;
        self.info(caller, id)
    }

    async fn settle_in_doubt(&self, mut completion: Completion, resolution: Resolution) -> Result<()> {
        completion.completed_at = Utc::now();
        if resolution == Resolution::Ok {
            completion.status = CompletionStatus::Ok;
            completion.result = Some(serde_json::json!({ "resolved": "ok" }));
            completion.error = None;
        } else {
            completion.status = CompletionStatus::Error;
            completion.error = Some(Error::new(ErrorCode::ToolFailed, "resolved as failed by an operator"));
        }
        self.store
            .write(Write::Resolve {
                op_id: completion.op_id,
                completion: Some(Box::new(completion.clone())),
            })
            .await?;
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Arc::new(completion));
        }
        Ok(())
    }

    /// Journals the op again, one incarnation up, then removes its `in_doubt`
    /// completion: a crash in between leaves it in doubt, never lost or doubled.
    async fn retry_in_doubt(self: &Arc<Self>, id: &OpId) -> Result<()> {
        let entry = self
            .store
            .view()
            .get(self.store.keyspace(store::DOUBT), id.as_bytes())
            .map_err(|e| storage_error("read ops in doubt", e))?
            .ok_or_else(|| Error::internal(format!("op {id} is in doubt but its record is missing")))?;
        let Entry::Accepted(mut record) = Entry::decode(&entry)? else {
            return Err(Error::internal(format!("the record of op {id} is not an op")));
        };
        record.incarnation += 1;
        // Its dependencies were met when it first ran.
        record.depends_on.clear();
        let exec = Exec::parse(&record.kind, &record.args)?;
        let (tenant, agent) = (record.tenant.clone(), record.agent);
        self.quotas.acquire(&tenant, agent, 1).map_err(Error::from)?;
        let admitted = self.lock().scheduler.admit(&[(agent, record.priority)]);
        let give_back = |ring: &Self| {
            ring.quotas.release(&tenant, agent, 1);
            ring.lock().scheduler.release(&agent);
        };
        if let Err(refused) = admitted {
            self.quotas.release(&tenant, agent, 1);
            return Err(Error::resource_exhausted(refused.to_string(), RETRY_AFTER));
        }
        let lsn = match self.journal.append(vec![record.encode_accepted()]).await {
            Ok(lsns) => lsns[0],
            Err(e) => {
                give_back(self);
                return Err(e);
            }
        };
        let removed = self
            .store
            .write(Write::Resolve {
                op_id: *id,
                completion: None,
            })
            .await;
        if let Err(e) = removed {
            self.journal.release(vec![lsn]);
            give_back(self);
            return Err(e);
        }
        let mut finish = Vec::new();
        {
            let mut st = self.lock();
            let now = Instant::now();
            // Nothing waits on it and it has no dependencies: registering cannot fail.
            let op = (Arc::new(record), exec, Some(lsn));
            self.register(&mut st, op, &FxHashSet::default(), now, &Preread::default())?;
            Self::activate(&mut st, *id, Some(lsn), now, &mut finish);
            self.gauge_queues(&st);
        }
        self.work.notify_one();
        self.finish_all(finish);
        Ok(())
    }

    fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            state: self.state.lock(),
            poisoned: &self.poisoned,
        }
    }

    /// Whether a panic struck while the state was locked (see [`StateGuard`]).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn metrics(&self) -> &RingMetrics {
        &self.metrics
    }

    /// Publishes the queue depths to the metrics.
    fn gauge_queues(&self, st: &RingState) {
        let depths = Priority::ALL.iter().map(|p| (*p, st.scheduler.depth(*p)));
        self.metrics.queued(depths, st.scheduler.len());
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Completion>> {
        self.events.subscribe()
    }

    pub fn stats(&self, caller: &Caller) -> RingStats {
        let running = self.running.used.load(Ordering::Acquire);
        let completing = self.completing.used.load(Ordering::Acquire);
        let st = self.lock();
        let queued = Priority::ALL
            .iter()
            .map(|p| (*p, st.scheduler.depth(*p) as u64))
            .collect();
        let second = self.started.elapsed().as_secs();
        let recent: u64 = st
            .counters
            .window
            .iter()
            .filter(|(s, _)| *s + 10 > second)
            .map(|(_, n)| n)
            .sum();
        let span = (self.started.elapsed().as_secs_f64()).clamp(1.0, 10.0);
        RingStats {
            queued,
            pending: st.scheduler.len() as u64,
            submission_capacity: st.scheduler.capacity() as u64,
            // From the slots, not by walking every live op under the lock: an op
            // holds a running slot while an attempt runs, and a completion slot
            // from its start until its completion is durable. A dispatch in
            // progress holds a few more for a moment.
            running: running as u64,
            max_running: self.config.max_running as u64,
            completing: completing.saturating_sub(running) as u64,
            completion_capacity: self.config.completion_capacity as u64,
            submitted_total: self.metrics.submitted.get(),
            deduplicated_total: self.metrics.deduplicated.get(),
            refused_total: self.metrics.refused.get(),
            retries_total: self.metrics.retries.get(),
            completed: self.metrics.completed_counts(),
            completed_per_sec: recent as f64 / span,
            latency: Priority::ALL
                .iter()
                .map(|p| (*p, percentiles(&st.counters.latency[p.rank()])))
                .collect(),
            breakers: self.breakers(caller),
            // The kernel serves the sessions; it fills this in.
            shm_sessions: 0,
        }
    }

    /// The breakers the caller may see: its tenant's, or every tenant's for an
    /// administrator.
    pub fn breakers(&self, caller: &Caller) -> Vec<BreakerInfo> {
        self.breakers
            .stats(caller.tenant.as_deref())
            .into_iter()
            .map(|listed| BreakerInfo {
                tenant: listed.tenant.to_string(),
                target: listed.target,
                state: match listed.stats.state {
                    BreakerState::Closed => "closed",
                    BreakerState::Open => "open",
                    BreakerState::HalfOpen => "half_open",
                }
                .into(),
                consecutive_failures: listed.stats.consecutive_failures,
                opened_total: listed.stats.opened_total,
                rejected_total: listed.stats.rejected_total,
            })
            .collect()
    }

    /// Closes breakers (an administrator's call): `target`'s, or all, in `tenant`
    /// or in every tenant.
    pub fn reset_breakers(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<BreakerInfo>> {
        if self.breakers.reset(tenant, target) == 0 && (tenant.is_some() || target.is_some()) {
            return Err(Error::not_found(
                "circuit breaker",
                target.or(tenant).unwrap_or_default(),
            ));
        }
        Ok(self.breakers(caller))
    }

    /// Forgets idle breakers now and then, so that the map follows the targets in
    /// use rather than every target ever called.
    async fn evict_idle_breakers(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(Breakers::IDLE / 10);
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                _ = ticks.tick() => {
                    self.breakers.evict_idle(Instant::now());
                }
            }
        }
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
mod tests {
    use super::*;

    /// The race a shared-memory session can cause: one claimer holds the last
    /// slots for a moment and gives them back unused while another, finding none,
    /// gave up. The one that gave up must be woken.
    #[tokio::test]
    async fn a_claimer_that_went_without_is_woken_when_slots_come_back() {
        let wake = Arc::new(Notify::new());
        let pool = Capacity::new(4, wake.clone());
        assert_eq!(pool.claim(64), 4);
        assert_eq!(pool.claim(64), 0);
        pool.unclaim(4);
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("the starved claimer is woken");
        // With nobody starved, giving slots back wakes nobody.
        assert_eq!(pool.claim(2), 2);
        pool.unclaim(2);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), wake.notified())
                .await
                .is_err()
        );
        // A finished op's permit counts as giving back.
        assert_eq!(pool.claim(64), 4);
        assert_eq!(pool.claim(1), 0);
        drop(pool.permit());
        tokio::time::timeout(Duration::from_secs(5), wake.notified())
            .await
            .expect("a returned permit wakes the starved claimer");
    }

    /// A caller that polls an op with short timeouts leaves nothing behind: each
    /// timed-out wait takes its waiter with it, and so does one dropped mid-way (a
    /// closed HTTP connection).
    /// A kernel on `dir`, its administrator, and an agent.
    async fn kernel(dir: &std::path::Path) -> (Arc<crate::Kernel>, Caller, AgentId) {
        let layer = bbx_core::config::ConfigLayer {
            data_dir: Some(dir.to_path_buf()),
            ..Default::default()
        };
        let config = bbx_core::config::KernelConfig::resolve(Default::default(), layer).unwrap();
        let kernel = crate::Kernel::open(config).await.unwrap().kernel;
        let token = std::fs::read_to_string(dir.join(crate::ADMIN_KEY_FILE)).unwrap();
        let admin = kernel.authenticate(token.trim()).unwrap();
        let agent = kernel
            .create_agent(
                &admin,
                bbx_core::model::CreateAgent {
                    name: "a".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .id;
        (kernel, admin, agent)
    }

    #[tokio::test]
    async fn a_panic_under_the_lock_stops_the_kernel_serving() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, admin, agent) = kernel(dir.path()).await;
        assert!(kernel.is_ready());
        let ring = kernel.ring.clone();
        let struck = std::thread::spawn(move || {
            let _state = ring.lock();
            panic!("a bug while the state is held");
        })
        .join();
        assert!(struck.is_err());
        assert!(!kernel.is_ready(), "not ready once its state may be half changed");
        let batch = bbx_core::op::SubmitBatch {
            ops: vec![SubmitOp::new(agent, "noop", serde_json::json!({}))],
            wait_ms: None,
        };
        let refused = kernel.submit(&admin, batch).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unavailable);
        kernel.shutdown().await;
    }

    #[tokio::test]
    async fn waits_that_time_out_or_are_dropped_leave_no_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, admin, agent) = kernel(dir.path()).await;
        let sleep = bbx_core::op::SubmitOp::new(agent, "sleep", serde_json::json!({ "ms": 60_000 }));
        let batch = bbx_core::op::SubmitBatch {
            ops: vec![sleep],
            wait_ms: None,
        };
        let id = kernel.submit(&admin, batch).await.unwrap().ops[0].op_id;
        for _ in 0..200 {
            let info = kernel.wait_op(&admin, &id, Duration::from_millis(1)).await.unwrap();
            assert_ne!(info.state, OpState::Done);
        }
        assert_eq!(kernel.ring.waiting_on(&id), 0);
        let dropped = tokio::time::timeout(
            Duration::from_millis(5),
            kernel.wait_op(&admin, &id, Duration::from_secs(60)),
        )
        .await;
        assert!(dropped.is_err(), "the wait was still waiting when dropped");
        assert_eq!(kernel.ring.waiting_on(&id), 0);
        kernel.cancel_op(&admin, &id).await.unwrap();
        kernel.shutdown().await;
    }
}
