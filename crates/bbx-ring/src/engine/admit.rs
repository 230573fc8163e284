//! Admission: a batch's keys and dependencies resolved and its new ops made live,
//! whole or not at all; acknowledged ops made runnable.

use super::*;
use crate::batch::{self, Dependency};
use crate::{Idempotency, Refused};

/// What a refused submission is told to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// A batch after admission: what each entry turned into, and the records of the
/// new ops with effects, to journal.
pub type Admitted = (Vec<Slot>, Vec<(OpId, Arc<OpRecord>)>);

impl<H: Host> Engine<H> {
    /// Resolves keys and dependencies and admits the new ops, so that two
    /// submissions of one key cannot both create an op. `owns` says whether the
    /// submitter may name an op of a tenant (an error if not). A refusal leaves
    /// nothing of the batch behind; one for lack of room
    /// (`resource_exhausted`) comes before any op is registered, so a retry may
    /// reuse the batch as it is.
    pub fn admit(
        &mut self,
        ops: &mut [Checked<H>],
        deps: &[Vec<Dependency>],
        recorded: &dyn Recorded,
        owns: &dyn Fn(&str, &OpId) -> Result<()>,
        now: Instant,
    ) -> Result<Admitted> {
        let slots = self.resolve_keys(ops, recorded)?;
        // Dependencies: in-batch references become op ids; others must exist and be
        // visible to the submitter.
        let mut resolved: Vec<Vec<OpId>> = Vec::with_capacity(ops.len());
        for (index, op_deps) in deps.iter().enumerate() {
            let mut ids = Vec::with_capacity(op_deps.len());
            for dep in op_deps {
                let id = match dep {
                    Dependency::InBatch(i) => slots[*i].id(),
                    Dependency::Op(id) => {
                        let tenant = match (self.live.get(id), self.recent.get(id)) {
                            (Some(live), _) => Some(live.record.tenant.clone()),
                            (None, Some(done)) => Some(done.tenant.clone()),
                            (None, None) => recorded.completion(id)?.map(|c| c.tenant.clone()),
                        };
                        match tenant {
                            Some(tenant) => owns(&tenant, id).map_err(|e| batch::at_op(index, e))?,
                            None => return Err(batch::at_op(index, Error::not_found("op", id))),
                        }
                        *id
                    }
                };
                ids.push(id);
            }
            resolved.push(ids);
        }
        self.take_room(ops, &slots)?;

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
            // A hold must outlive a restart as the op's effects must: both are
            // journaled before they are acknowledged.
            if H::effects(&op.exec) != Effects::None || op.record.hold.is_some() {
                records.push((id, op.record.clone()));
            }
            let registered = self.register(op.record.clone(), op.exec.clone(), None, &arriving, now, recorded);
            if let Err(e) = registered {
                // Only a storage failure gets here; the batch still goes whole.
                // Discarding an op gives its quota back; those never registered
                // give theirs back here.
                for (slot, op) in slots.iter().zip(ops.iter()) {
                    if let Slot::New(id) = slot {
                        if self.live.contains_key(id) {
                            // Nobody joined it: the lock has been held since it was admitted.
                            self.discard(*id);
                        } else {
                            self.in_flight.release(&op.record.tenant, op.record.agent, 1);
                            self.scheduler.release(&op.record.agent);
                        }
                    }
                }
                return Err(e);
            }
            self.metrics.submitted.inc();
        }
        Ok((slots, records))
    }

    /// What each entry of a batch is: a new op, or the op its idempotency key
    /// already names (with the same kind and args; a different one is refused).
    fn resolve_keys(&self, ops: &[Checked<H>], recorded: &dyn Recorded) -> Result<Vec<Slot>> {
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
                        None => self.known_key(&record.agent, key, recorded)?,
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
        Ok(slots)
    }

    /// Takes the new ops' in-flight quota, per agent, and their scheduler slots;
    /// all or none.
    fn take_room(&mut self, ops: &[Checked<H>], slots: &[Slot]) -> Result<()> {
        let new = || {
            slots
                .iter()
                .zip(ops.iter())
                .filter(|(slot, _)| matches!(slot, Slot::New(_)))
                .map(|(_, op)| &op.record)
        };
        let mut per_agent: Vec<(&str, AgentId, u64)> = Vec::new();
        for record in new() {
            match per_agent.iter_mut().find(|(_, agent, _)| *agent == record.agent) {
                Some((_, _, n)) => *n += 1,
                None => per_agent.push((&record.tenant, record.agent, 1)),
            }
        }
        let release = |taken: &[(&str, AgentId, u64)]| {
            for (tenant, agent, n) in taken {
                self.in_flight.release(tenant, *agent, *n);
            }
        };
        for (index, (tenant, agent, n)) in per_agent.iter().enumerate() {
            if let Err(exceeded) = self.in_flight.acquire(tenant, *agent, *n) {
                release(&per_agent[..index]);
                return Err(exceeded);
            }
        }
        let admitted: Vec<(AgentId, Priority)> = new().map(|record| (record.agent, record.priority)).collect();
        if let Err(refused) = self.scheduler.admit(&admitted) {
            release(&per_agent);
            let message = match refused {
                Refused::Full { .. } | Refused::AgentFull { .. } | Refused::Shed => refused.to_string(),
            };
            return Err(Error::resource_exhausted(message, RETRY_AFTER));
        }
        Ok(())
    }

    /// Admits one op alone, with no dependencies and no key to resolve (an op in
    /// doubt that an operator retries): its quota and scheduler slot.
    pub fn admit_one(&mut self, record: &OpRecord) -> Result<()> {
        self.in_flight.acquire(&record.tenant, record.agent, 1)?;
        if let Err(refused) = self.scheduler.admit(&[(record.agent, record.priority)]) {
            self.in_flight.release(&record.tenant, record.agent, 1);
            return Err(Error::resource_exhausted(refused.to_string(), RETRY_AFTER));
        }
        Ok(())
    }

    /// Gives back what [`Self::admit_one`] took, for an op never registered.
    pub fn unadmit_one(&mut self, record: &OpRecord) {
        self.in_flight.release(&record.tenant, record.agent, 1);
        self.scheduler.release(&record.agent);
    }

    /// Makes an admitted op live: links it to its dependencies still in flight (live,
    /// or `arriving` with it), notes one that already ended without `ok`, and claims
    /// its idempotency key. The op holds its scheduler slot until it is queued.
    pub fn register(
        &mut self,
        record: Arc<OpRecord>,
        exec: H::Exec,
        lsn: Option<Lsn>,
        arriving: &FxHashSet<OpId>,
        accepted: Instant,
        recorded: &dyn Recorded,
    ) -> Result<()> {
        let id = record.op_id;
        let mut blocked_on = 0;
        let mut failed_dependency = None;
        for dep in &record.depends_on {
            if arriving.contains(dep) || self.live.contains_key(dep) {
                blocked_on += 1;
                self.dependents.entry(*dep).or_default().push(id);
                continue;
            }
            let done = match self.recent.get(dep) {
                Some(done) => Some(done.clone()),
                None => recorded.completion(dep)?,
            };
            match done {
                Some(done) if done.status == CompletionStatus::Ok => {}
                Some(done) => failed_dependency = Some(dependency_failure(dep, done.status.as_str())),
                None => failed_dependency = Some(format!("dependency {dep} is no longer known (lost in a restart)")),
            }
        }
        if let Some(idempotency) = &record.idempotency {
            self.keys.insert((record.agent, idempotency.key.clone()), id);
        }
        let held = record.hold.is_some();
        self.live.insert(
            id,
            Box::new(Live {
                record,
                exec,
                lsn,
                started: None,
                reservation: None,
                attempt_max: Spend::default(),
                spent: Spend::default(),
                state: if held {
                    OpState::PendingApproval
                } else {
                    OpState::Blocked
                },
                active: false,
                holds_slot: true,
                finishing: false,
                delayed: false,
                held,
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
    fn known_key(&self, agent: &AgentId, key: &str, recorded: &dyn Recorded) -> Result<Option<KeyedOp>> {
        if let Some(id) = self.keys.get(&(*agent, key.to_owned())) {
            let digest = self
                .live
                .get(id)
                .and_then(|l| l.record.idempotency.as_ref())
                .map(|i| i.digest.clone());
            return Ok(Some((*id, digest)));
        }
        recorded.key(agent, key)
    }

    /// Gives a new op the submission's completion queue, and holds it back until
    /// [`Self::start_delayed`] if `delayed`. Call before [`Self::activate`].
    pub fn hand_to(&mut self, id: &OpId, reaper: Option<H::Waiter>, delayed: bool) {
        if let Some(live) = self.live.get_mut(id) {
            live.delayed = delayed;
            live.reaper = reaper;
        }
    }

    /// Adds a waiter to a live op; hands it back if the op is not live.
    pub fn join(&mut self, id: &OpId, waiter: H::Waiter) -> std::result::Result<(), H::Waiter> {
        match self.live.get_mut(id) {
            Some(live) => {
                live.waiters.push(waiter);
                Ok(())
            }
            None => Err(waiter),
        }
    }

    /// Makes an admitted op runnable once it is acknowledged, with its journal
    /// position if it was journaled; true if it was queued.
    pub fn activate(&mut self, id: OpId, lsn: Option<Lsn>, now: Instant, finish: &mut Vec<Finish<H>>) -> bool {
        let Some(live) = self.live.get_mut(&id) else {
            return false;
        };
        live.active = true;
        live.lsn = lsn.or(live.lsn);
        self.release_if_ready(id, now, finish)
    }

    /// Forgets an admitted op that was never acknowledged; returns those who joined
    /// it meanwhile (deduplicated submissions that reap), to be told.
    pub fn discard(&mut self, id: OpId) -> Vec<H::Waiter> {
        let Some(live) = self.live.remove(&id) else {
            return Vec::new();
        };
        self.in_flight.release(&live.record.tenant, live.record.agent, 1);
        if live.holds_slot {
            self.scheduler.release(&live.record.agent);
        }
        self.dependents.remove(&id);
        if let Some(idempotency) = &live.record.idempotency {
            self.keys.remove(&(live.record.agent, idempotency.key.clone()));
            self.epochs.bump(&live.record.agent, &idempotency.key);
        }
        live.waiters
    }

    /// Lets ops held back by [`Self::hand_to`] start (once their dependencies are
    /// done); true if any was queued.
    pub fn start_delayed(&mut self, ids: &[OpId], now: Instant, finish: &mut Vec<Finish<H>>) -> bool {
        let mut queued = false;
        for id in ids {
            if let Some(live) = self.live.get_mut(id) {
                live.delayed = false;
                queued |= self.release_if_ready(*id, now, finish);
            }
        }
        queued
    }

    /// Queues an active op whose dependencies are done, or ends it if one failed or
    /// it was cancelled while it waited.
    pub(super) fn release_if_ready(&mut self, id: OpId, now: Instant, finish: &mut Vec<Finish<H>>) -> bool {
        let Some(live) = self.live.get_mut(&id) else {
            return false;
        };
        if !live.active || live.finishing || !live.holds_slot || live.delayed || live.held {
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
            self.scheduler.enqueue(agent, priority, id, now);
            return true;
        }
        false
    }
}
