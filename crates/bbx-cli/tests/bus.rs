//! The MessageBus against a real `bbx serve`, through the CLI's contract:
//! durable publish with dedup, consumer groups with leases, acks and
//! redelivery, dead letters, tenants apart, and what survives a crash.

mod support;

use serde_json::{Value, json};
use support::{Kernel, json, stderr, stdout};

fn publish(kernel: &Kernel, topic: &str, payload: &str, extra: &[&str]) -> Value {
    let mut args = vec!["bus", "publish", topic, payload, "--json"];
    args.extend_from_slice(extra);
    json(&kernel.cli(&args))
}

/// `bbx bus subscribe`: the messages printed, one JSON object a line.
fn subscribe(kernel: &Kernel, topic: &str, group: &str, max: usize, extra: &[&str]) -> Vec<Value> {
    let max = max.to_string();
    let mut args = vec!["bus", "subscribe", topic, "--group", group, "--max", &max, "--json"];
    args.extend_from_slice(extra);
    let out = kernel.cli(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

fn payloads(messages: &[Value]) -> Vec<Value> {
    messages.iter().map(|m| m["payload"].clone()).collect()
}

#[tokio::test]
async fn messages_are_published_once_and_consumed_by_groups_until_acked() {
    let mut kernel = Kernel::start();
    let first = publish(&kernel, "orders", r#"{"n": 1}"#, &["--id", "order-1"]);
    assert_eq!(
        (first["offset"].clone(), first["id"].clone()),
        (json!(0), json!("order-1")),
        "{first}"
    );
    let again = publish(&kernel, "orders", r#"{"n": 1}"#, &["--id", "order-1"]);
    assert_eq!(
        (again["offset"].clone(), again["duplicate"].clone()),
        (json!(0), json!(true)),
        "{again}"
    );
    for n in 2..=3 {
        publish(&kernel, "orders", &json!({ "n": n }).to_string(), &[]);
    }

    // A group gets them in order, acks them; after the ack wait a second member
    // gets nothing again, while a new group gets them all.
    let got = subscribe(&kernel, "orders", "billing", 2, &["--ack-wait-ms", "300"]);
    assert_eq!(payloads(&got), [json!({"n": 1}), json!({"n": 2})], "one message per id");
    for (message, offset) in got.iter().zip(0..) {
        assert_eq!(
            (message["offset"].clone(), message["delivery"].clone()),
            (json!(offset), json!(1))
        );
        assert!(message["id"].is_string(), "{message}");
    }
    std::thread::sleep(std::time::Duration::from_millis(400));
    let rest = subscribe(&kernel, "orders", "billing", 5, &["--timeout-ms", "300"]);
    assert_eq!(payloads(&rest), [json!({"n": 3})], "acked ones are not delivered again");
    let all = subscribe(&kernel, "orders", "audit", 10, &["--timeout-ms", "300", "--no-ack"]);
    assert_eq!(all.len(), 3, "a new group starts at the earliest");

    // Unacked: delivered again after its ack wait, counted; an expired lease cannot be acked.
    let held = subscribe(&kernel, "orders", "slow", 1, &["--no-ack", "--ack-wait-ms", "200"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stale = kernel.cli(&[
        "bus",
        "ack",
        "orders",
        "slow",
        "--acks",
        &json!([held[0]["ack"]]).to_string(),
    ]);
    assert!(
        !stale.status.success() && stderr(&stale).contains("expired"),
        "{}",
        stderr(&stale)
    );
    let again = subscribe(&kernel, "orders", "slow", 1, &["--no-ack"]);
    assert_eq!(
        (again[0]["offset"].clone(), again[0]["delivery"].clone()),
        (json!(0), json!(2))
    );

    // Acked out of order: the second of two, not the first.
    let two = subscribe(&kernel, "orders", "partial", 2, &["--no-ack"]);
    let second = json!([two[1]["ack"]]).to_string();
    assert!(
        kernel
            .cli(&["bus", "ack", "orders", "partial", "--acks", &second])
            .status
            .success()
    );

    // A crash keeps every acknowledged publish and ack; what was not acked comes again.
    kernel.crash();
    kernel.restart();
    let after = subscribe(&kernel, "orders", "billing", 5, &["--timeout-ms", "300"]);
    assert!(after.is_empty(), "acks survive a crash: {after:?}");
    let audit = subscribe(&kernel, "orders", "audit", 10, &["--timeout-ms", "300"]);
    assert_eq!(payloads(&audit), [json!({"n": 1}), json!({"n": 2}), json!({"n": 3})]);
    let partial = subscribe(&kernel, "orders", "partial", 10, &["--timeout-ms", "300"]);
    assert_eq!(
        payloads(&partial),
        [json!({"n": 1}), json!({"n": 3})],
        "an ack above the floor survives"
    );
    let dup = publish(&kernel, "orders", r#"{"n": 1}"#, &["--id", "order-1"]);
    assert_eq!(dup["duplicate"], true, "the dedup window survives a crash: {dup}");

    let stats = json(&kernel.cli(&["bus", "stats", "--json"]));
    let orders = &stats["topics"][0];
    assert_eq!(orders["topic"], "orders", "{stats}");
    let billing = orders["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == "billing")
        .unwrap();
    assert_eq!(billing["lag"], 0, "{billing}");
    let report = json(&kernel.cli(&["v2", "message-bus", "stats"]));
    assert_eq!(report["topics"][0]["topic"], "orders");
}

#[tokio::test]
async fn a_poison_message_ends_in_the_dead_letters_and_can_be_replayed() {
    let kernel = Kernel::start();
    let made = kernel.cli(&[
        "bus",
        "create-topic",
        "jobs",
        "--max-deliveries",
        "2",
        "--backoff-ms",
        "0",
        "--partitions",
        "2",
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let exists = kernel.cli(&["bus", "create-topic", "jobs"]);
    assert!(!exists.status.success() && stderr(&exists).contains("exists"));
    publish(&kernel, "jobs", r#""poison""#, &["--key", "k1"]);
    for delivery in 1..=2 {
        let got = subscribe(&kernel, "jobs", "workers", 1, &["--no-ack", "--timeout-ms", "2000"]);
        assert_eq!(got[0]["delivery"], delivery, "{got:?}");
        let nack = json!([got[0]["ack"]]).to_string();
        let out = kernel.cli(&[
            "bus",
            "nack",
            "jobs",
            "workers",
            "--acks",
            &nack,
            "--reason",
            "cannot parse",
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let none = subscribe(&kernel, "jobs", "workers", 1, &["--timeout-ms", "300"]);
    assert!(
        none.is_empty(),
        "past max deliveries it is not delivered again: {none:?}"
    );
    let dead = json(&kernel.cli(&["bus", "dlq", "jobs", "--json"]));
    let letter = &dead["messages"][0];
    assert_eq!(
        (letter["payload"].clone(), letter["reason"].clone()),
        (json!("poison"), json!("cannot parse")),
        "{dead}"
    );
    assert_eq!(
        (letter["deliveries"].clone(), letter["group"].clone()),
        (json!(2), json!("workers"))
    );
    let report = json(&kernel.cli(&["v2", "message-bus", "dlq", "jobs"]));
    assert_eq!(report["messages"].as_array().unwrap().len(), 1);

    let replayed = json(&kernel.cli(&["bus", "dlq-replay", "jobs"]));
    assert_eq!(replayed["replayed"].as_array().unwrap().len(), 1, "{replayed}");
    assert!(
        json(&kernel.cli(&["bus", "dlq", "jobs"]))["messages"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let back = subscribe(&kernel, "jobs", "workers", 1, &["--timeout-ms", "2000"]);
    assert_eq!(payloads(&back), [json!("poison")]);
    assert_eq!(json(&kernel.cli(&["bus", "dlq-purge", "jobs"]))["purged"], 0);
}

#[tokio::test]
async fn bad_input_is_one_clear_error_and_tenants_do_not_meet() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[bus]\nmax_message_bytes = 1000\n").unwrap();
    let kernel = Kernel::start_with(&["--config", config.path().to_str().unwrap()]);
    publish(&kernel, "news", r#"{"a": 1}"#, &["--tenant", "acme"]);
    let elsewhere = kernel.cli(&[
        "bus",
        "subscribe",
        "news",
        "--group",
        "g",
        "--tenant",
        "globex",
        "--json",
    ]);
    assert!(
        !elsewhere.status.success() && stderr(&elsewhere).contains("not_found"),
        "{}",
        stderr(&elsewhere)
    );
    let listed = json(&kernel.cli(&["bus", "topics", "--tenant", "globex"]));
    assert!(listed["topics"].as_array().unwrap().is_empty(), "{listed}");
    let unknown = kernel.cli(&["bus", "dlq", "nothing-here"]);
    assert!(stderr(&unknown).contains("not_found"));

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("\"{}\"", "x".repeat(2000))).unwrap();
    let path = format!("@{}", file.path().display());
    let big = kernel.cli(&["bus", "publish", "news", &path, "--tenant", "acme"]);
    assert!(
        stderr(&big).contains("payload_too_large"),
        "over the maximum: {}",
        stderr(&big)
    );
    let stats = json(&kernel.cli(&["bus", "stats", "--tenant", "acme"]));
    assert_eq!(stats["topics"][0]["published"], 1, "nothing of it was stored: {stats}");
    for (acks, why) in [
        ("[\"nonsense\"]", "not an ack token"),
        ("[\"0:99:1\"]", "not_found"),
        ("[]", "1 to"),
    ] {
        let out = kernel.cli(&["bus", "ack", "news", "g", "--acks", acks, "--tenant", "acme"]);
        assert!(
            !out.status.success() && stderr(&out).contains(why),
            "{acks}: {}",
            stderr(&out)
        );
    }
    subscribe(&kernel, "news", "g", 1, &["--tenant", "acme", "--no-ack"]);
    for (acks, why) in [
        ("[\"0:99:1\"]", "not_found"),
        ("[\"0:0:7\"]", "expired"),
        ("[\"9:0:1\"]", "no partition"),
    ] {
        let out = kernel.cli(&["bus", "ack", "news", "g", "--acks", acks, "--tenant", "acme"]);
        assert!(
            !out.status.success() && stderr(&out).contains(why),
            "{acks}: {}",
            stderr(&out)
        );
    }
    let zero = kernel.cli(&[
        "bus",
        "subscribe",
        "news",
        "--group",
        "g",
        "--max",
        "0",
        "--tenant",
        "acme",
    ]);
    assert!(stderr(&zero).contains("max must be"), "{}", stderr(&zero));
    let bad_topic = kernel.cli(&["bus", "create-topic", "t", "--partitions", "0"]);
    assert!(stderr(&bad_topic).contains("partitions"), "{}", stderr(&bad_topic));
}

/// `bus.publish` as an op: its message commits with the op's completion, so a
/// retried submission (same idempotency key) publishes once.
#[tokio::test]
async fn an_agents_op_publishes_once() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let args = r#"{"topic": "events", "payload": {"step": 1}, "key": "run-1"}"#;
    let submit = || {
        let out = kernel.cli(&[
            "ring",
            "submit",
            &agent,
            "bus.publish",
            args,
            "--idempotency-key",
            "s1",
            "--json",
        ]);
        json(&out)["op_id"].as_str().unwrap().to_owned()
    };
    let op = submit();
    let done = json(&kernel.cli(&["ring", "wait", &op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(
        (done["status"].clone(), done["result"]["offset"].clone()),
        (json!("ok"), json!(0)),
        "{done}"
    );
    assert_eq!(submit(), op, "the same key is the same op");
    let got = subscribe(&kernel, "events", "g", 5, &["--timeout-ms", "300"]);
    assert_eq!(payloads(&got), [json!({"step": 1})]);
    assert_eq!(got[0]["key"], "run-1");
    let bad = kernel.cli(&[
        "ring",
        "submit",
        &agent,
        "bus.publish",
        r#"{"topic": "events"}"#,
        "--json",
    ]);
    assert!(stderr(&bad).contains("invalid_argument"), "{}", stderr(&bad));
}

/// A route turns each message into an op of an agent; a message whose op is
/// refused for good ends in the dead letters with the reason.
#[tokio::test]
async fn a_route_turns_messages_into_an_agents_ops() {
    let kernel = Kernel::start();
    let agent = kernel.new_agent();
    let route = |name: &str, topic: &str, kind: &str, args: &Value| {
        let args = args.to_string();
        kernel.cli(&[
            "bus", "route", name, "--topic", topic, "--agent", &agent, "--kind", kind, "--args", &args,
        ])
    };
    let made = route(
        "clicks",
        "clicks",
        "state.incr",
        &json!({ "key": "clicks", "by": "{{payload}}" }),
    );
    assert!(made.status.success(), "{}", stderr(&made));
    for n in 1..=10 {
        publish(&kernel, "clicks", &n.to_string(), &[]);
    }
    let total = |kernel: &Kernel| {
        let out = kernel.cli(&["state", "get", &agent, "clicks", "--json"]);
        out.status.success().then(|| json(&out)["value"].clone())
    };
    let mut seen = None;
    for _ in 0..100 {
        seen = total(&kernel);
        if seen == Some(json!(55)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(seen, Some(json!(55)), "each message's op ran once");
    let listed = json(&kernel.cli(&["bus", "routes"]));
    assert_eq!(listed["routes"][0]["group"], "route:clicks", "{listed}");

    let made = kernel.cli(&["bus", "create-topic", "bad", "--max-deliveries", "1"]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert!(route("bad", "bad", "no.such.kind", &json!({})).status.success());
    publish(&kernel, "bad", "1", &[]);
    let mut dead = Value::Null;
    for _ in 0..100 {
        dead = json(&kernel.cli(&["bus", "dlq", "bad"]));
        if !dead["messages"].as_array().unwrap().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let reason = dead["messages"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("could not submit") && reason.contains("no.such.kind"),
        "{dead}"
    );

    json(&kernel.cli(&["bus", "unroute", "clicks"]));
    publish(&kernel, "clicks", "100", &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(total(&kernel), Some(json!(55)), "a removed route takes nothing");
    let other = kernel.cli(&[
        "bus", "route", "x", "--topic", "t", "--agent", &agent, "--kind", "noop", "--tenant", "else",
    ]);
    assert!(
        stderr(&other).contains("not_found"),
        "another tenant's agent: {}",
        stderr(&other)
    );
}

/// Mailboxes: an agent sends to another's mailbox as itself; only the owner (or
/// an operator) reads it; a mailbox cannot be published to directly.
/// Request/reply: a request waits for the reply naming its id, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_message_each_other_and_requests_get_replies() {
    let kernel = Kernel::start();
    let (alice, bob) = (kernel.new_agent(), kernel.new_agent());
    let created = json(&kernel.cli(&[
        "auth",
        "create-api-key",
        "alice",
        "--tenant",
        "default",
        "--role",
        "agent",
        "--agent",
        &alice,
        "--json",
    ]));
    let alice_key = created["key"].as_str().unwrap().to_owned();
    let as_alice = |args: &[&str]| {
        let mut all = vec!["--api-key", alice_key.as_str()];
        all.extend_from_slice(args);
        kernel.cli(&all)
    };
    let sent = as_alice(&["bus", "send", &bob, "--payload", r#"{"hello": "bob"}"#]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let forged = as_alice(&["bus", "send", &bob, "--from", &bob, "--payload", "1"]);
    assert!(stderr(&forged).contains("permission_denied"), "{}", stderr(&forged));
    let peek = as_alice(&["bus", "inbox", &bob]);
    assert!(
        stderr(&peek).contains("permission_denied"),
        "only bob's: {}",
        stderr(&peek)
    );
    // Nor through a route: not into its own ops, nor replacing or removing bob's.
    let bobs_mail = format!("mailbox.{bob}");
    let routed = as_alice(&[
        "bus", "route", "spy", "--topic", &bobs_mail, "--agent", &alice, "--kind", "noop",
    ]);
    assert!(stderr(&routed).contains("permission_denied"), "{}", stderr(&routed));
    let made = kernel.cli(&[
        "bus", "route", "bobs", "--topic", "t", "--agent", &bob, "--kind", "noop",
    ]);
    assert!(made.status.success(), "{}", stderr(&made));
    let hijack = as_alice(&[
        "bus", "route", "bobs", "--topic", "t", "--agent", &alice, "--kind", "noop",
    ]);
    assert!(stderr(&hijack).contains("permission_denied"), "{}", stderr(&hijack));
    let removed = as_alice(&["bus", "unroute", "bobs"]);
    assert!(stderr(&removed).contains("permission_denied"), "{}", stderr(&removed));
    let seen = json(&as_alice(&["bus", "routes"]));
    assert_eq!(seen["routes"], json!([]), "alice sees her agent's routes only: {seen}");
    let direct = kernel.cli(&["bus", "publish", &format!("mailbox.{bob}"), "1"]);
    assert!(stderr(&direct).contains("mailboxes"), "{}", stderr(&direct));

    let inbox = json(&kernel.cli(&["bus", "inbox", &bob, "--max", "5", "--timeout-ms", "1000"]));
    let message = &inbox["messages"][0];
    assert_eq!(
        (message["payload"].clone(), message["key"].clone()),
        (json!({"hello": "bob"}), json!(alice)),
        "{inbox}"
    );
    let acks = json!([message["ack"]]).to_string();
    let acked = kernel.cli(&["bus", "ack", &format!("mailbox.{bob}"), "inbox", "--acks", &acks]);
    assert!(acked.status.success(), "{}", stderr(&acked));

    // The op bus.send: sent as the op's agent, exactly once with its completion.
    let args = json!({ "to": bob, "payload": "by op" }).to_string();
    let op = json(&kernel.cli(&["ring", "submit", &alice, "bus.send", &args, "--json"]))["op_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = json(&kernel.cli(&["ring", "wait", &op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(done["status"], "ok", "{done}");
    let inbox = json(&kernel.cli(&["bus", "inbox", &bob, "--timeout-ms", "1000"]));
    assert_eq!(
        (
            inbox["messages"][0]["payload"].clone(),
            inbox["messages"][0]["key"].clone()
        ),
        (json!("by op"), json!(alice))
    );
    let stranger = json(&kernel.cli(&["agent", "create", "s", "--tenant", "other", "--json"]))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let args = json!({ "to": stranger, "payload": 1 }).to_string();
    let op = json(&kernel.cli(&["ring", "submit", &alice, "bus.send", &args, "--json"]))["op_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = json(&kernel.cli(&["ring", "wait", &op, "--timeout-ms", "30000", "--json"]));
    assert_eq!(done["error"]["code"], "not_found", "another tenant's agent: {done}");

    // A request, answered by whoever consumes its topic.
    assert!(kernel.cli(&["bus", "create-topic", "svc"]).status.success());
    let url = kernel.url();
    let requester = {
        let dir = kernel.data_dir().to_owned();
        std::thread::spawn(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_bbx"))
                .args(["--url", &url, "--data-dir"])
                .arg(&dir)
                .args([
                    "bus",
                    "request",
                    "svc",
                    "--payload",
                    r#"{"q": 1}"#,
                    "--timeout-ms",
                    "10000",
                ])
                .env_remove("BBX_API_KEY")
                .output()
                .unwrap();
            json(&out)
        })
    };
    let request = subscribe(&kernel, "svc", "workers", 1, &["--timeout-ms", "10000"]);
    assert_eq!(request[0]["payload"], json!({"q": 1}));
    let id = request[0]["id"].as_str().unwrap().to_owned();
    let replied = kernel.cli(&["bus", "reply", &id, "--payload", r#"{"a": 2}"#]);
    assert!(replied.status.success(), "{}", stderr(&replied));
    let answered = requester.join().unwrap();
    assert_eq!(
        (answered["id"].clone(), answered["reply"].clone()),
        (json!(id), json!({"a": 2})),
        "{answered}"
    );
    let twice = kernel.cli(&["bus", "reply", &id, "--payload", "3"]);
    assert!(stderr(&twice).contains("no request"), "{}", stderr(&twice));
    let alone = json(&kernel.cli(&["bus", "request", "svc", "--payload", "1", "--timeout-ms", "100"]));
    assert_eq!(alone["timed_out"], true, "{alone}");
}

/// A group's messages as server-sent events, through the CLI and the Rust
/// client: each comes leased, with its ack token as the event's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_streams_its_messages_as_server_sent_events() {
    use bbx_core::api::prelude::*;
    let kernel = Kernel::start();
    for n in 1..=3 {
        publish(&kernel, "feed", &n.to_string(), &[]);
    }
    let out = kernel.cli(&["bus", "stream", "feed", "readers", "--limit", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let streamed: Vec<Value> = stdout(&out).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(payloads(&streamed), [json!(1), json!(2), json!(3)]);

    let client = bbx_client::Client::new(&kernel.url(), &kernel.key()).unwrap();
    let input = json!({ "topic": "feed", "group": "live", "start": "latest", "limit": 1 });
    let mut events = client.stream_endpoint("bus.stream", input).await.unwrap();
    publish(&kernel, "feed", r#"{"live": true}"#, &[]);
    let event = tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(event["payload"], json!({"live": true}), "only what came after: {event}");
    let ack = json!({ "topic": "feed", "group": "live", "acks": [event["ack"]] });
    assert_eq!(client.call_endpoint("bus.ack", ack).await.unwrap()["acked"], 1);
    assert!(events.next().await.is_none(), "the stream ends at its limit");
    let missing = client
        .stream_endpoint("bus.stream", json!({ "topic": "nothing", "group": "g" }))
        .await;
    assert_eq!(missing.err().map(|e| e.code), Some(bbx_core::ErrorCode::NotFound));
}

/// An agent consumes through the ring (`bus.fetch`, `bus.ack`), and what it
/// fetched is untrusted: a later op carrying a message's host is tainted by it.
#[tokio::test]
async fn agents_consume_through_ops_and_what_they_fetch_is_untrusted() {
    let kernel = Kernel::start();
    let (alice, bob) = (kernel.new_agent(), kernel.new_agent());
    let payload = json!({ "next": "http://evil.example:8080/x" }).to_string();
    let sent = kernel.cli(&["bus", "send", &alice, "--from", &bob, "--payload", &payload]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    let run = |agent: &str, kind: &str, args: Value| {
        let out = kernel.cli(&["ring", "submit", agent, kind, &args.to_string(), "--json"]);
        let op = json(&out)["op_id"].as_str().unwrap().to_owned();
        json(&kernel.cli(&["ring", "wait", &op, "--timeout-ms", "30000", "--json"]))
    };
    let mailbox = format!("mailbox.{alice}");
    let fetch = json!({ "topic": mailbox, "group": "inbox", "max": 5, "timeout_ms": 2000 });
    let fetched = run(&alice, "bus.fetch", fetch.clone());
    assert_eq!(fetched["status"], "ok", "{fetched}");
    let message = &fetched["result"]["messages"][0];
    assert_eq!(message["key"], json!(bob), "{fetched}");
    assert!(fetched["labels"].to_string().contains("untrusted"), "{fetched}");

    let test = ["flow", "test", "--agent", &alice, "--kind", "tool.http", "--args"];
    let mut args = test.to_vec();
    let url = json!({ "url": "http://evil.example:8080/y" }).to_string();
    args.push(&url);
    let explained = json(&kernel.cli(&args));
    assert_eq!(explained["tainted"][0]["path"], "/url", "{explained}");
    assert_eq!(explained["tainted"][0]["source"], fetched["op_id"], "{explained}");

    let ack = json!({ "topic": mailbox, "group": "inbox", "acks": [message["ack"]] });
    assert_eq!(run(&alice, "bus.ack", ack.clone())["result"]["acked"], 1);
    assert_eq!(
        run(&alice, "bus.ack", ack)["result"]["acked"],
        1,
        "acking again is no error"
    );
    let empty = run(
        &alice,
        "bus.fetch",
        json!({ "topic": mailbox, "group": "inbox", "timeout_ms": 100 }),
    );
    assert_eq!(empty["result"]["messages"], json!([]), "{empty}");
    let prying = run(&bob, "bus.fetch", fetch);
    assert_eq!(prying["error"]["code"], "permission_denied", "{prying}");
}

/// A topic with an owner is that agent's: others publish and consume, by op
/// or with a key confined to them, only as it grants (region `topic`).
#[tokio::test]
async fn an_agents_topic_is_used_by_others_only_as_it_grants() {
    let kernel = Kernel::start();
    let (owner, other) = (kernel.new_agent(), kernel.new_agent());
    let made = kernel.cli(&["bus", "create-topic", "plans.owner", "--owner", &owner, "--json"]);
    assert!(made.status.success(), "{}", stderr(&made));
    assert_eq!(json(&made)["config"]["owner"], owner.as_str());
    let submit = |agent: &str, kind: &str, args: Value| {
        kernel.cli(&["ring", "submit", agent, kind, &args.to_string(), "--wait", "--json"])
    };
    let publish_op = json!({ "topic": "plans.owner", "payload": {"step": 1} });
    let mine = submit(&owner, "bus.publish", publish_op.clone());
    assert!(mine.status.success(), "the owner publishes: {}", stderr(&mine));
    let refused = submit(&other, "bus.publish", publish_op.clone());
    assert!(stderr(&refused).contains("policy_denied"), "{}", stderr(&refused));
    let fetch_op = json!({ "topic": "plans.owner", "group": "g" });
    assert!(stderr(&submit(&other, "bus.fetch", fetch_op.clone())).contains("policy_denied"));

    let key = kernel.agent_key(&other);
    let as_other = |args: &[&str]| kernel.cli_as(&key, args);
    let over_http = as_other(&["bus", "publish", "plans.owner", "1", "--json"]);
    assert!(stderr(&over_http).contains("policy_denied"), "{}", stderr(&over_http));

    // Read granted over the topics starting "plans.": fetch yes, publish no.
    json(&kernel.cli(&[
        "flow",
        "grant",
        &owner,
        "--grantee",
        &other,
        "--region",
        "topic",
        "--prefix",
        "plans.",
    ]));
    let fetched = json(&submit(&other, "bus.fetch", fetch_op.clone()));
    assert_eq!(
        fetched["result"]["messages"][0]["payload"],
        json!({"step": 1}),
        "{fetched}"
    );
    // A grantee's groups are its own: what it leased and acks is not the
    // owner's group "g", which still has the message to deliver.
    let token = fetched["result"]["messages"][0]["ack"].as_str().unwrap();
    let acked = json(&submit(
        &other,
        "bus.ack",
        json!({ "topic": "plans.owner", "group": "g", "acks": [token] }),
    ));
    assert_eq!(acked["result"]["acked"], 1, "{acked}");
    let owners = json(&submit(&owner, "bus.fetch", fetch_op));
    assert_eq!(
        owners["result"]["messages"][0]["payload"],
        json!({"step": 1}),
        "{owners}"
    );
    let topics = json(&kernel.cli(&["bus", "topics", "--json"])).to_string();
    assert!(topics.contains(&format!("{other}/g")), "{topics}");
    assert!(stderr(&submit(&other, "bus.publish", publish_op)).contains("policy_denied"));
    let subscribed = as_other(&[
        "bus",
        "subscribe",
        "plans.owner",
        "--group",
        "h",
        "--max",
        "1",
        "--json",
    ]);
    assert!(subscribed.status.success(), "{}", stderr(&subscribed));

    // The tenant's own credentials and unowned topics are as before.
    publish(&kernel, "plans.owner", "2", &[]);
    let open = as_other(&["bus", "publish", "open", "3", "--json"]);
    assert!(open.status.success(), "{}", stderr(&open));
    let stranger = kernel.cli(&[
        "bus",
        "create-topic",
        "x",
        "--owner",
        &bbx_core::AgentId::generate().to_string(),
    ]);
    assert!(stderr(&stranger).contains("not_found"), "{}", stderr(&stranger));
}
