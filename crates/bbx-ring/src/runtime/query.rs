//! What callers ask of ops and the ring: info, wait, cancel, resolve, stats and
//! breakers.

use super::*;

impl Ring {
    pub fn info(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        let recent = {
            let st = self.lock();
            if let Some(live) = st.live(id) {
                caller.check_owner(&live.record.tenant, "op", id)?;
                return Ok(OpInfo {
                    op_id: *id,
                    agent: live.record.agent,
                    kind: live.record.kind.to_string(),
                    state: live.state,
                    attempts: live.attempts,
                    completion: None,
                });
            }
            st.recent(id).cloned()
        };
        // Read without the lock: an op that has left the ring was recorded before
        // it left, so the store has it if the ring did not.
        let done = match recent {
            Some(done) => done,
            None => Arc::new(self.stored_completion(id)?.ok_or_else(|| Error::not_found("op", id))?),
        };
        caller.check_owner(&done.tenant, "op", id)?;
        Ok(OpInfo::done((*done).clone()))
    }

    /// The op's completion, waiting up to `timeout` for it; the op as it stands if
    /// it is still not done by then.
    pub async fn wait(&self, caller: &Caller, id: &OpId, timeout: Duration) -> Result<OpInfo> {
        // Declared before the receiver, so dropped after it: a wait that leaves a
        // waiter behind (timed out, or its caller gone) takes it with it. One that
        // was answered or never waited has nothing to take, and takes no lock.
        let mut forget = ForgetWaiter {
            ring: self,
            id: *id,
            armed: false,
        };
        let receiver = {
            let mut st = self.lock();
            match st.live_mut(id) {
                Some(live) => {
                    caller.check_owner(&live.record.tenant, "op", id)?;
                    let (sender, receiver) = oneshot::channel();
                    live.waiters.push(Waiter::Once(sender));
                    forget.armed = true;
                    Some(receiver)
                }
                None => None,
            }
        };
        if let Some(receiver) = receiver
            && let Ok(Ok(done)) = tokio::time::timeout(timeout, receiver).await
        {
            // The ring took the waiter when it answered.
            forget.armed = false;
            return Ok(OpInfo::done((*done).clone()));
        }
        self.info(caller, id)
    }

    /// How many callers of [`Ring::wait`] an op holds; for tests.
    #[cfg(test)]
    pub(super) fn waiting_on(&self, id: &OpId) -> usize {
        self.lock().live(id).map_or(0, |live| live.waiters.len())
    }

    /// Cancels an op: at once if it has not started, by dropping its executor if it
    /// is running. A kernel-service op that is already being applied, and an op that
    /// is done, cannot be cancelled (409).
    pub async fn cancel(self: &Arc<Self>, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        let owns = |tenant: &str| caller.check_owner(tenant, "op", id);
        let cancelled = self.lock().cancel(id, &owns)?;
        match cancelled {
            None => {
                let info = self.info(caller, id)?;
                let status = info.completion.as_ref().map_or("done", |c| c.status.as_str());
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} has already completed ({status})"),
                ));
            }
            Some(engine::Cancelled::Running(token)) => {
                if let Some(token) = token {
                    token.cancel();
                }
            }
            Some(engine::Cancelled::Ends(finish)) => self.finish_all(vec![finish]),
            Some(engine::Cancelled::Later) => {}
        }
        // A running executor notices the cancel at its next await point.
        self.wait(caller, id, Duration::from_secs(5)).await
    }

    /// Settles an op in doubt: completes it `ok` or `error` as the operator says,
    /// or runs it again. Only one resolution of an op at a time; the store refuses
    /// one for an op that is no longer in doubt.
    pub async fn resolve(self: &Arc<Self>, caller: &Caller, id: &OpId, resolution: Resolution) -> Result<OpInfo> {
        let Some(current) = self.stored_completion(id)? else {
            // Known but with no stored completion (running, or an op that is not
            // journaled): not in doubt. Unknown, or another tenant's: missing.
            let state = serde_json::to_value(self.info(caller, id)?.state).unwrap_or_default();
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("op {id} is not in doubt (it is {})", state.as_str().unwrap_or("live")),
            ));
        };
        caller.check_owner(&current.tenant, "op", id)?;
        if current.status != CompletionStatus::InDoubt {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("op {id} is not in doubt (it is {})", current.status.as_str()),
            ));
        }
        {
            // Its in-doubt completion is stored but not yet settled: the op is
            // still live, and a retry must not register a second one.
            if !self.lock().begin_resolving(*id) {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {id} is already being resolved or completed; try again"),
                ));
            }
        }
        // On a task of its own, so that a caller who goes away mid-way (a closed
        // HTTP connection drops its handler) cannot leave it half done.
        let ring = self.clone();
        let op = *id;
        let resolution = self.tasks.spawn(async move {
            let resolved = match resolution {
                Resolution::Retry => ring.retry_in_doubt(&op).await,
                Resolution::Ok | Resolution::Failed => ring.settle_in_doubt(current, resolution).await,
            };
            ring.lock().end_resolving(&op);
            resolved
        });
        resolution
            .await
            .map_err(|e| Error::internal(format!("resolving op {id} failed: {e}")))??;
        self.info(caller, id)
    }

    pub(super) async fn settle_in_doubt(&self, mut completion: Completion, resolution: Resolution) -> Result<()> {
        completion.completed_at = Utc::now();
        if resolution == Resolution::Ok {
            completion.status = CompletionStatus::Ok;
            completion.result = Some(serde_json::json!({ "resolved": "ok" }));
            completion.error = None;
        } else {
            completion.status = CompletionStatus::Error;
            completion.error = Some(Error::new(ErrorCode::ToolFailed, "resolved as failed by an operator"));
        }
        self.store
            .write(Write::Resolve {
                op_id: completion.op_id,
                completion: Some(Box::new(completion.clone())),
            })
            .await?;
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Arc::new(completion));
        }
        Ok(())
    }

    /// Journals the op again, one incarnation up, then removes its `in_doubt`
    /// completion: a crash in between leaves it in doubt, never lost or doubled.
    pub(super) async fn retry_in_doubt(self: &Arc<Self>, id: &OpId) -> Result<()> {
        let entry = self
            .store
            .view()
            .get(self.store.keyspace(store::DOUBT), id.as_bytes())
            .map_err(|e| storage_error("read ops in doubt", e))?
            .ok_or_else(|| Error::internal(format!("op {id} is in doubt but its record is missing")))?;
        let Entry::Accepted(mut record) = Entry::decode(&entry)? else {
            return Err(Error::internal(format!("the record of op {id} is not an op")));
        };
        record.incarnation += 1;
        // Its dependencies were met when it first ran.
        record.depends_on.clear();
        let exec = Exec::parse(&self.components, &record.kind, &record.args)?;
        self.lock().admit_one(&record)?;
        let give_back = |ring: &Self| ring.lock().unadmit_one(&record);
        let lsn = match self.journal.append(vec![record.encode_accepted()]).await {
            Ok(lsns) => lsns[0],
            Err(e) => {
                give_back(self);
                return Err(e);
            }
        };
        let removed = self
            .store
            .write(Write::Resolve {
                op_id: *id,
                completion: None,
            })
            .await;
        if let Err(e) = removed {
            self.journal.release(vec![lsn]);
            give_back(self);
            return Err(e);
        }
        let mut finish = Vec::new();
        {
            let mut st = self.lock();
            let now = Instant::now();
            // It has no dependencies and its key is its own: registering reads nothing.
            let nothing = &engine::NothingRecorded;
            st.register(Arc::new(record), exec, Some(lsn), &FxHashSet::default(), now, nothing)?;
            st.activate(*id, Some(lsn), now, &mut finish);
            st.gauge_queues();
        }
        self.work.notify_one();
        self.finish_all(finish);
        Ok(())
    }

    pub fn stats(&self, caller: &Caller) -> RingStats {
        let running = self.running.used.load(Ordering::Acquire);
        let completing = self.completing.used.load(Ordering::Acquire);
        // Listed before the ring's lock is taken: an administrator's list can be long.
        let breakers = self.breakers(caller);
        let st = self.lock();
        let figures = st.figures(Instant::now());
        let latency = Priority::ALL
            .iter()
            .map(|p| (*p, percentiles(st.latency(*p))))
            .collect();
        drop(st);
        let span = (self.started.elapsed().as_secs_f64()).clamp(1.0, 10.0);
        RingStats {
            queued: figures.queued.into_iter().collect(),
            pending: figures.pending,
            submission_capacity: figures.capacity,
            // From the slots, not by walking every live op under the lock: an op
            // holds a running slot while an attempt runs, and a completion slot
            // from its start until its completion is durable. A dispatch in
            // progress holds a few more for a moment.
            running: running as u64,
            max_running: self.config.max_running as u64,
            completing: completing.saturating_sub(running) as u64,
            completion_capacity: self.config.completion_capacity as u64,
            submitted_total: self.metrics.submitted.get(),
            deduplicated_total: self.metrics.deduplicated.get(),
            refused_total: self.metrics.refused.get(),
            retries_total: self.metrics.retries.get(),
            completed: self.metrics.completed_counts(),
            completed_per_sec: figures.completed_last_10s as f64 / span,
            latency,
            breakers,
            // The kernel serves the sessions; it fills this in.
            shm_sessions: 0,
        }
    }

    /// The breakers the caller may see: its tenant's, or every tenant's for an
    /// administrator.
    pub fn breakers(&self, caller: &Caller) -> Vec<BreakerInfo> {
        self.breakers
            .stats(caller.tenant.as_deref())
            .into_iter()
            .map(|listed| BreakerInfo {
                tenant: listed.tenant.to_string(),
                target: listed.target,
                state: match listed.stats.state {
                    BreakerState::Closed => "closed",
                    BreakerState::Open => "open",
                    BreakerState::HalfOpen => "half_open",
                }
                .into(),
                consecutive_failures: listed.stats.consecutive_failures,
                opened_total: listed.stats.opened_total,
                rejected_total: listed.stats.rejected_total,
            })
            .collect()
    }

    /// Closes breakers (an administrator's call): `target`'s, or all, in `tenant`
    /// or in every tenant.
    pub fn reset_breakers(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<BreakerInfo>> {
        if self.breakers.reset(tenant, target) == 0 && (tenant.is_some() || target.is_some()) {
            return Err(Error::not_found(
                "circuit breaker",
                target.or(tenant).unwrap_or_default(),
            ));
        }
        Ok(self.breakers(caller))
    }

    /// Forgets idle breakers now and then, so that the map follows the targets in
    /// use rather than every target ever called.
    pub(super) async fn evict_idle_breakers(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(Breakers::IDLE / 10);
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                _ = ticks.tick() => {
                    self.breakers.evict_idle(Instant::now());
                }
            }
        }
    }
}
