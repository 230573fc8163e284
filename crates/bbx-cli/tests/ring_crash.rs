//! SIGKILL under op load, at a random moment, 20 times: after each restart every
//! acknowledged op completes exactly once, a retried submission joins its op, and
//! no `state.incr` is applied twice.
//!
//! `BBX_CRASH_ROUNDS` sets the number of kills for a longer run.

mod support;

use bbx_client::Client;
use bbx_core::model::CreateAgent;
use bbx_core::op::{CompletionStatus, OpState, SubmitBatch, SubmitOp};
use bbx_core::{AgentApi, AgentId, OpId};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use support::Kernel;

const SUBMITTERS: usize = 16;

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
        let submitters: Vec<_> = (0..SUBMITTERS)
            .map(|s| {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut sent: Vec<(String, Option<OpId>)> = Vec::new();
                    for seq in 0.. {
                        let key = format!("r{round}-s{s}-{seq}");
                        let batch = SubmitBatch {
                            ops: vec![incr(agent, &key)],
                            wait_ms: Some(5_000),
                        };
                        match client.submit_ops(batch).await {
                            Ok(submitted) => sent.push((key, Some(submitted.ops[0].op_id))),
                            Err(_) => {
                                // The kernel died: this one may or may not have been journaled.
                                sent.push((key, None));
                                return sent;
                            }
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis(50 + (seed >> 33) % 250)).await;
        kernel.crash();
        let mut round_keys = Vec::new();
        for submitter in submitters {
            for (key, id) in submitter.await.unwrap() {
                round_keys.push(key.clone());
                all_keys.insert(key, id);
            }
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
