//! The MCP server: BBX's agent API as tools a model can call.
//!
//! One tool set, two transports. Inside the kernel it is mounted at `/mcp` as
//! streamable HTTP, behind the same bearer-key check as `/v1`, and each call acts as
//! the key that authenticated its HTTP request. `bbx mcp` serves the same tools over
//! stdio, backed by a remote kernel through `bbx-client`. What differs is only the
//! [`ApiSource`]: where a call gets the [`AgentApi`] it runs against.
//!
//! A kernel error comes back as a tool result with `isError: true` whose structured
//! content is the usual `{"error": {"code", "message", "details"}}`, so a model can
//! read what went wrong; malformed arguments do the same (rmcp reports them as tool
//! errors); an unknown tool is a JSON-RPC error.

use bbx_core::api::prelude::*;
use bbx_core::model::{Agent, AgentPage, CreateAgent, ListAgents, ListState, SetState, StateEntry, StatePage, Status};
use bbx_core::op::{BreakerInfo, OpInfo, ResetBreakers, Resolution, RingStats, SubmitBatch, Submitted, WalStatus};
use bbx_core::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, OpId};
use bbx_kernel::{Caller, Kernel};
use rmcp::handler::server::router::tool::{ToolRoute, ToolRouter};
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResponse, CallToolResult, Extensions, Implementation, JsonObject, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{Json, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// Where a tool call finds the API to act on.
pub trait ApiSource: Clone + Send + Sync + 'static {
    type Api: AgentApi;
    fn api(&self, extensions: &Extensions) -> Result<Self::Api, Error>;

    /// Hears that the tool `tool` was refused with 403 for `why`: inside the kernel,
    /// an audit event; a client's kernel audits its own refusals.
    fn denied(&self, _extensions: &Extensions, _tool: &str, _why: &str) {}
}

/// Inside the kernel: act as the caller the HTTP auth layer put on the request.
#[derive(Clone)]
pub struct KernelSource(pub Arc<Kernel>);

impl ApiSource for KernelSource {
    type Api = bbx_kernel::Session;

    fn api(&self, extensions: &Extensions) -> Result<Self::Api, Error> {
        let caller = extensions
            .get::<axum::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .ok_or_else(|| Error::unauthenticated("missing", "the MCP request carried no authenticated key"))?;
        Ok(self.0.session(caller.clone()))
    }

    fn denied(&self, extensions: &Extensions, tool: &str, why: &str) {
        let parts = extensions.get::<axum::http::request::Parts>();
        let Some(caller) = parts.and_then(|parts| parts.extensions.get::<Caller>()) else {
            return;
        };
        let source = parts
            .and_then(|parts| {
                parts
                    .extensions
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            })
            .map(|info| info.0.ip().to_string());
        let event =
            bbx_kernel::AuditEvent::new(bbx_kernel::AuditKind::Denied, Some(caller), format!("mcp {tool}"), why);
        self.0.audit(event.from(source));
    }
}

/// One fixed API for every call, e.g. a client of a remote kernel in `bbx mcp`.
#[derive(Clone)]
pub struct FixedApi<A>(pub A);

impl<A: AgentApi + Clone> ApiSource for FixedApi<A> {
    type Api = A;

    fn api(&self, _: &Extensions) -> Result<A, Error> {
        Ok(self.0.clone())
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateKeyArgs {
    /// The agent's id, as returned by agent_create.
    pub agent_id: String,
    /// The state key, e.g. "plan/current". Any printable text up to 512 bytes.
    pub key: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateSetArgs {
    /// The agent's id, as returned by agent_create.
    pub agent_id: String,
    /// The state key, e.g. "plan/current". Any printable text up to 512 bytes.
    pub key: String,
    /// The JSON value to store: object, array, string, number, boolean or null.
    pub value: Value,
    /// Compare-and-swap: only write if the key's current version is this (0 = only if absent).
    #[serde(default)]
    pub if_version: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateDeleteArgs {
    /// The agent's id, as returned by agent_create.
    pub agent_id: String,
    /// The state key to delete.
    pub key: String,
    /// Only delete if the key's current version is this.
    #[serde(default)]
    pub if_version: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateListArgs {
    /// The agent's id, as returned by agent_create.
    pub agent_id: String,
    /// Only keys that start with this prefix, e.g. "plan/".
    #[serde(default)]
    pub prefix: Option<String>,
    /// Page size, 1-1000 (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    /// The next_cursor from the previous page, to continue listing.
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RingWaitArgs {
    /// The op's id, as returned by ring_submit.
    pub op_id: String,
    /// How long to wait for the completion, in milliseconds (default 30000, at most 60000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RingResolveArgs {
    /// The id of the op in doubt.
    pub op_id: String,
    /// `ok` (its effect happened), `failed` (it did not) or `retry` (run it again).
    #[serde(rename = "as")]
    pub resolution: Resolution,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaNodeArgs {
    /// `agent/ID` or `tenant/NAME`.
    pub node: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaSetArgs {
    /// `agent/ID` or `tenant/NAME`.
    pub node: String,
    /// The limits to set; limits not given keep their values.
    pub limits: QuotaLimits,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RingBreakersArgs {
    /// Close breakers (administrators only) instead of only listing them.
    #[serde(default)]
    pub reset: bool,
    /// With `reset`: only this target's breakers, e.g. "tool.http example.com:443".
    pub target: Option<String>,
    /// With `reset`: only this tenant's breakers.
    pub tenant: Option<String>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct BreakerList {
    /// The circuit breakers the caller may see: its tenant's, or all for an administrator.
    pub breakers: Vec<BreakerInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct QuotaList {
    /// Every quota node the caller may see, with limits and usage.
    pub quotas: Vec<QuotaInfo>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Deleted {
    /// Always true: the key existed and is gone.
    pub deleted: bool,
}

type ToolResult<T> = Result<Json<T>, CallToolResult>;

fn tool_error(error: Error) -> CallToolResult {
    CallToolResult::structured_error(serde_json::to_value(error.into_body()).unwrap_or(Value::Null))
}

/// Why a tool call was refused with 403, if it was.
fn denial(result: &CallToolResult) -> Option<&str> {
    let error = result.structured_content.as_ref()?.get("error")?;
    (error.get("code")? == "permission_denied")
        .then(|| error.get("message").and_then(Value::as_str).unwrap_or_default())
}

fn answer<T>(result: Result<T, Error>) -> ToolResult<T> {
    result.map(Json).map_err(tool_error)
}

#[derive(Clone)]
pub struct McpServer<S: ApiSource> {
    source: S,
    tool_router: ToolRouter<Self>,
}

impl<S: ApiSource> McpServer<S> {
    pub fn new(source: S) -> Self {
        Self::with_endpoints(source, &[])
    }

    /// The fixed tools and one for each of `endpoints` (the components'), named
    /// as the endpoint with `_` for `.` (`ring.approve` is `ring_approve`).
    pub fn with_endpoints(source: S, endpoints: &[bbx_core::model::EndpointInfo]) -> Self {
        let mut tool_router = Self::tool_router();
        // A streaming endpoint is no tool: a tool's call answers once.
        for endpoint in endpoints.iter().filter(|e| !e.streams) {
            let schema: JsonObject = match &endpoint.input {
                Value::Object(schema) => schema.clone(),
                _ => JsonObject::new(),
            };
            let tool = Tool::new(endpoint.name.replace('.', "_"), endpoint.description.clone(), schema);
            let name = endpoint.name.clone();
            tool_router.add_route(ToolRoute::new_dyn(tool, move |ctx: ToolCallContext<'_, Self>| {
                let name = name.clone();
                Box::pin(async move {
                    let input = Value::Object(ctx.arguments.unwrap_or_default());
                    let result = match ctx.service.api(&ctx.request_context) {
                        Ok(api) => match api.call_endpoint(&name, input).await {
                            Ok(output) => CallToolResult::structured(output),
                            Err(e) => tool_error(e),
                        },
                        Err(refused) => refused,
                    };
                    Ok(CallToolResponse::Complete(result))
                })
            }));
        }
        Self { source, tool_router }
    }

    fn api(&self, ctx: &RequestContext<RoleServer>) -> Result<S::Api, CallToolResult> {
        self.source.api(&ctx.extensions).map_err(tool_error)
    }
}

fn agent_id(raw: &str) -> Result<AgentId, CallToolResult> {
    raw.parse().map_err(tool_error)
}

#[tool_router]
impl<S: ApiSource> McpServer<S> {
    #[tool(
        description = "Create a new agent in BBX and return it. The returned `id` is how every other tool \
        refers to this agent; keep it. Each agent gets its own durable key/value state store."
    )]
    async fn agent_create(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(req): Parameters<CreateAgent>,
    ) -> ToolResult<Agent> {
        let api = self.api(&ctx)?;
        answer(api.create_agent(req).await)
    }

    #[tool(
        description = "List agents, oldest first, optionally filtered by tenant or by a label (\"key=value\"). \
        Returns one page; if `next_cursor` is present, call again with it as `cursor` for the next page."
    )]
    async fn agent_list(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(req): Parameters<ListAgents>,
    ) -> ToolResult<AgentPage> {
        let api = self.api(&ctx)?;
        answer(api.list_agents(req).await)
    }

    #[tool(
        description = "Read one value from an agent's durable state. Returns the value with its `version` \
        (use it with state_set's `if_version` for a safe read-modify-write). Fails with not_found if the key \
        was never set."
    )]
    async fn state_get(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<StateKeyArgs>,
    ) -> ToolResult<StateEntry> {
        let api = self.api(&ctx)?;
        answer(api.state_get(agent_id(&args.agent_id)?, args.key).await)
    }

    #[tool(
        description = "Store a JSON value under a key in an agent's durable state; it is on disk when this \
        returns and survives restarts. Give `if_version` to write only if nobody changed the key since you \
        read it (0 = only if the key does not exist yet); a mismatch fails with version_conflict."
    )]
    async fn state_set(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<StateSetArgs>,
    ) -> ToolResult<StateEntry> {
        let api = self.api(&ctx)?;
        let req = SetState {
            value: args.value,
            if_version: args.if_version,
        };
        answer(api.state_set(agent_id(&args.agent_id)?, args.key, req).await)
    }

    #[tool(
        description = "Delete a key from an agent's durable state. Fails with not_found if the key does not \
        exist; with `if_version`, deletes only if the key is still at that version."
    )]
    async fn state_delete(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<StateDeleteArgs>,
    ) -> ToolResult<Deleted> {
        let api = self.api(&ctx)?;
        let result = api
            .state_delete(agent_id(&args.agent_id)?, args.key, args.if_version)
            .await;
        answer(result.map(|()| Deleted { deleted: true }))
    }

    #[tool(
        description = "List an agent's state entries (keys with their values and versions) in key order, \
        optionally only keys starting with `prefix`. Returns one page; pass `next_cursor` back as `cursor` \
        for more."
    )]
    async fn state_list(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<StateListArgs>,
    ) -> ToolResult<StatePage> {
        let api = self.api(&ctx)?;
        let req = ListState {
            prefix: args.prefix,
            limit: args.limit,
            cursor: args.cursor,
        };
        answer(api.state_list(agent_id(&args.agent_id)?, req).await)
    }

    #[tool(
        description = "Submit ops to the AgentRing, BBX's durable op queue, and get their op ids back once \
        they are on disk. Each op names an `agent`, a `kind` (noop, sleep {ms}, state.get {key}, state.set \
        {key, value}, state.incr {key, by}, state.delete {key}, tool.http {method, url, headers, body}, \
        tool.shell {program, args, timeout_ms}, tool.file {op: read|write|append|list|stat|delete, path, \
        content}) and `args`; optional: priority (LOW, NORMAL, \
        HIGH, REALTIME), timeout_ms, retries {count, backoff_ms}, depends_on (op ids, or #N for the Nth op \
        of this batch), idempotency_key (submitting the same key again returns the same op, so a retry never \
        runs it twice). Then call ring_wait with an op id for its result."
    )]
    async fn ring_submit(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(batch): Parameters<SubmitBatch>,
    ) -> ToolResult<Submitted> {
        let api = self.api(&ctx)?;
        answer(api.submit_ops(batch).await)
    }

    #[tool(
        description = "Wait for an op submitted with ring_submit to complete and return it. When `state` is \
        `done`, `completion` holds `status` (ok, error, timeout, cancelled, in_doubt) and `result` or \
        `error`; otherwise the op is still queued or running: call again."
    )]
    async fn ring_wait(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<RingWaitArgs>,
    ) -> ToolResult<OpInfo> {
        let api = self.api(&ctx)?;
        let id: OpId = args.op_id.parse().map_err(tool_error)?;
        let timeout_ms = args.timeout_ms.unwrap_or(30_000);
        if timeout_ms > 60_000 {
            return Err(tool_error(Error::invalid_field(
                "timeout_ms",
                "timeout_ms is at most 60000",
            )));
        }
        answer(api.wait_op(id, std::time::Duration::from_millis(timeout_ms)).await)
    }

    #[tool(
        description = "Report the AgentRing's statistics: queued ops by priority, running ops, completions \
        by status, throughput, latency percentiles by priority, retries and circuit breaker states. Takes no \
        arguments."
    )]
    async fn ring_stats(&self, ctx: RequestContext<RoleServer>) -> ToolResult<RingStats> {
        let api = self.api(&ctx)?;
        answer(api.ring_stats().await)
    }

    #[tool(
        description = "Report the AgentRing's journal (administrators only): segments, bytes, next, synced and \
        checkpoint positions, records and syncs so far, and fdatasync latency percentiles. Takes no arguments."
    )]
    async fn ring_wal(&self, ctx: RequestContext<RoleServer>) -> ToolResult<WalStatus> {
        let api = self.api(&ctx)?;
        answer(api.wal_status().await)
    }

    #[tool(
        description = "List the circuit breakers of the caller's tenant (every tenant's for an \
        administrator): target (an executor, with host and port for remote ones), state (closed, open, \
        half_open) and counts. With reset true, an administrator closes them: all, or those of `target` \
        and/or `tenant`."
    )]
    async fn ring_breakers(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<RingBreakersArgs>,
    ) -> ToolResult<BreakerList> {
        let api = self.api(&ctx)?;
        if !args.reset && (args.target.is_some() || args.tenant.is_some()) {
            return Err(tool_error(Error::invalid_field(
                "target",
                "target and tenant choose what reset closes; set reset to true",
            )));
        }
        let breakers = if args.reset {
            let req = ResetBreakers {
                target: args.target,
                tenant: args.tenant,
            };
            api.reset_breakers(req).await
        } else {
            api.breakers().await
        };
        answer(breakers.map(|breakers| BreakerList { breakers }))
    }

    #[tool(description = "The reference design's name for ring_stats; the same tool.")]
    async fn enhanced_ring_stats(&self, ctx: RequestContext<RoleServer>) -> ToolResult<RingStats> {
        self.ring_stats(ctx).await
    }

    #[tool(description = "The reference design's name for ring_wal; the same tool.")]
    async fn enhanced_ring_wal(&self, ctx: RequestContext<RoleServer>) -> ToolResult<WalStatus> {
        self.ring_wal(ctx).await
    }

    #[tool(description = "The reference design's name for ring_breakers; the same tool and arguments.")]
    async fn enhanced_ring_circuit(
        &self,
        ctx: RequestContext<RoleServer>,
        args: Parameters<RingBreakersArgs>,
    ) -> ToolResult<BreakerList> {
        self.ring_breakers(ctx, args).await
    }

    #[tool(
        description = "Settle an op whose status is in_doubt (a tool that was running when the kernel \
        stopped, so its effect may or may not have happened): `as` is ok, failed, or retry (run it again with \
        the same idempotency key). Returns the op."
    )]
    async fn ring_resolve(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<RingResolveArgs>,
    ) -> ToolResult<OpInfo> {
        let api = self.api(&ctx)?;
        let id: OpId = args.op_id.parse().map_err(tool_error)?;
        answer(api.resolve_op(id, args.resolution).await)
    }

    #[tool(
        description = "Read the quota of an agent (node \"agent/ID\") or a tenant (\"tenant/NAME\"): its \
        limits (requests_per_second, tool_calls_per_minute, concurrent_ops, memory_bytes, cpu_percent, pids), \
        its parent's limits, which also apply, and its usage."
    )]
    async fn quota_get(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<QuotaNodeArgs>,
    ) -> ToolResult<QuotaInfo> {
        let api = self.api(&ctx)?;
        let node: Node = args.node.parse().map_err(tool_error)?;
        answer(api.quota(node).await)
    }

    #[tool(
        description = "Set limits of an agent (node \"agent/ID\") or a tenant (\"tenant/NAME\"); limits \
        not given keep their values. An agent can never exceed its tenant. Returns the node's quota."
    )]
    async fn quota_set(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(args): Parameters<QuotaSetArgs>,
    ) -> ToolResult<QuotaInfo> {
        let api = self.api(&ctx)?;
        let node: Node = args.node.parse().map_err(tool_error)?;
        answer(api.set_quota(node, args.limits).await)
    }

    #[tool(
        description = "Report every quota node (tenants and agents) with its limits and usage: ops in \
        flight, refusals, throttles and 80 % warnings. Takes no arguments."
    )]
    async fn enforced_quotas_stats(&self, ctx: RequestContext<RoleServer>) -> ToolResult<QuotaList> {
        let api = self.api(&ctx)?;
        answer(api.list_quotas().await.map(|quotas| QuotaList { quotas }))
    }

    #[tool(
        description = "Report the host's NVIDIA GPUs through NVML (devices, memory, utilization), or \
        why there are none. Takes no arguments."
    )]
    async fn enforced_quotas_gpu(&self, ctx: RequestContext<RoleServer>) -> ToolResult<GpuStatus> {
        let api = self.api(&ctx)?;
        answer(api.gpu_status().await)
    }

    #[tool(
        description = "Report how tool processes are confined: the cgroup driver (v2, v1 or rlimits), \
        where groups are made, the groups that exist now, and whether programs run isolated. Takes no \
        arguments."
    )]
    async fn enforced_quotas_cgroup(&self, ctx: RequestContext<RoleServer>) -> ToolResult<CgroupStatus> {
        let api = self.api(&ctx)?;
        answer(api.cgroup_status().await)
    }

    #[tool(
        description = "Report the BBX kernel's status: version, uptime, number of agents, and storage \
        figures. Takes no arguments."
    )]
    async fn bbx_status(&self, ctx: RequestContext<RoleServer>) -> ToolResult<Status> {
        let api = self.api(&ctx)?;
        answer(api.status().await)
    }
}

#[tool_handler(router = self.tool_router)]
impl<S: ApiSource> ServerHandler for McpServer<S> {
    /// Every tool call, with a refusal (403) audited however the tool got it.
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, rmcp::ErrorData> {
        let tool = request.name.to_string();
        let extensions = context.extensions.clone();
        let response = self
            .tool_router
            .call(ToolCallContext::new(self, request, context))
            .await?;
        if let CallToolResponse::Complete(result) = &response
            && let Some(why) = denial(result)
        {
            self.source.denied(&extensions, &tool, why);
        }
        Ok(response)
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("bbx", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "BBX is an operating system for AI agents. Create an agent with agent_create, then keep \
                 durable state for it with state_set/state_get/state_list/state_delete, passing the agent's id. \
                 Run actions as durable, exactly-once ops with ring_submit and collect results with ring_wait.",
            )
    }
}
