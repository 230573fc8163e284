//! Completion: an op's completion made, recorded first where it must outlive a
//! restart, then settled (its waiters, dependents, key and quota); and recovery,
//! which makes journaled ops without a completion live again.

use super::*;

/// A journaled op without a completion, found at start.
pub struct Recovered<H: Host> {
    pub record: OpRecord,
    pub exec: H::Exec,
    pub lsn: Lsn,
    /// Its start mark and the budget it reserved, if it had started (an op with
    /// external effects).
    pub started: Option<(Lsn, Option<Reservation>)>,
}

/// How an op ends: its status, result, error and its result's labels.
type Ending = (CompletionStatus, Option<Value>, Option<Error>, Vec<String>);

impl<H: Host> Engine<H> {
    /// Completes ops: those that must outlive a restart (journaled, or with a key)
    /// go to `out.to_record` first; the rest settle at once. Works through a list,
    /// not recursion, since ending an op may end its dependents.
    pub fn finish(&mut self, mut queue: Vec<Finish<H>>, out: &mut Outbox<H>) {
        while let Some(finish) = queue.pop() {
            let ending = (finish.status, finish.result, finish.error, finish.labels);
            let Some((completion, digest, durable)) = self.completion_of(finish.id, ending, out.at) else {
                continue;
            };
            if durable {
                let in_doubt = finish.status == CompletionStatus::InDoubt;
                let live = self.live.get(&finish.id);
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
                out.to_record.push(ToRecord {
                    completion,
                    digest,
                    doubt,
                    charge,
                    held: finish.held,
                });
            } else {
                self.settle(completion, false, &mut queue, out);
            }
        }
        // Still under the lock (the last thing each of its holders does): an op
        // that `wait`, `info` or a dependency can see done holds no quota.
        for (record, n) in out.settled.drain(..) {
            self.in_flight.release(&record.tenant, record.agent, n);
        }
    }

    /// Completes ops whose effect is applied with their completion: each goes to
    /// `out.to_record` with an `ok` completion, held until it is durable.
    pub fn applying(&mut self, ops: impl IntoIterator<Item = (OpId, H::Held)>, out: &mut Outbox<H>) {
        for (id, held) in ops {
            let ending = (CompletionStatus::Ok, None, None, Vec::new());
            let Some((completion, digest, _)) = self.completion_of(id, ending, out.at) else {
                continue;
            };
            out.to_record.push(ToRecord {
                completion,
                digest,
                doubt: None,
                charge: None,
                held: Some(held),
            });
        }
    }

    /// Settles completions that the store recorded, and moves their dependents on.
    /// A completion that could not be recorded is not reported here: its op stays
    /// live and journaled, so the next start runs it.
    pub fn recorded(&mut self, completions: impl IntoIterator<Item = Arc<Completion>>, out: &mut Outbox<H>) {
        let mut follow_ups = Vec::new();
        for completion in completions {
            self.settle(completion, true, &mut follow_ups, out);
        }
        self.finish(follow_ups, out);
    }

    /// The completion of a live op as it ends now, with the digest of its key and
    /// whether it must be recorded in the store; marks the op finishing. `None` if
    /// it is gone or already finishing.
    fn completion_of(
        &mut self,
        id: OpId,
        (status, result, error, result_labels): Ending,
        at: Moment,
    ) -> Option<(Arc<Completion>, Option<String>, bool)> {
        let live = self.live.get_mut(&id)?;
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
            labels: if result_labels.is_empty() {
                record.labels.clone()
            } else {
                record.labels.iter().cloned().chain(result_labels).collect()
            },
        });
        let digest = record.idempotency.as_ref().map(|i| i.digest.clone());
        let durable = live.lsn.is_some() || record.idempotency.is_some();
        Some((completion, digest, durable))
    }

    /// Publishes a completion: removes the op, queues the answers to its waiters,
    /// releases its journal records and moves its dependents on; dependents that
    /// end now go to `follow_ups`.
    fn settle(
        &mut self,
        completion: Arc<Completion>,
        recorded: bool,
        follow_ups: &mut Vec<Finish<H>>,
        out: &mut Outbox<H>,
    ) {
        let Some(live) = self.live.remove(&completion.op_id) else {
            return;
        };
        let live = *live;
        match out.settled.last_mut() {
            Some((record, n)) if record.agent == live.record.agent => *n += 1,
            _ => out.settled.push((live.record.clone(), 1)),
        }
        if live.holds_slot {
            self.scheduler.release(&live.record.agent);
            out.freed += 1;
        }
        if let Some(idempotency) = &live.record.idempotency {
            let key = (live.record.agent, idempotency.key.clone());
            if self.keys.get(&key) == Some(&completion.op_id) {
                self.keys.remove(&key);
                self.epochs.bump(&key.0, &key.1);
            }
        }
        let second = out.at.now.saturating_duration_since(self.started).as_secs();
        let counters = &mut self.counters;
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
            out.forgotten = self
                .recent
                .insert(completion.op_id, completion.clone())
                .or(out.forgotten.take());
        }
        for dependent in self.dependents.remove(&completion.op_id).unwrap_or_default() {
            if let Some(waiting) = self.live.get_mut(&dependent) {
                waiting.blocked_on = waiting.blocked_on.saturating_sub(1);
                if completion.status != CompletionStatus::Ok {
                    waiting.failed_dependency = Some(dependency_failure(&completion.op_id, completion.status.as_str()));
                }
                out.queued |= self.release_if_ready(dependent, out.at.now, follow_ups);
            }
        }
        if let Some(reaper) = live.reaper {
            out.answers.push((reaper, completion.clone()));
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

    /// Puts recovered ops back, in journal order, with their dependencies and
    /// idempotency keys. They were admitted before the crash, so they are not
    /// refused now. An op with external effects that had started is not run
    /// again: it ends `in_doubt` (in `finish`). `recorded` answers for the
    /// dependencies that completed before the crash.
    pub fn recover(
        &mut self,
        ops: Vec<Recovered<H>>,
        recorded: &dyn Recorded,
        now: Instant,
        finish: &mut Vec<Finish<H>>,
    ) -> Result<()> {
        let order: Vec<(OpId, bool)> = ops.iter().map(|r| (r.record.op_id, r.started.is_some())).collect();
        let ids: FxHashSet<OpId> = order.iter().map(|(id, _)| *id).collect();
        for Recovered {
            record,
            exec,
            lsn,
            started,
        } in ops
        {
            self.scheduler.readmit(record.agent);
            self.in_flight.reacquire(&record.tenant, record.agent, 1);
            let id = record.op_id;
            self.register(Arc::new(record), exec, Some(lsn), &ids, now, recorded)?;
            if let (Some((mark, reservation)), Some(live)) = (started, self.live.get_mut(&id)) {
                live.started = Some(mark);
                live.reservation = reservation;
            }
        }
        for (id, in_doubt) in order {
            if in_doubt {
                finish.push(Finish::in_doubt(id));
            } else {
                self.activate(id, None, now, finish);
            }
        }
        Ok(())
    }
}
