//! Completion: recording completions with their effects, settling ops, and
//! answering their waiters.

use super::*;

impl Ring {
    /// The completion of a live op as it ends now, with the digest of its key and
    /// whether it must be recorded in the store; marks the op finishing. `None` if
    /// it is gone or already finishing.
    pub(super) fn completion_of(
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
    pub(super) fn finish_all(self: &Arc<Self>, finish: Vec<Finish>) {
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
    pub(super) fn finish_locked(&self, st: &mut RingState, mut queue: Vec<Finish>, out: &mut Outbox) {
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
    pub(super) fn deliver(self: &Arc<Self>, out: Outbox) {
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
    pub(super) fn record(self: &Arc<Self>, pending: Vec<Pending>) {
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
    pub(super) fn settle_locked(
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
    pub(super) fn completion(&self, st: &RingState, id: &OpId) -> Result<Option<Arc<Completion>>> {
        if let Some(done) = st.recent.get(id) {
            return Ok(Some(done.clone()));
        }
        Ok(self.stored_completion(id)?.map(Arc::new))
    }

    pub(super) fn stored_completion(&self, id: &OpId) -> Result<Option<Completion>> {
        self.store
            .view()
            .get(self.store.keyspace(store::OPS), id.as_bytes())
            .map_err(|e| storage_error("read ops", e))?
            .map(|bytes| decode_completion(&bytes))
            .transpose()
    }
}
