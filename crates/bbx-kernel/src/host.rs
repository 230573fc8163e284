//! The kernel as components act through it: the [`bbx_component::Submitter`]
//! (ops through the whole pipeline) and the [`bbx_component::AgentHost`]
//! (whole agents: their records, exports and imports, forks).

use super::*;

/// The kernel as components act through it (submitting ops, saving and
/// restoring whole agents): weak, since the kernel holds the components.
pub(crate) struct KernelHandle(pub(crate) std::sync::Weak<Kernel>);

impl KernelHandle {
    fn kernel(&self) -> Result<Arc<Kernel>> {
        self.0
            .upgrade()
            .ok_or_else(|| Error::unavailable("the kernel is shutting down"))
    }
}

impl bbx_component::Submitter for KernelHandle {
    fn submit<'a>(&'a self, caller: &'a Caller, batch: SubmitBatch) -> bbx_component::Pending<'a, Submitted> {
        Box::pin(async move { self.kernel()?.submit(caller, batch).await })
    }

    fn wait<'a>(&'a self, caller: &'a Caller, op: OpId, timeout: Duration) -> bbx_component::Pending<'a, OpInfo> {
        Box::pin(async move { self.kernel()?.wait_op(caller, &op, timeout).await })
    }

    fn cancel<'a>(&'a self, caller: &'a Caller, op: OpId) -> bbx_component::Pending<'a, OpInfo> {
        Box::pin(async move { self.kernel()?.cancel_op(caller, &op).await })
    }

    fn may_read(&self, caller: &Caller, agent: &AgentId, operation: &str) -> Result<()> {
        let kernel = self.kernel()?;
        kernel.agent_tenant(caller, agent)?;
        kernel.authorize_on_agent(
            caller,
            bbx_auth::Access::new(operation, Some(bbx_auth::Action::Read), None),
            agent,
        )
    }
}

impl bbx_component::AgentHost for KernelHandle {
    fn agent(&self, agent: &AgentId) -> Result<bbx_core::model::Agent> {
        let kernel = self.kernel()?;
        let bytes = kernel
            .store
            .view()
            .get(kernel.store.keyspace(bbx_agents::AGENTS), agent.as_bytes())
            .map_err(|e| storage_error("read", e))?;
        bbx_agents::decode_agent(&bytes.ok_or_else(|| Error::not_found("agent", agent))?)
    }

    fn export(&self, view: &fjall::Snapshot, agent: &AgentId) -> Result<bbx_component::AgentData> {
        let kernel = self.kernel()?;
        kernel.components.export(&kernel.store, view, agent)
    }

    fn exported_write(
        &self,
        agent: &AgentId,
        write: bbx_component::StoreWrite<'_>,
    ) -> Option<(&'static str, bbx_component::ExportedWrite)> {
        self.kernel().ok()?.components.exported_write(agent, write)
    }

    fn parts(&self) -> Vec<&'static str> {
        self.kernel()
            .map(|kernel| kernel.components.names())
            .unwrap_or_default()
    }

    fn import(&self, data: bbx_component::AgentData) -> Result<Box<dyn bbx_store::Staged>> {
        Ok(Box::new(self.kernel()?.components.import(data)?))
    }

    fn imported(&self, data: &bbx_component::AgentData) {
        if let Ok(kernel) = self.kernel() {
            kernel.components.imported(data);
        }
    }

    fn create_agent<'a>(
        &'a self,
        caller: &'a Caller,
        request: CreateAgent,
    ) -> bbx_component::Pending<'a, bbx_core::model::Agent> {
        Box::pin(async move { self.kernel()?.create_agent(caller, request).await })
    }

    fn delete_agent<'a>(&'a self, caller: &'a Caller, agent: AgentId) -> bbx_component::Pending<'a, ()> {
        Box::pin(async move { self.kernel()?.delete_agent(caller, &agent).await })
    }

    fn quota_limits(&self, agent: &AgentId) -> QuotaLimits {
        self.kernel()
            .map(|kernel| kernel.quotas.limits(&bbx_quota::Node::Agent(*agent)))
            .unwrap_or_default()
    }

    fn set_quota_limits<'a>(
        &'a self,
        caller: &'a Caller,
        agent: AgentId,
        limits: QuotaLimits,
    ) -> bbx_component::Pending<'a, ()> {
        Box::pin(async move {
            self.kernel()?
                .set_quota(caller, &bbx_quota::Node::Agent(agent), limits)
                .await
                .map(drop)
        })
    }

    fn workspace(&self, agent: &AgentId) -> Result<PathBuf> {
        self.kernel()?.tools.workspace(agent)
    }

    fn capture_workspace(&self, agent: &AgentId) -> Result<bbx_component::workspace_gate::WorkspaceCapture> {
        Ok(self.kernel()?.tools.workspace_gate().announce(*agent))
    }
}
