//! Ops through the AgentRing: submission (quota checks first), waiting, cancel,
//! resolution, the ring's figures, and the expiry of old completions.

use super::*;

impl Kernel {
    /// See [`Ring::expire_completions`].
    pub async fn expire_completions(&self, now: chrono::DateTime<Utc>) -> Result<usize> {
        self.ring.expire_completions(now).await
    }

    /// Submits a batch of ops; answers once every op with effects is journaled.
    pub async fn submit(&self, caller: &Caller, batch: SubmitBatch) -> Result<Submitted> {
        self.submit_and_start(caller, batch, None).await
    }

    /// Submits a batch as [`Kernel::submit`] does, and hands each op's completion
    /// to `queue` (a deduplicated op's too, at once if it is done).
    pub async fn submit_to(&self, caller: &Caller, batch: SubmitBatch, queue: &CompletionQueue) -> Result<Submitted> {
        self.submit_and_start(caller, batch, Some(queue.sink())).await
    }

    pub(crate) async fn submit_and_start(
        &self,
        caller: &Caller,
        batch: SubmitBatch,
        reaper: Option<&ring::Sink>,
    ) -> Result<Submitted> {
        let submitted = self.submit_with(caller, batch, reaper).await?;
        // The submitting task starts the next batch itself: inline ops (`noop`,
        // `state.get`) complete here, without waking the dispatcher task and the
        // thread it sleeps on; what is left for it, it is woken for.
        self.ring.dispatch_once();
        Ok(submitted)
    }

    /// Checks and submits a batch, handing its completions to `reaper` if given;
    /// the caller then starts the next batch of ops with [`Ring::dispatch_once`].
    pub(crate) async fn submit_with(
        &self,
        caller: &Caller,
        batch: SubmitBatch,
        reaper: Option<&ring::Sink>,
    ) -> Result<Submitted> {
        caller.may(Action::Act)?;
        // Fx hashing: agent ids are ids the kernel made (UUIDv7), not the caller's
        // choice, and SipHash per op showed in the ring's profile.
        let mut known: FxHashMap<AgentId, Arc<str>> = FxHashMap::default();
        // Each op's tenant, beside the ops rather than paired with them: moving every
        // op (some 300 bytes) into a new list was a measurable share of `inproc`.
        let mut tenants = Vec::with_capacity(batch.ops.len());
        // The agents the custom authorization policies see, if any are loaded.
        let mut records: FxHashMap<AgentId, Agent> = FxHashMap::default();
        for (index, op) in batch.ops.iter().enumerate() {
            let tenant = match known.get(&op.agent) {
                Some(tenant) => tenant.clone(),
                None => {
                    let tenant = self
                        .agent_tenant(caller, &op.agent)
                        .map_err(|e| bbx_ring::batch::at_op(index, e))?;
                    known.insert(op.agent, tenant.clone());
                    tenant
                }
            };
            tenants.push(tenant);
            caller
                .check_kind(&op.kind)
                .map_err(|e| bbx_ring::batch::at_op(index, e))?;
            let mut access = Access::new("op.submit", Some(Action::Act), None).op_kind(&op.kind);
            // A state op names a key, which state policies look at.
            if let Some(key) = op
                .args
                .get("key")
                .and_then(|k| k.as_str())
                .filter(|_| op.kind.starts_with("state."))
            {
                access = access.key(key);
            }
            if !self.policies.is_empty() {
                // Each agent's record is read once per batch, not once per op.
                let record = match records.entry(op.agent) {
                    std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                    std::collections::hash_map::Entry::Vacant(new) => new.insert(
                        self.load_agent(caller, &op.agent)
                            .map_err(|e| bbx_ring::batch::at_op(index, e))?,
                    ),
                };
                self.authorize(caller, &access.on(record))
                    .map_err(|e| bbx_ring::batch::at_op(index, e))?;
            }
        }
        let mut batch = batch;
        let references = self.resolve_references(caller, &mut batch.ops)?;
        let start_after = self.check_rates(&batch.ops, &tenants).await?;
        // Made here only for components that check ops, which record what they
        // decided of each by its id.
        let op_ids: Vec<OpId> = if self.components.checks_ops() {
            let now = Utc::now();
            batch.ops.iter().map(|_| OpId::generate_at(now)).collect()
        } else {
            Vec::new()
        };
        let Checked { holds, labels } = self.check_ops(caller, &batch.ops, (&tenants, &references), &op_ids)?;
        let placement = ring::Placement {
            tenants,
            op_ids,
            holds,
            labels,
            start_after,
        };
        self.ring
            .submit(
                caller,
                batch.ops,
                placement,
                batch.wait_ms.map(Duration::from_millis),
                reaper,
            )
            .await
    }

    /// Resolves the `$from` references ([`bbx_component::refs`]) in each op's
    /// args in place, reading each source op with the submitter's rights;
    /// returns, per op, the references it carried.
    fn resolve_references(
        &self,
        caller: &Caller,
        ops: &mut [bbx_core::op::SubmitOp],
    ) -> Result<Vec<Vec<bbx_component::Reference>>> {
        ops.iter_mut()
            .enumerate()
            .map(|(index, op)| {
                bbx_component::refs::resolve(op.agent, &mut op.args, |source| self.op(caller, source))
                    .map_err(|e| bbx_ring::batch::at_op(index, e))
            })
            .collect()
    }

    /// The components' checks of each op: the holds they put on ops and the
    /// labels they gave them, by index.
    fn check_ops(
        &self,
        caller: &Caller,
        ops: &[bbx_core::op::SubmitOp],
        (tenants, references): (&[Arc<str>], &[Vec<bbx_component::Reference>]),
        op_ids: &[OpId],
    ) -> Result<Checked> {
        let mut checked = Checked::default();
        if !self.components.checks_ops() {
            return Ok(checked);
        }
        for (index, ((op, tenant), &op_id)) in ops.iter().zip(tenants).zip(op_ids).enumerate() {
            let submission = bbx_component::Submission {
                op_id,
                caller,
                tenant,
                op,
                references: &references[index],
            };
            let checks = self
                .components
                .check(&submission)
                .map_err(|e| bbx_ring::batch::at_op(index, e))?;
            if let Some(held) = checks.hold {
                let within = chrono::Duration::from_std(held.within).unwrap_or(chrono::Duration::MAX);
                let until = Utc::now()
                    .checked_add_signed(within)
                    .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC);
                let hold = bbx_ring::Hold {
                    by: held.by.to_owned(),
                    reason: held.reason,
                    until,
                };
                checked.holds.push((index, hold));
            }
            if !checks.labels.is_empty() {
                checked.labels.push((index, checks.labels));
            }
        }
        Ok(checked)
    }

    /// Approves an op held for approval; it then runs.
    pub async fn approve_op(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        caller.may(Action::Operate)?;
        self.authorize_op(caller, "op.approve", Action::Operate, id)?;
        let held = self.ring.info(caller, id)?;
        self.components.check_approval(&held.agent)?;
        self.ring.approve(caller, id).await
    }

    /// Denies an op held for approval; it ends with `policy_denied`.
    pub async fn deny_op(&self, caller: &Caller, id: &OpId, reason: &str) -> Result<OpInfo> {
        caller.may(Action::Operate)?;
        self.authorize_op(caller, "op.deny", Action::Operate, id)?;
        self.ring.deny(caller, id, reason).await
    }

    pub fn op(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        self.authorize_op(caller, "op.get", Action::Read, id)?;
        self.ring.info(caller, id)
    }

    /// Waits up to `timeout` for an op to complete.
    pub async fn wait_op(&self, caller: &Caller, id: &OpId, timeout: Duration) -> Result<OpInfo> {
        self.authorize_op(caller, "op.wait", Action::Read, id)?;
        self.ring.wait(caller, id, timeout).await
    }

    pub async fn cancel_op(&self, caller: &Caller, id: &OpId) -> Result<OpInfo> {
        caller.may(Action::Operate)?;
        self.authorize_op(caller, "op.cancel", Action::Operate, id)?;
        self.ring.cancel(caller, id).await
    }

    /// Settles an op left in doubt by a crash.
    pub async fn resolve_op(&self, caller: &Caller, id: &OpId, resolution: Resolution) -> Result<OpInfo> {
        caller.may(Action::Operate)?;
        self.authorize_op(caller, "op.resolve", Action::Operate, id)?;
        self.ring.resolve(caller, id, resolution).await
    }

    /// Completions as they happen, for event streams; filter by [`Caller::sees`].
    pub fn completions(&self) -> tokio::sync::broadcast::Receiver<Arc<Completion>> {
        self.ring.subscribe()
    }

    /// What components tell the event stream as it happens (run steps, flow
    /// decisions); filter by [`Caller::sees`].
    pub fn notices(&self) -> tokio::sync::broadcast::Receiver<Arc<bbx_component::Notice>> {
        self.context.notices.subscribe()
    }

    /// The ring's figures; its breakers are the caller's tenant's (all, for an
    /// administrator).
    pub fn ring_stats(&self, caller: &Caller) -> RingStats {
        RingStats {
            shm_sessions: self.shm_sessions.count() as u64,
            ..self.ring.stats(caller)
        }
    }

    pub async fn wal_status(&self, caller: &Caller) -> Result<WalStatus> {
        caller.require_admin("read the journal's status")?;
        let status = self.ring.wal_status().await?;
        Ok(WalStatus {
            committer_nice: self.store.committer_nice(),
            ..status
        })
    }

    pub fn breakers(&self, caller: &Caller) -> Vec<BreakerInfo> {
        self.ring.breakers(caller)
    }

    pub fn reset_breakers(
        &self,
        caller: &Caller,
        tenant: Option<&str>,
        target: Option<&str>,
    ) -> Result<Vec<BreakerInfo>> {
        caller.require_admin("reset circuit breakers")?;
        self.ring.reset_breakers(caller, tenant, target)
    }
}

/// Nudges the store once a second, so that it makes fjall durable (and lets the
/// journal drop its redo records) even when no write comes to trigger it.
pub(crate) fn spawn_store_checkpoints(
    tasks: &TaskTracker,
    store: Arc<Store>,
    stopping: tokio_util::sync::CancellationToken,
) {
    tasks.spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stopping.cancelled() => return,
                _ = ticks.tick() => store.checkpoint(),
            }
        }
    });
}

/// The holds and labels the components' checks put on the ops of a batch.
#[derive(Default)]
struct Checked {
    holds: Vec<(usize, bbx_ring::Hold)>,
    labels: Vec<(usize, Vec<String>)>,
}
