//! Submission: a batch checked whole, admitted whole (keys, dependencies, slots),
//! journaled, and its ops made live.

use super::*;

impl Ring {
    /// Submits a batch, placed as the pipeline decided ([`Placement`]). The
    /// submitter starts its ops itself right after, with
    /// [`Self::dispatch_once`], which saves waking the dispatcher task; only ops
    /// accepted after a journal sync (when the submitter may be long gone) wake it.
    pub async fn submit(
        self: &Arc<Self>,
        caller: &Caller,
        ops: Vec<SubmitOp>,
        placement: Placement,
        wait: Option<Duration>,
        reaper: Option<&Sink>,
    ) -> Result<Submitted> {
        let Placement {
            tenants,
            op_ids,
            mut holds,
            mut labels,
            start_after,
        } = placement;
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
            .map(|(index, (op, tenant))| {
                let hold = take(&mut holds, index);
                let labels = take(&mut labels, index).unwrap_or_default();
                let op_id = op_ids
                    .get(index)
                    .copied()
                    .unwrap_or_else(|| OpId::generate_at(submitted_at));
                self.check(op, tenant, (op_id, hold, labels), submitted_at)
                    .map_err(|e| batch::at_op(index, e))
            })
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
            let admitted = {
                let recorded = preread.with(self);
                let owns = |tenant: &str, id: &OpId| caller.check_owner(tenant, "op", id);
                self.lock().admit(&mut checked, &deps, &recorded, &owns, Instant::now())
            };
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
                                st.hand_to(id, reaper.map(|sink| Waiter::Sink(sink.clone())), start_after.is_some());
                                st.activate(*id, lsn_of.get(id).copied(), now, &mut finish);
                            }
                            (Slot::Existing(id), Some(sink)) => {
                                if let Err(waiter) = st.join(id, Waiter::Sink(sink.clone())) {
                                    // Done, or (rarely) gone between admission and now:
                                    // expired, or being retried after it was in doubt.
                                    let done = match self.completion(&st, id) {
                                        Ok(Some(done)) => done,
                                        Ok(None) => untracked(*id, &op.record, "it is no longer known here".into()),
                                        Err(e) => {
                                            untracked(*id, &op.record, format!("its completion cannot be read ({e})"))
                                        }
                                    };
                                    answers.push((waiter, done));
                                }
                            }
                            (Slot::Existing(_), None) => {}
                        }
                    }
                }
                Err(e) => {
                    // Nothing was acknowledged: the new ops go as if never submitted.
                    let why = format!("it was not accepted: its journal record could not be written ({e})");
                    for (slot, op) in slots.iter().zip(&checked) {
                        if let Slot::New(id) = slot {
                            for waiter in st.discard(*id) {
                                answers.push((waiter, untracked(*id, &op.record, why.clone())));
                            }
                        }
                    }
                }
            }
            st.gauge_queues();
        }
        if !journaled.is_empty() {
            self.work.notify_one();
        }
        self.finish_all(finish);
        for (waiter, completion) in answers {
            waiter.answer(completion);
        }
        lsns?;
        for (slot, op) in slots.iter().zip(&checked) {
            if let (Slot::New(id), Some(hold)) = (slot, &op.record.hold) {
                self.expire_hold(*id, hold.until);
            }
        }
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
    pub(super) fn check(
        &self,
        op: SubmitOp,
        tenant: Arc<str>,
        (op_id, hold, labels): (OpId, Option<Hold>, Vec<String>),
        submitted_at: DateTime<Utc>,
    ) -> Result<Checked<KernelHost>> {
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
        let idempotency = batch::idempotency_key(&op)?.map(|key| crate::Idempotency {
            key,
            digest: batch::args_digest(&op.kind, &op.args),
        });
        let record = OpRecord {
            op_id,
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
            hold,
            labels,
            run: op.run_id,
        };
        Ok(Checked {
            record: Arc::new(record),
            exec,
        })
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
}

/// The entry of a sparse list for the op at `index`, taken out of it.
fn take<T>(list: &mut Vec<(usize, T)>, index: usize) -> Option<T> {
    let at = list.iter().position(|(i, _)| *i == index)?;
    Some(list.swap_remove(at).1)
}

/// What the pipeline before the ring decided for a batch.
pub struct Placement {
    /// Each op's tenant (its agent's).
    pub tenants: Vec<Arc<str>>,
    /// The id each op is to have, made before the checks so that they can
    /// record what they decided of it; empty: made here.
    pub op_ids: Vec<OpId>,
    /// The ops to hold for approval, by index.
    pub holds: Vec<(usize, Hold)>,
    /// The labels the checks gave ops, by index.
    pub labels: Vec<(usize, Vec<String>)>,
    /// Held back this long by a quota's `queue` action.
    pub start_after: Option<Duration>,
}

impl Placement {
    /// Ops of these tenants, neither held nor delayed.
    pub fn tenants(tenants: Vec<Arc<str>>) -> Self {
        Self {
            tenants,
            op_ids: Vec::new(),
            holds: Vec::new(),
            labels: Vec::new(),
            start_after: None,
        }
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
