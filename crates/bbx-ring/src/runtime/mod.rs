//! The ring's runtime: the [`engine`] wired to the journal, the store and the
//! executors, with submission, scheduling, execution and completion of ops.
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
mod expire;
mod hold;
mod open;
mod preread;
mod query;
mod run;
pub mod store;
mod submit;

pub use submit::Placement;

use crate::engine::{
    self, Attempt, Charge, Checked, Engine, Host, InFlight, KeyEpochs, KeyedOp, Lsn, Moment, Slot, Start,
};
use crate::{Admission, BreakerConfig, BreakerState, Breakers, Effects, Entry, Hold, OpRecord, RingMetrics, Tracked};
use crate::{SchedulerConfig, batch};
use bbx_auth::Caller;
use bbx_component::{TaskContext, TaskOp};
use bbx_core::config::RingConfig;
use bbx_core::op::{
    BreakerInfo, Completion, CompletionStatus, OpInfo, Priority, Resolution, RingStats, SubmitBatch, SubmitOp,
    Submitted, SubmittedOp, WalStatus,
};
use bbx_core::quota::{Node, Spend};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_quota::{Quotas, spend_key};
use bbx_store::JournalWriter;
use bbx_store::journal::percentiles;
use chrono::{DateTime, Utc};
use exec::Exec;
use fjall::Readable;
use parking_lot::Mutex;
use preread::Preread;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use store::{Applied, Store, Write, decode_completion, decode_idempotency, idempotency_key, storage_error};
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The longest timeout an op may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Most ops the dispatcher takes from the scheduler under one lock.
const DISPATCH_BATCH: usize = 64;
/// Completions sent to event streams that a slow reader may fall behind by.
const EVENT_BUFFER: usize = 4096;

pub struct Ring {
    config: RingConfig,
    store: Arc<Store>,
    journal: JournalWriter,
    state: Mutex<Engine<KernelHost>>,
    /// Wakes the dispatcher: an op was queued, or a slot freed.
    work: Arc<Notify>,
    /// Wakes submitters waiting for room in the queue.
    room: tokio::sync::Notify,
    room_waiters: AtomicUsize,
    running: Arc<Capacity>,
    completing: Arc<Capacity>,
    breakers: Breakers,
    /// See [`KeyEpochs`].
    key_epochs: Arc<KeyEpochs>,
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
    quotas: Arc<Quotas>,
    /// The components whose op kinds the ring runs.
    components: Arc<bbx_component::Components>,
}

/// What the ring runs ops with, and the quotas it reserves and gives back.
pub struct Services {
    pub quotas: Arc<Quotas>,
    pub components: Arc<bbx_component::Components>,
}

/// The kernel as the engine's host: ops run on [`Exec`]utors, completions go to
/// [`Waiter`]s, and an ending op holds its completion slot (and its breaker's
/// verdict, for an effect judged by whether its write lands) until its completion
/// is durable.
pub struct KernelHost;

impl Host for KernelHost {
    type Exec = Exec;
    type Waiter = Waiter;
    type Held = Held;
    type Cancel = CancellationToken;

    fn effects(exec: &Exec) -> Effects {
        exec.effects()
    }

    fn canceller(exec: &Exec) -> Option<CancellationToken> {
        // Only executors that await can be cancelled while running.
        exec.cancellable().then(CancellationToken::new)
    }

    fn applies_with_completion(exec: &Exec) -> bool {
        matches!(exec, Exec::Effect(_))
    }

    fn spent(exec: &Exec, result: &Value) -> Spend {
        match exec {
            Exec::Task(task) => task.spent(result),
            Exec::Noop | Exec::Read(_) | Exec::Effect(_) | Exec::Refused(_) => Spend::default(),
        }
    }
}

type Outbox = engine::Outbox<KernelHost>;
type Finish = engine::Finish<KernelHost>;

/// What an ending op holds until its completion is durable.
pub struct Held {
    /// Given back when dropped, once the completion is durable.
    _completing: Option<Permit>,
    /// The breaker that judges the op by whether its completion is written.
    admission: Option<Breaker>,
    /// A component's effect, committed with the completion.
    effect: Option<Arc<dyn bbx_component::EffectOp>>,
}

impl Held {
    fn slot(completing: Option<Permit>) -> Option<Self> {
        Some(Self {
            _completing: completing,
            admission: None,
            effect: None,
        })
    }
}

/// The in-flight quota of `bbx-quota`, as the engine asks for it.
struct InFlightOps(Arc<Quotas>);

impl InFlight for InFlightOps {
    fn acquire(&self, tenant: &str, agent: AgentId, ops: u64) -> Result<()> {
        self.0.acquire(tenant, agent, ops).map_err(Error::from)
    }

    fn reacquire(&self, tenant: &str, agent: AgentId, ops: u64) {
        self.0.reacquire(tenant, agent, ops);
    }

    fn release(&self, tenant: &str, agent: AgentId, ops: u64) {
        self.0.release(tenant, agent, ops);
    }
}

/// The ring's state, locked. A panic while it is held may leave the state half
/// changed (an op counted but not queued, a slot never given back): the guard
/// notices the unwinding, and the ring then refuses new work and reports itself
/// not ready, so the operator restarts the kernel and recovery rebuilds the state
/// from the journal and the store.
struct StateGuard<'a> {
    state: parking_lot::MutexGuard<'a, Engine<KernelHost>>,
    poisoned: &'a AtomicBool,
    /// Taken while the thread was already unwinding (a lock in a `Drop`): a
    /// panic then is not one that struck while the state was being changed.
    unwinding: bool,
}

impl std::ops::Deref for StateGuard<'_> {
    type Target = Engine<KernelHost>;

    fn deref(&self) -> &Engine<KernelHost> {
        &self.state
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut Engine<KernelHost> {
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
        if let Some(live) = self.ring.lock().live_mut(&self.id) {
            live.waiters.retain(|waiter| !waiter.abandoned());
        }
    }
}

/// Someone to hand an op's completion to.
pub enum Waiter {
    /// A caller of [`Ring::wait`].
    Once(oneshot::Sender<Arc<Completion>>),
    /// A submitter that reaps all of its ops' completions in one place.
    Sink(Sink),
}

/// Takes the completions of the ops of one submitter (a shared-memory session, or
/// an in-process completion queue); called outside the ring's lock.
pub type Sink = Arc<dyn Fn(Arc<Completion>) + Send + Sync>;

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

/// A breaker and how it let an attempt through.
type Breaker = (Arc<Tracked>, Admission);

/// The stored spend counters a charge adds to: each node it was reserved on, in
/// each window.
fn charge_keys(charge: &Charge) -> Vec<String> {
    let nodes: Vec<String> = if charge.reservation.nodes.is_empty() {
        vec![
            Node::Tenant(charge.tenant.to_string()).to_string(),
            Node::Agent(charge.agent).to_string(),
        ]
    } else {
        charge.reservation.nodes.clone()
    };
    nodes
        .iter()
        .flat_map(|node| {
            [&charge.reservation.day, &charge.reservation.month]
                .into_iter()
                .map(move |window| spend_key(node, window))
        })
        .collect()
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

    /// An outbox for ops handled now.
    fn outbox(&self) -> Outbox {
        let publish = self.events.receiver_count() > 0 || self.components.observes();
        Outbox::new(Moment::read(), publish)
    }

    pub fn metrics(&self) -> &RingMetrics {
        &self.metrics
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Completion>> {
        self.events.subscribe()
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
        labels: Vec::new(),
    })
}

#[cfg(test)]
mod tests;
