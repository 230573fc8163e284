//! `tool.http`: one HTTP request, guarded against server-side request forgery.
//!
//! Every address the request connects to passes the agent's [`AddressPolicy`]:
//! names are resolved by a resolver that drops refused addresses (so a name that
//! resolves to 169.254.169.254, or is rebound to it later, is refused), address
//! literals are checked before the request, redirects are checked hop by hop, and
//! proxies from the environment are ignored. The op's idempotency key goes out as
//! `Idempotency-Key`, so a server that honours it applies a retried call once.
//!
//! A header's value may name a secret (`{"$secret": "github_token"}`): its value
//! is put in only now, only if the secret is bound to the URL's host, redirects
//! are then not followed (they could lead to another host), and the response
//! has every occurrence of the value replaced before anyone sees it.

use crate::net::{AddressPolicy, not_allowed};
use crate::{Context, SecretSource};
use bbx_core::{Error, ErrorCode, Result};
use parking_lot::Mutex;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Default cap on a response body.
const DEFAULT_RESPONSE_BYTES: u64 = 1 << 20;
/// Most a response body may be capped at.
const MAX_RESPONSE_BYTES: u64 = 64 << 20;
/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCall {
    #[serde(default = "get")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderArg>,
    /// A string is sent as is; any other JSON value is sent as JSON.
    #[serde(default)]
    pub body: Option<Value>,
    /// Time allowed for the request (the op's own timeout still applies).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Most bytes of the response body kept (default 1 MiB); the rest is dropped and
    /// `truncated` says so.
    #[serde(default)]
    pub max_response_bytes: Option<u64>,
}

/// A header's value: text, or a secret of the agent's tenant named by
/// `{"$secret": NAME}`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum HeaderArg {
    Text(String),
    Secret(SecretRef),
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(rename = "$secret")]
    pub name: String,
}

/// What a revealed value is replaced with in a response.
const REDACTED: &str = "[redacted secret]";

fn get() -> String {
    "GET".into()
}

impl HttpCall {
    pub(crate) fn checked(self) -> Result<Self> {
        Method::from_bytes(self.method.as_bytes())
            .map_err(|_| Error::invalid_field("args.method", format!("{:?} is not an HTTP method", self.method)))?;
        let url = Url::parse(&self.url)
            .map_err(|e| Error::invalid_field("args.url", format!("{:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(Error::invalid_field(
                "args.url",
                "the URL must be http:// or https:// with a host",
            ));
        }
        for (name, value) in &self.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::invalid_field("args.headers", format!("{name:?} is not a header name")))?;
            let valid = match value {
                HeaderArg::Text(text) => reqwest::header::HeaderValue::from_str(text).is_ok(),
                HeaderArg::Secret(secret) => bbx_core::validate::name("$secret", &secret.name).is_ok(),
            };
            if !valid {
                return Err(Error::invalid_field(
                    "args.headers",
                    format!("the value of {name} is not valid"),
                ));
            }
        }
        if self
            .max_response_bytes
            .is_some_and(|m| m == 0 || m > MAX_RESPONSE_BYTES)
        {
            return Err(Error::invalid_field(
                "args.max_response_bytes",
                format!("max_response_bytes must be 1 to {MAX_RESPONSE_BYTES}"),
            ));
        }
        if self.timeout_ms == Some(0) {
            return Err(Error::invalid_field("args.timeout_ms", "timeout_ms must be at least 1"));
        }
        Ok(self)
    }
}

/// One client per address policy: a client's resolver and redirect rule carry the
/// policy, and connections are pooled per client.
#[derive(Default)]
pub(crate) struct Clients {
    /// By policy, and whether they follow redirects.
    by_policy: Mutex<HashMap<(AddressPolicy, bool), reqwest::Client>>,
}

impl Clients {
    pub(crate) fn client(&self, policy: &AddressPolicy) -> Result<reqwest::Client> {
        self.client_for(policy, true)
    }

    fn client_for(&self, policy: &AddressPolicy, follow_redirects: bool) -> Result<reqwest::Client> {
        let key = (policy.clone(), follow_redirects);
        if let Some(client) = self.by_policy.lock().get(&key) {
            return Ok(client.clone());
        }
        let redirects = policy.clone();
        let client = reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if !follow_redirects {
                    return attempt.stop();
                }
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match literal_ip(attempt.url()) {
                    Some(ip) if !redirects.permits(ip) => attempt.error(Refused(ip)),
                    _ => attempt.follow(),
                }
            }))
            .build()
            .map_err(|e| Error::internal(format!("cannot build an HTTP client: {e}")))?;
        self.by_policy.lock().insert(key, client.clone());
        Ok(client)
    }

    pub(crate) async fn run(
        &self,
        call: &HttpCall,
        ctx: &Context,
        secrets: Option<&dyn SecretSource>,
    ) -> Result<Value> {
        let policy = AddressPolicy::new(&ctx.settings)?;
        let url = Url::parse(&call.url).map_err(|e| Error::invalid_field("args.url", e.to_string()))?;
        let host = url.host_str().unwrap_or_default().to_owned();
        check_literal(&policy, &url)?;
        let method = Method::from_bytes(call.method.as_bytes())
            .map_err(|_| Error::invalid_field("args.method", "not an HTTP method"))?;
        let mut headers = reqwest::header::HeaderMap::new();
        let mut revealed = Vec::new();
        for (name, value) in &call.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::invalid_field("args.headers", format!("{name:?} is not a header name")))?;
            let value = match value {
                HeaderArg::Text(text) => reqwest::header::HeaderValue::from_str(text),
                HeaderArg::Secret(secret) => {
                    let source = secrets
                        .ok_or_else(|| Error::new(ErrorCode::FailedPrecondition, "this kernel keeps no secrets"))?;
                    let value = source.reveal(&ctx.tenant, &secret.name, &host)?;
                    let mut header = reqwest::header::HeaderValue::from_str(&value);
                    if let Ok(header) = &mut header {
                        header.set_sensitive(true);
                    }
                    revealed.push(value);
                    header
                }
            }
            .map_err(|_| Error::invalid_field("args.headers", format!("the value of {name} is not valid")))?;
            headers.insert(name, value);
        }
        if !revealed.is_empty() {
            // The value goes to the bound host only: not to another origin behind it
            // (a Host header of the agent's choosing), nor in clear text off this machine.
            if headers.contains_key(reqwest::header::HOST) {
                return Err(Error::permission_denied(
                    "a request that carries a secret may not set its Host header",
                ));
            }
            let loopback = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
                || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
                || url.host_str() == Some("localhost");
            if url.scheme() != "https" && !loopback {
                return Err(Error::permission_denied(
                    "a secret is sent over https only (or to this machine)",
                ));
            }
        }
        let mut request = self
            .client_for(&policy, revealed.is_empty())?
            .request(method, url)
            .headers(headers);
        if let Some(key) = &ctx.idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        request = match &call.body {
            None | Some(Value::Null) => request,
            Some(Value::String(text)) => request.body(text.clone()),
            Some(other) => request.json(other),
        };
        if let Some(ms) = call.timeout_ms {
            request = request.timeout(Duration::from_millis(ms));
        }
        let mut response = request.send().await.map_err(|e| request_error(&host, &e))?;
        let status = response.status().as_u16();
        let headers: BTreeMap<String, String> = response
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let cap = call.max_response_bytes.unwrap_or(DEFAULT_RESPONSE_BYTES) as usize;
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = response.chunk().await.map_err(|e| request_error(&host, &e))? {
            let room = cap - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let is_json = headers
            .get("content-type")
            .is_some_and(|t| t.starts_with("application/json") || t.contains("+json"));
        let mut out = json!({ "status": status, "headers": headers, "truncated": truncated });
        match (is_json && !truncated)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten()
        {
            Some(parsed) => out["json"] = parsed,
            None => out["body"] = Value::String(String::from_utf8_lossy(&body).into_owned()),
        }
        redact(&mut out, &revealed);
        Ok(out)
    }
}

/// Replaces every occurrence of each of `secrets` in the strings of `value`.
fn redact(value: &mut Value, secrets: &[String]) {
    match value {
        Value::String(text) => {
            for secret in secrets {
                if text.contains(secret.as_str()) {
                    *text = text.replace(secret.as_str(), REDACTED);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| redact(item, secrets)),
        Value::Object(fields) => fields.values_mut().for_each(|field| redact(field, secrets)),
        _ => {}
    }
}

/// Refuses a URL whose host is an address the policy does not permit. Names are
/// checked by the guarded resolver, but an address literal never reaches a
/// resolver, so every request through a guarded client checks this first.
pub(crate) fn check_literal(policy: &AddressPolicy, url: &Url) -> Result<()> {
    match literal_ip(url) {
        Some(ip) => policy.check(url.host_str().unwrap_or_default(), ip),
        None => Ok(()),
    }
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// A connection refused by the address policy, carried through reqwest's errors.
#[derive(Debug)]
struct Refused(IpAddr);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "address {} is not allowed", self.0)
    }
}

impl std::error::Error for Refused {}

/// Resolves names and keeps only the addresses the policy permits; if none is
/// left, resolution fails with [`Refused`].
struct GuardedResolver {
    policy: AddressPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let permitted: Vec<SocketAddr> = resolved.iter().copied().filter(|a| policy.permits(a.ip())).collect();
            match (permitted.is_empty(), resolved.first()) {
                (true, Some(first)) => Err(Box::new(Refused(first.ip())) as Box<dyn std::error::Error + Send + Sync>),
                _ => Ok(Box::new(permitted.into_iter()) as Addrs),
            }
        })
    }
}

/// What a failed request becomes: a refused address, a timeout, or the server
/// being unreachable (transient, so the ring may retry it).
fn request_error(host: &str, error: &reqwest::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(Refused(ip)) = e.downcast_ref::<Refused>() {
            return not_allowed(host, *ip);
        }
        source = e.source();
    }
    if error.is_timeout() {
        return Error::new(ErrorCode::Timeout, format!("the request to {host} timed out"));
    }
    Error::unavailable(format!("the request to {host} failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(value: Value) -> Result<HttpCall> {
        serde_json::from_value::<HttpCall>(value)
            .map_err(|e| Error::invalid_field("args", e.to_string()))
            .and_then(HttpCall::checked)
    }

    #[test]
    fn calls_are_checked_before_they_run() {
        assert!(call(json!({"url": "http://example.com/x"})).is_ok());
        assert!(call(json!({"url": "file:///etc/passwd"})).is_err());
        assert!(call(json!({"url": "not a url"})).is_err());
        assert!(call(json!({"method": "G ET", "url": "http://a"})).is_err());
        assert!(call(json!({"url": "http://a", "headers": {"bad name": "x"}})).is_err());
        assert!(call(json!({"url": "http://a", "max_response_bytes": 0})).is_err());
        assert!(call(json!({"url": "http://a", "extra": 1})).is_err());
    }
}
