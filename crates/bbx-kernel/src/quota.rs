//! AgentQuotas wired into the kernel: limits persisted in the store and loaded at
//! start, rate limits checked on every submission, and the host's confinement
//! reported.

use crate::Kernel;
use bbx_auth::Caller;
use bbx_core::op::SubmitOp;
use bbx_core::quota::Node;
use bbx_core::quota::{CgroupStatus, GpuStatus, QuotaAction, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, Result};
use bbx_quota::Demand;
use bbx_quota::stored::PutLimits;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whether an op counts against `tool_calls_per_minute`.
fn is_tool_call(kind: &str) -> bool {
    kind.starts_with("tool.") || kind.starts_with("llm.")
}

impl Kernel {
    /// Checks a batch against the rate limits of each agent's path, waiting where a
    /// node says `throttle` (up to its `max_delay_ms`). Where a node says `queue`,
    /// the batch is let in and the answer says how long its ops wait to start.
    /// `tenants` holds each op's tenant.
    pub(crate) async fn check_rates(&self, ops: &[SubmitOp], tenants: &[Arc<str>]) -> Result<Option<Duration>> {
        let mut start_after: Option<Duration> = None;
        let mut demands: HashMap<AgentId, (&str, Demand)> = HashMap::new();
        for (op, tenant) in ops.iter().zip(tenants) {
            let (_, demand) = demands.entry(op.agent).or_insert((&**tenant, Demand::default()));
            demand.ops += 1;
            demand.tool_calls += u32::from(is_tool_call(&op.kind));
        }
        for (agent, (tenant, demand)) in demands {
            let began = Instant::now();
            loop {
                match self.quotas.check_rates(tenant, agent, demand, Instant::now()) {
                    Ok(warnings) => {
                        for warning in warnings {
                            self.ring_metrics().quota_warning(warning.limit);
                            tracing::info!(node = %warning.node, limit = warning.limit, "quota past 80 %");
                        }
                        break;
                    }
                    Err(exceeded) => match exceeded.action {
                        QuotaAction::Notify => {
                            self.ring_metrics().quota_exceeded(exceeded.limit);
                            tracing::warn!(node = %exceeded.node, limit = exceeded.limit,
                                "quota exceeded; let through (action notify)");
                            break;
                        }
                        QuotaAction::Throttle
                            if exceeded
                                .retry_after
                                .is_some_and(|wait| began.elapsed() + wait <= exceeded.max_delay) =>
                        {
                            self.quotas.note_throttled(&exceeded);
                            tokio::time::sleep(exceeded.retry_after.unwrap_or(Duration::ZERO)).await;
                        }
                        QuotaAction::Queue if exceeded.retry_after.is_some_and(|wait| wait <= exceeded.max_delay) => {
                            self.quotas.note_throttled(&exceeded);
                            let wait = self.quotas.queue(tenant, agent, demand, Instant::now());
                            start_after = Some(start_after.unwrap_or_default().max(wait));
                            break;
                        }
                        QuotaAction::Throttle | QuotaAction::Queue | QuotaAction::Reject => {
                            self.ring_metrics().quota_exceeded(exceeded.limit);
                            return Err(exceeded.into());
                        }
                    },
                }
            }
        }
        Ok(start_after)
    }

    /// The node's limits, its tenant's and group's, and what it uses.
    pub fn quota(&self, caller: &Caller, node: &Node) -> Result<QuotaInfo> {
        let access = bbx_auth::Access::new("quota.get", Some(bbx_auth::Action::Read), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        let (parent, group) = match node {
            Node::Tenant(tenant) => {
                caller.check_tenant(tenant)?;
                (None, None)
            }
            Node::Group { tenant, .. } => {
                caller.check_tenant(tenant)?;
                (Some(self.quotas.limits(&Node::Tenant(tenant.clone()))), None)
            }
            Node::Agent(agent) => {
                let tenant = self.agent_tenant(caller, agent)?;
                let group = self.quotas.group_of(*agent).map(|name| {
                    self.quotas.limits(&Node::Group {
                        tenant: tenant.to_string(),
                        name,
                    })
                });
                (Some(self.quotas.limits(&Node::Tenant(tenant.to_string()))), group)
            }
        };
        Ok(QuotaInfo {
            node: node.to_string(),
            limits: self.quotas.limits(node),
            parent,
            group,
            usage: self.quotas.usage(node),
        })
    }

    /// Sets the limits that `update` gives, keeping the node's others. A tenant's
    /// limits are the administrator's to set; a tenant key may set its groups' and
    /// agents' (which can never exceed the tenant's anyway). Only an agent has a
    /// `group`; it changes only while the agent is idle.
    pub async fn set_quota(&self, caller: &Caller, node: &Node, update: QuotaLimits) -> Result<QuotaInfo> {
        caller.may(bbx_auth::Action::Operate)?;
        let access = bbx_auth::Access::new("quota.set", Some(bbx_auth::Action::Operate), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        update.validate()?;
        // One update at a time from check to store: two concurrent updates of
        // different limits would otherwise each write back the other's old value,
        // and an update racing its agent's deletion could outlive the agent.
        let _serial = self.quota_updates.lock().await;
        match node {
            Node::Tenant(_) => caller.require_admin("set a tenant's quota")?,
            Node::Group { tenant, .. } => caller.check_tenant(tenant)?,
            Node::Agent(agent) => {
                self.agent_tenant(caller, agent)?;
            }
        }
        if update.group.is_some() && !matches!(node, Node::Agent(_)) {
            return Err(Error::invalid_field("group", "only an agent joins a group"));
        }
        let previous = self.quotas.limits(node);
        let limits = previous.merged(&update);
        // In memory first: that is where an idle agent's change of group is checked.
        self.quotas.set(node.clone(), limits.clone())?;
        let stored = self
            .store
            .write(PutLimits {
                node: node.clone(),
                limits: Some(limits),
            })
            .await;
        if let Err(e) = stored {
            let _ = self.quotas.set(node.clone(), previous);
            return Err(e);
        }
        self.quota(caller, node)
    }

    /// Every node the caller may see that has limits or ops in flight.
    pub fn list_quotas(&self, caller: &Caller) -> Result<Vec<QuotaInfo>> {
        let access = bbx_auth::Access::new("quota.list", Some(bbx_auth::Action::Read), caller.tenant.as_deref());
        self.authorize(caller, &access)?;
        Ok(self
            .quotas
            .nodes()
            .iter()
            .filter_map(|node| self.quota(caller, node).ok())
            .collect())
    }

    pub fn cgroup_status(&self, caller: &Caller) -> Result<CgroupStatus> {
        caller.require_admin("read the host's cgroups")?;
        let driver = self.tools.cgroup_driver();
        Ok(CgroupStatus {
            driver: driver.kind().to_owned(),
            roots: driver.roots().iter().map(|p| p.display().to_string()).collect(),
            groups: driver.groups(),
            isolated: self.tools.isolates(),
            run_as_uid: self.tools.isolates().then_some(self.config.tools.run_as_uid),
        })
    }

    pub async fn gpu_status(&self, caller: &Caller) -> Result<GpuStatus> {
        caller.require_admin("read the host's GPUs")?;
        tokio::task::spawn_blocking(bbx_quota::gpu::status)
            .await
            .map_err(|e| Error::internal(format!("reading the GPUs failed: {e}")))
    }
}
