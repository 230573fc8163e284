//! The kernel's API as traits, one per component.
//!
//! The kernel implements them in process; `bbx-client` implements them over HTTP.
//! Front ends that only need the API (the MCP server, both over streamable HTTP
//! inside the kernel and over stdio in `bbx mcp`) are written once against them.

use crate::error::Result;
use crate::ids::{AgentId, OpId};
use crate::model::{
    Agent, AgentPage, CreateAgent, EndpointInfo, ListAgents, ListState, SetState, StateEntry, StatePage, Status,
};
use crate::op::{BreakerInfo, OpInfo, ResetBreakers, Resolution, RingStats, SubmitBatch, Submitted, WalStatus};
use crate::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use std::future::Future;
use std::time::Duration;

/// Agents and their versioned state (the kernel objects), and the kernel's status.
pub trait AgentsApi: Send + Sync + 'static {
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
}

/// The AgentRing: ops submitted, waited on, cancelled and settled; its figures.
pub trait RingApi: Send + Sync + 'static {
    /// Submits ops to the AgentRing; answers once they are durable.
    fn submit_ops(&self, batch: SubmitBatch) -> impl Future<Output = Result<Submitted>> + Send;
    fn get_op(&self, id: OpId) -> impl Future<Output = Result<OpInfo>> + Send;
    /// Waits up to `timeout` for the op's completion.
    fn wait_op(&self, id: OpId, timeout: Duration) -> impl Future<Output = Result<OpInfo>> + Send;
    fn cancel_op(&self, id: OpId) -> impl Future<Output = Result<OpInfo>> + Send;
    fn ring_stats(&self) -> impl Future<Output = Result<RingStats>> + Send;
    /// Settles an op left `in_doubt` by a crash.
    fn resolve_op(&self, id: OpId, resolution: Resolution) -> impl Future<Output = Result<OpInfo>> + Send;
    /// The journal's segments, positions and sync latency (administrators only).
    fn wal_status(&self) -> impl Future<Output = Result<WalStatus>> + Send;
    /// The circuit breakers the caller may see: its tenant's, or all for an administrator.
    fn breakers(&self) -> impl Future<Output = Result<Vec<BreakerInfo>>> + Send;
    /// Closes breakers (administrators only); returns them all.
    fn reset_breakers(&self, req: ResetBreakers) -> impl Future<Output = Result<Vec<BreakerInfo>>> + Send;
}

/// AgentQuotas: limits per tenant, group and agent, and how tools are confined.
pub trait QuotaApi: Send + Sync + 'static {
    fn quota(&self, node: Node) -> impl Future<Output = Result<QuotaInfo>> + Send;
    /// Sets the limits `update` gives; the node's others stay.
    fn set_quota(&self, node: Node, update: QuotaLimits) -> impl Future<Output = Result<QuotaInfo>> + Send;
    fn list_quotas(&self) -> impl Future<Output = Result<Vec<QuotaInfo>>> + Send;
    fn cgroup_status(&self) -> impl Future<Output = Result<CgroupStatus>> + Send;
    fn gpu_status(&self) -> impl Future<Output = Result<GpuStatus>> + Send;
}

/// The endpoints components declare (and the kernel's own that are declared the
/// same way): each served as an HTTP route, an MCP tool and a CLI command, which
/// front ends mount without knowing them.
pub trait EndpointsApi: Send + Sync + 'static {
    fn endpoints(&self) -> impl Future<Output = Result<Vec<EndpointInfo>>> + Send;
    /// Calls the endpoint `name` with `input`, an object of its path's fields and
    /// its body's.
    fn call_endpoint(
        &self,
        name: &str,
        input: serde_json::Value,
    ) -> impl Future<Output = Result<serde_json::Value>> + Send;
}

/// The whole API, as one bound for front ends that serve all of it (the MCP
/// server): every type that implements each component's trait has it.
pub trait AgentApi: AgentsApi + RingApi + QuotaApi + EndpointsApi {}

impl<T: AgentsApi + RingApi + QuotaApi + EndpointsApi> AgentApi for T {}

/// The API's traits, for `use bbx_core::api::prelude::*`: their methods need them
/// in scope.
pub mod prelude {
    pub use super::{AgentApi, AgentsApi, EndpointsApi, QuotaApi, RingApi};
}
