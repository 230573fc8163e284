//! The kernel's network face: the `/v1` HTTP API, `/mcp`, and the probes.
//!
//! `bbx-server` turns a [`bbx_kernel::Kernel`] into an axum application:
//! - `/v1/...` — the HTTP API ([`http`]), described by `/v1/openapi.json`, which is
//!   generated from the handlers themselves;
//! - `/mcp` — the MCP server ([`mcp`]) over streamable HTTP;
//! - `/healthz`, `/readyz`, `/metrics` — probes and Prometheus metrics, open to all.
//!
//! Everything under `/v1` and `/mcp` passes one bearer-key check, which puts the
//! authenticated [`bbx_kernel::Caller`] on the request. Every failure, including
//! axum's own (bad JSON, unknown route, body too large), leaves as the one error
//! shape, `{"error": {"code", "message", "details"}}`.

pub mod endpoints;
pub mod error;
pub mod http;
pub mod mcp;
pub mod metrics;
pub mod oauth;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bbx_core::{Error, ErrorCode};
use bbx_kernel::Kernel;
use error::ApiError;
use metrics::HttpMetrics;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use std::future::Future;
use std::sync::Arc;

/// The whole application for `kernel`.
pub fn app(kernel: Arc<Kernel>) -> axum::Router {
    let metrics = Arc::new(HttpMetrics::new(&kernel));
    let (v1, mut openapi) = http::router();
    let v1 = v1.merge(endpoints::routes(&kernel.endpoints(), &mut openapi));
    let openapi = Arc::new(openapi.to_pretty_json().expect("the OpenAPI document serializes"));

    let mcp_kernel = kernel.clone();
    let mut mcp_config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_max_request_body_bytes(kernel.config().max_body_bytes);
    if !kernel.config().listen.ip().is_loopback() {
        // The Host check guards loopback servers against DNS rebinding; on a public
        // address clients use real host names, and the bearer key is the guard.
        mcp_config = mcp_config.disable_allowed_hosts();
    }
    let mcp = StreamableHttpService::new(
        move || {
            let endpoints = mcp_kernel.endpoints();
            Ok(mcp::McpServer::with_endpoints(
                mcp::KernelSource(mcp_kernel.clone()),
                &endpoints,
            ))
        },
        Arc::new(LocalSessionManager::default()),
        mcp_config,
    );

    let authenticated = v1
        .route(
            "/v1/openapi.json",
            get(move || async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi.as_str().to_owned(),
                )
            }),
        )
        .merge(
            axum::Router::new()
                .nest_service("/mcp", mcp)
                .layer(middleware::from_fn(transport_errors_as_json)),
        )
        .layer(middleware::from_fn_with_state(kernel.clone(), require_key));

    let max_body = kernel.config().max_body_bytes;
    axum::Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route(oauth::RESOURCE_METADATA, get(oauth::resource_metadata))
        .route(oauth::SERVER_METADATA, get(oauth::server_metadata))
        .route(oauth::TOKEN, axum::routing::post(oauth::token))
        // Public, as a JWKS is: anyone may check the kernel's tokens.
        .route(
            "/.well-known/jwks.json",
            get(|axum::extract::State(kernel): axum::extract::State<Arc<Kernel>>| async move {
                axum::Json(kernel.jwks())
            }),
        )
        .route("/metrics", get(render_metrics).with_state(metrics.clone()))
        .merge(authenticated)
        .fallback(|| async { ApiError(Error::new(ErrorCode::NotFound, "no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError(Error::new(
                ErrorCode::MethodNotAllowed,
                "this route does not accept that method",
            ))
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(max_body, refuse_oversized))
        .layer(middleware::from_fn_with_state(metrics, metrics::track))
        .with_state(kernel)
}

/// Serves `app(kernel)` on `listener` until `shutdown` resolves, then lets requests
/// in flight finish and commits every queued write before returning.
pub async fn serve(
    kernel: Arc<Kernel>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(kernel.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    kernel.shutdown().await;
    result
}

async fn require_key(State(kernel): State<Arc<Kernel>>, mut request: Request, next: Next) -> Response {
    let header = request.headers().get(header::AUTHORIZATION);
    let token = match header {
        None => Err(Error::unauthenticated(
            "missing",
            "send the API key as Authorization: Bearer <key>",
        )),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| Error::unauthenticated("invalid", "the Authorization header must be Bearer <key>")),
    };
    let source = source(&request);
    let authenticated = match token {
        Ok(token) => kernel.authenticate_from(token, source.clone()).await,
        Err(e) => Err(e),
    };
    match authenticated {
        Ok(caller) => {
            // Kept for the audit of a denial; formatted only if there is one.
            let (method, uri) = (request.method().clone(), request.uri().clone());
            request.extensions_mut().insert(caller.clone());
            let mut response = next.run(request).await;
            if let Some(error::Denial(why)) = response.extensions_mut().remove::<error::Denial>() {
                let what = format!("{method} {}", uri.path());
                let event = bbx_kernel::AuditEvent::new(bbx_kernel::AuditKind::Denied, Some(&caller), what, why);
                kernel.audit(event.from(source));
            }
            response
        }
        Err(e) => {
            let mut response = ApiError(e).into_response();
            oauth::challenge(&mut response, request.headers(), &kernel);
            response
        }
    }
}

/// The client's address, where the listener recorded it.
fn source(request: &Request) -> Option<String> {
    request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip().to_string())
}

/// rmcp answers transport problems (a wrong `Accept`, an unknown protocol version,
/// GET on a stateless endpoint) in plain text; give them the one error shape.
async fn transport_errors_as_json(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        406 => ErrorCode::NotAcceptable,
        413 => ErrorCode::PayloadTooLarge,
        415 => ErrorCode::UnsupportedMediaType,
        422 => ErrorCode::InvalidArgument,
        503 => ErrorCode::Unavailable,
        400..=499 => ErrorCode::MalformedRequest,
        _ => ErrorCode::Internal,
    };
    let body = axum::body::to_bytes(response.into_body(), 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("MCP transport error").to_owned(),
        text => text.to_owned(),
    };
    ApiError(Error::new(code, message)).into_response()
}

/// Refuses with 413 from the headers alone when the declared body is over the limit;
/// bodies of unknown length are cut off at the limit while being read
/// (`DefaultBodyLimit`).
///
/// A client that asked `Expect: 100-continue` never uploads the body. One that did
/// not is already sending it, and a server that answers and closes mid-upload makes
/// the client's write fail before it reads the answer (a broken pipe instead of the
/// 413), so the body is read and thrown away first, up to [`DRAIN_LIMIT_BYTES`] and
/// [`DRAIN_TIME_LIMIT`]; past those the connection is closed regardless.
async fn refuse_oversized(State(max_body): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > max_body as u64 => {
            let expects_continue = request
                .headers()
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !expects_continue && length <= DRAIN_LIMIT_BYTES {
                let drain = discard(request.into_body());
                let _ = tokio::time::timeout(DRAIN_TIME_LIMIT, drain).await;
            }
            ApiError(Error::new(
                ErrorCode::PayloadTooLarge,
                format!("the request body is {length} bytes; the limit is {max_body}"),
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// The most of a refused body that is read so that its sender sees the refusal.
const DRAIN_LIMIT_BYTES: u64 = 64 * 1024 * 1024;
/// How long a refused body is read before the connection is closed on it.
const DRAIN_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn discard(body: axum::body::Body) {
    use futures::StreamExt;
    let mut chunks = body.into_data_stream();
    while let Some(Ok(_)) = chunks.next().await {}
}

async fn readyz(State(kernel): State<Arc<Kernel>>) -> Response {
    match kernel.not_ready() {
        None => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Some(why) => ApiError(Error::unavailable(why)).into_response(),
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text
/// format for everything else.
async fn render_metrics(State(metrics): State<Arc<HttpMetrics>>, headers: axum::http::HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let openmetrics = metrics.render_openmetrics();
    let (content_type, body) = if wants_openmetrics {
        (metrics::OPENMETRICS_CONTENT_TYPE, openmetrics)
    } else {
        (
            metrics::PROMETHEUS_TEXT_CONTENT_TYPE,
            metrics::openmetrics_to_prometheus_text(&openmetrics),
        )
    };
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}
