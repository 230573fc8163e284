//! Tool ops and quotas end to end: the real `bbx serve`, driven through the CLI's
//! contract, with real processes, real cgroups and a real HTTP server on loopback.

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{Kernel, json, stderr};

fn agent(kernel: &Kernel, extra: &[&str]) -> String {
    let mut args = vec!["agent", "create", "tools", "--json"];
    args.extend_from_slice(extra);
    json(&kernel.cli(&args))["id"].as_str().unwrap().to_owned()
}

fn submit(kernel: &Kernel, agent: &str, kind: &str, args: &Value, extra: &[&str]) -> String {
    let args = args.to_string();
    let mut cli = vec!["ring", "submit", agent, kind, &args, "--json"];
    cli.extend_from_slice(extra);
    json(&kernel.cli(&cli))["op_id"].as_str().unwrap().to_owned()
}

fn wait(kernel: &Kernel, op: &str) -> Value {
    json(&kernel.cli(&["ring", "wait", op, "--timeout-ms", "60000", "--json"]))
}

fn run(kernel: &Kernel, agent: &str, kind: &str, args: Value) -> Value {
    let op = submit(kernel, agent, kind, &args, &[]);
    wait(kernel, &op)
}

/// A loopback HTTP server that answers every request with `{"ok": true}` and keeps
/// the request heads it saw.
async fn http_server() -> (String, support::Seen) {
    let (port, seen) = support::http_server(|_| ("application/json", r#"{"ok":true}"#.to_owned())).await;
    (format!("http://127.0.0.1:{port}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_ops_follow_the_cli_contract() {
    let kernel = Kernel::start();
    let (url, seen) = http_server().await;
    let open = agent(&kernel, &["--allow-network", "127.0.0.0/8"]);
    let closed = agent(&kernel, &[]);

    // tool.shell: a program and its arguments, no shell.
    let done = run(
        &kernel,
        &open,
        "tool.shell",
        json!({"program": "python3", "args": ["-c", "print(6 * 7)"], "timeout_ms": 20000}),
    );
    assert_eq!(done["status"], "ok", "{done}");
    assert_eq!(done["result"]["stdout"], "42\n");
    assert_eq!(done["result"]["exit_code"], 0);

    // tool.file: write, then read it back; the program above could see the same workspace.
    let written = run(
        &kernel,
        &open,
        "tool.file",
        json!({"op": "write", "path": "notes/today.txt", "content": "hello"}),
    );
    assert_eq!(written["status"], "ok", "{written}");
    let read = run(
        &kernel,
        &open,
        "tool.file",
        json!({"op": "read", "path": "notes/today.txt"}),
    );
    assert_eq!(read["result"]["content"], "hello");
    let cat = run(
        &kernel,
        &open,
        "tool.shell",
        json!({"program": "cat", "args": ["notes/today.txt"], "timeout_ms": 20000}),
    );
    assert_eq!(cat["result"]["stdout"], "hello");

    // tool.file refusals complete with path_outside_workspace.
    for path in ["../../etc/passwd", "/etc/passwd"] {
        let refused = run(&kernel, &open, "tool.file", json!({"op": "read", "path": path}));
        assert_eq!(refused["status"], "error", "{refused}");
        assert_eq!(refused["error"]["code"], "path_outside_workspace", "{refused}");
    }

    // tool.http to loopback, allowed for this agent; the op's key goes out as Idempotency-Key.
    let op = submit(
        &kernel,
        &open,
        "tool.http",
        &json!({"method": "GET", "url": format!("{url}/hello")}),
        &["--idempotency-key", "fetch-1"],
    );
    let fetched = wait(&kernel, &op);
    assert_eq!(fetched["status"], "ok", "{fetched}");
    assert_eq!(fetched["result"]["status"], 200);
    assert_eq!(fetched["result"]["json"]["ok"], true);
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with("GET /hello "), "{}", heads[0]);
    assert!(
        heads[0].to_lowercase().contains("idempotency-key: fetch-1"),
        "{}",
        heads[0]
    );

    // SSRF: loopback by name, private and metadata addresses are refused for an agent
    // that did not allow them, and nothing reaches the server.
    let port = url.rsplit(':').next().unwrap();
    for target in [
        format!("http://localhost:{port}/x"),
        format!("http://127.0.0.1:{port}/x"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
        "http://[::ffff:10.0.0.1]/".to_owned(),
    ] {
        let refused = run(&kernel, &closed, "tool.http", json!({"method": "GET", "url": target}));
        assert_eq!(refused["status"], "error", "{target}: {refused}");
        assert_eq!(refused["error"]["code"], "address_not_allowed", "{target}: {refused}");
    }
    assert_eq!(seen.lock().unwrap().len(), 1, "a refused request reached the server");

    // --no-network: the program gets a network namespace of its own; the same
    // connection that works from a networked agent's program fails from it.
    let offline = agent(&kernel, &["--no-network"]);
    let connect = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)"
    );
    let shell = json!({"program": "python3", "args": ["-c", connect], "timeout_ms": 20000});
    let online = run(&kernel, &open, "tool.shell", shell.clone());
    assert_eq!(online["result"]["stdout"], "connected\n", "{online}");
    let cut_off = run(&kernel, &offline, "tool.shell", shell);
    assert!(
        cut_off["result"]["stdout"].as_str().unwrap().starts_with("refused"),
        "{cut_off}"
    );

    // A program's own timeout kills it and completes `timeout`.
    let slow = run(
        &kernel,
        &open,
        "tool.shell",
        json!({"program": "sleep", "args": ["30"], "timeout_ms": 300}),
    );
    assert_eq!(slow["status"], "timeout", "{slow}");
    assert_eq!(slow["error"]["code"], "timeout");

    // Bad arguments are one clear error at submission, and nothing is queued.
    let out = kernel.cli(&["ring", "submit", &open, "tool.shell", r#"{"args":["x"]}"#, "--json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("program"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_limits_come_from_the_agents_quota() {
    let kernel = Kernel::start();
    let id = agent(&kernel, &[]);
    let set = json(&kernel.cli(&[
        "quotas",
        "set",
        &id,
        "--memory-bytes",
        "67108864",
        "--pids",
        "24",
        "--cpu-percent",
        "50",
        "--json",
    ]));
    assert_eq!(set["limits"]["memory_bytes"], 67108864);
    let got = json(&kernel.cli(&["quotas", "get", &id, "--json"]));
    assert_eq!(got["limits"]["pids"], 24);
    assert_eq!(got["limits"]["cpu_percent"], 50);
    assert_eq!(got["node"], format!("agent/{id}"));

    let cgroups = json(&kernel.cli(&["quotas", "cgroup-status", "--json"]));
    if cgroups["driver"] == "rlimits" {
        return support::cannot_check("this host has no usable cgroups");
    }
    let hog = run(
        &kernel,
        &id,
        "tool.shell",
        json!({"program": "python3", "args": ["-c", "x = bytearray(512 << 20); print(len(x))"], "timeout_ms": 30000}),
    );
    assert_eq!(hog["status"], "error", "{hog}");
    assert_eq!(hog["error"]["code"], "memory_limit", "{hog}");

    let bomb = run(
        &kernel,
        &id,
        "tool.shell",
        json!({"program": "python3",
               "args": ["-c", "import os, time\nfor _ in range(100):\n    os.fork()\ntime.sleep(0.2)"],
               "timeout_ms": 30000}),
    );
    assert_eq!(bomb["status"], "error", "{bomb}");
    assert_eq!(bomb["error"]["code"], "pids_limit", "{bomb}");
    assert_eq!(bomb["error"]["details"]["limit"], "pids");

    // A tenant's limit binds its agents: 16 pids for the tenant beats the agent's 24.
    kernel.cli(&["quotas", "set", "default", "--tenant", "--pids", "16"]);
    let got = json(&kernel.cli(&["quotas", "get", &id, "--json"]));
    assert_eq!(got["parent"]["pids"], 16);

    // The report's paths.
    for args in [
        &["v2", "enforced-quotas", "stats"][..],
        &["v2", "enforced-quotas", "gpu-status"],
        &["v2", "enforced-quotas", "cgroup-status"],
    ] {
        let out = kernel.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let gpu = json(&kernel.cli(&["quotas", "gpu-status", "--json"]));
    assert_eq!(gpu["available"], !gpu["devices"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_concurrency_limits_refuse_with_the_limits_name() {
    let kernel = Kernel::start();
    let id = agent(&kernel, &[]);
    kernel.cli(&["quotas", "set", &id, "--requests-per-second", "2"]);
    let noop = |kernel: &Kernel| kernel.cli(&["ring", "submit", &id, "noop", "--json"]);
    let mut refused = None;
    for _ in 0..5 {
        let out = noop(&kernel);
        if !out.status.success() {
            refused = Some(stderr(&out));
            break;
        }
    }
    let refused = refused.expect("5 submissions in well under 2 s exceed 2 per second");
    assert!(refused.contains("requests_per_second"), "{refused}");
    assert_eq!(refused.trim().lines().count(), 1, "one line: {refused}");

    // Throttle instead: the submission waits for its token and goes through.
    kernel.cli(&["quotas", "set", &id, "--action", "throttle", "--max-delay-ms", "5000"]);
    let began = Instant::now();
    for _ in 0..4 {
        let out = noop(&kernel);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert!(
        began.elapsed() >= Duration::from_millis(400),
        "throttled submissions waited for tokens"
    );
    let stats = json(&kernel.cli(&["quotas", "get", &id, "--json"]));
    assert!(stats["usage"]["throttled"].as_u64().unwrap() > 0, "{stats}");

    // Queue: every submission is accepted at once, and the ops start as the limit
    // allows, in order: 6 ops at 2 per second take about 2 s from first to last.
    let queued_agent = agent(&kernel, &[]);
    kernel.cli(&[
        "quotas",
        "set",
        &queued_agent,
        "--requests-per-second",
        "2",
        "--action",
        "queue",
        "--max-delay-ms",
        "10000",
    ]);
    let began = Instant::now();
    let ops: Vec<String> = (0..6)
        .map(|_| submit(&kernel, &queued_agent, "noop", &json!(null), &[]))
        .collect();
    let accepted_in = began.elapsed();
    let completions: Vec<Value> = ops.iter().map(|op| wait(&kernel, op)).collect();
    let done_in = began.elapsed();
    assert!(completions.iter().all(|c| c["status"] == "ok"));
    assert!(
        done_in >= Duration::from_millis(1500),
        "queued ops started as the limit allowed ({done_in:?})"
    );
    assert!(accepted_in < done_in, "accepted before they ran");
    let first = completions[0]["completed_at"].as_str().unwrap().to_owned();
    let last = completions[5]["completed_at"].as_str().unwrap().to_owned();
    assert!(first < last, "in the order they were queued");

    // Ops in flight: one sleeping op holds the only slot.
    let other = agent(&kernel, &[]);
    kernel.cli(&["quotas", "set", &other, "--concurrent-ops", "1"]);
    let sleeping = submit(&kernel, &other, "sleep", &json!({"ms": 2000}), &[]);
    let out = kernel.cli(&["ring", "submit", &other, "noop", "--json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("concurrent_ops"), "{}", stderr(&out));
    wait(&kernel, &sleeping);
    let out = kernel.cli(&["ring", "submit", &other, "noop", "--json"]);
    assert!(out.status.success(), "the slot came back: {}", stderr(&out));

    // A named group between tenant and agent binds its members together, and no
    // one else: one sleeping member holds the group's only slot.
    let (first, second, outsider) = (agent(&kernel, &[]), agent(&kernel, &[]), agent(&kernel, &[]));
    let group = json(&kernel.cli(&[
        "quotas",
        "set",
        "group/default/research",
        "--concurrent-ops",
        "1",
        "--json",
    ]));
    assert_eq!(group["node"], "group/default/research");
    for member in [&first, &second] {
        let out = kernel.cli(&["quotas", "set", member, "--group", "research"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let held = submit(&kernel, &first, "sleep", &json!({"ms": 1500}), &[]);
    let out = kernel.cli(&["ring", "submit", &second, "noop", "--json"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("group/default/research"), "{}", stderr(&out));
    let out = kernel.cli(&["ring", "submit", &outsider, "noop", "--json"]);
    assert!(out.status.success(), "not a member: {}", stderr(&out));
    // A member changes group only when idle.
    let out = kernel.cli(&["quotas", "set", &first, "--group", "other"]);
    assert!(!out.status.success(), "changed group with an op in flight");
    let member = json(&kernel.cli(&["quotas", "get", &second, "--json"]));
    assert_eq!(member["group"]["concurrent_ops"], 1, "{member}");
    wait(&kernel, &held);
    let out = kernel.cli(&["ring", "submit", &second, "noop", "--json"]);
    assert!(out.status.success(), "the group's slot came back: {}", stderr(&out));

    // Bad limits change nothing.
    let out = kernel.cli(&["quotas", "set", &other, "--pids", "0"]);
    assert!(!out.status.success());
    let got = json(&kernel.cli(&["quotas", "get", &other, "--json"]));
    assert!(got["limits"].get("pids").is_none(), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_running_at_a_crash_is_in_doubt_never_rerun_and_resolved_by_the_operator() {
    let mut kernel = Kernel::start();
    let id = agent(&kernel, &[]);
    // Each run appends a line to runs.txt; the first run then hangs, a later one returns.
    let program = "import os, time\n\
                   first = not os.path.exists('runs.txt')\n\
                   open('runs.txt', 'a').write('run\\n')\n\
                   time.sleep(60 if first else 0)\n\
                   print(open('runs.txt').read().count('run'))";
    let args = json!({"program": "python3", "args": ["-c", program], "timeout_ms": 120000});
    let op = submit(&kernel, &id, "tool.shell", &args, &["--idempotency-key", "deploy-1"]);
    let runs = kernel.data_dir().join("workspaces").join(&id).join("runs.txt");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !runs.exists() {
        assert!(Instant::now() < deadline, "the tool never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kernel.crash();
    kernel.restart();

    let doubt = wait(&kernel, &op);
    assert_eq!(doubt["status"], "in_doubt", "{doubt}");
    assert_eq!(doubt["error"]["code"], "in_doubt");
    // Not run again on its own, and the dead kernel's program is gone too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read_to_string(&runs).unwrap().matches("run").count(), 1);
    // The same key still names the same op.
    assert_eq!(
        submit(&kernel, &id, "tool.shell", &args, &["--idempotency-key", "deploy-1"]),
        op
    );

    // Retry runs it once more, under the same op id.
    let retried = json(&kernel.cli(&["ring", "resolve", &op, "--as", "retry", "--json"]));
    assert_eq!(retried["op_id"], op);
    let done = wait(&kernel, &op);
    assert_eq!(done["status"], "ok", "{done}");
    assert_eq!(done["result"]["stdout"], "2\n");
    // Settled: resolving again is refused.
    let out = kernel.cli(&["ring", "resolve", &op, "--as", "ok"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not in doubt"), "{}", stderr(&out));

    // A second op in doubt, settled as ok, survives another restart as ok.
    // (The program marks that it runs: its start mark was durable before it.)
    let hang = json!({"program": "python3",
                      "args": ["-c", "import time\nopen('second.txt', 'w').write('x')\ntime.sleep(60)"],
                      "timeout_ms": 120000});
    let second = submit(&kernel, &id, "tool.shell", &hang, &[]);
    let marker = kernel.data_dir().join("workspaces").join(&id).join("second.txt");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the second tool never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kernel.crash();
    kernel.restart();
    assert_eq!(wait(&kernel, &second)["status"], "in_doubt");
    let settled = json(&kernel.cli(&["ring", "resolve", &second, "--as", "ok", "--json"]));
    assert_eq!(settled["completion"]["status"], "ok");
    let (clean, log) = kernel.stop();
    assert!(clean, "{log}");
    kernel.restart();
    assert_eq!(wait(&kernel, &second)["status"], "ok");
}

/// The Python that has the official MCP SDK: the test venv that scripts/test.sh makes.
fn mcp_python() -> std::path::PathBuf {
    let venv = std::env::var_os("BBX_VENV").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/bbx-venv"),
        std::path::PathBuf::from,
    );
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh once (it installs the MCP SDK there)",
        python.display()
    );
    python
}

fn log_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_mcp_calls_tools_of_other_mcp_servers_over_stdio_and_http() {
    let python = mcp_python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/mcp_server.py");
    let scratch = tempfile::tempdir().unwrap();
    let (stdio_log, http_log) = (scratch.path().join("stdio.log"), scratch.path().join("http.log"));

    // A streamable HTTP server, started by the test.
    let port = support::free_port();
    let mut http_server = std::process::Command::new(&python)
        .arg(&script)
        .arg(&http_log)
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the MCP server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A stdio server, configured by the operator.
    let config = scratch.path().join("bbx.toml");
    std::fs::write(
        &config,
        format!(
            "[tools.mcp.local]\ncommand = [{:?}, {:?}, {:?}]\n",
            python.display().to_string(),
            script.display().to_string(),
            stdio_log.display().to_string()
        ),
    )
    .unwrap();
    let kernel = Kernel::start_with(&["--config", config.to_str().unwrap()]);
    let url = format!("http://127.0.0.1:{port}/mcp");
    let web = format!("web={url}");
    let open = agent(&kernel, &["--mcp-server", &web, "--allow-network", "127.0.0.0/8"]);
    let closed = agent(&kernel, &["--mcp-server", &web]);

    let call =
        |tool: &str, server: &str, text: &str| json!({"server": server, "tool": tool, "arguments": {"text": text}});
    let op = submit(
        &kernel,
        &open,
        "tool.mcp",
        &call("record", "local", "over stdio"),
        &["--idempotency-key", "k-stdio"],
    );
    let done = wait(&kernel, &op);
    assert_eq!(done["status"], "ok", "{done}");
    assert_eq!(done["result"]["content"][0]["text"], "recorded over stdio");
    assert_eq!(
        log_lines(&stdio_log),
        vec![json!({"text": "over stdio", "key": "k-stdio"})]
    );

    let op = submit(
        &kernel,
        &open,
        "tool.mcp",
        &call("record", "web", "over http"),
        &["--idempotency-key", "k-http"],
    );
    let done = wait(&kernel, &op);
    assert_eq!(done["status"], "ok", "{done}");
    assert_eq!(
        log_lines(&http_log),
        vec![json!({"text": "over http", "key": "k-http"})]
    );

    // Arguments the tool's advertised input schema refuses never reach it.
    for (arguments, at) in [(json!({"text": 5}), "/text"), (json!({}), "text")] {
        let refused = run(
            &kernel,
            &open,
            "tool.mcp",
            json!({"server": "local", "tool": "record", "arguments": arguments}),
        );
        assert_eq!(refused["error"]["code"], "invalid_argument", "{refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("input schema") && message.contains(at), "{message}");
    }
    let missing = run(&kernel, &open, "tool.mcp", json!({"server": "web", "tool": "nope"}));
    assert_eq!(missing["error"]["code"], "invalid_argument", "{missing}");
    assert!(
        missing["error"]["message"].as_str().unwrap().contains("no tool"),
        "{missing}"
    );
    assert_eq!(log_lines(&stdio_log).len(), 1, "no refused call reached the server");

    let failed = run(&kernel, &open, "tool.mcp", json!({"server": "local", "tool": "fail"}));
    assert_eq!(failed["status"], "error", "{failed}");
    assert_eq!(failed["error"]["code"], "tool_failed", "{failed}");

    let unknown = run(
        &kernel,
        &open,
        "tool.mcp",
        json!({"server": "nowhere", "tool": "record"}),
    );
    assert_eq!(unknown["status"], "error");
    assert!(unknown["error"]["message"].as_str().unwrap().contains("nowhere"));

    // An agent's own MCP URL obeys its address rules, like tool.http.
    let refused = run(&kernel, &closed, "tool.mcp", call("record", "web", "sneaky"));
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(refused["error"]["code"], "address_not_allowed", "{refused}");
    assert_eq!(log_lines(&http_log).len(), 1, "nothing reached the server");

    let _ = http_server.kill();
    let _ = http_server.wait();
}
