//! Submission: a batch checked whole, admitted whole (keys, dependencies, slots),
//! journaled, and its ops made live.

use super::*;

impl Ring {
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
            // A submitter that may wait counts itself before it tries: a slot freed
            // between a refusal and the count would otherwise wake nobody.
            let waiting = deadline.map(|_| WaitingForRoom::count(&self.room_waiters));
            let admitted = self.admit(caller, &mut checked, &deps, &preread);
            match admitted {
                Ok(admitted) => break admitted,
                // Raised before any op of the batch is registered: a retry finds
                // none of them live, and reuses their ids and records as they are.
                Err(e) if e.code == ErrorCode::ResourceExhausted => {
                    let Some(left) = deadline.and_then(|d| d.checked_duration_since(Instant::now())) else {
                        self.metrics.refused.inc();
                        return Err(e);
                    };
                    let _ = tokio::time::timeout(left, room).await;
                    drop(waiting);
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
    pub(super) fn check(&self, op: SubmitOp, tenant: Arc<str>, submitted_at: DateTime<Utc>) -> Result<Checked> {
        let exec = Exec::parse(&self.components, &op.kind, &op.args)?;
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
            kind: exec::interned(&self.components, op.kind),
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
    pub(super) fn admit(
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
    pub(super) fn register(
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
    pub(super) fn known_key(
        &self,
        st: &RingState,
        agent: &AgentId,
        key: &str,
        preread: &Preread,
    ) -> Result<Option<KeyedOp>> {
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
    pub(super) fn stored_key(&self, agent: &AgentId, key: &str) -> Result<Option<KeyedOp>> {
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
    pub(super) fn activate(st: &mut RingState, id: OpId, lsn: Option<Lsn>, now: Instant, finish: &mut Vec<Finish>) {
        let Some(live) = st.live.get_mut(&id) else { return };
        live.active = true;
        live.lsn = lsn.or(live.lsn);
        Self::release_if_ready(st, id, now, finish);
    }

    /// Forgets an admitted op that was never acknowledged; returns those who joined
    /// it meanwhile (deduplicated submissions that reap), to be told.
    pub(super) fn discard(&self, st: &mut RingState, id: OpId) -> Vec<Waiter> {
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
    pub(super) fn release_if_ready(st: &mut RingState, id: OpId, now: Instant, finish: &mut Vec<Finish>) -> bool {
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
}

/// A submitter counted among those waiting for room while it lives.
struct WaitingForRoom<'a>(&'a AtomicUsize);

impl<'a> WaitingForRoom<'a> {
    fn count(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::AcqRel);
        Self(waiters)
    }
}

impl Drop for WaitingForRoom<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
