//! `bbx bench snapshot`: StateSnapshots in process, on the default local
//! store. An agent is filled with `--keys` state keys of `--value-bytes`; then,
//! `--runs` times each: `--changed-percent` of its keys rewritten and an
//! incremental snapshot taken (its bytes written and wall time); a full
//! restore of the first snapshot into a new agent (every key read, checked and
//! written); a point-in-time recovery of a second agent
//! to a random moment among 10,000 ops done after its snapshot (the history of
//! an hour at 10k ops an hour, done faster); and the ring's durable throughput
//! of small state writes alone (the reference) and while snapshots of the
//! large agent run back to back.

use crate::cli::{BenchSnapshotArgs, Cli};
use anyhow::{Result, bail};
use bbx_core::AgentId;
use bbx_core::op::{SubmitBatch, SubmitOp};
use bbx_kernel::{Caller, Kernel};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Spread {
    runs: usize,
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        Self {
            runs: values.len(),
            median: values[values.len() / 2],
            min: values[0],
            max: values[values.len() - 1],
        }
    }
}

#[derive(Serialize)]
struct Targets {
    incremental_writes_at_most_3mb: bool,
    incremental_under_1s: bool,
    restore_100mb_local_under_2s: bool,
    pitr_under_2s: bool,
    ring_throughput_during_snapshot_at_least_80_percent: bool,
    restore_100mb_from_s3_under_5s: Option<bool>,
}

#[derive(Serialize)]
struct Report {
    keys: usize,
    value_bytes: usize,
    state_bytes: u64,
    full_snapshot_ms: f64,
    full_snapshot_bytes_written: u64,
    incremental_bytes_written: Spread,
    incremental_ms: Spread,
    restore_ms: Spread,
    pitr_ops_in_history: usize,
    pitr_ms: Spread,
    ring_ops_per_sec_alone: f64,
    ring_ops_per_sec_during_snapshots: f64,
    ring_throughput_ratio: f64,
    snapshots_during_ring_run: usize,
    /// With --s3-endpoint: a full restore of the same agent from S3.
    restore_from_s3_ms: Option<Spread>,
    targets: Targets,
}

struct Bench {
    kernel: Arc<Kernel>,
    caller: Caller,
}

fn text_value(len: usize, rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ";
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Bench {
    async fn set_many(&self, agent: AgentId, writes: Vec<(String, Value)>) -> Result<()> {
        for batch in writes.chunks(64) {
            let ops = batch
                .iter()
                .map(|(key, value)| SubmitOp::new(agent, "state.set", json!({ "key": key, "value": value })))
                .collect();
            let submitted = self
                .kernel
                .submit(&self.caller, SubmitBatch { ops, wait_ms: None })
                .await?;
            for op in submitted.ops {
                let info = self
                    .kernel
                    .wait_op(&self.caller, &op.op_id, Duration::from_secs(60))
                    .await?;
                if info.completion.is_none_or(|c| c.error.is_some()) {
                    bail!("a state.set of the benchmark failed");
                }
            }
        }
        Ok(())
    }

    async fn call(&self, name: &str, input: Value) -> Result<(Value, f64)> {
        let started = Instant::now();
        let answer = self.kernel.call_endpoint(&self.caller, name, input).await?;
        Ok((answer, started.elapsed().as_secs_f64() * 1000.0))
    }

    async fn agent(&self, name: &str) -> Result<AgentId> {
        Ok(self
            .kernel
            .create_agent(&self.caller, serde_json::from_value(json!({ "name": name }))?)
            .await?
            .id)
    }

    /// Small durable writes from 32 writers for `time`: ops per second.
    async fn ring_rate(&self, agent: AgentId, time: Duration) -> Result<f64> {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Instant::now() + time;
        let mut writers = Vec::new();
        for writer in 0..32 {
            let (kernel, caller, done) = (self.kernel.clone(), self.caller.clone(), done.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < stop {
                    let op = SubmitOp::new(
                        agent,
                        "state.set",
                        json!({ "key": format!("w{writer}-{}", i % 50), "value": i }),
                    );
                    let id = kernel
                        .submit(
                            &caller,
                            SubmitBatch {
                                ops: vec![op],
                                wait_ms: None,
                            },
                        )
                        .await?
                        .ops[0]
                        .op_id;
                    kernel.wait_op(&caller, &id, Duration::from_secs(30)).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok::<_, bbx_core::Error>(())
            }));
        }
        for writer in writers {
            writer.await??;
        }
        Ok(done.load(Ordering::Relaxed) as f64 / time.as_secs_f64())
    }
}

impl Bench {
    /// An agent with `--keys` keys of `--value-bytes`.
    async fn filled(&self, args: &BenchSnapshotArgs, rng: &mut impl Rng) -> Result<AgentId> {
        let big = self.agent("snapshot-bench").await?;
        eprintln!(
            "filling an agent with {} keys of {} bytes...",
            args.keys, args.value_bytes
        );
        let fill: Vec<(String, Value)> = (0..args.keys)
            .map(|i| (format!("key-{i:06}"), json!(text_value(args.value_bytes, rng))))
            .collect();
        self.set_many(big, fill).await?;
        Ok(big)
    }
}

/// Full restores of the filled agent from an S3-only kernel.
async fn s3_restores(dir: &std::path::Path, args: &BenchSnapshotArgs, endpoint: &str) -> Result<Spread> {
    let store = bbx_core::config::SnapshotStoreConfig::S3(bbx_core::config::S3Bucket {
        bucket: args.s3_bucket.clone(),
        prefix: Some(format!("bench-{}", uuid::Uuid::new_v4().simple())),
        endpoint: Some(endpoint.to_owned()),
        region: "us-east-1".into(),
        access_key_id: None,
        secret_access_key: None,
        anonymous: true,
    });
    let over = bbx_core::config::ConfigLayer {
        snapshots: Some(bbx_core::config::SnapshotsConfig {
            stores: vec![store],
            ..Default::default()
        }),
        ..Default::default()
    };
    let (kernel, caller) = crate::bench::open_in_process(dir, over).await?;
    let bench = Bench { kernel, caller };
    let big = bench.filled(args, &mut rand::rng()).await?;
    eprintln!("a snapshot to S3, and full restores from it...");
    let (snapshot, _) = bench.call("snapshots.create", json!({ "agent": big })).await?;
    let mut restores = Vec::new();
    for _ in 0..args.runs {
        let fresh = bench.agent("restore-bench").await?;
        let (_, ms) = bench
            .call(
                "snapshots.restore",
                json!({ "snapshot": snapshot["id"], "agent": fresh }),
            )
            .await?;
        restores.push(ms);
    }
    bench.kernel.shutdown().await;
    Ok(Spread::of(restores))
}

async fn measure(dir: &std::path::Path, args: &BenchSnapshotArgs) -> Result<Report> {
    let (kernel, caller) = crate::bench::open_in_process(&dir.join("local"), Default::default()).await?;
    let bench = Bench { kernel, caller };
    let mut rng = rand::rng();
    let big = bench.filled(args, &mut rng).await?;
    eprintln!("the full snapshot...");
    let (first, full_ms) = bench.call("snapshots.create", json!({ "agent": big })).await?;
    let first_id = first["id"].clone();
    let changed = ((args.keys as f64 * args.changed_percent / 100.0).round() as usize).max(1);
    let (mut written, mut incremental, mut restores) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        eprintln!(
            "run {}: {changed} keys rewritten, then an incremental snapshot...",
            run + 1
        );
        let rewrites = (0..changed)
            .map(|_| {
                let key = format!("key-{:06}", rng.random_range(0..args.keys));
                (key, json!(text_value(args.value_bytes, &mut rng)))
            })
            .collect();
        bench.set_many(big, rewrites).await?;
        let (snapshot, ms) = bench.call("snapshots.create", json!({ "agent": big })).await?;
        written.push(snapshot["bytes_written"].as_f64().unwrap_or_default());
        incremental.push(ms);
    }
    for run in 0..args.runs {
        // Into an agent with nothing: every key is read, checked and written.
        eprintln!("run {}: the first snapshot restored whole into a new agent...", run + 1);
        let fresh = bench.agent("restore-bench").await?;
        let (_, ms) = bench
            .call("snapshots.restore", json!({ "snapshot": first_id, "agent": fresh }))
            .await?;
        restores.push(ms);
    }

    eprintln!("point-in-time recovery over 10,000 ops...");
    let small = bench.agent("pitr-bench").await?;
    bench.call("snapshots.create", json!({ "agent": small })).await?;
    let mut moments = Vec::new();
    for round in 0..10 {
        let writes = (0..1000)
            .map(|i| {
                (
                    format!("k{}", (round * 1000 + i) % 1000),
                    json!({ "round": round, "i": i }),
                )
            })
            .collect();
        bench.set_many(small, writes).await?;
        moments.push(chrono::Utc::now());
    }
    let mut pitr = Vec::new();
    for _ in 0..args.runs {
        let at = moments[rng.random_range(0..moments.len())];
        let (_, ms) = bench
            .call("snapshots.pitr", json!({ "agent": small, "at": at.to_rfc3339() }))
            .await?;
        pitr.push(ms);
    }

    eprintln!("the ring's durable throughput, alone and while snapshots run...");
    let writer = bench.agent("ring-bench").await?;
    let alone = bench.ring_rate(writer, Duration::from_secs(5)).await?;
    let running = Arc::new(AtomicBool::new(true));
    let snapshots = {
        let (kernel, caller, running) = (bench.kernel.clone(), bench.caller.clone(), running.clone());
        tokio::spawn(async move {
            let mut taken = 0;
            while running.load(Ordering::Relaxed) {
                if kernel
                    .call_endpoint(&caller, "snapshots.create", json!({ "agent": big }))
                    .await
                    .is_ok()
                {
                    taken += 1;
                }
            }
            taken
        })
    };
    let during = bench.ring_rate(writer, Duration::from_secs(5)).await?;
    running.store(false, Ordering::Relaxed);
    let taken = snapshots.await?;
    bench.kernel.shutdown().await;
    let restore_from_s3_ms = match &args.s3_endpoint {
        Some(endpoint) => Some(s3_restores(&dir.join("s3"), args, endpoint).await?),
        None => None,
    };

    let incremental_bytes_written = Spread::of(written);
    let incremental_ms = Spread::of(incremental);
    let restore_ms = Spread::of(restores);
    let pitr_ms = Spread::of(pitr);
    let ratio = during / alone;
    Ok(Report {
        keys: args.keys,
        value_bytes: args.value_bytes,
        state_bytes: first["bytes"].as_u64().unwrap_or_default(),
        full_snapshot_ms: full_ms,
        full_snapshot_bytes_written: first["bytes_written"].as_u64().unwrap_or_default(),
        targets: Targets {
            incremental_writes_at_most_3mb: incremental_bytes_written.median <= 3e6,
            incremental_under_1s: incremental_ms.median < 1000.0,
            restore_100mb_local_under_2s: restore_ms.median < 2000.0,
            pitr_under_2s: pitr_ms.median < 2000.0,
            ring_throughput_during_snapshot_at_least_80_percent: ratio >= 0.8,
            restore_100mb_from_s3_under_5s: restore_from_s3_ms.as_ref().map(|s| s.median < 5000.0),
        },
        incremental_bytes_written,
        incremental_ms,
        restore_ms,
        pitr_ops_in_history: 10_000,
        pitr_ms,
        ring_ops_per_sec_alone: alone,
        ring_ops_per_sec_during_snapshots: during,
        ring_throughput_ratio: ratio,
        snapshots_during_ring_run: taken,
        restore_from_s3_ms,
    })
}

pub async fn snapshot(cli: &Cli, args: &BenchSnapshotArgs) -> Result<()> {
    if args.keys == 0 || args.runs == 0 || !(0.0..=100.0).contains(&args.changed_percent) {
        bail!("--keys and --runs must be at least 1, --changed-percent from 0 to 100");
    }
    let _ = cli;
    let scratch_dir = args.scratch_dir.clone();
    let args = args.clone();
    crate::bench::report_in_process(
        scratch_dir.as_deref(),
        move |dir| async move { measure(&dir, &args).await },
    )
}
