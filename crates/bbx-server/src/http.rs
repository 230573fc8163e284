//! The `/v1` HTTP API. Each handler is a thin translation between HTTP and one
//! kernel call; the `#[utoipa::path]` on it is the source of `/v1/openapi.json`.

use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use bbx_core::model::{
    Agent, AgentPage, ApiKeyInfo, CreateAgent, CreateApiKey, CreatedApiKey, DeleteState, EndpointInfo, ListAgents,
    ListState, SetState, StateEntry, StatePage, Status,
};
use bbx_core::op::{
    BreakerInfo, OpInfo, OpenShm, ResetBreakers, ResolveOp, RingStats, ShmSession, SubmitBatch, Submitted, WalStatus,
};
use bbx_core::quota::Node;
use bbx_core::quota::{CgroupStatus, GpuStatus, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, ErrorBody, KeyId, OpId};
use bbx_kernel::{Caller, Kernel};
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type Kern = State<Arc<Kernel>>;
type Reply<T> = Result<ApiJson<T>, ApiError>;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "BBX kernel API", description = "Agents as kernel objects, with durable state. Every /v1 call needs `Authorization: Bearer <API key>`."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags((name = "agents"), (name = "state"), (name = "ops"), (name = "ring"), (name = "quotas"), (name = "keys"), (name = "system"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("bbx API key")
                    .build(),
            ),
        );
    }
}

/// The `/v1` routes (without auth, which the caller layers on) and their OpenAPI.
pub fn router() -> (axum::Router<Arc<Kernel>>, utoipa::openapi::OpenApi) {
    use utoipa::OpenApi;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_agent, list_agents))
        .routes(routes!(get_agent, delete_agent))
        .routes(routes!(list_state))
        .routes(routes!(get_state, put_state, delete_state))
        .routes(routes!(submit_ops))
        .routes(routes!(op_events))
        .routes(routes!(get_op))
        .routes(routes!(wait_op))
        .routes(routes!(cancel_op))
        .routes(routes!(resolve_op))
        .routes(routes!(list_quotas))
        .routes(routes!(cgroup_status))
        .routes(routes!(gpu_status))
        .routes(routes!(get_quota, set_quota))
        .routes(routes!(get_group_quota, set_group_quota))
        .routes(routes!(ring_stats))
        .routes(routes!(wal_status))
        .routes(routes!(list_breakers))
        .routes(routes!(reset_breakers))
        .routes(routes!(open_shm))
        .routes(routes!(status))
        .routes(routes!(list_endpoints))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .split_for_parts()
}

/// The endpoints the kernel's components offer: each is also a route of this API
/// (in this document) and an MCP tool.
#[utoipa::path(get, path = "/v1/endpoints", tag = "system",
    responses((status = 200, body = Vec<EndpointInfo>)))]
async fn list_endpoints(State(kernel): Kern) -> Reply<Vec<EndpointInfo>> {
    Ok(ApiJson(kernel.endpoints()))
}

fn agent_id(raw: &str) -> Result<AgentId, ApiError> {
    Ok(raw.parse()?)
}

/// Create an agent.
#[utoipa::path(post, path = "/v1/agents", tag = "agents", request_body = CreateAgent,
    responses((status = 201, body = Agent), (status = "4XX", body = ErrorBody, description = "Invalid request")))]
async fn create_agent(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateAgent>,
) -> Result<(StatusCode, ApiJson<Agent>), ApiError> {
    Ok((StatusCode::CREATED, ApiJson(kernel.create_agent(&caller, req).await?)))
}

/// List agents, oldest first, paged.
#[utoipa::path(get, path = "/v1/agents", tag = "agents", params(ListAgents),
    responses((status = 200, body = AgentPage), (status = "4XX", body = ErrorBody, description = "Invalid request")))]
async fn list_agents(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiQuery(req): ApiQuery<ListAgents>,
) -> Reply<AgentPage> {
    Ok(ApiJson(kernel.list_agents(&caller, req)?))
}

/// Get an agent.
#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path, description = "Agent id")),
    responses((status = 200, body = Agent), (status = "4XX", body = ErrorBody, description = "Invalid id or unknown agent")))]
async fn get_agent(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Reply<Agent> {
    Ok(ApiJson(kernel.get_agent(&caller, &agent_id(&id)?)?))
}

/// Delete an agent and all of its state.
#[utoipa::path(delete, path = "/v1/agents/{id}", tag = "agents", params(("id" = String, Path, description = "Agent id")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ErrorBody, description = "Invalid id or unknown agent")))]
async fn delete_agent(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    kernel.delete_agent(&caller, &agent_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// List an agent's state entries by key prefix, paged.
#[utoipa::path(get, path = "/v1/agents/{id}/state", tag = "state", params(("id" = String, Path, description = "Agent id"), ListState),
    responses((status = 200, body = StatePage), (status = "4XX", body = ErrorBody, description = "Invalid request")))]
async fn list_state(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(req): ApiQuery<ListState>,
) -> Reply<StatePage> {
    Ok(ApiJson(kernel.state_list(&caller, &agent_id(&id)?, req)?))
}

/// Read a state value. Keys containing `/` are sent percent-encoded (`notes%2Fa`).
#[utoipa::path(get, path = "/v1/agents/{id}/state/{key}", tag = "state",
    params(("id" = String, Path, description = "Agent id"), ("key" = String, Path, description = "State key, percent-encoded")),
    responses((status = 200, body = StateEntry), (status = "4XX", body = ErrorBody, description = "Invalid request or unknown key")))]
async fn get_state(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((id, key)): ApiPath<(String, String)>,
) -> Reply<StateEntry> {
    Ok(ApiJson(kernel.state_get(&caller, &agent_id(&id)?, &key)?))
}

/// Write a state value; acknowledged only once it is on disk. With `if_version`,
/// a compare-and-swap: 409 `version_conflict` if the key moved on.
#[utoipa::path(put, path = "/v1/agents/{id}/state/{key}", tag = "state", request_body = SetState,
    params(("id" = String, Path, description = "Agent id"), ("key" = String, Path, description = "State key, percent-encoded")),
    responses((status = 200, body = StateEntry), (status = 409, body = ErrorBody, description = "Version conflict"),
        (status = "4XX", body = ErrorBody, description = "Invalid request")))]
async fn put_state(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((id, key)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SetState>,
) -> Reply<StateEntry> {
    Ok(ApiJson(kernel.state_set(&caller, &agent_id(&id)?, key, req).await?))
}

/// Delete a state value, optionally only at a given version.
#[utoipa::path(delete, path = "/v1/agents/{id}/state/{key}", tag = "state",
    params(("id" = String, Path, description = "Agent id"), ("key" = String, Path, description = "State key, percent-encoded"), DeleteState),
    responses((status = 204, description = "Deleted"), (status = 409, body = ErrorBody, description = "Version conflict"),
        (status = "4XX", body = ErrorBody, description = "Invalid request or unknown key")))]
async fn delete_state(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((id, key)): ApiPath<(String, String)>,
    ApiQuery(req): ApiQuery<DeleteState>,
) -> Result<StatusCode, ApiError> {
    kernel
        .state_delete(&caller, &agent_id(&id)?, key, req.if_version)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The kernel's status.
#[utoipa::path(get, path = "/v1/status", tag = "system", responses((status = 200, body = Status)))]
async fn status(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<Status> {
    Ok(ApiJson(kernel.status(&caller)?))
}

/// Create an API key (administrators only). The secret is in the response, once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = CreateApiKey,
    responses((status = 201, body = CreatedApiKey), (status = "4XX", body = ErrorBody, description = "Invalid request or not an administrator")))]
async fn create_key(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateApiKey>,
) -> Result<(StatusCode, ApiJson<CreatedApiKey>), ApiError> {
    Ok((StatusCode::CREATED, ApiJson(kernel.create_key(&caller, req).await?)))
}

/// List API keys (administrators only); secrets are never shown.
#[utoipa::path(get, path = "/v1/keys", tag = "keys", responses((status = 200, body = Vec<ApiKeyInfo>), (status = 403, body = ErrorBody)))]
async fn list_keys(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<Vec<ApiKeyInfo>> {
    Ok(ApiJson(kernel.list_keys(&caller)?))
}

/// Revoke an API key (administrators only). Requests with it get 401 from now on.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys", params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = ApiKeyInfo), (status = "4XX", body = ErrorBody, description = "Unknown key or not an administrator")))]
async fn revoke_key(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Reply<ApiKeyInfo> {
    let id: KeyId = id.parse()?;
    Ok(ApiJson(kernel.revoke_key(&caller, &id).await?))
}

fn op_id(raw: &str) -> Result<OpId, ApiError> {
    Ok(raw.parse()?)
}

/// Submit a batch of ops. Answers once every op with effects is durable in the
/// journal; 429 with `Retry-After` when the submission queue is full (unless
/// `wait_ms` asks to wait for room).
#[utoipa::path(post, path = "/v1/ops", tag = "ops", request_body = SubmitBatch,
    responses((status = 200, body = Submitted), (status = 409, body = ErrorBody, description = "Idempotency key reused with different args"),
        (status = 429, body = ErrorBody, description = "Submission queue full"), (status = "4XX", body = ErrorBody, description = "Invalid batch")))]
async fn submit_ops(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiJson(batch): ApiJson<SubmitBatch>,
) -> Reply<Submitted> {
    Ok(ApiJson(kernel.submit(&caller, batch).await?))
}

/// An op: where it is, and its completion once done.
#[utoipa::path(get, path = "/v1/ops/{id}", tag = "ops", params(("id" = String, Path, description = "Op id")),
    responses((status = 200, body = OpInfo), (status = "4XX", body = ErrorBody, description = "Invalid id or unknown op")))]
async fn get_op(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Reply<OpInfo> {
    Ok(ApiJson(kernel.op(&caller, &op_id(&id)?)?))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// How long to wait for the completion (default 30000, at most 60000).
    timeout_ms: Option<u64>,
}

/// Longest long poll; a client that wants longer polls again.
const MAX_WAIT_MS: u64 = 60_000;

/// Wait for an op's completion (long poll). Returns the op as it stands if it is
/// not done within `timeout_ms`: check `state`.
#[utoipa::path(get, path = "/v1/ops/{id}/wait", tag = "ops", params(("id" = String, Path, description = "Op id"), WaitQuery),
    responses((status = 200, body = OpInfo), (status = "4XX", body = ErrorBody, description = "Invalid id or unknown op")))]
async fn wait_op(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Reply<OpInfo> {
    let timeout_ms = query.timeout_ms.unwrap_or(30_000);
    if timeout_ms > MAX_WAIT_MS {
        return Err(Error::invalid_field("timeout_ms", format!("timeout_ms is at most {MAX_WAIT_MS}")).into());
    }
    let timeout = std::time::Duration::from_millis(timeout_ms);
    Ok(ApiJson(kernel.wait_op(&caller, &op_id(&id)?, timeout).await?))
}

/// Cancel an op that has not completed.
#[utoipa::path(post, path = "/v1/ops/{id}/cancel", tag = "ops", params(("id" = String, Path, description = "Op id")),
    responses((status = 200, body = OpInfo), (status = 409, body = ErrorBody, description = "Already completed"),
        (status = "4XX", body = ErrorBody, description = "Invalid id or unknown op")))]
async fn cancel_op(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Reply<OpInfo> {
    Ok(ApiJson(kernel.cancel_op(&caller, &op_id(&id)?).await?))
}

/// Settle an op left `in_doubt` by a crash: `ok` (its effect happened), `failed`
/// (it did not, or must not count) or `retry` (run it again, with the same
/// idempotency key).
#[utoipa::path(post, path = "/v1/ops/{id}/resolve", tag = "ops", params(("id" = String, Path, description = "Op id")),
    request_body = ResolveOp,
    responses((status = 200, body = OpInfo), (status = 409, body = ErrorBody, description = "Not in doubt, or being resolved"),
        (status = "4XX", body = ErrorBody, description = "Invalid id or unknown op")))]
async fn resolve_op(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ResolveOp>,
) -> Reply<OpInfo> {
    Ok(ApiJson(kernel.resolve_op(&caller, &op_id(&id)?, req.resolution).await?))
}

/// A quota node from its path: `tenants/NAME` or `agents/ID`.
fn quota_node(kind: &str, name: &str) -> Result<Node, ApiError> {
    let node = match kind {
        "tenants" => format!("tenant/{name}"),
        "agents" => format!("agent/{name}"),
        other => {
            return Err(Error::not_found("quota node kind", other)
                .with_details(serde_json::json!({ "kinds": ["tenants", "agents"] }))
                .into());
        }
    };
    Ok(node.parse()?)
}

/// Every quota node the caller may see, with its limits and usage.
#[utoipa::path(get, path = "/v1/quotas", tag = "quotas", responses((status = 200, body = Vec<QuotaInfo>)))]
async fn list_quotas(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<Vec<QuotaInfo>> {
    Ok(ApiJson(kernel.list_quotas(&caller)?))
}

/// A node's limits, its parent's, and its usage.
#[utoipa::path(get, path = "/v1/quotas/{kind}/{name}", tag = "quotas",
    params(("kind" = String, Path, description = "`tenants` or `agents`"), ("name" = String, Path, description = "Tenant name or agent id")),
    responses((status = 200, body = QuotaInfo), (status = "4XX", body = ErrorBody, description = "Unknown node")))]
async fn get_quota(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((kind, name)): ApiPath<(String, String)>,
) -> Reply<QuotaInfo> {
    Ok(ApiJson(kernel.quota(&caller, &quota_node(&kind, &name)?)?))
}

/// Set some of a node's limits; those not given keep their values.
#[utoipa::path(patch, path = "/v1/quotas/{kind}/{name}", tag = "quotas", request_body = QuotaLimits,
    params(("kind" = String, Path, description = "`tenants` or `agents`"), ("name" = String, Path, description = "Tenant name or agent id")),
    responses((status = 200, body = QuotaInfo), (status = "4XX", body = ErrorBody, description = "Bad limits or unknown node")))]
async fn set_quota(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((kind, name)): ApiPath<(String, String)>,
    ApiJson(limits): ApiJson<QuotaLimits>,
) -> Reply<QuotaInfo> {
    Ok(ApiJson(
        kernel.set_quota(&caller, &quota_node(&kind, &name)?, limits).await?,
    ))
}

/// A group's limits, its tenant's, and its usage.
#[utoipa::path(get, path = "/v1/quotas/groups/{tenant}/{name}", tag = "quotas",
    params(("tenant" = String, Path, description = "Tenant"), ("name" = String, Path, description = "Group")),
    responses((status = 200, body = QuotaInfo), (status = "4XX", body = ErrorBody, description = "Bad name")))]
async fn get_group_quota(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
) -> Reply<QuotaInfo> {
    let node: Node = format!("group/{tenant}/{name}").parse()?;
    Ok(ApiJson(kernel.quota(&caller, &node)?))
}

/// Set some of a group's limits; an agent joins it through its own quota's `group`.
#[utoipa::path(patch, path = "/v1/quotas/groups/{tenant}/{name}", tag = "quotas", request_body = QuotaLimits,
    params(("tenant" = String, Path, description = "Tenant"), ("name" = String, Path, description = "Group")),
    responses((status = 200, body = QuotaInfo), (status = "4XX", body = ErrorBody, description = "Bad limits or name")))]
async fn set_group_quota(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiPath((tenant, name)): ApiPath<(String, String)>,
    ApiJson(limits): ApiJson<QuotaLimits>,
) -> Reply<QuotaInfo> {
    let node: Node = format!("group/{tenant}/{name}").parse()?;
    Ok(ApiJson(kernel.set_quota(&caller, &node, limits).await?))
}

/// How tool processes are confined on this host (administrators only).
#[utoipa::path(get, path = "/v1/quotas/cgroups", tag = "quotas", responses((status = 200, body = CgroupStatus)))]
async fn cgroup_status(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<CgroupStatus> {
    Ok(ApiJson(kernel.cgroup_status(&caller)?))
}

/// The host's GPUs through NVML, or why there are none (administrators only).
#[utoipa::path(get, path = "/v1/quotas/gpus", tag = "quotas", responses((status = 200, body = GpuStatus)))]
async fn gpu_status(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<GpuStatus> {
    Ok(ApiJson(kernel.gpu_status(&caller).await?))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsQuery {
    /// Only this agent's completions.
    agent: Option<String>,
}

/// Completions as they happen, as server-sent events (`event: completion`, the
/// completion as JSON), and what components tell beside them (`event: run`: a
/// goal run's steps starting and ending; `event: flow`: a flow decision other
/// than allow). A reader that falls behind gets `event: lagged` with how many
/// it missed.
#[utoipa::path(get, path = "/v1/ops/events", tag = "ops", params(EventsQuery),
    responses((status = 200, content_type = "text/event-stream", description = "A stream of completions")))]
async fn op_events(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let agent = query.agent.as_deref().map(agent_id).transpose()?;
    if let Some(agent) = &agent {
        kernel.get_agent(&caller, agent)?;
    }
    // A key confined to an agent streams that agent's events only.
    let agent = agent.or(caller.agent);
    let receivers = (kernel.completions(), kernel.notices());
    let stream = futures::stream::unfold(
        (receivers, caller, agent),
        |((mut done, mut told), caller, agent)| async move {
            loop {
                let shown = |tenant: &str, of: bbx_core::AgentId| caller.sees(tenant) && agent.is_none_or(|a| a == of);
                let event = tokio::select! {
                    received = done.recv() => match received {
                        Ok(done) if shown(&done.tenant, done.agent) => Event::default().event("completion").json_data(&*done),
                        Ok(_) => continue,
                        Err(RecvError::Lagged(missed)) => Ok(Event::default().event("lagged").data(missed.to_string())),
                        Err(RecvError::Closed) => return None,
                    },
                    received = told.recv() => match received {
                        Ok(notice) if shown(&notice.tenant, notice.agent) => {
                            Event::default().event(notice.event).json_data(&*notice)
                        }
                        Ok(_) => continue,
                        Err(RecvError::Lagged(missed)) => Ok(Event::default().event("lagged").data(missed.to_string())),
                        Err(RecvError::Closed) => return None,
                    },
                };
                return Some((event, ((done, told), caller, agent)));
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The ring's queues, throughput, latency by priority, retries and breakers.
#[utoipa::path(get, path = "/v1/ring/stats", tag = "ring", responses((status = 200, body = RingStats)))]
async fn ring_stats(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<RingStats> {
    Ok(ApiJson(kernel.ring_stats(&caller)))
}

/// The journal: segments, size, synced and checkpoint positions, sync latency
/// (administrators only).
#[utoipa::path(get, path = "/v1/ring/wal", tag = "ring", responses((status = 200, body = WalStatus), (status = 403, body = ErrorBody)))]
async fn wal_status(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<WalStatus> {
    Ok(ApiJson(kernel.wal_status(&caller).await?))
}

/// The circuit breaker of every target used so far.
#[utoipa::path(get, path = "/v1/ring/breakers", tag = "ring", responses((status = 200, body = Vec<BreakerInfo>)))]
async fn list_breakers(State(kernel): Kern, Extension(caller): Extension<Caller>) -> Reply<Vec<BreakerInfo>> {
    Ok(ApiJson(kernel.breakers(&caller)))
}

/// Close circuit breakers: one target's, or all (administrators only).
#[utoipa::path(post, path = "/v1/ring/breakers/reset", tag = "ring", request_body = ResetBreakers,
    responses((status = 200, body = Vec<BreakerInfo>), (status = "4XX", body = ErrorBody, description = "Unknown target or not an administrator")))]
async fn reset_breakers(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<ResetBreakers>,
) -> Reply<Vec<BreakerInfo>> {
    Ok(ApiJson(kernel.reset_breakers(
        &caller,
        req.tenant.as_deref(),
        req.target.as_deref(),
    )?))
}

/// Open a shared-memory session: a ring file that a client on the same machine maps
/// to submit ops and reap completions with no system call on the fast path. Ops
/// run as the caller of this request.
#[utoipa::path(post, path = "/v1/ring/shm", tag = "ring", request_body = OpenShm,
    responses((status = 201, body = ShmSession), (status = "4XX", body = ErrorBody, description = "Bad queue size or too many sessions")))]
async fn open_shm(
    State(kernel): Kern,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<OpenShm>,
) -> Result<(StatusCode, ApiJson<ShmSession>), ApiError> {
    Ok((StatusCode::CREATED, ApiJson(kernel.open_shm(&caller, req)?)))
}
