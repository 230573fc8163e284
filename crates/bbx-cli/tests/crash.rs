//! SIGKILL under concurrent write load: every acknowledged write survives.

mod support;

use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::model::{CreateAgent, SetState};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use support::Kernel;

const WRITERS: usize = 32;
const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_under_load() {
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
    // The highest value each writer's key was acknowledged at, across all rounds.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;

    for round in 0..ROUNDS {
        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (client, acked) = (client.clone(), acked.clone());
                tokio::spawn(async move {
                    loop {
                        let next = acked[w].load(Ordering::SeqCst) + 1;
                        let req = SetState {
                            value: json!(next),
                            if_version: None,
                        };
                        match client.state_set(agent, format!("w{w}"), req).await {
                            Ok(_) => acked[w].store(next, Ordering::SeqCst),
                            Err(_) => return, // the kernel is gone
                        }
                    }
                })
            })
            .collect();
        // Kill at a different moment each round (100-400 ms into the load).
        let delay = 100
            + (seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(round as u64 * 1442695040888963407)
                >> 33)
                % 300;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kernel.crash();
        for writer in writers {
            writer.await.unwrap();
        }
        kernel.restart();

        let client = Client::new(&kernel.url(), &kernel.key()).unwrap();
        let mut total = 0;
        for (w, acked) in acked.iter().enumerate() {
            let acked = acked.load(Ordering::SeqCst);
            total += acked;
            if acked == 0 {
                continue;
            }
            let stored = client
                .state_get(agent, format!("w{w}"))
                .await
                .unwrap()
                .value
                .as_u64()
                .unwrap();
            // Everything acknowledged is there; at most the one write in flight at the
            // kill may have landed without its acknowledgement reaching the writer.
            assert!(
                stored == acked || stored == acked + 1,
                "round {round}, writer {w}: acked {acked}, stored {stored}"
            );
        }
        assert!(total > 0, "round {round}: no write was acknowledged before the kill");
    }
}
