//! OAuth for machine clients (an MCP client that speaks OAuth gets its token from
//! BBX itself): the protected resource's metadata (RFC 9728), the authorization
//! server's (RFC 8414), and a token endpoint with the client-credentials grant,
//! where the client is an API key (its id the client id, the whole key the secret).
//! Every 401 of the API points to the resource metadata (`WWW-Authenticate`).

use axum::Json;
use axum::extract::{Form, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bbx_kernel::Kernel;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

pub const RESOURCE_METADATA: &str = "/.well-known/oauth-protected-resource";
pub const SERVER_METADATA: &str = "/.well-known/oauth-authorization-server";
pub const TOKEN: &str = "/oauth/token";

/// The server's own URL, as the client reached it.
fn base(headers: &HeaderMap, kernel: &Kernel) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map_or_else(|| kernel.config().listen.to_string(), str::to_owned);
    format!("http://{host}")
}

pub async fn resource_metadata(State(kernel): State<Arc<Kernel>>, headers: HeaderMap) -> Json<Value> {
    let base = base(&headers, &kernel);
    let mut servers = vec![base.clone()];
    servers.extend(kernel.config().auth.oidc.iter().map(|issuer| issuer.issuer.clone()));
    Json(json!({
        "resource": base,
        "authorization_servers": servers,
        "bearer_methods_supported": ["header"],
        "resource_name": "BBX",
    }))
}

pub async fn server_metadata(State(kernel): State<Arc<Kernel>>, headers: HeaderMap) -> Json<Value> {
    let base = base(&headers, &kernel);
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}{TOKEN}"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": [],
    }))
}

#[derive(Deserialize)]
pub struct TokenRequest {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// An OAuth error (RFC 6749 §5.2).
fn refuse(status: StatusCode, error: &str, description: &str) -> Response {
    let body = Json(json!({ "error": error, "error_description": description }));
    let mut response = (status, body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"bbx\""),
        );
    }
    response
}

/// The client-credentials grant: the token carries the key's tenant, role and agent.
pub async fn token(State(kernel): State<Arc<Kernel>>, headers: HeaderMap, Form(form): Form<TokenRequest>) -> Response {
    if form.grant_type.as_deref() != Some("client_credentials") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only grant_type=client_credentials is served",
        );
    }
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic ")))
        .and_then(|encoded| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()
        })
        .and_then(|decoded| String::from_utf8(decoded).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(id, secret)| (id.to_owned(), secret.to_owned()))
        });
    let credentials = basic.or_else(|| form.client_id.zip(form.client_secret));
    let Some((client_id, secret)) = credentials else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "send the client's credentials",
        );
    };
    match kernel.token_for_key(&client_id, &secret) {
        Ok(issued) => Json(json!({
            "access_token": issued.token,
            "token_type": "Bearer",
            "expires_in": issued.claims.exp - issued.claims.iat,
        }))
        .into_response(),
        Err(e) => {
            let event =
                bbx_kernel::AuditEvent::new(bbx_kernel::AuditKind::AuthenticationFailed, None, TOKEN, e.message);
            kernel.audit(event);
            refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "the client id and secret do not name a valid key",
            )
        }
    }
}

/// Points a 401 of the API to the resource metadata.
pub fn challenge(response: &mut Response, headers: &HeaderMap, kernel: &Kernel) {
    let value = format!(
        "Bearer resource_metadata=\"{}{RESOURCE_METADATA}\"",
        base(headers, kernel)
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
}
