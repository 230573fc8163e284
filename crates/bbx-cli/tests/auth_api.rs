//! Auth against a real `bbx serve` over real sockets: access tokens of a real
//! OpenID Connect provider (the npm package oidc-provider, on loopback), and
//! custom ABAC policies set and enforced through the CLI and the HTTP API.

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use support::{Kernel, free_port};

/// The OIDC provider's directory (its script and node_modules).
fn provider_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/oidc")
}

/// A running oidc-provider, killed on drop.
struct Provider {
    child: Child,
    port: u16,
    keys: PathBuf,
}

impl Provider {
    /// Starts the provider on `port` with the keys in `keys` (a new one first if
    /// `rotate`); `None` if this host cannot run it.
    fn start(port: u16, keys: &Path, rotate: bool) -> Option<Self> {
        if !provider_dir().join("node_modules/oidc-provider").is_dir() {
            support::cannot_check("tests/oidc has no node_modules: run `npm ci` there (scripts/test.sh does)");
            return None;
        }
        let mut command = Command::new("node");
        command
            .current_dir(provider_dir())
            .arg("provider.mjs")
            .args(["--port", &port.to_string(), "--keys"])
            .arg(keys)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if rotate {
            command.arg("--rotate");
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                support::cannot_check(&format!("cannot run node: {e}"));
                return None;
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "the provider did not start");
        Some(Self {
            child,
            port,
            keys: keys.to_path_buf(),
        })
    }

    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Restarts it signing with a new key, the old one still published.
    fn rotate(mut self) -> Self {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (port, keys) = (self.port, self.keys.clone());
        std::mem::forget(self);
        Self::start(port, &keys, true).expect("it started before")
    }

    /// A client-credentials access token for `client`, for `resource`.
    async fn token(&self, client: &str, resource: Option<&str>) -> String {
        let mut form = format!("grant_type=client_credentials&client_id={client}&client_secret=secret&scope=bbx");
        if let Some(resource) = resource {
            form.push_str(&format!("&resource={resource}"));
        }
        let response = reqwest::Client::new()
            .post(format!("{}/token", self.issuer()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        body["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token: {body}"))
            .to_owned()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(kernel: &Kernel, path: &str, bearer: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", kernel.url()))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokens_of_a_real_oidc_provider() {
    let keys = tempfile::tempdir().unwrap();
    let Some(provider) = Provider::start(free_port(), keys.path(), false) else {
        return;
    };
    let config = tempfile::NamedTempFile::new().unwrap();
    let toml = format!(
        "[[auth.oidc]]\nissuer = \"{}\"\naudience = \"urn:bbx\"\nleeway_secs = 1\njwks_min_refetch_secs = 0\n\
         role_map = {{ bbx-operator = \"operator\" }}\n",
        provider.issuer()
    );
    std::fs::write(config.path(), toml).unwrap();
    let kernel = Kernel::start_with(&["--config", config.path().to_str().unwrap()]);
    let admin = kernel.key();
    for tenant in ["acme", "globex"] {
        kernel.cli(&["agent", "create", "a", "--tenant", tenant]);
    }

    let token = provider.token("acme-operator", None).await;
    let (status, page) = get(&kernel, "/v1/agents", &token).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let tenants: Vec<&str> = page["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["tenant"].as_str().unwrap())
        .collect();
    assert_eq!(tenants, ["acme"], "an outside token acts in its tenant only");
    let (status, _) = get(&kernel, "/v1/keys", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an operator does not manage keys");

    let refusals = [
        (provider.token("acme-nobody", None).await, "grants no BBX role"),
        (provider.token("acme-operator", Some("urn:other")).await, "not valid"),
    ];
    for (token, why) in &refusals {
        let (status, body) = get(&kernel, "/v1/agents", token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(why), "{body}");
    }
    let short = provider.token("acme-operator", Some("urn:bbx:short")).await;
    assert_eq!(get(&kernel, "/v1/agents", &short).await.0, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let (status, body) = get(&kernel, "/v1/agents", &short).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");

    // The provider rotates its key: a token of the new key makes the kernel fetch
    // the keys again; one of the old key stays good while the provider publishes it.
    let provider = provider.rotate();
    let rotated = provider.token("acme-operator", None).await;
    assert_ne!(kid(&rotated), kid(&token));
    assert_eq!(get(&kernel, "/v1/agents", &rotated).await.0, StatusCode::OK);
    assert_eq!(get(&kernel, "/v1/agents", &token).await.0, StatusCode::OK);

    let keys_elsewhere = tempfile::tempdir().unwrap();
    let elsewhere = Provider::start(free_port(), keys_elsewhere.path(), false).unwrap();
    let foreign = elsewhere.token("acme-operator", None).await;
    let (status, body) = get(&kernel, "/v1/agents", &foreign).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not one this kernel trusts"),
        "{body}"
    );

    let (_, resource) = get(&kernel, "/.well-known/oauth-protected-resource", &admin).await;
    assert!(
        resource["authorization_servers"]
            .as_array()
            .unwrap()
            .contains(&json!(provider.issuer())),
        "{resource}"
    );
    let audit = support::json(&kernel.cli(&["auth", "audit", "--json"]));
    let failed = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "authentication_failed")
        .count();
    assert!(failed >= 4, "{audit}");
}

/// A token's header, as sent (it names the signing key).
fn kid(token: &str) -> &str {
    token.split('.').next().unwrap()
}

const READ_ONLY_NIGHTS: &str = r#"package bbx.authz.freeze
deny contains "state is frozen for tenant acme" if {
    input.resource.tenant == "acme"
    input.action.class == "act"
    input.principal.role != "tenant_admin"
}
"#;

#[tokio::test]
async fn policies_through_the_cli_and_the_api() {
    let kernel = Kernel::start();
    let agent = support::json(&kernel.cli(&["agent", "create", "a", "--tenant", "acme", "--json"]));
    let agent = agent["id"].as_str().unwrap().to_owned();
    let operator = support::json(&kernel.cli(&[
        "auth",
        "create-api-key",
        "ops",
        "-n",
        "ops",
        "--tenant",
        "acme",
        "--role",
        "operator",
        "--json",
    ]))["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(policy.path(), READ_ONLY_NIGHTS).unwrap();
    let source = format!("@{}", policy.path().display());
    let set = support::json(&kernel.cli(&["auth", "set-policy", "freeze", "--source", &source]));
    assert_eq!(set["version"], 1, "{set}");

    let broken = kernel.cli(&[
        "auth",
        "set-policy",
        "freeze",
        "--source",
        "package bbx.authz.freeze\ndeny contains",
    ]);
    assert!(!broken.status.success());
    assert!(
        support::stderr(&broken).contains("policy freeze is refused"),
        "{}",
        support::stderr(&broken)
    );
    let rules = support::json(&kernel.cli(&["auth", "rules", "--json"]));
    assert_eq!(rules["policies"][0]["version"], 1, "the policy in force stays: {rules}");
    assert_eq!(rules["policies"][0]["source"], READ_ONLY_NIGHTS);

    let response = reqwest::Client::new()
        .put(format!("{}/v1/agents/{agent}/state/k", kernel.url()))
        .bearer_auth(&operator)
        .json(&json!({ "value": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "permission_denied");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("freeze: state is frozen for tenant acme"),
        "{body}"
    );
    let (status, _) = get(&kernel, &format!("/v1/agents/{agent}/state?prefix="), &operator).await;
    assert_eq!(status, StatusCode::OK, "reads are not refused");

    let audit = support::json(&kernel.cli(&["auth", "audit", "--json"]));
    let events = audit["events"].as_array().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "denied" && e["why"].as_str().unwrap().contains("freeze")),
        "{audit}"
    );
    assert!(events.iter().any(|e| e["kind"] == "policy_changed"), "{audit}");

    support::json(&kernel.cli(&["auth", "delete-policy", "freeze"]));
    let output = kernel.cli(&["state", "set", &agent, "k", "1"]);
    assert!(output.status.success(), "{}", support::stderr(&output));
}

/// An agent of `tenant` whose tools may reach loopback.
fn loopback_agent(kernel: &Kernel, tenant: &str) -> String {
    let args = [
        "agent",
        "create",
        "a",
        "--tenant",
        tenant,
        "--allow-network",
        "127.0.0.0/8",
        "--json",
    ];
    support::json(&kernel.cli(&args))["id"].as_str().unwrap().to_owned()
}

const SECRET: &str = "ghp_s3cr3t-value-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_only_their_hosts_and_never_come_back() {
    let kernel = Kernel::start();
    // Each request is answered with its own head: a server echoing what it got.
    let (port, seen) = support::http_server(|head| ("text/plain", head.to_owned())).await;
    let agent = loopback_agent(&kernel, "acme");
    let value_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(value_file.path(), SECRET).unwrap();
    let value = format!("@{}", value_file.path().display());
    let set = support::json(&kernel.cli(&[
        "secrets",
        "set",
        "gh",
        "--tenant",
        "acme",
        "--value",
        &value,
        "--hosts",
        "127.0.0.1",
    ]));
    assert_eq!(set["hosts"], json!(["127.0.0.1"]), "{set}");
    assert!(!set.to_string().contains(SECRET));
    let listed = support::json(&kernel.cli(&["secrets", "list", "--tenant", "acme"]));
    assert_eq!(listed[0]["name"], "gh");
    assert!(!listed.to_string().contains(SECRET), "values are write-only");

    let call = |host: &str| {
        json!({ "url": format!("http://{host}:{port}/x"), "headers": { "authorization": { "$secret": "gh" } } })
            .to_string()
    };
    let submitted = support::json(&kernel.cli(&["ring", "submit", &agent, "tool.http", &call("127.0.0.1"), "--json"]));
    let op = submitted["op_id"].as_str().unwrap();
    let done = support::json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(done["status"], "ok", "{done}");
    assert!(
        seen.lock().unwrap()[0].contains(&format!("authorization: {SECRET}")),
        "the value went out"
    );
    let shown = done.to_string();
    assert!(!shown.contains(SECRET), "the echoed value is redacted: {shown}");
    assert!(shown.contains("[redacted secret]"), "{shown}");

    // Another host (the same server by another name): refused, nothing sent.
    let submitted = support::json(&kernel.cli(&["ring", "submit", &agent, "tool.http", &call("localhost"), "--json"]));
    let op = submitted["op_id"].as_str().unwrap();
    let refused = support::json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(refused["error"]["code"], "permission_denied", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not bound to the host localhost")
    );
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing reached the other host");

    // Not to another origin behind the bound host, not in clear text off this machine.
    let fronted = json!({ "url": format!("http://127.0.0.1:{port}/x"),
        "headers": { "host": "evil.example", "authorization": { "$secret": "gh" } } });
    let cleartext = json!({ "url": "http://api.example.com/x", "headers": { "authorization": { "$secret": "gh" } } });
    support::json(&kernel.cli(&[
        "secrets",
        "bind",
        "gh",
        "--tenant",
        "acme",
        "--hosts",
        r#"["127.0.0.1", "API.example.com"]"#,
    ]));
    for (args, why) in [(fronted, "Host header"), (cleartext, "over https only")] {
        let submitted =
            support::json(&kernel.cli(&["ring", "submit", &agent, "tool.http", &args.to_string(), "--json"]));
        let op = submitted["op_id"].as_str().unwrap();
        let refused = support::json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "30000", "--json"]));
        assert_eq!(refused["error"]["code"], "permission_denied", "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains(why), "{refused}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "nothing more went out");

    // Another tenant has no such secret.
    let other = loopback_agent(&kernel, "globex");
    let submitted = support::json(&kernel.cli(&["ring", "submit", &other, "tool.http", &call("127.0.0.1"), "--json"]));
    let op = submitted["op_id"].as_str().unwrap();
    let missing = support::json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");

    let audit = support::json(&kernel.cli(&["auth", "audit", "--json"]));
    let events = audit.to_string();
    assert!(!events.contains(SECRET), "the audit log never holds a value");
    assert!(
        events.contains("secret_changed") && events.contains("not bound to the host localhost"),
        "{audit}"
    );
    assert!(
        !holds(kernel.data_dir(), SECRET.as_bytes()),
        "no file of the data directory holds the value"
    );
    support::json(&kernel.cli(&["secrets", "delete", "gh", "--tenant", "acme"]));
    assert_eq!(
        support::json(&kernel.cli(&["secrets", "list", "--tenant", "acme"])),
        json!([])
    );
}

/// Whether a file under `dir` holds `needle`.
fn holds(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|entry| {
        let path = entry.path();
        if path.is_dir() {
            holds(&path, needle)
        } else {
            std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        }
    })
}
