//! SIGKILL under op load, at a random moment, 20 times: after each restart every
//! acknowledged op completes exactly once, a retried submission joins its op, and
//! no `state.incr` is applied twice.
//!
//! `BBX_CRASH_ROUNDS` sets the number of kills for a longer run.

mod support;

use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::model::CreateAgent;
use bbx_core::op::{CompletionStatus, OpState, SubmitBatch, SubmitOp};
use bbx_core::{AgentId, OpId};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use support::Kernel;

const SUBMITTERS: usize = 16;

/// Runs `submitters` tasks that each submit one keyed op after another (made by
/// `op(submitter, seq)`), kills the kernel after a random pause within `pause_ms`,
/// and returns every key sent with its op id if it was acknowledged (a key without
/// one may or may not have been journaled).
async fn submit_until_killed(
    kernel: &mut Kernel,
    client: &Client,
    submitters: usize,
    seed: &mut u64,
    pause_ms: std::ops::Range<u64>,
    op: impl Fn(usize, u64) -> SubmitOp + Send + Sync + Clone + 'static,
) -> Vec<(String, Option<OpId>)> {
    let tasks: Vec<_> = (0..submitters)
        .map(|s| {
            let (client, op) = (client.clone(), op.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                for seq in 0.. {
                    let op = op(s, seq);
                    let key = op.idempotency_key.clone().expect("crash-test ops are keyed");
                    let batch = SubmitBatch {
                        ops: vec![op],
                        wait_ms: Some(5_000),
                    };
                    match client.submit_ops(batch).await {
                        Ok(submitted) => sent.push((key, Some(submitted.ops[0].op_id))),
                        Err(_) => {
                            sent.push((key, None));
                            return sent;
                        }
                    }
                }
                unreachable!()
            })
        })
        .collect();
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let pause = pause_ms.start + (*seed >> 33) % (pause_ms.end - pause_ms.start);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    kernel.crash();
    let mut sent = Vec::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    sent
}

fn incr(agent: AgentId, key: &str) -> SubmitOp {
    SubmitOp {
        idempotency_key: Some(key.to_owned()),
        ..SubmitOp::new(agent, "state.incr", json!({"key": "n", "by": 1}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_op_completes_exactly_once_across_sigkills() {
    let rounds: usize = std::env::var("BBX_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let mut kernel = Kernel::start();
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "crash".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    // Every submission key ever sent, with its op id once acknowledged.
    let mut all_keys: BTreeMap<String, Option<OpId>> = BTreeMap::new();

    for round in 0..rounds {
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        let sent = submit_until_killed(&mut kernel, &client, SUBMITTERS, &mut seed, 50..300, move |s, seq| {
            incr(agent, &format!("r{round}-s{s}-{seq}"))
        })
        .await;
        let mut round_keys = Vec::new();
        for (key, id) in sent {
            round_keys.push(key.clone());
            all_keys.insert(key, id);
        }
        assert!(
            all_keys.values().filter(|id| id.is_some()).count() > 0,
            "round {round}: nothing was acknowledged before the kill"
        );
        kernel.restart();

        // The client retries what it did not hear back about, with the same keys;
        // everything acknowledged must come back as the same op.
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        let mut ids = Vec::new();
        for chunk in round_keys.chunks(2000) {
            let batch = SubmitBatch {
                ops: chunk.iter().map(|key| incr(agent, key)).collect(),
                wait_ms: Some(30_000),
            };
            let submitted = client.submit_ops(batch).await.unwrap();
            for (key, op) in chunk.iter().zip(submitted.ops) {
                if let Some(acked) = all_keys[key] {
                    assert_eq!(op.op_id, acked, "round {round}: key {key} came back as another op");
                    assert!(op.deduplicated);
                }
                all_keys.insert(key.clone(), Some(op.op_id));
                ids.push(op.op_id.to_string());
            }
        }
        // One read that depends on every op of the round: it runs once they all
        // completed with ok (a failed one would cancel it).
        let read = SubmitOp {
            depends_on: ids,
            ..SubmitOp::new(agent, "state.get", json!({"key": "n"}))
        };
        let read = client
            .submit_ops(SubmitBatch {
                ops: vec![read],
                wait_ms: None,
            })
            .await
            .unwrap()
            .ops[0]
            .op_id;
        let info = client.wait_op(read, Duration::from_secs(60)).await.unwrap();
        assert_eq!(info.state, OpState::Done, "round {round}: the ops did not all complete");
        let completion = info.completion.unwrap();
        assert_eq!(completion.status, CompletionStatus::Ok, "round {round}: {completion:?}");
        let counted = completion.result.unwrap()["value"].as_u64().unwrap();
        assert_eq!(
            counted,
            all_keys.len() as u64,
            "round {round}: {} distinct ops, but the counter says {counted}: an op ran twice or not at all",
            all_keys.len()
        );
    }
    let wal = Client::new(&kernel.url(), &kernel.key())
        .unwrap()
        .wal_status()
        .await
        .unwrap();
    assert!(wal.segments >= 1);
}

fn append(agent: AgentId, key: &str) -> SubmitOp {
    SubmitOp {
        idempotency_key: Some(key.to_owned()),
        ..SubmitOp::new(
            agent,
            "tool.file",
            json!({"op": "append", "path": "log.txt", "content": format!("{key}\n")}),
        )
    }
}

/// Tool ops (appends to a workspace file, an effect outside the kernel's store)
/// under SIGKILL at random moments: after each restart every acknowledged op is
/// `ok` with its line written exactly once, or `in_doubt` with its line written at
/// most once; none is ever run again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_ops_are_done_or_in_doubt_and_never_rerun_across_sigkills() {
    let rounds: usize = std::env::var("BBX_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .map_or(10, |r: usize| r.div_ceil(2));
    let mut kernel = Kernel::start();
    let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
    let agent = client
        .create_agent(CreateAgent {
            name: "tools".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .id;
    let log = kernel
        .data_dir()
        .join("workspaces")
        .join(agent.to_string())
        .join("log.txt");
    let mut seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut acked: BTreeMap<String, OpId> = BTreeMap::new();
    let mut in_doubt = 0;
    for round in 0..rounds {
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        let round_keys = submit_until_killed(&mut kernel, &client, 8, &mut seed, 100..400, move |s, seq| {
            append(agent, &format!("t{round}-s{s}-{seq}"))
        })
        .await;
        kernel.restart();
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        // Resubmitting every key of the round: an acknowledged one names its op.
        let batch = SubmitBatch {
            ops: round_keys.iter().map(|(key, _)| append(agent, key)).collect(),
            wait_ms: Some(30_000),
        };
        let submitted = client.submit_ops(batch).await.unwrap();
        for ((key, id), op) in round_keys.iter().zip(submitted.ops) {
            if let Some(id) = id {
                assert_eq!(op.op_id, *id, "round {round}: key {key} came back as another op");
            }
            acked.insert(key.clone(), op.op_id);
        }
        let mut statuses = Vec::with_capacity(acked.len());
        for (key, id) in &acked {
            let info = client.wait_op(*id, Duration::from_secs(60)).await.unwrap();
            statuses.push((key, info.completion.expect("every op completes").status));
        }
        let written = std::fs::read_to_string(&log).unwrap_or_default();
        let mut lines: BTreeMap<&str, usize> = BTreeMap::new();
        for line in written.lines() {
            *lines.entry(line).or_default() += 1;
        }
        for (key, status) in statuses {
            let times = lines.get(key.as_str()).copied().unwrap_or(0);
            match status {
                CompletionStatus::Ok => assert_eq!(times, 1, "round {round}: {key} is ok but written {times} times"),
                CompletionStatus::InDoubt => {
                    assert!(times <= 1, "round {round}: {key} is in doubt but written {times} times");
                    in_doubt += 1;
                }
                other => panic!("round {round}: {key} ended {other:?}"),
            }
        }
        assert!(
            lines.values().all(|n| *n == 1),
            "round {round}: a line was written twice"
        );
    }
    assert!(
        acked.len() > rounds,
        "the rounds acknowledged too little to mean anything"
    );
    eprintln!("{} tool ops over {rounds} kills, {in_doubt} left in doubt", acked.len());
}
