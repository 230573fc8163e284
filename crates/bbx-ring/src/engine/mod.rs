//! The ring's state machine, free of I/O: what happens to an op from admission to
//! its settled completion, decided under the ring's one lock.
//!
//! The engine is the data and the transitions; its host does the I/O around it.
//! The host journals what [`Engine::admit`] says to journal and then calls
//! [`Engine::activate`]; an op accepted with a hold waits until the host journals
//! its approval ([`Engine::approved`]) or denies it ([`Engine::deny`]); it runs what [`Engine::next`] hands out and reports each
//! attempt's end to [`Engine::attempts_ended`]; it writes the completions that an
//! [`Outbox`] lists to the store and reports each write to [`Engine::recorded`];
//! and it answers the waiters, publishes the events and releases the journal
//! records that the outbox lists, after it lets go of the lock. Time is an input
//! ([`Moment`]), so a test can drive the engine through any schedule, crashes
//! included, deterministically (`tests/simulation.rs`).
//!
//! What the engine needs to know of the world it asks through small traits: the
//! in-flight quota ([`InFlight`]) and what the store recorded of ops that left
//! the ring ([`Recorded`]); what runs an op is the host's ([`Host`]).

mod admit;
mod epochs;
mod hold;
mod recent;
mod run;
mod settle;

pub use admit::Admitted;
pub use epochs::KeyEpochs;
pub use run::{Attempt, Cancelled, Ended, Old};
pub use settle::Recovered;

use crate::metrics::RingMetrics;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::{Effects, OpRecord};
use bbx_core::op::{Completion, CompletionStatus, OpState, Priority};
use bbx_core::quota::{Reservation, Spend};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use recent::Recent;
use rustc_hash::{FxHashMap, FxHashSet};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A position in the journal.
pub type Lsn = u64;

/// An op an idempotency key names, and the digest of what it was submitted with.
pub type KeyedOp = (OpId, Option<String>);

/// What the engine's host runs ops with, and who hears of their completions.
pub trait Host: 'static {
    /// What runs an op, parsed from its kind and arguments.
    type Exec: Clone;
    /// Someone to hand a completion to.
    type Waiter;
    /// What an ending op holds until its completion is durable (a completion slot).
    type Held;
    /// Stops a running attempt.
    type Cancel: Clone;

    fn effects(exec: &Self::Exec) -> Effects;
    /// A handle that stops a running attempt, for executors that can be stopped.
    fn canceller(exec: &Self::Exec) -> Option<Self::Cancel>;
    /// Whether the op's effect is applied with its completion: once it runs, it
    /// cannot be cancelled.
    fn applies_with_completion(exec: &Self::Exec) -> bool;
    /// What a successful attempt of `exec` reports it spent of a budget.
    fn spent(exec: &Self::Exec, result: &Value) -> Spend;
}

/// The in-flight quota: ops an agent and its tenant have admitted and not settled.
pub trait InFlight: Send + Sync {
    fn acquire(&self, tenant: &str, agent: AgentId, ops: u64) -> Result<()>;
    /// Counts ops admitted before a restart, without refusing them.
    fn reacquire(&self, tenant: &str, agent: AgentId, ops: u64);
    fn release(&self, tenant: &str, agent: AgentId, ops: u64);
}

/// What the store recorded of ops that have left the ring.
pub trait Recorded {
    /// The op the store records for an idempotency key.
    fn key(&self, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>>;
    /// The completion of an op that is not live.
    fn completion(&self, id: &OpId) -> Result<Option<Arc<Completion>>>;
}

/// Nothing recorded: for ops that name no key and depend on nothing stored.
pub struct NothingRecorded;

impl Recorded for NothingRecorded {
    fn key(&self, _: &AgentId, _: &str) -> Result<Option<KeyedOp>> {
        Ok(None)
    }

    fn completion(&self, _: &OpId) -> Result<Option<Arc<Completion>>> {
        Ok(None)
    }
}

/// One reading of both clocks, for every op handled in one batch: a clock read per
/// op was a measurable share of the dispatch path.
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub now: Instant,
    pub wall: DateTime<Utc>,
}

impl Moment {
    pub fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: Utc::now(),
        }
    }
}

/// The engine's bounds.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Completions of ops left unrecorded (no effects, no key) kept readable.
    pub recent_completions: usize,
}

/// The state of the ring. Maps keyed by op id hash with Fx: ids are random UUIDv7s
/// the ring generates, so SipHash's defence against chosen keys buys nothing
/// there, and it took 4 % of the ring's CPU in a profile. Keys that clients choose
/// (idempotency keys) keep SipHash.
pub struct Engine<H: Host> {
    /// Boxed: an op's entry is a few hundred bytes, moved on every insert,
    /// removal and rehash otherwise.
    live: FxHashMap<OpId, Box<Live<H>>>,
    /// Idempotency keys of live ops.
    keys: HashMap<(AgentId, String), OpId>,
    scheduler: Scheduler<AgentId, OpId>,
    /// Live op -> the live ops waiting for it.
    dependents: FxHashMap<OpId, Vec<OpId>>,
    /// Completions of ops that were not recorded in the store.
    recent: Recent,
    /// In-doubt ops an operator is resolving right now.
    resolving: FxHashSet<OpId>,
    counters: Counters,
    started: Instant,
    in_flight: Arc<dyn InFlight>,
    epochs: Arc<KeyEpochs>,
    metrics: RingMetrics,
}

/// A live op: admitted, and not yet settled.
pub struct Live<H: Host> {
    pub record: Arc<OpRecord>,
    pub exec: H::Exec,
    pub lsn: Option<Lsn>,
    /// The journal's mark that an op with external effects first ran.
    pub started: Option<Lsn>,
    /// The budget held for it while it runs, what one attempt can spend at most,
    /// and what its attempts have spent so far.
    pub reservation: Option<Reservation>,
    attempt_max: Spend,
    spent: Spend,
    pub state: OpState,
    /// Acknowledged to the submitter (journaled if it has effects); until then it
    /// must not run.
    active: bool,
    /// Holds an admitted scheduler slot without being queued (blocked, or not yet
    /// active); released if it ends that way.
    holds_slot: bool,
    /// A completion is being recorded; nothing else may happen to the op.
    pub finishing: bool,
    /// Held back (a quota's `queue` action): it starts when its host lets it.
    delayed: bool,
    /// Held for approval ([`OpRecord::hold`]): it starts once approved.
    held: bool,
    cancel_requested: bool,
    blocked_on: usize,
    failed_dependency: Option<String>,
    pub attempts: u32,
    accepted: Instant,
    first_start: Option<Instant>,
    exec_time: Duration,
    cancel: Option<H::Cancel>,
    /// The completion queue of the submission that created the op: kept apart from
    /// `waiters`, which most ops never have, so that it costs no allocation.
    reaper: Option<H::Waiter>,
    pub waiters: Vec<H::Waiter>,
}

struct Counters {
    latency: [Histogram<u64>; 4],
    /// (second since start, completions in it), the last 10 seconds.
    window: VecDeque<(u64, u64)>,
}

/// An op about to end, with what it holds until its completion is durable.
pub struct Finish<H: Host> {
    pub id: OpId,
    pub status: CompletionStatus,
    pub result: Option<Value>,
    pub error: Option<Error>,
    pub held: Option<H::Held>,
    /// Labels of its result, after the op's own.
    pub labels: Vec<String>,
}

impl<H: Host> Finish<H> {
    pub fn new(id: OpId, status: CompletionStatus, result: Option<Value>, error: Option<Error>) -> Self {
        Self {
            id,
            status,
            result,
            error,
            held: None,
            labels: Vec::new(),
        }
    }

    pub fn cancelled(id: OpId, reason: &str) -> Self {
        Self::new(
            id,
            CompletionStatus::Cancelled,
            None,
            Some(Error::new(ErrorCode::FailedPrecondition, reason.to_owned())),
        )
    }

    /// An op with external effects that was running when the kernel stopped.
    pub fn in_doubt(id: OpId) -> Self {
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
}

/// A completion to record in the store before it settles.
pub struct ToRecord<H: Host> {
    pub completion: Arc<Completion>,
    /// The digest of its idempotency key's op.
    pub digest: Option<String>,
    /// For an `in_doubt` completion: the op, kept so it can be retried.
    pub doubt: Option<Arc<OpRecord>>,
    /// The budget charge that commits with the completion.
    pub charge: Option<Charge>,
    pub held: Option<H::Held>,
}

/// What an op with a budget reservation is charged when it completes.
#[derive(Clone, Debug)]
pub struct Charge {
    pub tenant: Arc<str>,
    pub agent: AgentId,
    pub reservation: Reservation,
    pub spent: Spend,
}

impl Charge {
    /// Its micro-dollars and tokens, never more than were reserved.
    pub fn capped(&self) -> Spend {
        Spend {
            micros: self.spent.micros.min(self.reservation.micros),
            tokens: self.spent.tokens.min(self.reservation.tokens),
        }
    }
}

/// What settling ops under the lock leaves to do once it is dropped.
pub struct Outbox<H: Host> {
    /// When the ops handled with this outbox ended.
    pub at: Moment,
    pub answers: Vec<(H::Waiter, Arc<Completion>)>,
    /// Whether anyone subscribed to the event stream: if not, no completion is
    /// collected for it.
    pub publish: bool,
    pub events: Vec<Arc<Completion>>,
    /// Journal records no longer needed.
    pub released: Vec<Lsn>,
    pub to_record: Vec<ToRecord<H>>,
    /// An op was queued: the dispatcher has work.
    pub queued: bool,
    /// Scheduler slots given back: submitters waiting for room may try again.
    pub freed: usize,
    /// Completions the ring stopped remembering, to drop outside its lock.
    pub forgotten: Option<FxHashMap<OpId, Arc<Completion>>>,
    /// Ops no longer in flight, per agent (a record of one of them, and how
    /// many): their quota is given back once per agent.
    settled: Vec<(Arc<OpRecord>, u64)>,
}

impl<H: Host> Outbox<H> {
    pub fn new(at: Moment, publish: bool) -> Self {
        Self {
            at,
            answers: Vec::new(),
            publish,
            events: Vec::new(),
            released: Vec::new(),
            to_record: Vec::new(),
            queued: false,
            freed: 0,
            forgotten: None,
            settled: Vec::new(),
        }
    }
}

/// What a batch entry turned into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    New(OpId),
    Existing(OpId),
}

impl Slot {
    pub fn id(self) -> OpId {
        match self {
            Self::New(id) | Self::Existing(id) => id,
        }
    }
}

/// An op of a batch after the checks that need no shared state: its record (its
/// id is used only if the op turns out new; its dependencies are filled in when
/// they are resolved) and its executor.
pub struct Checked<H: Host> {
    pub record: Arc<OpRecord>,
    pub exec: H::Exec,
}

/// An op to start: its record, executor and, if it can be stopped while running,
/// its canceller.
pub struct Start<H: Host> {
    pub id: OpId,
    pub record: Arc<OpRecord>,
    pub exec: H::Exec,
    pub cancel: Option<H::Cancel>,
}

/// The ring's figures, read under its lock.
#[derive(Debug, Clone)]
pub struct Figures {
    pub queued: Vec<(Priority, u64)>,
    pub pending: u64,
    pub capacity: u64,
    pub completed_last_10s: u64,
}

impl<H: Host> Engine<H> {
    pub fn new(
        config: EngineConfig,
        in_flight: Arc<dyn InFlight>,
        epochs: Arc<KeyEpochs>,
        metrics: RingMetrics,
        started: Instant,
    ) -> Self {
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds");
        Self {
            live: FxHashMap::default(),
            keys: HashMap::new(),
            scheduler: Scheduler::new(config.scheduler),
            dependents: FxHashMap::default(),
            recent: Recent::new(config.recent_completions),
            resolving: FxHashSet::default(),
            counters: Counters {
                latency: [histogram(), histogram(), histogram(), histogram()],
                window: VecDeque::new(),
            },
            started,
            in_flight,
            epochs,
            metrics,
        }
    }

    pub fn live(&self, id: &OpId) -> Option<&Live<H>> {
        self.live.get(id).map(|live| &**live)
    }

    pub fn live_mut(&mut self, id: &OpId) -> Option<&mut Live<H>> {
        self.live.get_mut(id).map(|live| &mut **live)
    }

    /// How many ops are live.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The completion of an op left unrecorded, while the ring remembers it.
    pub fn recent(&self, id: &OpId) -> Option<&Arc<Completion>> {
        self.recent.get(id)
    }

    /// Marks an in-doubt op as being resolved; false if it is live or already
    /// being resolved.
    pub fn begin_resolving(&mut self, id: OpId) -> bool {
        !self.live.contains_key(&id) && self.resolving.insert(id)
    }

    pub fn end_resolving(&mut self, id: &OpId) {
        self.resolving.remove(id);
    }

    /// Publishes the queue depths to the metrics.
    pub fn gauge_queues(&self) {
        let depths = Priority::ALL.iter().map(|p| (*p, self.scheduler.depth(*p)));
        self.metrics.queued(depths, self.scheduler.len());
    }

    /// Queue depths and completions in the last ten seconds.
    pub fn figures(&self, now: Instant) -> Figures {
        let second = now.saturating_duration_since(self.started).as_secs();
        Figures {
            queued: Priority::ALL
                .iter()
                .map(|p| (*p, self.scheduler.depth(*p) as u64))
                .collect(),
            pending: self.scheduler.len() as u64,
            capacity: self.scheduler.capacity() as u64,
            completed_last_10s: self
                .counters
                .window
                .iter()
                .filter(|(s, _)| *s + 10 > second)
                .map(|(_, n)| n)
                .sum(),
        }
    }

    /// Submission to completion of the ops of one priority, in microseconds.
    pub fn latency(&self, priority: Priority) -> &Histogram<u64> {
        &self.counters.latency[priority.rank()]
    }
}

fn dependency_failure(dep: &OpId, status: &str) -> String {
    format!("dependency {dep} ended with status {status}")
}
