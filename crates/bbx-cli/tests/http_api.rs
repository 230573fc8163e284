//! The HTTP API of a real `bbx serve` process, over real sockets.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::Kernel;

/// A request body and its content type.
type Body = Option<(&'static str, Vec<u8>)>;

struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    fn new(kernel: &Kernel) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: kernel.url(),
            key: kernel.key(),
        }
    }

    async fn raw(&self, method: Method, path: &str, key: Option<&str>, body: Body) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        let response = req.send().await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        (
            status,
            if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
            },
        )
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let body = body.map(|b| ("application/json", serde_json::to_vec(&b).unwrap()));
        self.raw(method, path, Some(&self.key), body).await
    }

    async fn agent(&self, name: &str) -> String {
        let (status, agent) = self
            .call(Method::POST, "/v1/agents", Some(json!({ "name": name })))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");
        agent["id"].as_str().unwrap().to_owned()
    }
}

/// Asserts the one error shape and returns its code.
fn error_code(status: StatusCode, body: &Value, expected: StatusCode) -> String {
    assert_eq!(status, expected, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message: {body}"
    );
    error["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no code: {body}"))
        .to_owned()
}

#[tokio::test]
async fn bad_input_gets_one_clear_error_and_changes_nothing() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let id = api.agent("target").await;
    let (status, _) = api
        .call(
            Method::PUT,
            &format!("/v1/agents/{id}/state/k"),
            Some(json!({ "value": "original" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let json_body = |s: &str| -> Body { Some(("application/json", s.as_bytes().to_vec())) };
    let key = api.key.clone();
    let k = Some(key.as_str());
    let state = format!("/v1/agents/{id}/state/k");
    let cases: Vec<(&str, Method, String, Body, StatusCode, &str)> = vec![
        (
            "malformed JSON",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": "),
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
        (
            "wrong type",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": 42}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "unknown field",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": \"a\", \"nmae\": 1}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "empty name",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": \"\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "control chars in name",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": \"a\\u0000b\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "bad tenant",
            Method::POST,
            "/v1/agents".into(),
            json_body("{\"name\": \"a\", \"tenant\": \"../x\"}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "not JSON content type",
            Method::POST,
            "/v1/agents".into(),
            Some(("text/plain", b"{\"name\":\"a\"}".to_vec())),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "unknown agent",
            Method::GET,
            "/v1/agents/01900000-0000-7000-8000-000000000000".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "id with slash",
            Method::GET,
            "/v1/agents/a%2Fb".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "id with control char",
            Method::GET,
            "/v1/agents/ab%0Acd/state".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "state of unknown agent",
            Method::PUT,
            "/v1/agents/01900000-0000-7000-8000-000000000000/state/k".into(),
            json_body("{\"value\": 1}"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "state value missing",
            Method::PUT,
            state.clone(),
            json_body("{\"if_version\": 1}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "negative if_version",
            Method::PUT,
            state.clone(),
            json_body("{\"value\": 1, \"if_version\": -1}"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "stale CAS",
            Method::PUT,
            state.clone(),
            json_body("{\"value\": \"lost\", \"if_version\": 7}"),
            StatusCode::CONFLICT,
            "version_conflict",
        ),
        (
            "create-only CAS on existing key",
            Method::PUT,
            state.clone(),
            json_body("{\"value\": \"lost\", \"if_version\": 0}"),
            StatusCode::CONFLICT,
            "version_conflict",
        ),
        (
            "stale delete",
            Method::DELETE,
            format!("{state}?if_version=9"),
            None,
            StatusCode::CONFLICT,
            "version_conflict",
        ),
        (
            "bad query",
            Method::GET,
            "/v1/agents?limit=many".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "limit out of range",
            Method::GET,
            "/v1/agents?limit=0".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "unknown query field",
            Method::GET,
            "/v1/agents?tenat=x".into(),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "bad cursor",
            Method::GET,
            format!("/v1/agents/{id}/state?cursor=zz"),
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_argument",
        ),
        (
            "unknown route",
            Method::GET,
            "/v1/nothing-here".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "wrong method",
            Method::PATCH,
            "/v1/agents".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (what, method, path, body, expected, code) in cases {
        let (status, body) = api.raw(method, &path, k, body).await;
        assert_eq!(error_code(status, &body, expected), code, "{what}");
    }

    // Oversized bodies: the kernel answers 413 as soon as the limit is passed, without
    // reading the rest, so the client sends headers and a first chunk, then reads.
    let ten_mb_name = serde_json::to_vec(&json!({ "name": "n".repeat(10 << 20) })).unwrap();
    let (status, body) = over_socket(kernel.port, &key, "POST", "/v1/agents", &ten_mb_name).await;
    assert_eq!(
        error_code(status, &body, StatusCode::PAYLOAD_TOO_LARGE),
        "payload_too_large"
    );
    let two_mb_value = serde_json::to_vec(&json!({ "value": "v".repeat(2 << 20) })).unwrap();
    let (status, body) = over_socket(kernel.port, &key, "PUT", &state, &two_mb_value).await;
    // URL libraries resolve `..` before sending; a hostile client does not.
    for path in [
        "/v1/agents/%2E%2E",
        "/v1/agents/../state",
        "/v1/agents/..%2F..%2Fadmin.key",
    ] {
        let (status, body) = over_socket(kernel.port, &key, "GET", path, b"").await;
        assert_eq!(
            error_code(status, &body, StatusCode::BAD_REQUEST),
            "invalid_id",
            "{path}"
        );
    }
    assert_eq!(
        error_code(status, &body, StatusCode::PAYLOAD_TOO_LARGE),
        "payload_too_large"
    );

    // Nothing above changed anything.
    let (_, page) = api.call(Method::GET, "/v1/agents", None).await;
    assert_eq!(page["agents"].as_array().unwrap().len(), 1);
    let (_, entry) = api.call(Method::GET, &state, None).await;
    assert_eq!(
        (entry["value"].clone(), entry["version"].clone()),
        (json!("original"), json!(1))
    );
}

/// A request written byte for byte on a socket: the path exactly as given, the
/// headers, and at most the first 256 KiB of `body` (an oversized body is answered
/// with 413 before the kernel reads the rest), then the response.
async fn over_socket(port: u16, key: &str, method: &str, path: &str, body: &[u8]) -> (StatusCode, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&body[..body.len().min(256 * 1024)]).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no status line: {text}"))
        .parse()
        .unwrap();
    let payload = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    // The body may be chunked; the JSON object is the part between the outer braces.
    let json = &payload[payload.find('{').unwrap_or(0)..=payload.rfind('}').unwrap_or(0)];
    (
        StatusCode::from_u16(status).unwrap(),
        serde_json::from_str(json).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn keys_are_required_checked_and_revocable() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    for (key, reason) in [
        (None, "missing"),
        (Some("nonsense"), "invalid"),
        (Some("bbx_00000000000000000000000000000000_00"), "invalid"),
    ] {
        let (status, body) = api.raw(Method::GET, "/v1/agents", key, None).await;
        assert_eq!(error_code(status, &body, StatusCode::UNAUTHORIZED), "unauthenticated");
        assert_eq!(body["error"]["details"]["reason"], reason);
    }
    let (status, body) = api.raw(Method::POST, "/mcp", None, None).await;
    assert_eq!(error_code(status, &body, StatusCode::UNAUTHORIZED), "unauthenticated");
    // MCP transport errors keep the one error shape too.
    let key = api.key.clone();
    let (status, body) = api.raw(Method::GET, "/mcp", Some(&key), None).await;
    assert_eq!(
        error_code(status, &body, StatusCode::METHOD_NOT_ALLOWED),
        "method_not_allowed"
    );
    let list = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_vec();
    let (status, body) = api
        .raw(Method::POST, "/mcp", Some(&key), Some(("application/json", list)))
        .await;
    assert_eq!(error_code(status, &body, StatusCode::NOT_ACCEPTABLE), "not_acceptable");

    // Probes and metrics are open; OpenAPI is behind the key like the rest of /v1.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(api.raw(Method::GET, path, None, None).await.0, StatusCode::OK, "{path}");
    }
    assert_eq!(
        api.raw(Method::GET, "/v1/openapi.json", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A tenant key: confined to its tenant, cannot manage keys, and revocable.
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/keys",
            Some(json!({ "name": "ci", "tenant": "acme" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let tenant_key = created["key"].as_str().unwrap().to_owned();
    let other = api.agent("other-tenant").await;
    let (status, body) = api
        .raw(Method::GET, &format!("/v1/agents/{other}"), Some(&tenant_key), None)
        .await;
    assert_eq!(error_code(status, &body, StatusCode::NOT_FOUND), "not_found");
    let (status, body) = api.raw(Method::GET, "/v1/keys", Some(&tenant_key), None).await;
    assert_eq!(error_code(status, &body, StatusCode::FORBIDDEN), "permission_denied");
    let (status, _) = api
        .raw(
            Method::POST,
            "/v1/agents",
            Some(&tenant_key),
            Some(("application/json", br#"{"name":"mine"}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, listed) = api.raw(Method::GET, "/v1/agents", Some(&tenant_key), None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = listed["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mine"], "a tenant key lists only its tenant's agents");

    let key_id = created["info"]["id"].as_str().unwrap();
    let (status, revoked) = api.call(Method::DELETE, &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(revoked["revoked_at"].is_string());
    let (status, body) = api.raw(Method::GET, "/v1/agents", Some(&tenant_key), None).await;
    assert_eq!(error_code(status, &body, StatusCode::UNAUTHORIZED), "unauthenticated");
    assert_eq!(body["error"]["details"]["reason"], "revoked");
}

/// A tenant key for `tenant`, minted by the administrator.
async fn tenant_key(api: &Api, tenant: &str) -> String {
    let (status, created) = api
        .call(
            Method::POST,
            "/v1/keys",
            Some(json!({ "name": tenant, "tenant": tenant })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["key"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let (acme, globex) = (tenant_key(&api, "acme").await, tenant_key(&api, "globex").await);
    // Acme's agent, allowed (by the administrator) to call a loopback server.
    let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    let (status, agent) = api
        .call(
            Method::POST,
            "/v1/agents",
            Some(json!({ "name": "a", "tenant": "acme", "tools": { "allow_networks": ["127.0.0.0/8"] } })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    let agent = agent["id"].as_str().unwrap().to_owned();
    let acme_call = |method, path: String, body: Value| {
        let body = Some(("application/json", serde_json::to_vec(&body).unwrap()));
        let api = &api;
        let acme = acme.clone();
        async move { api.raw(method, &path, Some(&acme), body).await }
    };
    let (status, _) = acme_call(
        Method::PUT,
        format!("/v1/agents/{agent}/state/k"),
        json!({ "value": 1 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A tool.http call that fails at once (nothing answers on the port): its
    // breaker is acme's, named by host and port.
    drop(web);
    let url = format!("http://127.0.0.1:{port}/");
    let ops = json!({ "ops": [
        { "agent": agent, "kind": "tool.http", "args": { "method": "GET", "url": url } },
        { "agent": agent, "kind": "sleep", "args": { "ms": 60_000 } },
    ] });
    let (status, submitted) = acme_call(Method::POST, "/v1/ops".into(), ops).await;
    assert_eq!(status, StatusCode::OK, "{submitted}");
    let http_op = submitted["ops"][0]["op_id"].as_str().unwrap().to_owned();
    let sleep_op = submitted["ops"][1]["op_id"].as_str().unwrap().to_owned();
    let (status, _) = acme_call(
        Method::GET,
        format!("/v1/ops/{http_op}/wait?timeout_ms=30000"),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // Globex's key: every one of acme's objects is missing, and acme goes unnamed.
    for path in [
        format!("/v1/agents/{agent}"),
        format!("/v1/agents/{agent}/state/k"),
        format!("/v1/ops/{http_op}"),
        format!("/v1/ops/{http_op}/wait?timeout_ms=1"),
        format!("/v1/ops/{sleep_op}"),
        format!("/v1/ops/{sleep_op}/wait?timeout_ms=1"),
    ] {
        let (status, body) = api.raw(Method::GET, &path, Some(&globex), None).await;
        assert_eq!(error_code(status, &body, StatusCode::NOT_FOUND), "not_found", "{path}");
        assert!(!body.to_string().contains("acme"), "{path}: {body}");
    }

    // Breakers: the administrator sees acme's target, globex sees none of acme's.
    let target = format!("127.0.0.1:{port}");
    let stats = |key: &str| {
        let out = kernel.cli(&["--api-key", key, "ring", "stats", "--json"]);
        support::json(&out)["breakers"].as_array().unwrap().clone()
    };
    let admin_key = kernel.key();
    let all = stats(&admin_key);
    assert!(
        all.iter().any(|b| b["tenant"] == "acme"
            && b["target"].as_str().unwrap().starts_with("tool.http")
            && b["target"].as_str().unwrap().contains(&target)),
        "{all:?}"
    );
    let theirs = stats(&globex);
    assert!(theirs.iter().all(|b| b["tenant"] == "globex"), "{theirs:?}");
    assert!(
        !theirs.iter().any(|b| b["target"].as_str().unwrap().contains(&target)),
        "{theirs:?}"
    );
    let (status, _) = acme_call(Method::POST, format!("/v1/ops/{sleep_op}/cancel"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn one_hundred_clients_racing_a_cas_have_one_winner_per_version() {
    let kernel = Kernel::start();
    let api = std::sync::Arc::new(Api::new(&kernel));
    let id = api.agent("racer").await;
    let path = format!("/v1/agents/{id}/state/counter");
    for version in 0..3u64 {
        let racers: Vec<_> = (0..100)
            .map(|i| {
                let (api, path) = (api.clone(), path.clone());
                tokio::spawn(async move {
                    api.call(Method::PUT, &path, Some(json!({ "value": i, "if_version": version })))
                        .await
                })
            })
            .collect();
        let mut winners = 0;
        for racer in racers {
            let (status, body) = racer.await.unwrap();
            match status {
                StatusCode::OK => {
                    assert_eq!(body["version"], version + 1);
                    winners += 1;
                }
                StatusCode::CONFLICT => assert_eq!(body["error"]["code"], "version_conflict"),
                other => panic!("unexpected {other}: {body}"),
            }
        }
        assert_eq!(winners, 1, "exactly one winner from version {version}");
    }
}

#[tokio::test]
async fn openapi_and_metrics_describe_the_running_kernel() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let id = api.agent("m").await;
    let (status, doc) = api.call(Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/agents",
        "/v1/agents/{id}",
        "/v1/agents/{id}/state",
        "/v1/agents/{id}/state/{key}",
        "/v1/status",
        "/v1/keys",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["paths"]["/v1/agents/{id}/state/{key}"]["put"]["responses"]["409"].is_object());
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());

    api.call(Method::GET, &format!("/v1/agents/{id}"), None).await;
    api.call(Method::GET, "/v1/agents/01900000-0000-7000-8000-000000000000", None)
        .await;
    let scrape = |accept: &'static str| {
        let request = reqwest::Client::new()
            .get(format!("{}/metrics", kernel.url()))
            .header("accept", accept);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let text = scrape("application/openmetrics-text; version=1.0.0").await;
    assert!(
        text.contains(r#"bbx_http_requests_total{method="GET",route="/v1/agents/{id}",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"bbx_http_requests_total{method="GET",route="/v1/agents/{id}",status="404"} 1"#),
        "{text}"
    );
    assert!(text.contains("bbx_http_request_duration_seconds_bucket"));
    assert!(text.contains("# TYPE bbx_store_syncs counter"));
    assert!(text.trim_end().ends_with("# EOF"));
    // Anything else gets the classic text format, where a counter family carries its
    // `_total` name (what `promtool check metrics` expects).
    let classic = scrape("text/plain").await;
    assert!(classic.contains("# TYPE bbx_store_syncs_total counter"), "{classic}");
    assert!(!classic.contains("# EOF"));
}

#[tokio::test]
async fn shutdown_is_graceful_and_state_survives_sigkill() {
    let mut kernel = Kernel::start();
    let api = Api::new(&kernel);
    let id = api.agent("durable").await;
    for i in 0..20 {
        let (status, _) = api
            .call(
                Method::PUT,
                &format!("/v1/agents/{id}/state/k{i}"),
                Some(json!({ "value": { "i": i } })),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    // Acknowledged means on disk: SIGKILL right after the last ack loses nothing.
    kernel.crash();
    kernel.restart();
    let api = Api::new(&kernel);
    let (_, page) = api
        .call(Method::GET, &format!("/v1/agents/{id}/state?limit=1000"), None)
        .await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 20);

    let (clean, stderr) = kernel.stop();
    assert!(clean, "SIGTERM exits 0: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");
}

#[tokio::test]
async fn ops_over_http_submit_wait_stream_cancel_and_refuse_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bbx.toml");
    std::fs::write(&config, "[ring]\nmax_running = 1\nsubmission_capacity = 2\n").unwrap();
    let kernel = Kernel::start_with(&["--config", config.to_str().unwrap()]);
    let api = Api::new(&kernel);
    let agent = api.agent("ops").await;

    // A stream of completions, opened before the ops run.
    let events = api
        .http
        .get(format!("{}/v1/ops/events?agent={agent}", api.base))
        .header("authorization", format!("Bearer {}", api.key))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    assert_eq!(events.headers()["content-type"], "text/event-stream");

    let op = json!({"agent": agent, "kind": "state.incr", "args": {"key": "n", "by": 5}, "idempotency_key": "h1"});
    let (status, submitted) = api.call(Method::POST, "/v1/ops", Some(json!({"ops": [op]}))).await;
    assert_eq!(status, StatusCode::OK, "{submitted}");
    let id = submitted["ops"][0]["op_id"].as_str().unwrap().to_owned();
    let (status, waited) = api
        .call(Method::GET, &format!("/v1/ops/{id}/wait?timeout_ms=10000"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(waited["state"], "done");
    assert_eq!(waited["completion"]["result"]["value"], 5);
    let mut body = events;
    let mut seen = String::new();
    while !seen.contains(&id) {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.chunk())
            .await
            .expect("a completion event arrives")
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains("event: completion"), "{seen}");

    let changed = json!({"agent": agent, "kind": "state.incr", "args": {"key": "n", "by": 6}, "idempotency_key": "h1"});
    let (status, body) = api.call(Method::POST, "/v1/ops", Some(json!({"ops": [changed]}))).await;
    assert_eq!(error_code(status, &body, StatusCode::CONFLICT), "already_exists");

    // One running, two queued: the queue is full.
    let sleep = |ms: u64| json!({"agent": agent, "kind": "sleep", "args": {"ms": ms}});
    let (_, running) = api
        .call(Method::POST, "/v1/ops", Some(json!({"ops": [sleep(60_000)]})))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, _) = api
        .call(Method::POST, "/v1/ops", Some(json!({"ops": [sleep(1), sleep(1)]})))
        .await;
    assert_eq!(status, StatusCode::OK);
    let response = api
        .http
        .post(format!("{}/v1/ops", api.base))
        .header("authorization", format!("Bearer {}", api.key))
        .json(&json!({"ops": [sleep(1)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "resource_exhausted");

    let running = running["ops"][0]["op_id"].as_str().unwrap().to_owned();
    let (status, cancelled) = api.call(Method::POST, &format!("/v1/ops/{running}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["completion"]["status"], "cancelled");
    let (status, body) = api.call(Method::POST, &format!("/v1/ops/{running}/cancel"), None).await;
    assert_eq!(error_code(status, &body, StatusCode::CONFLICT), "failed_precondition");

    let (status, stats) = api.call(Method::GET, "/v1/ring/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["refused_total"], 1);
    let (status, wal) = api.call(Method::GET, "/v1/ring/wal", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(wal["records_total"].as_u64().unwrap() >= 1);
    let (status, body) = api.call(Method::GET, "/v1/ops/not-an-id", None).await;
    assert_eq!(error_code(status, &body, StatusCode::BAD_REQUEST), "invalid_id");

    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "bbx_ring_submitted_total 4",
        "bbx_ring_refused_total 1",
        "bbx_ring_completed_total{status=\"cancelled\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing from /metrics");
    }
    // The journal also carries the store's writes (the agent, the completions), so
    // it counts at least what wal-status counted a moment before.
    let journaled: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bbx_journal_records_total "))
        .expect("bbx_journal_records_total in /metrics")
        .parse()
        .unwrap();
    assert!(journaled >= wal["records_total"].as_u64().unwrap());
}

#[tokio::test]
async fn cli_ring_contract() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let agent = api.agent("cli").await;
    let submit = |key: &str| {
        let out = kernel.cli(&[
            "ring",
            "submit",
            &agent,
            "state.incr",
            r#"{"key":"n","by":1}"#,
            "--idempotency-key",
            key,
            "--json",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["op_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let first = submit("k");
    assert_eq!(submit("k"), first, "the same key prints the same op id");
    let out = kernel.cli(&["ring", "wait", &first, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let completion: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(completion["status"], "ok");
    assert_eq!(completion["result"]["value"], 1);
    for args in [
        &["ring", "stats", "--json"][..],
        &["v2", "enhanced-ring", "stats"],
        &["v2", "enhanced-ring", "wal-status"],
        &["v2", "enhanced-ring", "circuit-breaker", "--reset"],
    ] {
        let out = kernel.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The committer runs at the default ring.committer_nice, 10 (or this test's own
    // nice value, which the kernel inherits, if that is higher).
    let out = kernel.cli(&["ring", "wal-status", "--json"]);
    let wal: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(wal["committer_nice"].as_i64().unwrap() >= 10, "{wal}");
    let out = kernel.cli(&["ring", "submit", &agent, "launch"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown op kind"), "{stderr}");
}

/// Endpoints declared through the component contract are served with no code of
/// their own in the server or the CLI: listed, routed, documented, and run as
/// commands.
#[tokio::test]
async fn declared_endpoints_are_routes_documents_and_commands() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let agent = api.agent("endpoints").await;
    let (status, listed) = api.call(Method::GET, "/v1/endpoints", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"ring.approve") && names.contains(&"ring.deny"),
        "{listed}"
    );
    let (_, openapi) = api.call(Method::GET, "/v1/openapi.json", None).await;
    let approve = &openapi["paths"]["/v1/ops/{op_id}/approve"]["post"];
    assert_eq!(approve["operationId"], "ring.approve", "{approve}");

    // An op that was never held: the endpoint answers 409 in the usual error shape.
    let op = json!({"agent": agent, "kind": "noop", "args": {}});
    let (_, submitted) = api.call(Method::POST, "/v1/ops", Some(json!({"ops": [op]}))).await;
    let id = submitted["ops"][0]["op_id"].as_str().unwrap().to_owned();
    api.call(Method::GET, &format!("/v1/ops/{id}/wait?timeout_ms=10000"), None)
        .await;
    let (status, refused) = api.call(Method::POST, &format!("/v1/ops/{id}/approve"), None).await;
    assert_eq!(
        error_code(status, &refused, StatusCode::CONFLICT),
        "failed_precondition"
    );
    let (status, refused) = api
        .call(Method::POST, &format!("/v1/ops/{id}/deny"), Some(json!({"reason": 5})))
        .await;
    assert_eq!(
        error_code(status, &refused, StatusCode::UNPROCESSABLE_ENTITY),
        "invalid_argument"
    );
    let missing = bbx_core::OpId::generate();
    let (status, refused) = api
        .call(Method::POST, &format!("/v1/ops/{missing}/approve"), None)
        .await;
    assert_eq!(error_code(status, &refused, StatusCode::NOT_FOUND), "not_found");

    // The same endpoints as commands: one line and a non-zero exit on refusal.
    let out = kernel.cli(&["ring", "approve", &id]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not waiting for approval"), "{stderr}");
    let out = kernel.cli(&["ring", "deny", &id, "--reason", "no"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not waiting for approval"));
    let out = kernel.cli(&["ring", "approve"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("OP_ID"));
    let out = kernel.cli(&["nothing", "here"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ring.approve"),
        "the error lists the endpoints"
    );
}

/// A key made with a role does what the role allows, from the command line.
#[tokio::test]
async fn cli_keys_with_roles() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let (status, agent) = api
        .call(Method::POST, "/v1/agents", Some(json!({"name": "r", "tenant": "acme"})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let agent = agent["id"].as_str().unwrap().to_owned();
    api.call(
        Method::PUT,
        &format!("/v1/agents/{agent}/state/k"),
        Some(json!({"value": 7})),
    )
    .await;
    let out = kernel.cli(&[
        "auth",
        "create-api-key",
        "dashboard",
        "-n",
        "ro",
        "--tenant",
        "acme",
        "--role",
        "reader",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(created["id"].is_string() && created["role"] == "reader", "{created}");
    let key = created["key"].as_str().unwrap();
    let read = kernel.cli(&["--api-key", key, "state", "get", &agent, "k", "--json"]);
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let write = kernel.cli(&["--api-key", key, "state", "set", &agent, "k", "8"]);
    assert!(!write.status.success());
    let stderr = String::from_utf8_lossy(&write.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("permission_denied") || stderr.contains("may not"),
        "{stderr}"
    );
    // The reference design's path, and a role that does not exist.
    let out = kernel.cli(&[
        "v2",
        "auth",
        "create-api-key",
        "svc",
        "--tenant",
        "acme",
        "--role",
        "operator",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The audit log has the denial (who, what, why, from where), the key's creation,
    // and a failed authentication; never a secret.
    let (status, _) = api.raw(Method::GET, "/v1/agents", Some("bbx_not_a_key"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let mut audit = Value::Null;
    for _ in 0..100 {
        let out = kernel.cli(&["auth", "audit", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        audit = serde_json::from_slice(&out.stdout).unwrap();
        let kinds: Vec<&str> = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["kind"].as_str())
            .collect();
        if ["denied", "credential_created", "authentication_failed"]
            .iter()
            .all(|k| kinds.contains(k))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let events = audit["events"].as_array().unwrap();
    let denied = events
        .iter()
        .find(|e| e["kind"] == "denied")
        .unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(denied["principal"], created["id"]);
    assert_eq!(
        (denied["tenant"].clone(), denied["source"].clone()),
        (json!("acme"), json!("127.0.0.1"))
    );
    assert!(
        denied["what"].as_str().unwrap().starts_with("PUT /v1/agents/"),
        "{denied}"
    );
    assert!(denied["why"].as_str().unwrap().contains("reader"), "{denied}");
    assert!(events.iter().any(|e| e["kind"] == "authentication_failed"), "{audit}");
    assert!(!audit.to_string().contains(key), "no secret in the audit log");
    let out = kernel.cli(&["--api-key", key, "auth", "audit"]);
    assert!(!out.status.success(), "a reader may not read the audit log");

    for path in [&["auth", "rules"][..], &["v2", "auth", "rules"]] {
        let out = kernel.cli(path);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rules: Value = serde_json::from_slice(&out.stdout).unwrap();
        let reader = rules["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["role"] == "reader")
            .unwrap();
        assert_eq!(reader["may"], json!(["read"]), "{rules}");
    }
    let out = kernel.cli(&["auth", "create-api-key", "svc", "--role", "wizard"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("unknown role"));
}

/// Access tokens from the command line: issued, used as a bearer, checked, and
/// published keys that need no credential.
#[tokio::test]
async fn cli_access_tokens() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let out = kernel.cli(&[
        "auth",
        "create-token",
        "ci",
        "--tenant",
        "acme",
        "--role",
        "operator",
        "--ttl",
        "600",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["claims"]["roles"], json!(["operator"]));
    let (status, _) = api.raw(Method::GET, "/v1/agents", Some(&token), None).await;
    assert_eq!(status, StatusCode::OK, "the token is a bearer on /v1");
    let (status, created_agent) = api
        .raw(
            Method::POST,
            "/v1/agents",
            Some(&token),
            Some(("application/json", br#"{"name":"t"}"#.to_vec())),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created_agent}");
    assert_eq!(created_agent["tenant"], "acme");

    let verify = kernel.cli(&["auth", "verify", &token, "--json"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let checked: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(
        (checked["valid"].clone(), checked["claims"]["sub"].clone()),
        (json!(true), json!("ci"))
    );
    let (head, signature) = token.rsplit_once('.').unwrap();
    let tampered = format!(
        "{head}.{}{}",
        if signature.starts_with('A') { "B" } else { "A" },
        &signature[1..]
    );
    let (status, body) = api.raw(Method::GET, "/v1/agents", Some(&tampered), None).await;
    assert_eq!(error_code(status, &body, StatusCode::UNAUTHORIZED), "unauthenticated");
    let verify = kernel.cli(&["auth", "verify", &tampered, "--json"]);
    assert!(!verify.status.success());
    let checked: Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(checked["valid"], false);

    let out = kernel.cli(&[
        "auth",
        "create-token",
        "brief",
        "--tenant",
        "acme",
        "--role",
        "reader",
        "--ttl",
        "1",
    ]);
    let brief = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let (status, _) = api.raw(Method::GET, "/v1/agents", Some(&brief), None).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (status, body) = api.raw(Method::GET, "/v1/agents", Some(&brief), None).await;
    assert_eq!(error_code(status, &body, StatusCode::UNAUTHORIZED), "unauthenticated");

    let jwks = api
        .http
        .get(format!("{}/.well-known/jwks.json", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), StatusCode::OK, "no credential needed");
    let jwks: Value = jwks.json().await.unwrap();
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519", "{jwks}");
}

/// An OAuth client finds BBX's authorization server from the resource, and gets a
/// token for an API key with the client-credentials grant.
#[tokio::test]
async fn oauth_client_credentials_for_machine_clients() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let (status, body) = api.raw(Method::GET, "/v1/agents", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let challenge = api
        .http
        .get(format!("{}/v1/agents", api.base))
        .send()
        .await
        .unwrap()
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        challenge.contains("resource_metadata=") && challenge.contains("oauth-protected-resource"),
        "{challenge}"
    );

    let get = |path: String| {
        let http = api.http.clone();
        async move { http.get(path).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let resource = get(format!("{}/.well-known/oauth-protected-resource", api.base)).await;
    assert!(resource["resource"].is_string(), "{resource}");
    let issuer = resource["authorization_servers"][0].as_str().unwrap().to_owned();
    let server = get(format!("{issuer}/.well-known/oauth-authorization-server")).await;
    let token_endpoint = server["token_endpoint"].as_str().unwrap().to_owned();
    assert_eq!(server["grant_types_supported"], json!(["client_credentials"]));

    let out = kernel.cli(&[
        "auth",
        "create-api-key",
        "bot",
        "--tenant",
        "acme",
        "--role",
        "reader",
        "--json",
    ]);
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (id, key) = (created["id"].as_str().unwrap(), created["key"].as_str().unwrap());
    let ask = |user: String, secret: String, grant: &'static str| {
        let http = api.http.clone();
        let endpoint = token_endpoint.clone();
        async move {
            let response = http
                .post(endpoint)
                .basic_auth(user, Some(secret))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("grant_type={grant}"))
                .send()
                .await
                .unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, granted) = ask(id.into(), key.into(), "client_credentials").await;
    assert_eq!(status, StatusCode::OK, "{granted}");
    assert_eq!(granted["token_type"], "Bearer");
    let token = granted["access_token"].as_str().unwrap();
    let (status, _) = api.raw(Method::GET, "/v1/agents", Some(token), None).await;
    assert_eq!(status, StatusCode::OK, "the access token is a bearer on /v1");
    let (status, refused) = ask(id.into(), format!("{key}x"), "client_credentials").await;
    assert_eq!(
        (status, refused["error"].clone()),
        (StatusCode::UNAUTHORIZED, json!("invalid_client"))
    );
    let other = bbx_core::KeyId::generate().to_string();
    let (status, _) = ask(other, key.into(), "client_credentials").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the client id must be the key's");
    let (status, refused) = ask(id.into(), key.into(), "password").await;
    assert_eq!(
        (status, refused["error"].clone()),
        (StatusCode::BAD_REQUEST, json!("unsupported_grant_type"))
    );
}

/// Guessing keys from one address is cut off with 429 and Retry-After.
#[tokio::test]
async fn failed_authentications_are_limited_per_address() {
    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let guess = format!("bbx_{}_{}", "ab".repeat(16), "0".repeat(64));
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(api.raw(Method::GET, "/v1/agents", Some(&guess), None).await.0);
    }
    assert!(
        statuses[..19].iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    assert_eq!(statuses[24], StatusCode::TOO_MANY_REQUESTS);
    let response = api
        .http
        .get(format!("{}/v1/agents", api.base))
        .header("authorization", format!("Bearer {}", api.key))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the address waits, whatever it sends"
    );
    assert!(response.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn shared_memory_sessions_submit_and_reap_tagged_completions() {
    use bbx_core::op::{CompletionStatus, SubmitOp};
    use std::time::Duration;

    let kernel = Kernel::start();
    let api = Api::new(&kernel);
    let agent: bbx_core::AgentId = api.agent("shm").await.parse().unwrap();
    let (status, body) = api
        .call(Method::POST, "/v1/ring/shm", Some(json!({"queue_bytes": 1000})))
        .await;
    assert_eq!(
        error_code(status, &body, StatusCode::UNPROCESSABLE_ENTITY),
        "invalid_argument"
    );
    let (status, session) = api.call(Method::POST, "/v1/ring/shm", Some(json!({}))).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let path = std::path::PathBuf::from(session["path"].as_str().unwrap());
    assert_eq!(session["queue_bytes"], 1024 * 1024);

    let summary = tokio::task::spawn_blocking(move || {
        let mut shm = bbx_client::ShmClient::attach(&path).unwrap();
        let noop = shm
            .call(&SubmitOp::new(agent, "noop", json!(null)), Duration::from_secs(10))
            .unwrap();
        assert_eq!(noop.status, CompletionStatus::Ok);
        // The ring's path is gone once a client has attached: nobody else can map it.
        assert!(!names_a_ring(&path), "{} still leads to the ring", path.display());

        // Journaled ops, many in flight at once, each reaped under its own tag.
        let tags: Vec<u64> = (0..200)
            .map(|_| {
                shm.submit(&SubmitOp::new(agent, "state.incr", json!({"key": "n", "by": 1})))
                    .unwrap()
            })
            .collect();
        let mut reaped = Vec::new();
        while reaped.len() < tags.len() {
            let done = shm
                .reap(Duration::from_secs(10))
                .unwrap()
                .expect("a completion arrives");
            assert_eq!(done.outcome.unwrap().status, CompletionStatus::Ok);
            reaped.push(done.tag);
        }
        reaped.sort_unstable();
        assert_eq!(reaped, tags);
        let read = shm
            .call(
                &SubmitOp::new(agent, "state.get", json!({"key": "n"})),
                Duration::from_secs(10),
            )
            .unwrap();
        // A keyed op travels in the JSON form; submitted again, it is reaped again,
        // as the same op.
        let mut keyed = SubmitOp::new(agent, "state.incr", json!({"key": "keyed", "by": 1}));
        keyed.idempotency_key = Some("once".into());
        let first = shm.call(&keyed, Duration::from_secs(10)).unwrap();
        let again = shm.call(&keyed, Duration::from_secs(10)).unwrap();
        assert_eq!(
            (first.op_id, first.idempotency_key.as_deref()),
            (again.op_id, Some("once"))
        );
        assert_eq!(again.result.unwrap()["value"], 1);
        // A client that submits without reaping is stopped by a full queue (the
        // kernel stops reading once it owes 8192 completions), and loses nothing.
        let mut accepted = 0u64;
        let refused = loop {
            match shm.submit(&SubmitOp::new(agent, "noop", json!(null))) {
                Ok(_) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 1_000_000, "the kernel never pushed back");
        };
        assert_eq!(refused.code, bbx_core::ErrorCode::ResourceExhausted);
        for _ in 0..accepted {
            let done = shm
                .reap(Duration::from_secs(10))
                .unwrap()
                .expect("every accepted op completes");
            // Each comes back under its tag: done, or, on a loaded machine where the
            // agent's queue filled before the dispatcher caught up, refused as the
            // HTTP API would refuse it. None is lost.
            match done.outcome {
                Ok(completion) => assert_eq!(completion.status, CompletionStatus::Ok),
                Err(e) => assert_eq!(e.code, bbx_core::ErrorCode::ResourceExhausted, "{e}"),
            }
        }
        // A refused op comes back under its tag as the error the HTTP API gives.
        let unknown = shm
            .call(
                &SubmitOp::new(agent, "no.such.kind", json!(null)),
                Duration::from_secs(10),
            )
            .unwrap_err();
        let stranger = shm
            .call(
                &SubmitOp::new(bbx_core::AgentId::generate(), "noop", json!(null)),
                Duration::from_secs(10),
            )
            .unwrap_err();
        (read.result.unwrap()["value"].clone(), unknown.code, stranger.code)
    })
    .await
    .unwrap();
    assert_eq!(summary.0, json!(200));
    assert_eq!(summary.1, bbx_core::ErrorCode::InvalidArgument);
    assert_eq!(summary.2, bbx_core::ErrorCode::NotFound);

    // The client dropped its end, which closed the session.
    wait_for_shm_sessions(&api, 0).await;

    // A client that dies without closing: its session ends too. A real process
    // maps the ring file and announces itself as the client, then is killed.
    let (_, session) = api.call(Method::POST, "/v1/ring/shm", Some(json!({}))).await;
    let path = session["path"].as_str().unwrap().to_owned();
    let attach = "import mmap, os, struct, sys, time\n\
        f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0)\n\
        m[12:16] = struct.pack('<I', os.getpid()); print('attached', flush=True); time.sleep(60)";
    let mut client = std::process::Command::new("python3")
        .args(["-c", attach, &path])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(client.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "attached");
    wait_for_shm_sessions(&api, 1).await;
    client.kill().unwrap();
    client.wait().unwrap();
    wait_for_shm_sessions(&api, 0).await;
    assert!(!names_a_ring(std::path::Path::new(&path)));

    // Revoking the key that opened a session ends the session.
    let (status, created) = api.call(Method::POST, "/v1/keys", Some(json!({ "name": "shm" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let client = bbx_client::Client::new(&api.base, created["key"].as_str().unwrap()).unwrap();
    let mut shm = client.open_shm(None).await.unwrap();
    let key_id = created["info"]["id"].as_str().unwrap().to_owned();
    let (status, _) = api.call(Method::DELETE, &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    let ended = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match shm.call(&SubmitOp::new(agent, "noop", json!(null)), Duration::from_secs(1)) {
                Err(e) if e.code == bbx_core::ErrorCode::Unavailable => return e,
                _ if std::time::Instant::now() > deadline => panic!("the session outlived its key"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })
    .await
    .unwrap();
    assert!(ended.message.contains("closed"), "{}", ended.message);
    wait_for_shm_sessions(&api, 0).await;

    // One key holds at most 8 sessions at once.
    for _ in 0..8 {
        let (status, body) = api.call(Method::POST, "/v1/ring/shm", Some(json!({}))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (status, body) = api.call(Method::POST, "/v1/ring/shm", Some(json!({}))).await;
    assert_eq!(
        error_code(status, &body, StatusCode::TOO_MANY_REQUESTS),
        "resource_exhausted"
    );

    // The increments are the kernel's own state, seen over HTTP too.
    let (status, value) = api
        .call(Method::GET, &format!("/v1/agents/{agent}/state/n"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{value}");
    assert_eq!(value["value"], 200);
}

/// Polls `bbx ring stats` until the kernel serves `count` shared-memory sessions.
async fn wait_for_shm_sessions(api: &Api, count: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, stats) = api.call(Method::GET, "/v1/ring/stats", None).await;
        if stats["shm_sessions"] == count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions: {}",
            stats["shm_sessions"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Whether `path` (a `/proc/PID/fd/N` link) still leads to a ring's memfd; the fd
/// number may since name something else.
fn names_a_ring(path: &std::path::Path) -> bool {
    std::fs::read_link(path).is_ok_and(|target| target.to_string_lossy().contains("bbx-ring"))
}
