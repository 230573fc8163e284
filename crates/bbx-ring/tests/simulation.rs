//! A deterministic simulation of the ring's engine: thousands of seeded random
//! schedules of submissions, journal writes, dispatches, attempt ends, retries,
//! cancels, store writes, copy-forwards, failures of the journal and the store,
//! crashes and restarts, each checked against the ring's promises:
//!
//! - each acknowledged journaled op completes exactly once (its completion is
//!   stored once, its kernel effect applied once), across any number of crashes;
//! - an op with external effects that had started is never run again after a
//!   crash (it ends `in_doubt`);
//! - an idempotency key in use names one op: a second submission joins it;
//! - an op runs only after every op it depends on completed `ok`;
//! - an op held for approval runs only once approved, and a denied one never;
//! - nothing starves: once failures stop, every live op settles;
//! - the in-flight quota always counts exactly the live ops, and is all given
//!   back at the end; every waiter is answered at most once.
//!
//! `BBX_SIM_SCHEDULES` sets how many schedules run (default 2,000) and
//! `BBX_SIM_SEED` the first seed; a failure names the seed that reproduces it.

use bbx_core::op::{Completion, CompletionStatus, Priority, RetryPolicy};
use bbx_core::quota::Spend;
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_ring::batch::{Dependency, args_digest};
use bbx_ring::engine::{
    Attempt, Cancelled, Checked, Ended, Engine, EngineConfig, Finish, Host, InFlight, KeyEpochs, KeyedOp, Lsn, Moment,
    Outbox, Recorded, Recovered, Slot, ToRecord,
};
use bbx_ring::{Effects, Hold, Idempotency, OpRecord, RingMetrics, SchedulerConfig};
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct SimHost;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SimExec(Effects);

/// A submission, the index of an entry in it, and the op it waits for.
type Waiter = (u64, usize, OpId);

impl Host for SimHost {
    type Exec = SimExec;
    type Waiter = Waiter;
    type Held = ();
    type Cancel = ();

    fn effects(exec: &SimExec) -> Effects {
        exec.0
    }

    fn canceller(exec: &SimExec) -> Option<()> {
        (exec.0 != Effects::Kernel).then_some(())
    }

    fn applies_with_completion(exec: &SimExec) -> bool {
        exec.0 == Effects::Kernel
    }

    fn spent(_: &SimExec, _: &Value) -> Spend {
        Spend::default()
    }
}

const KINDS: [(&str, Effects); 3] = [
    ("none", Effects::None),
    ("kernel", Effects::Kernel),
    ("external", Effects::External),
];

fn exec_of(kind: &str) -> SimExec {
    SimExec(KINDS.iter().find(|(k, _)| *k == kind).expect("a simulated kind").1)
}

/// The in-flight quota: a count per agent, refusing past a limit.
struct Counting {
    per_agent: Mutex<HashMap<AgentId, u64>>,
    limit: u64,
}

impl Counting {
    fn total(&self) -> u64 {
        self.per_agent.lock().values().sum()
    }
}

impl InFlight for Counting {
    fn acquire(&self, _: &str, agent: AgentId, ops: u64) -> Result<()> {
        let mut counts = self.per_agent.lock();
        let count = counts.entry(agent).or_default();
        if *count + ops > self.limit {
            return Err(Error::new(ErrorCode::ResourceExhausted, "too many ops in flight"));
        }
        *count += ops;
        Ok(())
    }

    fn reacquire(&self, _: &str, agent: AgentId, ops: u64) {
        *self.per_agent.lock().entry(agent).or_default() += ops;
    }

    fn release(&self, _: &str, agent: AgentId, ops: u64) {
        let mut counts = self.per_agent.lock();
        let count = counts.entry(agent).or_default();
        assert!(*count >= ops, "released more ops than were in flight");
        *count -= ops;
    }
}

/// What survives a crash.
#[derive(Default)]
struct Disk {
    journal: Vec<Journaled>,
    completions: HashMap<OpId, Completion>,
    keys: HashMap<(AgentId, String), (OpId, String)>,
    kernel_effects: HashMap<OpId, u32>,
}

struct Journaled {
    lsn: Lsn,
    entry: Entry,
    released: bool,
}

enum Entry {
    Accepted(Box<OpRecord>),
    Started(OpId),
}

impl Recorded for Disk {
    fn key(&self, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>> {
        Ok(self
            .keys
            .get(&(*agent, key.to_owned()))
            .map(|(id, digest)| (*id, Some(digest.clone()))))
    }

    fn completion(&self, id: &OpId) -> Result<Option<Arc<Completion>>> {
        Ok(self.completions.get(id).cloned().map(Arc::new))
    }
}

/// A batch admitted and not yet journaled.
struct Unjournaled {
    submission: u64,
    slots: Vec<Slot>,
    records: Vec<OpId>,
    delayed: bool,
}

/// What the checker knows, across crashes.
#[derive(Default)]
struct Oracle {
    /// Acknowledged ops: journaled, and the life they were acknowledged in.
    acked: HashMap<OpId, (bool, u32)>,
    /// Completions settled (published), per op.
    settled: HashMap<OpId, CompletionStatus>,
    /// Answers per (submission, op).
    answers: HashMap<Waiter, u32>,
    /// The life in which an op's start mark was made.
    marked: HashMap<OpId, u32>,
    /// Ops accepted with a hold, and those of them approved.
    held: HashSet<OpId>,
    approved: HashSet<OpId>,
    /// The op that owns an idempotency key, while it is known.
    owners: HashMap<(AgentId, String), OpId>,
    ops: Vec<OpId>,
}

struct World {
    rng: StdRng,
    seed: u64,
    disk: Disk,
    oracle: Oracle,
    engine: Engine<SimHost>,
    in_flight: Arc<Counting>,
    /// Crashes so far: the current life.
    life: u32,
    next_lsn: Lsn,
    next_id: u128,
    next_submission: u64,
    base: Instant,
    elapsed: Duration,
    agents: Vec<AgentId>,
    unjournaled: Vec<Unjournaled>,
    /// Attempts running: the op, and whether it was cancelled.
    running: Vec<(OpId, bool)>,
    to_record: Vec<ToRecord<SimHost>>,
    /// Ops whose completion could not be written: they stay until a restart.
    stuck: usize,
    timers: Vec<(Duration, Timer)>,
}

enum Timer {
    Requeue(OpId),
    StartDelayed(Vec<OpId>),
}

fn engine(in_flight: &Arc<Counting>, base: Instant) -> Engine<SimHost> {
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            capacity: 48,
            agent_capacity: 24,
            aging: Duration::from_millis(50),
            shed_low_above: Some(0.9),
        },
        recent_completions: 16,
    };
    Engine::new(
        config,
        in_flight.clone(),
        Arc::new(KeyEpochs::default()),
        RingMetrics::new(),
        base,
    )
}

impl World {
    fn new(seed: u64) -> Self {
        let in_flight = Arc::new(Counting {
            per_agent: Mutex::default(),
            limit: 20,
        });
        let base = Instant::now();
        Self {
            rng: StdRng::seed_from_u64(seed),
            seed,
            disk: Disk::default(),
            oracle: Oracle::default(),
            engine: engine(&in_flight, base),
            in_flight,
            life: 0,
            next_lsn: 1,
            next_id: 1,
            next_submission: 1,
            base,
            elapsed: Duration::ZERO,
            agents: (1..=3u128)
                .map(|n| AgentId::from_bytes((n << 64).to_be_bytes()))
                .collect(),
            unjournaled: Vec::new(),
            running: Vec::new(),
            to_record: Vec::new(),
            stuck: 0,
            timers: Vec::new(),
        }
    }

    fn violated(&self, what: impl std::fmt::Display) -> ! {
        panic!("seed {}: {what}", self.seed)
    }

    fn at(&self) -> Moment {
        Moment {
            now: self.base + self.elapsed,
            wall: DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::from_std(self.elapsed).unwrap(),
        }
    }

    fn outbox(&self) -> Outbox<SimHost> {
        Outbox::new(self.at(), true)
    }

    fn append(&mut self, entry: Entry) -> Lsn {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        self.disk.journal.push(Journaled {
            lsn,
            entry,
            released: false,
        });
        lsn
    }

    /// One step of a schedule; `chaos` lets failures and crashes happen.
    fn step(&mut self, chaos: bool) {
        match self.rng.random_range(0..100) {
            0..25 => self.submit(),
            25..35 => self.journal_batch(chaos),
            35..55 => self.dispatch(),
            55..72 => self.end_attempt(chaos),
            72..82 => self.write_completions(chaos),
            82..88 => self.fire_timer(),
            88..90 => self.cancel(),
            90..92 => self.decide_held(),
            92..95 => self.copy_forward(),
            95..97 if chaos => self.crash(),
            _ => self.elapsed += Duration::from_millis(self.rng.random_range(1..40)),
        }
        self.check_in_flight();
    }

    fn submit(&mut self) {
        let size = self.rng.random_range(1..=3);
        let mut ops = Vec::with_capacity(size);
        let mut deps = Vec::with_capacity(size);
        for index in 0..size {
            let (kind, effects) = KINDS[self.rng.random_range(0..KINDS.len())];
            let agent = self.agents[self.rng.random_range(0..self.agents.len())];
            // Few keys and few distinct args, so that keys collide, mostly with the
            // same op and sometimes with a different one.
            let args = json!({ "n": self.rng.random_range(0..3) });
            let idempotency = self.rng.random_bool(0.4).then(|| Idempotency {
                key: format!("k{}", self.rng.random_range(0..6)),
                digest: args_digest(kind, &args),
            });
            let retries = self.rng.random_bool(0.5).then(|| RetryPolicy {
                count: self.rng.random_range(1..4),
                backoff_ms: 10,
                max_backoff_ms: 100,
            });
            let mut op_deps = Vec::new();
            if index > 0 && self.rng.random_bool(0.3) {
                op_deps.push(Dependency::InBatch(self.rng.random_range(0..index)));
            }
            if !self.oracle.ops.is_empty() && self.rng.random_bool(0.3) {
                let dep = self.oracle.ops[self.rng.random_range(0..self.oracle.ops.len())];
                op_deps.push(Dependency::Op(dep));
            }
            deps.push(op_deps);
            let id = OpId::from_bytes(self.next_id.to_be_bytes());
            self.next_id += 1;
            let record = OpRecord {
                op_id: id,
                agent,
                tenant: Arc::from("t"),
                kind: Cow::Borrowed(kind),
                args,
                priority: Priority::ALL[self.rng.random_range(0..4)],
                timeout_ms: 1000,
                retries,
                depends_on: Vec::new(),
                idempotency,
                user_data: None,
                trace: None,
                labels: Vec::new(),
                run: None,
                submitted_at: self.at().wall,
                incarnation: 0,
                hold: self.rng.random_bool(0.1).then(|| Hold {
                    by: "sim".into(),
                    reason: "a second look".into(),
                    until: self.at().wall + chrono::Duration::seconds(60),
                }),
            };
            ops.push(Checked {
                record: Arc::new(record),
                exec: SimExec(effects),
            });
        }
        let now = self.at().now;
        let admitted = self.engine.admit(&mut ops, &deps, &self.disk, &|_, _| Ok(()), now);
        let (slots, records) = match admitted {
            Ok(admitted) => admitted,
            Err(e) => {
                let expected = [
                    ErrorCode::ResourceExhausted,
                    ErrorCode::AlreadyExists,
                    ErrorCode::NotFound,
                ];
                if !expected.contains(&e.code) {
                    self.violated(format!("an unexpected refusal: {e}"));
                }
                return;
            }
        };
        for (slot, op) in slots.iter().zip(&ops) {
            let Some(idem) = &op.record.idempotency else { continue };
            let key = (op.record.agent, idem.key.clone());
            match (slot, self.oracle.owners.get(&key).copied()) {
                (Slot::New(id), Some(owner)) if owner != *id => {
                    self.violated(format!("key {key:?} of op {owner} made a second op {id}"))
                }
                (Slot::New(id), _) => {
                    self.oracle.owners.insert(key, *id);
                }
                (Slot::Existing(id), Some(owner)) if owner != *id => {
                    self.violated(format!("key {key:?} of op {owner} joined op {id}"))
                }
                (Slot::Existing(_), _) => {}
            }
        }
        for (slot, op) in slots.iter().zip(&ops) {
            if let (Slot::New(id), Some(_)) = (slot, &op.record.hold) {
                self.oracle.held.insert(*id);
            }
        }
        let batch = Unjournaled {
            submission: self.next_submission,
            slots,
            records: records.iter().map(|(id, _)| *id).collect(),
            delayed: self.rng.random_bool(0.1),
        };
        self.next_submission += 1;
        if batch.records.is_empty() {
            // Nothing to journal: acknowledged at once.
            self.acknowledge(batch, &HashMap::new());
        } else {
            self.unjournaled.push(batch);
        }
    }

    /// The journal write of a pending batch: it lands and the batch is
    /// acknowledged, or it fails and the batch goes as if never submitted.
    fn journal_batch(&mut self, chaos: bool) {
        if self.unjournaled.is_empty() {
            return;
        }
        let batch = self
            .unjournaled
            .remove(self.rng.random_range(0..self.unjournaled.len()));
        if chaos && self.rng.random_bool(0.1) {
            for slot in &batch.slots {
                if let Slot::New(id) = slot {
                    for waiter in self.engine.discard(*id) {
                        self.answer(waiter);
                    }
                    self.oracle.owners.retain(|_, owner| owner != id);
                }
            }
            return;
        }
        let mut lsns = HashMap::new();
        for id in &batch.records {
            let record = self.engine.live(id).expect("an admitted op is live").record.clone();
            lsns.insert(*id, self.append(Entry::Accepted(Box::new((*record).clone()))));
        }
        self.acknowledge(batch, &lsns);
    }

    fn acknowledge(&mut self, batch: Unjournaled, lsns: &HashMap<OpId, Lsn>) {
        let now = self.at().now;
        let mut finish = Vec::new();
        let mut delayed = Vec::new();
        for (index, slot) in batch.slots.iter().enumerate() {
            let waiter = (batch.submission, index, slot.id());
            match slot {
                Slot::New(id) => {
                    self.engine.hand_to(id, Some(waiter), batch.delayed);
                    self.engine.activate(*id, lsns.get(id).copied(), now, &mut finish);
                    self.oracle.acked.insert(*id, (lsns.contains_key(id), self.life));
                    self.oracle.ops.push(*id);
                    delayed.push(*id);
                }
                Slot::Existing(id) => {
                    // Done already: the submitter reads its completion instead.
                    if self.engine.join(id, waiter).is_err() {
                        self.oracle.answers.entry(waiter).or_default();
                    }
                }
            }
        }
        if batch.delayed {
            let due = self.elapsed + Duration::from_millis(self.rng.random_range(1..50));
            self.timers.push((due, Timer::StartDelayed(delayed)));
        }
        self.finish(finish);
    }

    fn dispatch(&mut self) {
        let max = self.rng.random_range(1..8);
        let (starts, _) = self.engine.next(max, self.at().now);
        let mut applying = Vec::new();
        for start in starts {
            if self.oracle.held.contains(&start.id) && !self.oracle.approved.contains(&start.id) {
                self.violated(format!("op {} ran while held for approval", start.id));
            }
            for dep in &start.record.depends_on {
                if self.oracle.settled.get(dep) != Some(&CompletionStatus::Ok) {
                    self.violated(format!(
                        "op {} started before its dependency {dep} completed ok",
                        start.id
                    ));
                }
            }
            match start.exec.0 {
                Effects::Kernel => applying.push((start.id, ())),
                Effects::External => {
                    if let Some(life) = self.oracle.marked.get(&start.id)
                        && *life < self.life
                    {
                        self.violated(format!(
                            "op {} ran again after a crash although it had started",
                            start.id
                        ));
                    }
                    if self.engine.needs_start_mark(&start.id) {
                        let mark = self.append(Entry::Started(start.id));
                        assert!(self.engine.started(&start.id, mark, None, Spend::default()));
                        self.oracle.marked.insert(start.id, self.life);
                    }
                    self.running.push((start.id, false));
                }
                Effects::None => self.running.push((start.id, false)),
            }
        }
        if !applying.is_empty() {
            let mut out = self.outbox();
            self.engine.applying(applying, &mut out);
            self.deliver(out);
        }
    }

    fn end_attempt(&mut self, chaos: bool) {
        if self.running.is_empty() {
            return;
        }
        let (id, cancelled) = self.running.remove(self.rng.random_range(0..self.running.len()));
        let attempt = match self.rng.random_range(0..10) {
            _ if cancelled => Attempt::Cancelled,
            0..6 => Attempt::Ok(json!({ "ran": true })),
            6 if chaos => Attempt::TimedOut,
            7 if chaos => Attempt::Failed(Error::unavailable("the target is down")),
            8 if chaos => Attempt::Failed(Error::new(ErrorCode::InvalidArgument, "refused")),
            _ => Attempt::Ok(Value::Null),
        };
        let ended = Ended {
            id,
            attempt,
            took: Duration::from_millis(1),
            held: Some(()),
            retry_after: None,
            labels: Vec::new(),
        };
        let mut out = self.outbox();
        for (op, delay) in self.engine.attempts_ended(vec![ended], &mut out) {
            self.timers.push((self.elapsed + delay, Timer::Requeue(op)));
        }
        self.deliver(out);
    }

    /// Writes some of the completions waiting for the store, in one request:
    /// each lands (with its key and its effect) or, under chaos, fails.
    fn write_completions(&mut self, chaos: bool) {
        let take = self.rng.random_range(0..=self.to_record.len());
        let mut written = Vec::new();
        for record in self.to_record.drain(..take).collect::<Vec<_>>() {
            if chaos && self.rng.random_bool(0.05) {
                self.stuck += 1;
                continue;
            }
            let completion = record.completion;
            let id = completion.op_id;
            if self.disk.completions.contains_key(&id) {
                self.violated(format!("op {id} completed twice"));
            }
            if let (Some(key), Some(digest)) = (&completion.idempotency_key, record.digest) {
                self.disk.keys.insert((completion.agent, key.clone()), (id, digest));
            }
            if completion.kind == "kernel" && completion.status == CompletionStatus::Ok {
                *self.disk.kernel_effects.entry(id).or_default() += 1;
            }
            self.disk.completions.insert(id, (*completion).clone());
            written.push(completion);
        }
        let mut out = self.outbox();
        self.engine.recorded(written, &mut out);
        self.deliver(out);
    }

    fn fire_timer(&mut self) {
        let Some(next) = (0..self.timers.len()).min_by_key(|i| self.timers[*i].0) else {
            return;
        };
        let (due, timer) = self.timers.remove(next);
        self.elapsed = self.elapsed.max(due);
        let now = self.at().now;
        let mut finish = Vec::new();
        match timer {
            Timer::Requeue(id) => finish.extend(self.engine.requeue(id, now)),
            Timer::StartDelayed(ids) => {
                self.engine.start_delayed(&ids, now, &mut finish);
            }
        }
        self.finish(finish);
    }

    fn cancel(&mut self) {
        if self.oracle.ops.is_empty() {
            return;
        }
        let id = self.oracle.ops[self.rng.random_range(0..self.oracle.ops.len())];
        match self.engine.cancel(&id, &|_| Ok(())) {
            Ok(Some(Cancelled::Running(_))) => {
                if let Some(running) = self.running.iter_mut().find(|(op, _)| *op == id) {
                    running.1 = true;
                }
            }
            Ok(Some(Cancelled::Ends(finish))) => self.finish(vec![finish]),
            Ok(Some(Cancelled::Later) | None) => {}
            Err(e) if e.code == ErrorCode::FailedPrecondition => {}
            Err(e) => self.violated(format!("an unexpected refusal to cancel: {e}")),
        }
    }

    /// An operator approves (its record journaled again without the hold) or
    /// denies an op held for approval.
    fn decide_held(&mut self) {
        let held = self.engine.held();
        if held.is_empty() {
            return;
        }
        let (id, _) = held[self.rng.random_range(0..held.len())];
        if self.rng.random_bool(0.7) {
            self.approve(id);
        } else {
            let denied = self.engine.deny(&id, "was denied");
            self.finish(denied.into_iter().collect());
        }
    }

    fn approve(&mut self, id: OpId) {
        let held = match self.engine.held_record(&id, &|_| Ok(())) {
            Ok(held) => held,
            Err(e) => self.violated(format!("a held op cannot be approved: {e}")),
        };
        let mut approved = (*held).clone();
        approved.hold = None;
        let lsn = self.append(Entry::Accepted(Box::new(approved.clone())));
        self.oracle.approved.insert(id);
        let mut finish = Vec::new();
        let now = self.at().now;
        let released = self.engine.approved(&id, Arc::new(approved), lsn, now, &mut finish);
        self.release(&released);
        self.finish(finish);
    }

    /// Journals the records of every live op again and releases the originals.
    fn copy_forward(&mut self) {
        for old in self.engine.old_records(self.next_lsn) {
            let mut copies = vec![self.append(Entry::Accepted(Box::new((*old.record).clone())))];
            if old.started.is_some() {
                copies.push(self.append(Entry::Started(old.id)));
            }
            let released = self.engine.copied(&old, copies);
            self.release(&released);
        }
    }

    fn release(&mut self, lsns: &[Lsn]) {
        let lsns: HashSet<Lsn> = lsns.iter().copied().collect();
        for journaled in &mut self.disk.journal {
            if lsns.contains(&journaled.lsn) {
                journaled.released = true;
            }
        }
    }

    fn finish(&mut self, finish: Vec<Finish<SimHost>>) {
        let mut out = self.outbox();
        self.engine.finish(finish, &mut out);
        self.deliver(out);
    }

    fn answer(&mut self, waiter: Waiter) {
        let answers = self.oracle.answers.entry(waiter).or_default();
        *answers += 1;
        if *answers > 1 {
            self.violated(format!(
                "entry {} of submission {} was answered twice for op {}",
                waiter.1, waiter.0, waiter.2
            ));
        }
    }

    fn deliver(&mut self, out: Outbox<SimHost>) {
        for (waiter, completion) in out.answers {
            assert_eq!(waiter.2, completion.op_id);
            self.answer(waiter);
        }
        for completion in out.events {
            let id = completion.op_id;
            if self.oracle.settled.insert(id, completion.status).is_some() {
                self.violated(format!("op {id} settled twice"));
            }
            if completion.idempotency_key.is_some() && !self.disk.completions.contains_key(&id) {
                self.violated(format!("keyed op {id} settled before its completion was stored"));
            }
        }
        self.release(&out.released);
        self.to_record.extend(out.to_record);
    }

    fn check_in_flight(&self) {
        let counted = self.in_flight.total();
        if counted != self.engine.len() as u64 {
            self.violated(format!("{counted} ops counted in flight, {} live", self.engine.len()));
        }
    }

    /// The process dies: everything but the disk is lost. A journal write in
    /// progress may or may not have landed. Then the ring restarts from the disk.
    fn crash(&mut self) {
        for batch in std::mem::take(&mut self.unjournaled) {
            if self.rng.random_bool(0.5) {
                for id in &batch.records {
                    let record = self.engine.live(id).expect("an admitted op is live").record.clone();
                    self.append(Entry::Accepted(Box::new((*record).clone())));
                }
            }
        }
        self.life += 1;
        self.running.clear();
        self.to_record.clear();
        self.timers.clear();
        self.stuck = 0;
        self.in_flight = Arc::new(Counting {
            per_agent: Mutex::default(),
            limit: self.in_flight.limit,
        });
        self.engine = engine(&self.in_flight, self.base);
        self.restart();
    }

    /// Recovery: the journal's records are read (released ones too, as if the
    /// checkpoint had not moved past them yet), and every op accepted and not
    /// completed is made live again.
    fn restart(&mut self) {
        let mut accepted: HashMap<OpId, (Lsn, OpRecord)> = HashMap::new();
        let mut order = Vec::new();
        let mut marks: HashMap<OpId, Lsn> = HashMap::new();
        for journaled in &self.disk.journal {
            match &journaled.entry {
                Entry::Accepted(record) => {
                    if !accepted.contains_key(&record.op_id) {
                        order.push(record.op_id);
                    }
                    accepted.insert(record.op_id, (journaled.lsn, (**record).clone()));
                }
                Entry::Started(id) => {
                    marks.insert(*id, journaled.lsn);
                }
            }
        }
        let mut recovered = Vec::new();
        for id in order {
            let (lsn, record) = accepted.remove(&id).expect("listed once");
            if self.disk.completions.contains_key(&id) {
                continue;
            }
            if self.disk.journal.iter().any(|j| j.lsn == lsn && j.released) {
                self.violated(format!(
                    "op {id} released its journal record without a stored completion"
                ));
            }
            let exec = exec_of(&record.kind);
            recovered.push(Recovered {
                record,
                exec,
                lsn,
                started: marks.get(&id).map(|mark| (*mark, None)),
            });
        }
        let recovering: HashSet<OpId> = recovered.iter().map(|r| r.record.op_id).collect();
        // A key is still owned by an op that recovery brings back or whose
        // completion is stored; an op that was never journaled is gone.
        let disk = &self.disk;
        self.oracle
            .owners
            .retain(|key, owner| recovering.contains(owner) || disk.keys.get(key).is_some_and(|(id, _)| id == owner));
        let mut finish = Vec::new();
        let now = self.at().now;
        if let Err(e) = self.engine.recover(recovered, &self.disk, now, &mut finish) {
            self.violated(format!("recovery failed: {e}"));
        }
        self.finish(finish);
    }

    /// Runs the world without failures until nothing is left to do.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.stuck > 0 {
                // Their completions were never written: only a restart runs them.
                self.crash();
            }
            if self.engine.is_empty() && self.unjournaled.is_empty() && self.timers.is_empty() {
                return;
            }
            while !self.unjournaled.is_empty() {
                self.journal_batch(false);
            }
            for (id, _) in self.engine.held() {
                self.approve(id);
            }
            self.dispatch();
            while !self.running.is_empty() {
                self.end_attempt(false);
            }
            while !self.to_record.is_empty() {
                self.write_completions(false);
            }
            self.fire_timer();
            self.check_in_flight();
        }
        self.violated(format!("{} ops never settled", self.engine.len()));
    }

    fn check_end(&self) {
        if self.in_flight.total() != 0 {
            self.violated("in-flight quota was not all given back");
        }
        for (id, (journaled, life)) in &self.oracle.acked {
            if *journaled && !self.disk.completions.contains_key(id) {
                self.violated(format!("acknowledged journaled op {id} never completed"));
            }
            // An op acknowledged without a journal record survives no crash; one
            // acknowledged in the last life completes.
            if *life == self.life && !self.oracle.settled.contains_key(id) {
                self.violated(format!("acknowledged op {id} never settled"));
            }
        }
        for (id, count) in &self.disk.kernel_effects {
            if *count != 1 {
                self.violated(format!("the effect of op {id} was applied {count} times"));
            }
        }
    }
}

fn schedule(seed: u64, steps: usize) -> u32 {
    let mut world = World::new(seed);
    for _ in 0..steps {
        world.step(true);
    }
    world.drain();
    world.check_end();
    world.life
}

#[test]
fn thousands_of_random_schedules_keep_the_rings_promises() {
    let schedules: u64 = std::env::var("BBX_SIM_SCHEDULES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let first: u64 = std::env::var("BBX_SIM_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let started = Instant::now();
    let mut crashes = 0;
    for seed in first..first + schedules {
        crashes += schedule(seed, 300);
    }
    println!(
        "{schedules} schedules of 300 steps (seeds {first}..{}), {crashes} crashes, in {:.1} s",
        first + schedules,
        started.elapsed().as_secs_f64()
    );
    assert!(
        crashes > schedules as u32 / 2,
        "the schedules crash the ring often enough to test recovery"
    );
}
