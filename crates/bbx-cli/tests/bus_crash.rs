//! The MessageBus under SIGKILL, at a random moment, 20 times, with publishers and
//! consumers of one group running: afterwards every acknowledged publish is there
//! and was delivered to the group, no acknowledged ack is undone (an acked message
//! never comes to its group again), a `bus.publish` op resubmitted with its
//! idempotency key after a crash published its message exactly once, and a route
//! turned every message into exactly one `state.incr`.
//!
//! `BBX_CRASH_ROUNDS` sets the number of kills for a longer run.

mod support;

use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::model::CreateAgent;
use bbx_core::op::{SubmitBatch, SubmitOp};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use support::Kernel;

const PUBLISHERS: usize = 8;
const CONSUMERS: usize = 2;

/// What the load saw before the kill.
#[derive(Default)]
struct Seen {
    /// Message ids whose publish was acknowledged.
    published: BTreeSet<String>,
    /// Message ids delivered to the group, and those whose ack was acknowledged.
    delivered: BTreeSet<String>,
    acked: BTreeSet<String>,
    /// Op submissions by idempotency key.
    op_keys: Vec<String>,
}

async fn fetch(client: &Client, group: &str, max: usize, timeout_ms: u64) -> bbx_core::Result<Vec<Value>> {
    let input = json!({ "topic": "c", "group": group, "max": max, "timeout_ms": timeout_ms, "ack_wait_ms": 60_000 });
    let fetched = client.call_endpoint("bus.subscribe", input).await?;
    Ok(fetched["messages"].as_array().cloned().unwrap_or_default())
}

async fn ack(client: &Client, group: &str, messages: &[Value]) -> bbx_core::Result<()> {
    let acks: Vec<&Value> = messages.iter().map(|m| &m["ack"]).collect();
    let input = json!({ "topic": "c", "group": group, "acks": acks });
    client.call_endpoint("bus.ack", input).await.map(drop)
}

fn id_of(message: &Value) -> String {
    message["id"].as_str().unwrap_or_default().to_owned()
}

/// Publishers, consumers and an op submitter, until the kernel is killed after a
/// random pause.
async fn load_until_killed(kernel: &mut Kernel, round: usize, agent: bbx_core::AgentId, seed: &mut u64) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let (client, seen) = (client.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            for seq in 0.. {
                let id = format!("r{round}-p{p}-{seq}");
                let input = json!({ "topic": "c", "id": id, "key": format!("k{p}"), "payload": { "seq": seq } });
                if client.call_endpoint("bus.publish", input).await.is_err() {
                    return;
                }
                seen.lock().unwrap().published.insert(id);
            }
        }));
    }
    for _ in 0..CONSUMERS {
        let (client, seen) = (client.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(messages) = fetch(&client, "g", 50, 100).await else {
                    return;
                };
                seen.lock().unwrap().delivered.extend(messages.iter().map(id_of));
                if messages.is_empty() {
                    continue;
                }
                if ack(&client, "g", &messages).await.is_err() {
                    return;
                }
                seen.lock().unwrap().acked.extend(messages.iter().map(id_of));
            }
        }));
    }
    {
        let (client, seen) = (client.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            for seq in 0.. {
                let key = format!("op-r{round}-{seq}");
                seen.lock().unwrap().op_keys.push(key.clone());
                if client.submit_ops(publish_op(agent, &key)).await.is_err() {
                    return;
                }
            }
        }));
    }
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    tokio::time::sleep(Duration::from_millis(200 + (*seed >> 33) % 600)).await;
    kernel.crash();
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap()
}

/// A `bus.publish` op to topic `ops`, keyed: its payload names its key.
fn publish_op(agent: bbx_core::AgentId, key: &str) -> SubmitBatch {
    let op = SubmitOp {
        idempotency_key: Some(key.to_owned()),
        ..SubmitOp::new(
            agent,
            "bus.publish",
            json!({ "topic": "ops", "payload": { "key": key } }),
        )
    };
    SubmitBatch {
        ops: vec![op],
        wait_ms: Some(30_000),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_publishes_and_acks_survive_sigkills_and_ops_publish_once() {
    let rounds: usize = std::env::var("BBX_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut kernel = Kernel::start();
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    client
        .call_endpoint("bus.create_topic", json!({ "topic": "c", "partitions": 3 }))
        .await
        .unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "publisher".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    // Every message of `c` also becomes a `state.incr` of the agent, exactly once.
    let route =
        json!({ "name": "count", "topic": "c", "agent": agent, "kind": "state.incr", "args": { "key": "routed" } });
    client.call_endpoint("bus.route", route).await.unwrap();
    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let (mut published, mut delivered, mut acked, mut op_keys) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new(), Vec::new());
    for round in 0..rounds {
        let seen = load_until_killed(&mut kernel, round, agent, &mut seed).await;
        assert!(
            !seen.published.is_empty(),
            "round {round}: nothing was published before the kill"
        );
        published.extend(seen.published);
        delivered.extend(seen.delivered);
        acked.extend(seen.acked);
        kernel.restart();
        // The op submitter retries what it did not hear back about, with its keys.
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        for key in &seen.op_keys {
            let op = client.submit_ops(publish_op(agent, key)).await.unwrap().ops[0].op_id;
            let done = client.wait_op(op, Duration::from_secs(30)).await.unwrap();
            let status = done.completion.map(|c| c.status.as_str().to_owned());
            assert_eq!(status.as_deref(), Some("ok"), "round {round}: op {key}");
        }
        op_keys.extend(seen.op_keys);
    }

    // Drain the group: nothing it acked comes again, and everything published
    // reached it.
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    loop {
        let messages = fetch(&client, "g", 1000, 300).await.unwrap();
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            let id = id_of(message);
            assert!(!acked.contains(&id), "{id} was acked, then delivered again");
            delivered.insert(id);
        }
        ack(&client, "g", &messages).await.unwrap();
    }
    let lost: Vec<&String> = published.difference(&delivered).collect();
    assert!(lost.is_empty(), "acknowledged publishes never delivered: {lost:?}");

    // A new group reads the whole topic: every acknowledged publish, once.
    let mut everything: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let messages = fetch(&client, "audit", 1000, 300).await.unwrap();
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            *everything.entry(id_of(message)).or_default() += 1;
        }
        ack(&client, "audit", &messages).await.unwrap();
    }
    assert!(published.iter().all(|id| everything.contains_key(id)));
    assert!(everything.values().all(|n| *n == 1), "a message stored twice");

    // The route took every message once: as many increments as messages.
    let mut routed = Value::Null;
    for _ in 0..300 {
        routed = client
            .state_get(agent, "routed".into())
            .await
            .map(|entry| entry.value)
            .unwrap_or(Value::Null);
        if routed == json!(everything.len()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(routed, json!(everything.len()), "routed increments against messages");

    // Every op's message, exactly once, whatever the crash did to its submission.
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let input = json!({ "topic": "ops", "group": "check", "max": 1000, "timeout_ms": 300 });
        let messages = client.call_endpoint("bus.subscribe", input).await.unwrap()["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if messages.is_empty() {
            break;
        }
        for message in &messages {
            *by_key
                .entry(message["payload"]["key"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        let acks: Vec<&Value> = messages.iter().map(|m| &m["ack"]).collect();
        let input = json!({ "topic": "ops", "group": "check", "acks": acks });
        client.call_endpoint("bus.ack", input).await.unwrap();
    }
    for key in &op_keys {
        assert_eq!(
            by_key.get(key),
            Some(&1),
            "op {key} published {:?} times",
            by_key.get(key)
        );
    }
}
