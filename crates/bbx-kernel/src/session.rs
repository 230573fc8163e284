//! The kernel as one authenticated caller sees it: the API traits of
//! [`bbx_core::api`], each call confined to the caller's tenant.

use super::*;

/// The kernel as seen by one authenticated caller.
#[derive(Clone)]
pub struct Session {
    pub(crate) kernel: Arc<Kernel>,
    pub(crate) caller: Caller,
}

impl Session {
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// See [`Kernel::submit_to`].
    pub async fn submit_to(&self, batch: SubmitBatch, queue: &CompletionQueue) -> Result<Submitted> {
        self.kernel.submit_to(&self.caller, batch, queue).await
    }
}

impl AgentsApi for Session {
    async fn create_agent(&self, req: CreateAgent) -> Result<Agent> {
        self.kernel.create_agent(&self.caller, req).await
    }
    async fn list_agents(&self, req: ListAgents) -> Result<AgentPage> {
        self.kernel.list_agents(&self.caller, req)
    }
    async fn get_agent(&self, id: AgentId) -> Result<Agent> {
        self.kernel.get_agent(&self.caller, &id)
    }
    async fn delete_agent(&self, id: AgentId) -> Result<()> {
        self.kernel.delete_agent(&self.caller, &id).await
    }
    async fn state_get(&self, agent: AgentId, key: String) -> Result<StateEntry> {
        self.kernel.state_get(&self.caller, &agent, &key)
    }
    async fn state_set(&self, agent: AgentId, key: String, req: SetState) -> Result<StateEntry> {
        self.kernel.state_set(&self.caller, &agent, key, req).await
    }
    async fn state_delete(&self, agent: AgentId, key: String, if_version: Option<u64>) -> Result<()> {
        self.kernel.state_delete(&self.caller, &agent, key, if_version).await
    }
    async fn state_list(&self, agent: AgentId, req: ListState) -> Result<StatePage> {
        self.kernel.state_list(&self.caller, &agent, req)
    }
    async fn status(&self) -> Result<Status> {
        self.kernel.status(&self.caller)
    }
}

impl EndpointsApi for Session {
    async fn endpoints(&self) -> Result<Vec<bbx_core::model::EndpointInfo>> {
        Ok(self.kernel.endpoints())
    }
    async fn call_endpoint(&self, name: &str, input: serde_json::Value) -> Result<serde_json::Value> {
        self.kernel.call_endpoint(&self.caller, name, input).await
    }
}

impl RingApi for Session {
    async fn submit_ops(&self, batch: SubmitBatch) -> Result<Submitted> {
        self.kernel.submit(&self.caller, batch).await
    }
    async fn get_op(&self, id: OpId) -> Result<OpInfo> {
        self.kernel.op(&self.caller, &id)
    }
    async fn wait_op(&self, id: OpId, timeout: Duration) -> Result<OpInfo> {
        self.kernel.wait_op(&self.caller, &id, timeout).await
    }
    async fn cancel_op(&self, id: OpId) -> Result<OpInfo> {
        self.kernel.cancel_op(&self.caller, &id).await
    }
    async fn ring_stats(&self) -> Result<RingStats> {
        Ok(self.kernel.ring_stats(&self.caller))
    }
    async fn resolve_op(&self, id: OpId, resolution: Resolution) -> Result<OpInfo> {
        self.kernel.resolve_op(&self.caller, &id, resolution).await
    }
    async fn wal_status(&self) -> Result<WalStatus> {
        self.kernel.wal_status(&self.caller).await
    }
    async fn breakers(&self) -> Result<Vec<BreakerInfo>> {
        Ok(self.kernel.breakers(&self.caller))
    }
    async fn reset_breakers(&self, req: ResetBreakers) -> Result<Vec<BreakerInfo>> {
        self.kernel
            .reset_breakers(&self.caller, req.tenant.as_deref(), req.target.as_deref())
    }
}

impl QuotaApi for Session {
    async fn quota(&self, node: Node) -> Result<QuotaInfo> {
        self.kernel.quota(&self.caller, &node)
    }
    async fn set_quota(&self, node: Node, update: QuotaLimits) -> Result<QuotaInfo> {
        self.kernel.set_quota(&self.caller, &node, update).await
    }
    async fn list_quotas(&self) -> Result<Vec<QuotaInfo>> {
        self.kernel.list_quotas(&self.caller)
    }
    async fn cgroup_status(&self) -> Result<CgroupStatus> {
        self.kernel.cgroup_status(&self.caller)
    }
    async fn gpu_status(&self) -> Result<GpuStatus> {
        self.kernel.gpu_status(&self.caller).await
    }
}
