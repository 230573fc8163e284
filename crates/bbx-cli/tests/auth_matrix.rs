//! Every route of the OpenAPI document × every role × an object of the caller's
//! own tenant and of another: the status the rules prescribe. A caller never gets
//! 401 with a good credential; an action its role forbids is 403; another
//! tenant's object is 404 (and a tenant the caller names itself, 403); anything
//! else reaches the handler. A route the document has and this table does not is
//! a failure, so a new route cannot go unchecked.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::Kernel;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Needs {
    /// Any authenticated caller.
    Any,
    Read,
    Act,
    Operate,
    ManageKeys,
    Admin,
}

/// What a route's path or body names, and so what another tenant's is answered.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// Nothing of a tenant.
    Nothing,
    /// An agent (or its op, its quota): another tenant's is missing (404).
    Object,
    /// A tenant the caller names itself: another is forbidden (403).
    Tenant,
    /// Listing agents: a key confined to one agent may not.
    AgentList,
}

fn rule(method: &str, path: &str) -> Option<(Needs, Target)> {
    use Needs::*;
    use Target::*;
    Some(match (method, path) {
        ("GET", "/v1/agents") => (Read, AgentList),
        ("POST", "/v1/agents") => (Operate, Tenant),
        ("GET", "/v1/agents/{id}") => (Read, Object),
        ("DELETE", "/v1/agents/{id}") => (Operate, Object),
        ("GET", "/v1/agents/{id}/state" | "/v1/agents/{id}/state/{key}") => (Read, Object),
        ("PUT" | "DELETE", "/v1/agents/{id}/state/{key}") => (Act, Object),
        ("POST", "/v1/auth/audit") => (ManageKeys, Nothing),
        ("POST", "/v1/auth/keys" | "/v1/keys" | "/v1/auth/tokens") => (ManageKeys, Tenant),
        ("PUT" | "DELETE", "/v1/auth/policies/{name}") => (Admin, Nothing),
        ("POST", "/v1/auth/revoke") => (ManageKeys, Object),
        ("GET", "/v1/auth/rules") => (Read, Nothing),
        ("POST", "/v1/auth/verify") => (Any, Nothing),
        ("GET", "/v1/endpoints" | "/v1/status" | "/v1/ring/stats" | "/v1/ring/breakers" | "/v1/quotas") => {
            (Any, Nothing)
        }
        ("GET", "/v1/keys") => (ManageKeys, Nothing),
        ("POST", "/v1/goals/runs" | "/v1/goal-engine/execute" | "/v1/goals/plan" | "/v1/goal-engine/plan") => {
            (Act, Object)
        }
        (
            "GET",
            "/v1/goals/runs" | "/v1/goal-engine/list" | "/v1/goals/runs/{run}" | "/v1/goal-engine/status/{run}",
        ) => (Read, Object),
        (
            "POST",
            "/v1/goals/runs/{run}/cancel"
            | "/v1/goals/runs/{run}/pause"
            | "/v1/goals/runs/{run}/resume"
            | "/v1/goals/runs/{run}/signals",
        ) => (Act, Object),
        // Approving a step is an operator's, whatever else the credential may do.
        ("POST", "/v1/goals/runs/{run}/steps/{step}/approve") => (Operate, Object),
        ("POST", "/v1/goals/validate") | ("GET", "/v1/goals/schema") => (Any, Nothing),
        ("GET", "/v1/kinds") => (Read, Nothing),
        (
            "POST",
            "/v1/snapshots"
            | "/v1/distributed-snapshots"
            | "/v1/snapshots/{snapshot}/restore"
            | "/v1/distributed-snapshots/{snapshot}/restore"
            | "/v1/snapshots/pitr"
            | "/v1/distributed-snapshots/pitr",
        )
        | ("DELETE", "/v1/snapshots/{snapshot}") => (Act, Object),
        (
            "GET",
            "/v1/snapshots"
            | "/v1/distributed-snapshots"
            | "/v1/snapshots/{snapshot}"
            | "/v1/snapshots/{snapshot}/diff",
        )
        | ("POST", "/v1/snapshots/{snapshot}/verify") => (Read, Object),
        ("POST", "/v1/snapshots/{snapshot}/fork") => (Operate, Object),
        ("GET", "/v1/snapshots/stats" | "/v1/snapshots/replicas") | ("POST", "/v1/snapshots/gc") => (Admin, Nothing),
        ("DELETE", "/v1/keys/{id}") | ("POST", "/v1/keys/{key_id}/rotate") => (ManageKeys, Object),
        ("POST", "/v1/ops") => (Act, Object),
        ("GET", "/v1/ops/events") => (Read, Nothing),
        ("GET", "/v1/ops/{id}" | "/v1/ops/{id}/wait") => (Read, Object),
        (
            "POST",
            "/v1/ops/{id}/cancel"
            | "/v1/ops/{id}/resolve"
            | "/v1/ops/{op_id}/approve"
            | "/v1/ops/{op_id}/deny"
            | "/v1/flow/ops/{op_id}/approve"
            | "/v1/flow/ops/{op_id}/deny",
        ) => (Operate, Object),
        ("GET", "/v1/quotas/cgroups" | "/v1/quotas/gpus" | "/v1/ring/wal") => (Admin, Nothing),
        ("POST", "/v1/ring/breakers/reset") => (Admin, Nothing),
        ("GET", "/v1/quotas/groups/{tenant}/{name}") => (Read, Tenant),
        ("PATCH", "/v1/quotas/groups/{tenant}/{name}") => (Operate, Tenant),
        ("GET", "/v1/quotas/{kind}/{name}") => (Read, Object),
        ("PATCH", "/v1/quotas/{kind}/{name}") => (Operate, Object),
        ("POST", "/v1/ring/shm") => (Act, Nothing),
        ("GET", "/v1/secrets") | ("PUT" | "DELETE", "/v1/secrets/{name}") | ("POST", "/v1/secrets/{name}/bind") => {
            (Operate, Tenant)
        }
        ("GET", "/v1/flow/policies" | "/v1/enhanced-flow/policies" | "/v1/flow/stats" | "/v1/enhanced-flow/stats") => {
            (Read, Nothing)
        }
        ("GET", "/v1/flow/anomalies" | "/v1/enhanced-flow/anomalies") => (Read, Nothing),
        ("GET", "/v1/flow/agents/{agent}/grants") => (Read, Object),
        ("POST", "/v1/flow/agents/{agent}/grants") | ("DELETE", "/v1/flow/agents/{agent}/grants/{grantee}") => {
            (Act, Object)
        }
        ("GET", "/v1/flow/ops/{op_id}/explain") => (Read, Object),
        ("GET", "/v1/flow/audit") => (ManageKeys, Nothing),
        ("PUT" | "DELETE", "/v1/flow/policies/{name}") => (Operate, Tenant),
        ("POST", "/v1/flow/test") => (Operate, Object),
        (
            "POST",
            "/v1/flow/agents/{agent}/quarantine"
            | "/v1/flow/agents/{agent}/release"
            | "/v1/flow/agents/{agent}/declassify",
        ) => (Operate, Object),
        (
            "POST",
            "/v1/bus/topics/{topic}/messages"
            | "/v1/message-bus/publish"
            | "/v1/bus/topics/{topic}/groups/{group}/fetch"
            | "/v1/bus/topics/{topic}/groups/{group}/ack"
            | "/v1/bus/topics/{topic}/groups/{group}/nack"
            | "/v1/bus/topics/{topic}/groups/{group}/extend",
        ) => (Act, Tenant),
        (
            "GET",
            "/v1/bus/topics"
            | "/v1/bus/stats"
            | "/v1/message-bus/stats"
            | "/v1/bus/topics/{topic}/dlq"
            | "/v1/message-bus/dlq/{topic}",
        ) => (Read, Tenant),
        ("PUT" | "DELETE", "/v1/bus/routes/{name}") => (Act, Tenant),
        // A stream's input is its path and query: the tenant goes in the query.
        ("GET", "/v1/bus/topics/{topic}/groups/{group}/stream") => (Act, Tenant),
        ("POST", "/v1/bus/mailboxes/{to}" | "/v1/bus/mailboxes/{agent}/fetch") => (Act, Object),
        ("POST", "/v1/bus/topics/{topic}/request" | "/v1/bus/replies/{to}") => (Act, Tenant),
        ("GET", "/v1/bus/routes") => (Read, Tenant),
        (
            "POST",
            "/v1/agents/{agent}/memories"
            | "/v1/semantic-memory/{agent}/add"
            | "/v1/agents/{agent}/memories/forget"
            | "/v1/semantic-memory/{agent}/forget",
        )
        | ("DELETE", "/v1/agents/{agent}/memories/{id}") => (Act, Object),
        ("POST", "/v1/agents/{agent}/memories/search" | "/v1/semantic-memory/{agent}/search")
        | (
            "GET",
            "/v1/agents/{agent}/memories/stats"
            | "/v1/semantic-memory/{agent}/stats"
            | "/v1/agents/{agent}/memories/{id}",
        ) => (Read, Object),
        (
            "POST",
            "/v1/agents/{agent}/context"
            | "/v1/agents/{agent}/context/{id}/pin"
            | "/v1/agents/{agent}/context/{id}/demote",
        )
        | ("DELETE", "/v1/agents/{agent}/context/{id}") => (Act, Object),
        (
            "GET",
            "/v1/agents/{agent}/context"
            | "/v1/agents/{agent}/context/stats"
            | "/v1/agents/{agent}/context/{id}"
            | "/v1/agents/{agent}/context/{id}/score"
            | "/v1/enhanced-context/{agent}/stats"
            | "/v1/enhanced-context/{agent}/ml-score/{key}",
        )
        | (
            "POST",
            "/v1/agents/{agent}/context/assemble"
            | "/v1/agents/{agent}/context/search"
            | "/v1/agents/{agent}/context/prefetch"
            | "/v1/enhanced-context/{agent}/prefetch/{key}",
        ) => (Read, Object),
        ("PUT", "/v1/bus/topics/{topic}")
        | ("POST", "/v1/bus/topics/{topic}/dlq/replay")
        | ("DELETE", "/v1/bus/topics/{topic}/dlq") => (Operate, Tenant),
        _ => return None,
    })
}

const ROLES: [&str; 5] = ["admin", "tenant_admin", "operator", "agent", "reader"];

fn allows(role: &str, needs: Needs) -> bool {
    match needs {
        Needs::Any | Needs::Read => true,
        Needs::Act => role != "reader",
        Needs::Operate => !matches!(role, "agent" | "reader"),
        Needs::ManageKeys => matches!(role, "admin" | "tenant_admin"),
        Needs::Admin => role == "admin",
    }
}

/// What the rules prescribe: `Some(status)` for a refusal, `None` for a request
/// that reaches its handler.
fn prescribed(role: &str, other: bool, (needs, target): (Needs, Target)) -> Option<StatusCode> {
    if !allows(role, needs) {
        return Some(StatusCode::FORBIDDEN);
    }
    if role == "agent" && target == Target::AgentList {
        return Some(StatusCode::FORBIDDEN);
    }
    match (other && role != "admin", target) {
        (true, Target::Object) => Some(StatusCode::NOT_FOUND),
        (true, Target::Tenant) => Some(StatusCode::FORBIDDEN),
        _ => None,
    }
}

/// What one tenant holds for the requests: an agent with a state key, a done op,
/// and what each iteration may destroy (an agent, a key, a token, a secret).
struct Fixture {
    tenant: &'static str,
    agent: String,
    op: String,
    spare_agent: String,
    snapshot: String,
    key: String,
    token: String,
    /// A memory of `agent`.
    memory: String,
    /// A run of `agent` that waits for an approval (step `ok`) and a signal.
    run: String,
}

struct Api {
    http: reqwest::Client,
    base: String,
    admin: String,
}

impl Api {
    async fn send(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key)
            .timeout(std::time::Duration::from_secs(10));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let streaming = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.to_str().unwrap_or_default().starts_with("text/event-stream"));
        let body = if streaming {
            Value::Null
        } else {
            response.json().await.unwrap_or(Value::Null)
        };
        (status, body)
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, body) = self.send(method, path, &self.admin.clone(), Some(body)).await;
        assert!(status.is_success(), "{path}: {status} {body}");
        body
    }

    async fn fixture(&self, tenant: &'static str) -> Fixture {
        let agent = self
            .admin(Method::POST, "/v1/agents", json!({ "name": "a", "tenant": tenant }))
            .await;
        let agent = agent["id"].as_str().unwrap().to_owned();
        self.admin(
            Method::PUT,
            &format!("/v1/agents/{agent}/state/k"),
            json!({ "value": 1 }),
        )
        .await;
        let ops = json!({ "ops": [{ "agent": agent, "kind": "noop", "args": {} }], "wait_ms": 5000 });
        let submitted = self.admin(Method::POST, "/v1/ops", ops).await;
        let op = submitted["ops"][0]["op_id"].as_str().unwrap().to_owned();
        let spare = self
            .admin(Method::POST, "/v1/agents", json!({ "name": "spare", "tenant": tenant }))
            .await;
        let key = json!({ "name": "spare", "tenant": tenant, "role": "reader" });
        let key = self.admin(Method::POST, "/v1/keys", key).await;
        let token = json!({ "identity": "spare", "tenant": tenant, "role": "reader" });
        let token = self.admin(Method::POST, "/v1/auth/tokens", token).await;
        let secret = json!({ "value": "v", "tenant": tenant, "hosts": "api.example.com" });
        self.admin(Method::PUT, "/v1/secrets/s", secret).await;
        let message = json!({ "payload": 1, "tenant": tenant });
        self.admin(Method::POST, "/v1/bus/topics/t/messages", message).await;
        // With its vector given: the matrix needs no embedding model.
        let memory = self
            .admin(
                Method::POST,
                &format!("/v1/agents/{agent}/memories"),
                memory_body("a memory"),
            )
            .await;
        let workflow = json!({ "steps": {
            "ok": { "kind": "wait.approval" },
            "w": { "kind": "wait.signal", "args": { "name": "go" } },
        } });
        let run = self
            .admin(
                Method::POST,
                "/v1/goals/runs",
                json!({ "agent": agent, "workflow": workflow }),
            )
            .await;
        let item = json!({ "content": "a context item" });
        self.admin(Method::POST, &format!("/v1/agents/{agent}/context"), item)
            .await;
        let snapshot = self
            .admin(Method::POST, "/v1/snapshots", json!({ "agent": agent }))
            .await;
        Fixture {
            tenant,
            agent,
            op,
            spare_agent: spare["id"].as_str().unwrap().to_owned(),
            key: key["info"]["id"].as_str().unwrap().to_owned(),
            token: token["token"].as_str().unwrap().to_owned(),
            memory: memory["id"].as_str().unwrap().to_owned(),
            run: run["run_id"].as_str().unwrap().to_owned(),
            snapshot: snapshot["id"].as_str().unwrap().to_owned(),
        }
    }

    /// A credential of `role` in tenant acme (an agent's confined to `agent`).
    async fn credential(&self, role: &str, agent: &str) -> String {
        if role == "admin" {
            return self.admin.clone();
        }
        let mut req = json!({ "name": role, "tenant": "acme", "role": role });
        if role == "agent" {
            req["agent"] = json!(agent);
        }
        self.admin(Method::POST, "/v1/keys", req).await["key"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// A memory.add body whose vector is given, so no model need be installed.
fn memory_body(text: &str) -> Value {
    let mut vector = vec![0.0; 384];
    vector[text.len() % 384] = 1.0;
    json!({ "text": text, "vector": vector, "model": "all-minilm-l6-v2" })
}

/// The path with its fields filled from `f`, and a body the route accepts.
fn request(method: &str, path: &str, f: &Fixture) -> (String, Option<Value>) {
    let deleting_agent = method == "DELETE" && path == "/v1/agents/{id}";
    let filled = path
        .replace("{tenant}", f.tenant)
        .replace("{kind}", "agents")
        .replace("{key_id}", &f.key)
        // A context item's key is its id: the fixture's first item.
        .replace("{key}", if path.contains("context") { "1" } else { "k" })
        .replace("{op_id}", &f.op)
        // Quarantining the spare agent leaves the one the other requests use alone;
        // grants are the credential's own agent's to give.
        .replace(
            "{agent}",
            if path.contains("/grants")
                || path.contains("/mailboxes/")
                || path.contains("memor")
                || path.contains("context")
            {
                &f.agent
            } else {
                &f.spare_agent
            },
        )
        .replace("{grantee}", &f.spare_agent)
        .replace(
            "{to}",
            if path.starts_with("/v1/bus/replies/") {
                "x"
            } else {
                &f.agent
            },
        )
        .replace("{topic}", "t")
        .replace("{group}", "g")
        .replace("{run}", &f.run)
        .replace("{step}", "ok")
        .replace("{snapshot}", &f.snapshot);
    if method == "GET" && matches!(path, "/v1/snapshots" | "/v1/distributed-snapshots") {
        return (format!("{filled}?agent={}", f.agent), None);
    }
    if path == "/v1/snapshots/{snapshot}/diff" {
        return (format!("{filled}?to={}", f.snapshot), None);
    }
    if method == "GET" && matches!(path, "/v1/goals/runs" | "/v1/goal-engine/list") {
        return (format!("{filled}?agent={}", f.agent), None);
    }
    let filled = if path.contains("/memories/") {
        filled.replace("{id}", &f.memory)
    } else if path.contains("context") {
        // The fixture's first context item.
        filled.replace("{id}", "1")
    } else if path.starts_with("/v1/ops/") {
        filled.replace("{id}", &f.op)
    } else if path.starts_with("/v1/keys/") {
        filled.replace("{id}", &f.key)
    } else if path.starts_with("/v1/quotas/groups/") {
        filled.replace("{name}", "g")
    } else if path.starts_with("/v1/quotas/") {
        filled.replace("{name}", &f.agent)
    } else if path.starts_with("/v1/auth/policies/")
        || path.starts_with("/v1/flow/policies/")
        || path.starts_with("/v1/bus/routes/")
    {
        filled.replace("{name}", "p")
    } else if path.starts_with("/v1/secrets/") {
        filled.replace("{name}", "s")
    } else if deleting_agent {
        filled.replace("{id}", &f.spare_agent)
    } else {
        filled.replace("{id}", &f.agent)
    };
    if path.ends_with("/stream") {
        return (format!("{filled}?tenant={}", f.tenant), None);
    }
    if method == "DELETE" {
        return (
            filled,
            Some(json!({ "tenant": f.tenant })).filter(|_| {
                ["/v1/secrets/", "/v1/flow/policies/", "/v1/bus/"]
                    .iter()
                    .any(|p| path.starts_with(p))
            }),
        );
    }
    let body = match path {
        "/v1/agents" => json!({ "name": "m", "tenant": f.tenant }),
        "/v1/agents/{id}/state/{key}" => json!({ "value": 2 }),
        "/v1/auth/keys" | "/v1/keys" => json!({ "name": "m", "tenant": f.tenant, "role": "reader" }),
        "/v1/auth/tokens" => json!({ "identity": "m", "tenant": f.tenant, "role": "reader" }),
        "/v1/auth/policies/{name}" => {
            json!({ "source": "package bbx.authz.m\ndeny contains \"x\" if { input.principal.role == \"nobody\" }" })
        }
        "/v1/auth/revoke" => json!({ "token": f.token }),
        "/v1/auth/verify" => json!({ "token": f.token }),
        "/v1/ops" => json!({ "ops": [{ "agent": f.agent, "kind": "noop", "args": {} }] }),
        "/v1/ops/{id}/resolve" => json!({ "as": "failed" }),
        "/v1/ops/{op_id}/deny" | "/v1/flow/ops/{op_id}/deny" => json!({ "reason": "no" }),
        "/v1/ring/shm" => json!({}),
        "/v1/secrets" => json!({ "tenant": f.tenant }),
        "/v1/secrets/{name}" => json!({ "value": "v2", "tenant": f.tenant }),
        "/v1/secrets/{name}/bind" => json!({ "hosts": ["api.example.com"], "tenant": f.tenant }),
        "/v1/flow/policies/{name}" => json!({
            "tenant": f.tenant,
            "source": "package bbx.flow\ndecision := {\"action\": \"audit\", \"reason\": \"x\"} if { input.op.kind == \"none\" }",
        }),
        "/v1/flow/test" => json!({ "agent": f.agent, "kind": "noop", "args": {} }),
        "/v1/flow/agents/{agent}/quarantine" => json!({ "reason": "matrix" }),
        "/v1/flow/agents/{agent}/declassify" => json!({ "value": "x.example" }),
        "/v1/flow/agents/{agent}/grants" if method == "POST" => {
            json!({ "grantee": f.spare_agent, "prefix": "shared/" })
        }
        "/v1/bus/topics/{topic}/groups/{group}/ack"
        | "/v1/bus/topics/{topic}/groups/{group}/nack"
        | "/v1/bus/topics/{topic}/groups/{group}/extend" => json!({ "acks": ["x"], "tenant": f.tenant }),
        "/v1/bus/topics/{topic}/messages" => json!({ "payload": 2, "tenant": f.tenant }),
        "/v1/bus/routes/{name}" => json!({ "topic": "t", "agent": f.agent, "kind": "noop", "tenant": f.tenant }),
        "/v1/bus/mailboxes/{to}" => json!({ "payload": 1 }),
        "/v1/bus/mailboxes/{agent}/fetch" => json!({}),
        "/v1/bus/topics/{topic}/request" => json!({ "payload": 1, "timeout_ms": 1, "tenant": f.tenant }),
        "/v1/bus/replies/{to}" => json!({ "payload": 1, "tenant": f.tenant }),
        "/v1/message-bus/publish" => json!({ "topic": "t", "message": 2, "tenant": f.tenant }),
        "/v1/agents/{agent}/memories" | "/v1/semantic-memory/{agent}/add" => memory_body("another memory"),
        "/v1/agents/{agent}/memories/search" | "/v1/semantic-memory/{agent}/search" => {
            json!({ "query": "memory", "mode": "keyword" })
        }
        "/v1/agents/{agent}/memories/forget" | "/v1/semantic-memory/{agent}/forget" => {
            json!({ "strategy": "lru", "max": 100 })
        }
        "/v1/agents/{agent}/context" if method == "POST" => json!({ "content": "another item" }),
        "/v1/agents/{agent}/context/{id}/demote" => json!({ "tier": "cool" }),
        "/v1/agents/{agent}/context/assemble" => json!({ "budget": 1000 }),
        "/v1/agents/{agent}/context/search" => json!({ "query": "door" }),
        "/v1/agents/{agent}/context/prefetch" => json!({ "ids": [1] }),
        "/v1/goals/runs" | "/v1/goal-engine/execute" => {
            json!({ "agent": f.agent, "workflow": { "steps": { "a": { "kind": "noop" } } } })
        }
        "/v1/goals/validate" => json!({ "workflow": { "steps": { "a": { "kind": "noop" } } } }),
        "/v1/goals/plan" | "/v1/goal-engine/plan" => json!({ "agent": f.agent, "goal": "count", "dry_run": true }),
        "/v1/goals/runs/{run}/signals" => json!({ "name": "go", "payload": 1 }),
        "/v1/snapshots" | "/v1/distributed-snapshots" => json!({ "agent": f.agent }),
        "/v1/snapshots/pitr" | "/v1/distributed-snapshots/pitr" => {
            json!({ "agent": f.agent, "at": chrono::Utc::now().to_rfc3339() })
        }
        "/v1/snapshots/{snapshot}/fork" => json!({ "name": "forked" }),
        _ if path.starts_with("/v1/bus/") || path.starts_with("/v1/message-bus/") => json!({ "tenant": f.tenant }),
        _ => json!({}),
    };
    (filled, Some(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_every_role_own_and_other_tenant() {
    let kernel = Kernel::start();
    let api = Api {
        http: reqwest::Client::new(),
        base: kernel.url(),
        admin: kernel.key(),
    };
    let document = api.admin(Method::GET, "/v1/openapi.json", Value::Null).await;
    let mut routes = Vec::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    // Deletions last, so that what they remove is not what the others read.
    routes.sort_by_key(|(method, path)| (method == "DELETE", path.clone()));
    let unknown: Vec<String> = routes
        .iter()
        .filter(|(m, p)| rule(m, p).is_none())
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert!(unknown.is_empty(), "routes with no prescription here: {unknown:?}");

    let mut wrong = Vec::new();
    let mut checked = 0;
    for role in ROLES {
        for other in [false, true] {
            // Fresh objects each time: the requests delete and revoke some.
            let own = api.fixture("acme").await;
            let foreign = api.fixture("globex").await;
            let credential = api.credential(role, &own.agent).await;
            let fixture = if other { &foreign } else { &own };
            for (method, path) in &routes {
                let (filled, body) = request(method, path, fixture);
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let (status, answer) = api.send(method.clone(), &filled, &credential, body).await;
                let expected = prescribed(role, other, rule(method.as_str(), path).unwrap());
                let fits = match expected {
                    Some(refusal) => status == refusal,
                    None => !matches!(status.as_u16(), 401 | 403 | 404) && !status.is_server_error(),
                };
                if !fits {
                    let tenant = if other { "other" } else { "own" };
                    wrong.push(format!(
                        "{role} {tenant} {method} {path}: {status} (expected {expected:?}) {answer}"
                    ));
                }
                if let Some(error) = answer.get("error").filter(|_| !status.is_success()) {
                    assert!(error["code"].is_string(), "the one error shape: {answer}");
                }
                checked += 1;
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} requests:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // A custom policy that refuses everything but administrators reaches every
    // route, but those that show no tenant's objects.
    let deny_all = json!({ "source": "package bbx.authz.all\ndeny contains \"nothing today\" if { input.principal.role != \"admin\" }" });
    api.admin(Method::PUT, "/v1/auth/policies/all", deny_all).await;
    let unscoped = ["/v1/endpoints", "/v1/ring/stats", "/v1/ring/breakers", "/v1/ops/events"];
    let own = api.fixture("acme").await;
    let credential = api.credential("tenant_admin", &own.agent).await;
    let mut open = Vec::new();
    for (method, path) in routes.iter().filter(|(_, p)| !unscoped.contains(&p.as_str())) {
        let (filled, body) = request(method, path, &own);
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (status, answer) = api.send(method.clone(), &filled, &credential, body).await;
        if status != StatusCode::FORBIDDEN {
            open.push(format!("{method} {path}: {status} {answer}"));
        }
    }
    assert!(
        open.is_empty(),
        "routes a deny-all policy does not reach:\n{}",
        open.join("\n")
    );
}
