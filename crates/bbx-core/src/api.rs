//! The kernel's agent API as a trait.
//!
//! The kernel implements it in process; `bbx-client` implements it over HTTP. Front
//! ends that only need the API (the MCP server, both over streamable HTTP inside the
//! kernel and over stdio in `bbx mcp`) are written once against this trait.

use crate::error::Result;
use crate::ids::{AgentId, OpId};
use crate::model::{Agent, AgentPage, CreateAgent, ListAgents, ListState, SetState, StateEntry, StatePage, Status};
use crate::op::{OpInfo, Resolution, RingStats, SubmitBatch, Submitted};
use crate::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use std::future::Future;
use std::time::Duration;

pub trait AgentApi: Send + Sync + 'static {
    fn create_agent(&self, req: CreateAgent) -> impl Future<Output = Result<Agent>> + Send;
    fn list_agents(&self, req: ListAgents) -> impl Future<Output = Result<AgentPage>> + Send;
    fn get_agent(&self, id: AgentId) -> impl Future<Output = Result<Agent>> + Send;
    fn delete_agent(&self, id: AgentId) -> impl Future<Output = Result<()>> + Send;
    fn state_get(&self, agent: AgentId, key: String) -> impl Future<Output = Result<StateEntry>> + Send;
    fn state_set(&self, agent: AgentId, key: String, req: SetState) -> impl Future<Output = Result<StateEntry>> + Send;
    fn state_delete(
        &self,
        agent: AgentId,
        key: String,
        if_version: Option<u64>,
    ) -> impl Future<Output = Result<()>> + Send;
    fn state_list(&self, agent: AgentId, req: ListState) -> impl Future<Output = Result<StatePage>> + Send;
    fn status(&self) -> impl Future<Output = Result<Status>> + Send;
    /// Submits ops to the AgentRing; answers once they are durable.
    fn submit_ops(&self, batch: SubmitBatch) -> impl Future<Output = Result<Submitted>> + Send;
    fn get_op(&self, id: OpId) -> impl Future<Output = Result<OpInfo>> + Send;
    /// Waits up to `timeout` for the op's completion.
    fn wait_op(&self, id: OpId, timeout: Duration) -> impl Future<Output = Result<OpInfo>> + Send;
    fn cancel_op(&self, id: OpId) -> impl Future<Output = Result<OpInfo>> + Send;
    fn ring_stats(&self) -> impl Future<Output = Result<RingStats>> + Send;
    /// Settles an op left `in_doubt` by a crash.
    fn resolve_op(&self, id: OpId, resolution: Resolution) -> impl Future<Output = Result<OpInfo>> + Send;
    fn quota(&self, node: Node) -> impl Future<Output = Result<QuotaInfo>> + Send;
    /// Sets the limits `update` gives; the node's others stay.
    fn set_quota(&self, node: Node, update: QuotaLimits) -> impl Future<Output = Result<QuotaInfo>> + Send;
    fn list_quotas(&self) -> impl Future<Output = Result<Vec<QuotaInfo>>> + Send;
    fn cgroup_status(&self) -> impl Future<Output = Result<CgroupStatus>> + Send;
    fn gpu_status(&self) -> impl Future<Output = Result<GpuStatus>> + Send;
}
