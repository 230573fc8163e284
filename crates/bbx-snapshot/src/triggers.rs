//! Snapshots nobody asked for by hand: every N ops with effects of an agent
//! (`snapshots.every_ops`), and on a schedule for each agent that changed
//! since (`snapshots.every_secs`). Each is a `snapshot.create` op submitted
//! through the whole pipeline as the agent itself (confined to it, in its
//! tenant), so quotas, policies and the audit see it like any other.
//!
//! And before a risky op, where a flow policy says so (its decision's
//! `"snapshot": true` labels the op [`bbx_component::SNAPSHOT_BEFORE`]): the snapshot's moment
//! is fixed while the op is checked, before it is journaled, and the op's file
//! and program ops wait until the workspace is read; it is built and listed
//! (trigger `policy`) in the background.

use crate::{Snapshots, ops};
use bbx_auth::Caller;
use bbx_core::AgentId;
use bbx_core::op::{Completion, Effects, SubmitBatch, SubmitOp};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Agents with ops since their last automatic snapshot.
#[derive(Default)]
pub struct Changes {
    /// Op kinds with effects (what counts as a change).
    effects: HashSet<String>,
    since: HashMap<AgentId, (Arc<str>, u64)>,
    /// Agents with an automatic snapshot asked for and not yet completed: a
    /// busy agent gets one at a time, not a queue of them.
    taking: HashSet<AgentId>,
    /// Agents with a snapshot before an op fixed and not yet listed: it is
    /// before every op checked since, so they need no other.
    before_ops: HashSet<AgentId>,
}

impl Changes {
    pub fn new(kinds: &[(bbx_component::OpKind, Option<serde_json::Value>)]) -> Self {
        Self {
            effects: kinds
                .iter()
                .filter(|(kind, _)| kind.effects != Effects::None && !kind.name.starts_with("snapshot."))
                .map(|(kind, _)| kind.name.to_owned())
                .collect(),
            since: HashMap::new(),
            taking: HashSet::new(),
            before_ops: HashSet::new(),
        }
    }

    /// Counts an op that changed the agent; true when it makes `every` since
    /// the last count reset (which this resets).
    fn count(&mut self, completion: &Completion, every: u64) -> bool {
        if !self.effects.contains(completion.kind.as_ref()) {
            return false;
        }
        let entry = self
            .since
            .entry(completion.agent)
            .or_insert_with(|| (completion.tenant.clone(), 0));
        entry.1 += 1;
        if every > 0 && entry.1 >= every {
            entry.1 = 0;
            return true;
        }
        false
    }

    pub fn forget(&mut self, agent: &AgentId) {
        self.since.remove(agent);
        self.taking.remove(agent);
    }

    /// A snapshot of the agent completed (or failed): another may be asked for.
    pub fn taken(&mut self, agent: &AgentId) {
        self.taking.remove(agent);
    }

    /// The agents that changed, forgotten.
    fn take(&mut self) -> Vec<(AgentId, Arc<str>)> {
        self.since
            .drain()
            .filter(|(_, (_, ops))| *ops > 0)
            .map(|(agent, (tenant, _))| (agent, tenant))
            .collect()
    }
}

impl Snapshots {
    /// Snapshots the agent before the op being checked runs (see the module's
    /// docs); an agent with one pending needs no other.
    pub(crate) fn snapshot_before(&self, agent: AgentId) -> bbx_core::Result<()> {
        let ctx = self.context()?;
        let moment = {
            // Fixed under the lock: an op checked meanwhile finds it fixed.
            let mut changes = self.changes.lock();
            if changes.before_ops.contains(&agent) {
                return Ok(());
            }
            let moment = self.moment(&agent)?;
            changes.before_ops.insert(agent);
            moment
        };
        let me = self.clone();
        ctx.tasks.spawn(async move {
            match me.take_before_op(agent, moment).await {
                Ok(()) => me.retain_later(agent),
                Err(e) => tracing::warn!(error = %e, %agent, "the snapshot a policy asked for before an op failed"),
            }
        });
        Ok(())
    }

    async fn take_before_op(&self, agent: AgentId, moment: crate::service::Moment) -> bbx_core::Result<()> {
        let built = async {
            let ctx = self.started().await?.clone();
            let (summary, hold) = self
                .build_at(agent, uuid::Uuid::now_v7(), "policy", moment, None)
                .await?;
            Ok::<_, bbx_core::Error>((ctx, hold, summary))
        }
        .await;
        // Built (or failed): an op checked from now on is after its moment.
        self.changes.lock().before_ops.remove(&agent);
        let (ctx, _hold, summary) = built?;
        let listed = (summary.agent, summary.id);
        ctx.store.write(crate::catalog::List(summary)).await?;
        // An agent deleted meanwhile had its snapshots unlisted: this one goes too.
        if ctx
            .agents
            .agent(&agent)
            .is_err_and(|e| e.code == bbx_core::ErrorCode::NotFound)
        {
            ctx.store.write(crate::catalog::Unlist(vec![listed])).await?;
            self.collect_later();
        }
        Ok(())
    }

    /// Counts the completion; snapshots its agent when `every_ops` is reached.
    pub(crate) fn count_change(&self, completion: &Completion) {
        if self.config.every_ops == 0 && self.config.every_secs == 0 {
            return;
        }
        let due = self.changes.lock().count(completion, self.config.every_ops);
        if due {
            self.take_later(completion.agent, completion.tenant.clone(), "every_ops");
        }
    }

    /// Every `every_secs`, snapshots each agent that changed since.
    pub(crate) fn schedule(&self) {
        let Ok(ctx) = self.context() else { return };
        if self.config.every_secs == 0 {
            return;
        }
        let me = self.clone();
        let stopping = ctx.stopping.clone();
        let every = std::time::Duration::from_secs(self.config.every_secs);
        ctx.tasks.spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = stopping.cancelled() => return,
                    _ = ticks.tick() => {}
                }
                let changed = me.changes.lock().take();
                for (agent, tenant) in changed {
                    me.take_later(agent, tenant, "schedule");
                }
            }
        });
    }

    fn take_later(&self, agent: AgentId, tenant: Arc<str>, trigger: &'static str) {
        let Ok(ctx) = self.context() else { return };
        if !self.changes.lock().taking.insert(agent) {
            return;
        }
        let submitter = ctx.submitter.clone();
        let me = self.clone();
        ctx.tasks.spawn(async move {
            let caller = Caller::of_agent(agent, tenant.to_string());
            let op = SubmitOp::new(agent, ops::CREATE, json!({ "trigger": trigger }));
            let batch = SubmitBatch {
                ops: vec![op],
                wait_ms: None,
            };
            if let Err(e) = submitter.submit(&caller, batch).await {
                me.changes.lock().taken(&agent);
                tracing::warn!(%agent, trigger, error = %e, "an automatic snapshot was not taken");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(agent: AgentId, kind: &'static str) -> Completion {
        serde_json::from_value(json!({
            "op_id": bbx_core::OpId::generate(),
            "agent": agent,
            "tenant": "t",
            "kind": kind,
            "status": "ok",
            "attempts": 1,
            "queue_us": 0,
            "exec_us": 0,
            "total_us": 0,
            "submitted_at": "2026-12-07T00:00:00Z",
            "completed_at": "2026-12-07T00:00:00Z",
        }))
        .unwrap()
    }

    #[test]
    fn every_nth_change_is_due_and_reads_and_snapshots_do_not_count() {
        let kinds = [
            (
                bbx_component::OpKind {
                    name: "state.set",
                    effects: Effects::Kernel,
                },
                None,
            ),
            (
                bbx_component::OpKind {
                    name: "state.get",
                    effects: Effects::None,
                },
                None,
            ),
            (
                bbx_component::OpKind {
                    name: "snapshot.create",
                    effects: Effects::Kernel,
                },
                None,
            ),
        ];
        let mut changes = Changes::new(&kinds);
        let agent = AgentId::generate();
        let due: Vec<bool> = (0..6)
            .map(|_| changes.count(&completion(agent, "state.set"), 3))
            .collect();
        assert_eq!(due, [false, false, true, false, false, true]);
        assert!(!changes.count(&completion(agent, "state.get"), 1));
        assert!(!changes.count(&completion(agent, "snapshot.create"), 1));
        assert!(changes.take().is_empty(), "counts were reset when due");
        changes.count(&completion(agent, "state.set"), 0);
        assert_eq!(changes.take().len(), 1);
        assert!(changes.take().is_empty());
    }

    #[test]
    fn an_agent_has_one_automatic_snapshot_pending_at_a_time() {
        let mut changes = Changes::new(&[]);
        let agent = AgentId::generate();
        assert!(changes.taking.insert(agent));
        assert!(
            !changes.taking.insert(agent),
            "a second is not asked for while one is pending"
        );
        changes.taken(&agent);
        assert!(changes.taking.insert(agent));
        changes.forget(&agent);
        assert!(changes.taking.is_empty());
    }
}
