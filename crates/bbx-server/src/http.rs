//! The `/v1` HTTP API. Each handler is a thin translation between HTTP and one
//! kernel call; the `#[utoipa::path]` on it is the source of `/v1/openapi.json`.

use crate::error::{ApiError, ApiJson, ApiPath, ApiQuery};
use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use bbx_core::model::{
    Agent, AgentPage, ApiKeyInfo, CreateAgent, CreateApiKey, CreatedApiKey, DeleteState, ListAgents, ListState,
    SetState, StateEntry, StatePage, Status,
};
use bbx_core::{AgentId, ErrorBody, KeyId};
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
    tags((name = "agents"), (name = "state"), (name = "keys"), (name = "system"))
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
        .routes(routes!(status))
        .routes(routes!(create_key, list_keys))
        .routes(routes!(revoke_key))
        .split_for_parts()
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
