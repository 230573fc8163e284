//! Completion: recording completions with their effects, and delivering what
//! settling ops produced (answers, events, released journal records).

use super::*;

impl Ring {
    /// Completes ops under one lock, then delivers what that produced.
    pub(super) fn finish_all(self: &Arc<Self>, finish: Vec<Finish>) {
        if finish.is_empty() {
            return;
        }
        let mut out = self.outbox();
        self.lock().finish(finish, &mut out);
        self.deliver(out);
    }

    /// Does what settling left to do outside the lock: answers waiters, publishes
    /// events, releases journal records, records completions in the store and wakes
    /// the dispatcher and submitters waiting for room.
    pub(super) fn deliver(self: &Arc<Self>, out: Outbox) {
        let engine::Outbox {
            answers,
            events,
            released,
            to_record,
            queued,
            freed,
            forgotten,
            ..
        } = out;
        drop(forgotten);
        // Components first: what they keep of a completion (a memory in the
        // index) is there for whoever hears of it.
        for completion in &events {
            self.components.completed(completion);
        }
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
        self.wake_submitters(freed);
    }

    /// Records completions (with their effects) in one store request, then settles
    /// them; what they hold is held until then.
    pub(super) fn record(self: &Arc<Self>, pending: Vec<engine::ToRecord<KernelHost>>) {
        if pending.is_empty() {
            return;
        }
        let ring = self.clone();
        self.tasks.spawn(async move {
            let mut writes = Vec::with_capacity(pending.len());
            let mut held = Vec::with_capacity(pending.len());
            for p in pending {
                let hold = p.held.unwrap_or(Held {
                    _completing: None,
                    admission: None,
                    effect: None,
                });
                writes.push(Box::new(Write::Complete {
                    completion: p.completion,
                    effect: hold.effect.clone(),
                    digest: p.digest,
                    doubt: p.doubt.map(|record| record.encode_accepted()),
                    charge: p.charge.as_ref().map(|c| (charge_keys(c), c.capped().micros)),
                }) as Box<dyn bbx_store::Staged>);
                held.push((hold, p.charge));
            }
            let written = ring.store.write_all(writes).await;
            let mut out = ring.outbox();
            let mut recorded = Vec::with_capacity(written.len());
            for (outcome, (hold, charge)) in written.into_iter().zip(&held) {
                if let Some((breaker, admission)) = &hold.admission {
                    breaker.record(*admission, outcome.is_ok(), out.at.now);
                }
                // The charge is durable with the completion: the reservation
                // becomes spend. Had the write failed, it stays held.
                if let (Ok(_), Some(charge)) = (&outcome, charge) {
                    let capped = charge.capped();
                    ring.quotas.settle(
                        &charge.tenant,
                        charge.agent,
                        &charge.reservation,
                        capped.micros,
                        capped.tokens,
                    );
                }
                match outcome.and_then(Applied::into_output::<Box<Completion>>) {
                    Ok(completion) => recorded.push(Arc::new(*completion)),
                    // The op stays journaled without a completion, so the next
                    // start runs it.
                    Err(e) => tracing::error!(error = %e, "an op's completion could not be recorded"),
                }
            }
            ring.lock().recorded(recorded, &mut out);
            drop(held);
            ring.deliver(out);
        });
    }

    /// A completion, from memory or the store.
    pub(super) fn completion(&self, st: &Engine<KernelHost>, id: &OpId) -> Result<Option<Arc<Completion>>> {
        if let Some(done) = st.recent(id) {
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
