//! Rust client of a running BBX kernel's HTTP API.
//!
//! [`Client`] speaks `/v1` with an API key and implements [`bbx_core::AgentApi`], so
//! anything written against that trait (the MCP server in `bbx mcp`, tests) runs
//! unchanged against a remote kernel. Errors come back as the kernel's own
//! [`bbx_core::Error`]; a kernel that does not answer at all becomes an
//! `unavailable` error that names the URL.
//!
//! A client on the kernel's machine can also open a [`ShmClient`]: a shared-memory
//! ring for ops, much faster than HTTP for many small ops.

mod shm;

pub use shm::{ShmClient, ShmCompletion};

mod sse;

use bbx_core::api::prelude::*;
use bbx_core::model::{
    Agent, AgentPage, ApiKeyInfo, CreateAgent, CreateApiKey, CreatedApiKey, DeleteState, EndpointInfo, ListAgents,
    ListState, SetState, StateEntry, StatePage, Status,
};
use bbx_core::op::{
    BreakerInfo, OpInfo, OpenShm, ResetBreakers, Resolution, ResolveOp, RingStats, ShmSession, SubmitBatch, Submitted,
    WalStatus,
};
use bbx_core::quota::{CgroupStatus, GpuStatus, Node, QuotaInfo, QuotaLimits};
use bbx_core::{AgentId, Error, ErrorBody, ErrorCode, KeyId, OpId, Result, validate};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// A client of one kernel. Cheap to clone: clones share one connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    bearer: String,
    /// The kernel's endpoints as last listed: a call looks its route up here,
    /// and lists them again only for a name it does not find.
    endpoints: std::sync::Arc<std::sync::RwLock<std::sync::Arc<Vec<EndpointInfo>>>>,
}

impl Client {
    /// A client of the kernel at `base_url` (e.g. `http://127.0.0.1:7878`).
    pub fn new(base_url: &str, api_key: &str) -> Result<Self> {
        let base = Url::parse(base_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .ok_or_else(|| Error::invalid_field("url", format!("{base_url:?} is not an http(s) URL")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            bearer: format!("Bearer {}", api_key.trim()),
            endpoints: Default::default(),
        })
    }

    /// `/segment/segment/...`, each segment percent-encoded (so a state key `a/b`
    /// stays one segment).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http URLs have paths")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn call<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T> {
        let response = self.send(request).await?;
        response
            .json()
            .await
            .map_err(|e| Error::internal(format!("the kernel's answer was not understood: {e}")))
    }

    async fn call_empty(&self, request: reqwest::RequestBuilder) -> Result<()> {
        self.send(request).await.map(drop)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .send()
            .await
            .map_err(|e| {
                let reason = if e.is_connect() {
                    "nothing accepts connections there"
                } else if e.is_timeout() {
                    "it timed out"
                } else {
                    "the connection failed"
                };
                Error::unavailable(format!(
                    "no BBX kernel answers at {}: {reason} ({})",
                    self.base,
                    root_cause(&e)
                ))
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(parsed) => parsed.error,
            Err(_) => Error::new(
                if status == StatusCode::NOT_FOUND {
                    ErrorCode::NotFound
                } else {
                    ErrorCode::Internal
                },
                format!(
                    "{} answered {status} without a BBX error body; is it a BBX kernel?",
                    self.base
                ),
            ),
        })
    }

    /// A state key's URL: the key must be valid first, since an empty key would
    /// address the listing route instead of a key.
    fn state_url_segments(agent: AgentId, key: &str) -> Result<[String; 5]> {
        validate::state_key(key)?;
        Ok([
            "v1".into(),
            "agents".into(),
            agent.to_string(),
            "state".into(),
            key.to_owned(),
        ])
    }

    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(segments))
    }

    fn with_query<Q: Serialize>(&self, method: Method, segments: &[&str], query: &Q) -> reqwest::RequestBuilder {
        self.request(method, segments).query(query)
    }

    pub async fn create_key(&self, req: &CreateApiKey) -> Result<CreatedApiKey> {
        self.call(self.request(Method::POST, &["v1", "keys"]).json(req)).await
    }

    pub async fn list_keys(&self) -> Result<Vec<ApiKeyInfo>> {
        self.call(self.request(Method::GET, &["v1", "keys"])).await
    }

    pub async fn revoke_key(&self, id: KeyId) -> Result<ApiKeyInfo> {
        self.call(self.request(Method::DELETE, &["v1", "keys", &id.to_string()]))
            .await
    }

    /// Opens a shared-memory session with the kernel, which must run on this
    /// machine as this user; its ops run as this client's key.
    pub async fn open_shm(&self, queue_bytes: Option<u64>) -> Result<ShmClient> {
        let session: ShmSession = self
            .call(
                self.request(Method::POST, &["v1", "ring", "shm"])
                    .json(&OpenShm { queue_bytes }),
            )
            .await?;
        ShmClient::attach(std::path::Path::new(&session.path))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

impl AgentsApi for Client {
    async fn create_agent(&self, req: CreateAgent) -> Result<Agent> {
        self.call(self.request(Method::POST, &["v1", "agents"]).json(&req))
            .await
    }
    async fn list_agents(&self, req: ListAgents) -> Result<AgentPage> {
        self.call(self.with_query(Method::GET, &["v1", "agents"], &req)).await
    }
    async fn get_agent(&self, id: AgentId) -> Result<Agent> {
        self.call(self.request(Method::GET, &["v1", "agents", &id.to_string()]))
            .await
    }
    async fn delete_agent(&self, id: AgentId) -> Result<()> {
        self.call_empty(self.request(Method::DELETE, &["v1", "agents", &id.to_string()]))
            .await
    }
    async fn state_get(&self, agent: AgentId, key: String) -> Result<StateEntry> {
        let segments = Self::state_url_segments(agent, &key)?;
        self.call(self.request(Method::GET, &segments.each_ref().map(String::as_str)))
            .await
    }
    async fn state_set(&self, agent: AgentId, key: String, req: SetState) -> Result<StateEntry> {
        let segments = Self::state_url_segments(agent, &key)?;
        self.call(
            self.request(Method::PUT, &segments.each_ref().map(String::as_str))
                .json(&req),
        )
        .await
    }
    async fn state_delete(&self, agent: AgentId, key: String, if_version: Option<u64>) -> Result<()> {
        let segments = Self::state_url_segments(agent, &key)?;
        let query = DeleteState { if_version };
        self.call_empty(self.with_query(Method::DELETE, &segments.each_ref().map(String::as_str), &query))
            .await
    }
    async fn state_list(&self, agent: AgentId, req: ListState) -> Result<StatePage> {
        self.call(self.with_query(Method::GET, &["v1", "agents", &agent.to_string(), "state"], &req))
            .await
    }
    async fn status(&self) -> Result<Status> {
        self.call(self.request(Method::GET, &["v1", "status"])).await
    }
}

impl EndpointsApi for Client {
    async fn endpoints(&self) -> Result<Vec<EndpointInfo>> {
        self.call(self.request(Method::GET, &["v1", "endpoints"])).await
    }

    /// Looks the endpoint up, fills its path's `{field}` segments from `input`
    /// and sends the rest as its JSON body.
    async fn call_endpoint(&self, name: &str, input: Value) -> Result<Value> {
        let (endpoint, segments, rest) = self.route(name, input).await?;
        let method = Method::from_bytes(endpoint.method.as_bytes())
            .map_err(|_| Error::internal(format!("endpoint {name} has an unknown method")))?;
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let mut request = self.request(method, &segments);
        if !rest.is_empty() {
            request = request.json(&rest);
        }
        self.call(request).await
    }
}

impl Client {
    /// The endpoint `name` (listed again only when it is not known), the path's
    /// segments with its `{field}`s filled from `input`, and the rest of `input`.
    async fn route(
        &self,
        name: &str,
        input: Value,
    ) -> Result<(EndpointInfo, Vec<String>, serde_json::Map<String, Value>)> {
        let known = self.endpoints.read().map(|e| e.clone()).unwrap_or_default();
        let endpoints = match known.iter().any(|e| e.name == name) {
            true => known,
            false => {
                let listed = std::sync::Arc::new(self.endpoints().await?);
                if let Ok(mut cached) = self.endpoints.write() {
                    *cached = listed.clone();
                }
                listed
            }
        };
        let endpoint = endpoints
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::not_found("endpoint", name))?
            .clone();
        let Value::Object(mut rest) = input else {
            return Err(Error::invalid_field("input", "an endpoint's input is a JSON object"));
        };
        let mut segments = Vec::new();
        for segment in endpoint.path.split('/').filter(|s| !s.is_empty()) {
            match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(field) => match rest.remove(field) {
                    Some(Value::String(value)) => segments.push(value),
                    Some(other) => segments.push(other.to_string()),
                    None => return Err(Error::invalid_field(field, format!("{name} needs {field}"))),
                },
                None => segments.push(segment.to_owned()),
            }
        }
        Ok((endpoint, segments, rest))
    }

    /// Opens a streaming endpoint (`bus.stream`, say): the input's path fields
    /// fill the path, the rest goes in the query string; its events come as they
    /// are sent.
    pub async fn stream_endpoint(&self, name: &str, input: Value) -> Result<EventStream> {
        let (_, segments, rest) = self.route(name, input).await?;
        let query: Vec<(String, String)> = rest
            .into_iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(field, value)| match value {
                Value::String(text) => (field, text),
                other => (field, other.to_string()),
            })
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let response = self.send(self.with_query(Method::GET, &segments, &query)).await?;
        Ok(EventStream {
            response,
            events: sse::Events::default(),
        })
    }
}

/// The events of a streaming endpoint (server-sent events), as they come.
pub struct EventStream {
    response: reqwest::Response,
    events: sse::Events,
}

impl EventStream {
    /// The next event's data; none once the stream ends. An event that carries
    /// only `{"error": ...}` is the stream's failure, returned as the error.
    pub async fn next(&mut self) -> Option<Result<Value>> {
        loop {
            if let Some(data) = self.events.next() {
                return Some(event(&data));
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.events.push(&bytes),
                Ok(None) => return None,
                Err(e) => return Some(Err(Error::unavailable(format!("the event stream broke: {e}")))),
            }
        }
    }
}

/// An event's data: JSON, or the stream's error.
fn event(data: &str) -> Result<Value> {
    let value: Value = serde_json::from_str(data).map_err(|e| Error::internal(format!("an event is not JSON: {e}")))?;
    match value.as_object().filter(|o| o.len() == 1).and_then(|o| o.get("error")) {
        Some(error) => Err(serde_json::from_value(error.clone())
            .unwrap_or_else(|_| Error::internal(format!("the stream failed: {error}")))),
        None => Ok(value),
    }
}

impl RingApi for Client {
    async fn submit_ops(&self, batch: SubmitBatch) -> Result<Submitted> {
        self.call(self.request(Method::POST, &["v1", "ops"]).json(&batch)).await
    }
    async fn get_op(&self, id: OpId) -> Result<OpInfo> {
        self.call(self.request(Method::GET, &["v1", "ops", &id.to_string()]))
            .await
    }
    async fn wait_op(&self, id: OpId, timeout: Duration) -> Result<OpInfo> {
        let query = [("timeout_ms", timeout.as_millis() as u64)];
        self.call(self.with_query(Method::GET, &["v1", "ops", &id.to_string(), "wait"], &query))
            .await
    }
    async fn cancel_op(&self, id: OpId) -> Result<OpInfo> {
        self.call(self.request(Method::POST, &["v1", "ops", &id.to_string(), "cancel"]))
            .await
    }
    async fn ring_stats(&self) -> Result<RingStats> {
        self.call(self.request(Method::GET, &["v1", "ring", "stats"])).await
    }
    async fn resolve_op(&self, id: OpId, resolution: Resolution) -> Result<OpInfo> {
        let id = id.to_string();
        self.call(
            self.request(Method::POST, &["v1", "ops", &id, "resolve"])
                .json(&ResolveOp { resolution }),
        )
        .await
    }
    async fn wal_status(&self) -> Result<WalStatus> {
        self.call(self.request(Method::GET, &["v1", "ring", "wal"])).await
    }
    async fn breakers(&self) -> Result<Vec<BreakerInfo>> {
        self.call(self.request(Method::GET, &["v1", "ring", "breakers"])).await
    }
    async fn reset_breakers(&self, req: ResetBreakers) -> Result<Vec<BreakerInfo>> {
        let reset = self.request(Method::POST, &["v1", "ring", "breakers", "reset"]);
        self.call(reset.json(&req)).await
    }
}

impl QuotaApi for Client {
    async fn quota(&self, node: Node) -> Result<QuotaInfo> {
        let segments = quota_path(&node);
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        self.call(self.request(Method::GET, &segments)).await
    }
    async fn set_quota(&self, node: Node, update: QuotaLimits) -> Result<QuotaInfo> {
        let segments = quota_path(&node);
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        self.call(self.request(Method::PATCH, &segments).json(&update)).await
    }
    async fn list_quotas(&self) -> Result<Vec<QuotaInfo>> {
        self.call(self.request(Method::GET, &["v1", "quotas"])).await
    }
    async fn cgroup_status(&self) -> Result<CgroupStatus> {
        self.call(self.request(Method::GET, &["v1", "quotas", "cgroups"])).await
    }
    async fn gpu_status(&self) -> Result<GpuStatus> {
        self.call(self.request(Method::GET, &["v1", "quotas", "gpus"])).await
    }
}

/// A quota node's URL: `/v1/quotas/tenants/NAME`, `.../groups/TENANT/NAME` or
/// `.../agents/ID`.
fn quota_path(node: &Node) -> Vec<String> {
    let mut segments = vec!["v1".to_owned(), "quotas".to_owned()];
    match node {
        Node::Tenant(name) => segments.extend(["tenants".to_owned(), name.clone()]),
        Node::Group { tenant, name } => segments.extend(["groups".to_owned(), tenant.clone(), name.clone()]),
        Node::Agent(id) => segments.extend(["agents".to_owned(), id.to_string()]),
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_slashes_stay_one_segment() {
        let client = Client::new("http://127.0.0.1:7878/", "k").unwrap();
        let url = client.url(&["v1", "agents", "x", "state", "notes/a b?"]);
        assert_eq!(url.path(), "/v1/agents/x/state/notes%2Fa%20b%3F");
    }

    #[test]
    fn bad_urls_are_refused_up_front() {
        for bad in ["", "localhost:7878", "ftp://x", "http://"] {
            assert_eq!(
                Client::new(bad, "k").unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn no_kernel_is_one_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(&format!("http://127.0.0.1:{port}"), "k").unwrap();
        let err = client.status().await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(err.message.contains(&format!("127.0.0.1:{port}")), "{}", err.message);
    }
}
