//! Running ops: the dispatcher, breakers, executors, retries, and the journal's
//! copy-forward of long-running ops.

use super::*;

impl Ring {
    /// Copies the journal records of ops that have been live for a whole pass
    /// forward, once every `ring.journal_copy_forward_secs`.
    pub(super) async fn copy_forward_every(self: Arc<Self>) {
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
        // Read before the ops are picked: each was still running then.
        let picked_at = Utc::now();
        let picked = self.lock().old_records(floor);
        if picked.is_empty() {
            return Ok(next);
        }
        let entries: Vec<Vec<Vec<u8>>> = picked
            .iter()
            .map(|old| {
                let mut entries = vec![old.record.encode_accepted()];
                if let Some(reserved) = &old.started {
                    let started = Entry::Started {
                        op_id: old.id,
                        incarnation: old.record.incarnation,
                        reserved: reserved.clone(),
                    };
                    entries.push(started.encode());
                }
                entries
            })
            .collect();
        let counts: Vec<usize> = entries.iter().map(Vec::len).collect();
        let mut lsns = self
            .journal
            .append_copies(entries.into_iter().flatten().collect(), picked_at)
            .await?
            .into_iter();
        let mut released = Vec::new();
        let mut st = self.lock();
        for (old, count) in picked.iter().zip(counts) {
            released.extend(st.copied(old, lsns.by_ref().take(count).collect()));
        }
        drop(st);
        self.journal.release(released);
        Ok(next)
    }

    /// Takes ops in scheduler order while running and completion slots are free.
    pub(super) async fn dispatch(self: Arc<Self>) {
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
    pub(super) fn next_batch(&self, max: usize) -> (Vec<Start<KernelHost>>, bool) {
        let mut st = self.lock();
        let (batch, more) = st.next(max, Instant::now());
        st.gauge_queues();
        drop(st);
        // One waiting submitter per freed slot: waking them all would have every one
        // of them retry for the same few slots.
        self.wake_submitters(batch.len());
        (batch, more)
    }

    /// Wakes up to `freed` submitters waiting for room in the queue.
    pub(super) fn wake_submitters(&self, freed: usize) {
        let waiting = self.room_waiters.load(Ordering::Acquire);
        for _ in 0..freed.min(waiting) {
            self.room.notify_one();
        }
    }

    /// Runs a dispatched batch through its breakers: inline executors at once, with
    /// their ends handled under one lock; kernel-service ops as one store write;
    /// each `sleep` on a task of its own.
    pub(super) fn run_batch(self: &Arc<Self>, batch: Vec<Start<KernelHost>>) {
        let mut ended = Vec::with_capacity(batch.len());
        let mut applying = Vec::new();
        let started = Instant::now();
        // A batch is mostly of one kind and tenant: look its breaker up once.
        let mut last_breaker: Option<(Arc<OpRecord>, Arc<Tracked>)> = None;
        for Start {
            id,
            record,
            exec,
            cancel: token,
        } in batch
        {
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
                    ended.push(Attempted {
                        id,
                        attempt: Attempt::Failed(error),
                        took: Duration::ZERO,
                        admission: None,
                        slots,
                        retry_after: Some(rejected.retry_after),
                        labels: Vec::new(),
                    });
                    continue;
                }
            };
            let (attempt, took) = match exec {
                // Nothing to time: a clock read would cost more than the op.
                Exec::Noop => (Attempt::Ok(Value::Null), Duration::ZERO),
                Exec::Refused(error) => (Attempt::Failed(error), Duration::ZERO),
                Exec::Read(read) => {
                    let reading = Instant::now();
                    let attempt = match read.read(&self.store, &record.agent) {
                        Ok(value) => Attempt::Ok(value),
                        Err(e) => Attempt::Failed(e),
                    };
                    (attempt, reading.elapsed())
                }
                Exec::Effect(effect) => {
                    if let Some(work) = effect.ready(record.agent) {
                        self.spawn_ready(record, effect, work, admission, slots);
                        continue;
                    }
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
                Exec::Task(task) => {
                    self.spawn_task(record, task, token.unwrap_or_default(), admission, slots);
                    continue;
                }
            };
            // Ended here: the breaker hears of it at once, and the attempt's end
            // need not carry the breaker along.
            let (breaker, admission) = admission;
            breaker.record(admission, !attempt.transient(), started);
            let labels = self.result_labels(&record, &attempt);
            ended.push(Attempted {
                id,
                attempt,
                took,
                admission: None,
                slots,
                retry_after: None,
                labels,
            });
        }
        if !ended.is_empty() {
            self.attempts_done(ended);
        }
        if !applying.is_empty() {
            self.apply_effects(applying);
        }
    }

    /// Runs a task op on a task of its own. One with external effects is first
    /// marked started in the journal (once, on its first attempt): from then on a
    /// crash leaves it `in_doubt`, never run again unasked.
    pub(super) fn spawn_task(
        self: &Arc<Self>,
        record: Arc<OpRecord>,
        task: Arc<dyn TaskOp>,
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
            let begun = if task.effects() == Effects::External {
                ring.begin_external(&record, task.max_spend()).await
            } else {
                Ok(())
            };
            let ctx = TaskContext {
                op_id: id,
                agent: record.agent,
                tenant: &record.tenant,
                idempotency_key: record.idempotency.as_ref().map(|i| i.key.as_str()),
                store: &ring.store,
            };
            let run = async {
                begun?;
                let timeout = Duration::from_millis(record.timeout_ms);
                match tokio::time::timeout(timeout, task.run(&ctx)).await {
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
            let labels = ring.result_labels(&record, &attempt);
            let ended = Attempted::ran(id, (attempt, labels), began.elapsed(), admission, slots);
            ring.attempts_done(vec![ended]);
        });
    }

    /// Runs what an effect needs before it is staged on a task of its own,
    /// holding its running slot, then hands the effect to the store; a failure
    /// or timeout ends the attempt as a task's would.
    fn spawn_ready(
        self: &Arc<Self>,
        record: Arc<OpRecord>,
        effect: Arc<dyn bbx_component::EffectOp>,
        work: bbx_component::Pending<'static, ()>,
        admission: Breaker,
        slots: Slots,
    ) {
        let ring = self.clone();
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            let began = Instant::now();
            let timeout = Duration::from_millis(record.timeout_ms);
            let failed = tokio::select! {
                () = stopping.cancelled() => return,
                done = tokio::time::timeout(timeout, work) => match done {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(Attempt::Failed(e)),
                    Err(_) => Some(Attempt::TimedOut),
                },
            };
            match failed {
                None => {
                    let slots = Slots {
                        running: None,
                        completing: slots.completing,
                    };
                    ring.apply_effects(vec![(record.op_id, effect, admission, slots)]);
                }
                Some(attempt) => {
                    let labels = ring.result_labels(&record, &attempt);
                    let ended = Attempted::ran(record.op_id, (attempt, labels), began.elapsed(), admission, slots);
                    ring.attempts_done(vec![ended]);
                }
            }
        });
    }

    /// Before an op with external effects first runs: reserves the most all its
    /// attempts can spend (`attempt_max` each) on its path's budgets, then makes
    /// its start mark, with the reservation, durable. Later attempts find both done.
    pub(super) async fn begin_external(&self, record: &OpRecord, attempt_max: Spend) -> Result<()> {
        let id = record.op_id;
        if !self.lock().needs_start_mark(&id) {
            return Ok(());
        }
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
        if !self.lock().started(&id, lsn, reservation.clone(), attempt_max) {
            unreserve();
            self.journal.release(vec![lsn]);
        }
        Ok(())
    }

    /// Kernel-service ops: each one's effect and completion go to the store as one
    /// write, and the batch's writes as one request. The breaker judges the op by
    /// whether its write lands.
    pub(super) fn apply_effects(
        self: &Arc<Self>,
        applying: Vec<(OpId, Arc<dyn bbx_component::EffectOp>, Breaker, Slots)>,
    ) {
        let mut out = self.outbox();
        let held = applying.into_iter().map(|(id, effect, admission, slots)| {
            let hold = Held {
                _completing: slots.completing,
                admission: Some(admission),
                effect: Some(effect),
            };
            (id, hold)
        });
        self.lock().applying(held, &mut out);
        self.deliver(out);
    }

    /// The labels components give an attempt's result, or its error as
    /// `{"error": ...}` (a tool's error can carry what the outside sent: a
    /// server's message, an MCP tool's error text); none for an attempt that
    /// timed out or was cancelled, or when no component labels results.
    fn result_labels(&self, record: &OpRecord, attempt: &Attempt) -> Vec<String> {
        if !self.components.labels_results() {
            return Vec::new();
        }
        let failed;
        let result = match attempt {
            Attempt::Ok(result) => result,
            Attempt::Failed(error) => {
                failed = serde_json::json!({ "error": error });
                &failed
            }
            Attempt::TimedOut | Attempt::Cancelled => return Vec::new(),
        };
        let op = bbx_component::Attempted {
            op_id: record.op_id,
            agent: record.agent,
            tenant: &record.tenant,
            kind: &record.kind,
            args: &record.args,
            run: record.run.as_deref(),
        };
        self.components.label(&op, result)
    }

    /// Ends attempts: records each with its breaker, then retries the op after its
    /// backoff (on a timer, holding no slot) or completes it. One lock for all.
    pub(super) fn attempts_done(self: &Arc<Self>, attempted: Vec<Attempted>) {
        let now = Instant::now();
        let ended = attempted
            .into_iter()
            .map(|a| {
                if let Some((breaker, admission)) = a.admission {
                    breaker.record(admission, !a.attempt.transient(), now);
                }
                let Slots { running, completing } = a.slots;
                drop(running);
                engine::Ended {
                    id: a.id,
                    attempt: a.attempt,
                    took: a.took,
                    held: Held::slot(completing),
                    retry_after: a.retry_after,
                    labels: a.labels,
                }
            })
            .collect();
        let mut out = self.outbox();
        let retrying = self.lock().attempts_ended(ended, &mut out);
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
    pub(super) fn start_delayed(self: &Arc<Self>, ids: Vec<OpId>) {
        let mut finish = Vec::new();
        let queued = {
            let mut st = self.lock();
            let queued = st.start_delayed(&ids, Instant::now(), &mut finish);
            st.gauge_queues();
            queued
        };
        if queued {
            self.work.notify_one();
        }
        self.finish_all(finish);
    }

    /// Puts an op back in the queue after its backoff.
    pub(super) fn requeue(self: &Arc<Self>, id: OpId) {
        let finish = self.lock().requeue(id, Instant::now());
        self.work.notify_one();
        self.finish_all(finish.into_iter().collect());
    }
}

/// An attempt that ended, with its breaker's admission and the slots it holds.
pub(super) struct Attempted {
    id: OpId,
    attempt: Attempt,
    took: Duration,
    admission: Option<Breaker>,
    slots: Slots,
    /// At least this long before a retry (an open breaker says how long).
    retry_after: Option<Duration>,
    /// What components said of its result.
    labels: Vec<String>,
}

impl Attempted {
    /// An attempt that the breaker let through and that ran for `took`.
    fn ran(
        id: OpId,
        (attempt, labels): (Attempt, Vec<String>),
        took: Duration,
        admission: Breaker,
        slots: Slots,
    ) -> Self {
        Self {
            id,
            attempt,
            took,
            admission: Some(admission),
            slots,
            retry_after: None,
            labels,
        }
    }
}
