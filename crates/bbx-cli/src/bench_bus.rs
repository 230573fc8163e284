//! `bbx bench bus`: the MessageBus's embedded backend, each phase next to a
//! reference measured in the same run.
//!
//! - `batched`: 1 KiB messages published in batches (`--batch`, 100) by 4
//!   concurrent in-process publishers; latency is a batch's publish to its
//!   durable answer, counted once per message.
//! - `fsync_reference`: a bare append + fdatasync loop on the same disk writing
//!   as many bytes per sync as `batched` journaled per group sync: the messages a
//!   second any log could make durable at that group size.
//! - `unbatched`: one message per publish from `--publishers` (256) concurrent
//!   in-process publishers.
//! - `delivery`: a kernel process over loopback HTTP; publishers send one message
//!   per request at `--rate` (10,000/s) on a fixed schedule from 64 connections
//!   while `--consumers` (2) of one group fetch (up to 200 at a time), then ack;
//!   latency is from a message's publish call to its receipt by a consumer.
//! - `redis`: Redis Streams with every write synced, the same batched and
//!   unbatched loads through its own client (`bench_bus_redis`), and BBX's ratio
//!   to it; absent, with the reason, where `redis-server` is not installed.

use crate::bench::{Figures, call_loop, histogram, open_in_process, scratch_dir, start_kernel, two_cores};
use crate::bench_ring::fsync_loop;
use crate::cli::{BenchBusArgs, Cli};
use anyhow::{Context, Result, bail};
use bbx_core::api::prelude::*;
use bbx_core::config::ConfigLayer;
use serde::Serialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The payload's text: 1 KiB as stored (a JSON string of 1022 characters).
fn kib_payload() -> Value {
    Value::String("m".repeat(1022))
}

#[derive(Serialize)]
struct Report {
    message_bytes: usize,
    batch: usize,
    batched: Figures,
    /// Journal bytes per group sync during `batched`, and messages per sync.
    batched_bytes_per_sync: u64,
    batched_messages_per_sync: f64,
    /// The fdatasync loop at `batched_bytes_per_sync`, in messages a second
    /// (its syncs a second × `batched_messages_per_sync`).
    fsync_reference: Figures,
    fsync_reference_messages_per_sec: f64,
    publishers: usize,
    unbatched: Figures,
    rate: f64,
    consumers: usize,
    delivery: Figures,
    /// Redis Streams on this machine (appendfsync always), through its client.
    redis: Option<crate::bench_bus_redis::RedisFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_missing: Option<String>,
    /// BBX's messages a second over Redis's: batched, unbatched.
    ratio_to_redis: Option<(f64, f64)>,
    targets: Targets,
}

#[derive(Serialize)]
struct Targets {
    batched_at_least_90_percent_of_fsync_reference: bool,
    unbatched_at_least_20k_per_sec: bool,
    delivery_p99_under_2ms: bool,
}

pub async fn bus(cli: &Cli, args: &BenchBusArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    if args.batch == 0 || args.publishers == 0 || args.consumers == 0 || !(args.rate.is_finite() && args.rate >= 1.0) {
        bail!("--batch, --publishers and --consumers must be positive, --rate at least 1");
    }
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let measure = Duration::from_secs_f64(args.seconds);
    let dir = scratch.path().join("inproc");
    let (batch, publishers) = (args.batch, args.publishers);
    // The in-process kernel gets a multi-threaded runtime of its own: this
    // command's runtime is single-threaded.
    let in_process = std::thread::spawn(move || -> Result<InProcess> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(in_process(&dir, measure, batch, publishers))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the in-process phases panicked"))??;

    std::fs::File::open(scratch.path())
        .and_then(|dir| Ok(rustix::fs::syncfs(dir)?))
        .context("cannot sync the scratch directory's file system")?;
    let fsync_reference = fsync_loop(scratch.path(), 1, in_process.bytes_per_sync as usize, measure, false)?;
    let fsync_reference_messages_per_sec = fsync_reference.ops_per_sec * in_process.messages_per_sync;

    let redis = crate::bench_bus_redis::measure(&scratch.path().join("redis"), measure, batch, publishers)?;
    let load = (args.rate, args.consumers);
    let delivery = delivery(&scratch.path().join("http"), measure, load, !args.no_isolate).await?;
    let ratio_to_redis = redis.as_ref().ok().map(|r| {
        (
            in_process.batched.ops_per_sec / r.batched.ops_per_sec.max(1.0),
            in_process.unbatched.ops_per_sec / r.unbatched.ops_per_sec.max(1.0),
        )
    });
    let (redis, redis_missing) = match redis {
        Ok(figures) => (Some(figures), None),
        Err(why) => (None, Some(why)),
    };
    let report = Report {
        redis,
        redis_missing,
        ratio_to_redis,
        message_bytes: 1024,
        batch,
        targets: Targets {
            batched_at_least_90_percent_of_fsync_reference: in_process.batched.ops_per_sec
                >= 0.9 * fsync_reference_messages_per_sec,
            unbatched_at_least_20k_per_sec: in_process.unbatched.ops_per_sec >= 20_000.0,
            delivery_p99_under_2ms: delivery.p99_us < 2000,
        },
        batched: in_process.batched,
        batched_bytes_per_sync: in_process.bytes_per_sync,
        batched_messages_per_sync: in_process.messages_per_sync,
        fsync_reference,
        fsync_reference_messages_per_sec,
        publishers,
        unbatched: in_process.unbatched,
        rate: args.rate,
        consumers: args.consumers,
        delivery,
    };
    if cli.json {
        crate::output::json(&report);
    } else {
        print_report(&report);
    }
    Ok(())
}

struct InProcess {
    batched: Figures,
    bytes_per_sync: u64,
    messages_per_sync: f64,
    unbatched: Figures,
}

async fn in_process(dir: &Path, measure: Duration, batch: usize, publishers: usize) -> Result<InProcess> {
    let (kernel, caller) = open_in_process(dir, ConfigLayer::default()).await?;
    let payload = kib_payload();
    let messages: Vec<Value> = (0..batch).map(|_| json!({ "payload": payload })).collect();
    let publish_batch = json!({ "topic": "batched", "messages": messages });

    let before = kernel.wal_status(&caller).await?;
    let publish = |input: Value| {
        let (kernel, caller) = (kernel.clone(), caller.clone());
        move || {
            let (kernel, caller, input) = (kernel.clone(), caller.clone(), input.clone());
            async move { kernel.call_endpoint(&caller, "bus.publish", input).await.map(drop) }
        }
    };
    let batched = call_loop(4, measure, batch as u64, publish(publish_batch)).await?;
    let after = kernel.wal_status(&caller).await?;
    let syncs = (after.syncs_total - before.syncs_total).max(1);

    let single = json!({ "topic": "unbatched", "payload": payload });
    let unbatched = call_loop(publishers, measure, 1, publish(single)).await?;
    kernel.shutdown().await;
    Ok(InProcess {
        bytes_per_sync: (after.bytes_total - before.bytes_total) / syncs,
        messages_per_sync: batched.ops as f64 / syncs as f64,
        batched,
        unbatched,
    })
}

fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Publish-to-delivery latency over loopback HTTP at `rate` messages a second.
async fn delivery(dir: &Path, measure: Duration, (rate, consumers): (f64, usize), isolate: bool) -> Result<Figures> {
    const PUBLISHERS: usize = 64;
    let cores = if isolate { two_cores()? } else { None };
    let (kernel, _) = start_kernel(dir, cores)?;
    let client = Arc::new(bbx_client::Client::new(&kernel.url, &kernel.key)?);
    client
        .call_endpoint("bus.create_topic", json!({ "topic": "latency" }))
        .await?;
    let warmup = Duration::from_secs(1);
    let start = Instant::now();
    let measured_from = epoch_micros() + warmup.as_micros() as u64;
    let end = start + warmup + measure;
    let interval = Duration::from_secs_f64(PUBLISHERS as f64 / rate);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                // Spread the publishers over one interval, then keep to the schedule.
                let mut next = start + interval.mul_f64(n as f64 / PUBLISHERS as f64);
                while next < end {
                    tokio::time::sleep_until(next.into()).await;
                    let input = json!({ "topic": "latency", "payload": { "sent_us": epoch_micros() } });
                    client.call_endpoint("bus.publish", input).await?;
                    next += interval;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    let consumers: Vec<_> = (0..consumers)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut latencies = histogram();
                let fetch = json!({ "topic": "latency", "group": "bench", "max": 200, "timeout_ms": 200 });
                while Instant::now() < end + Duration::from_millis(500) {
                    let fetched = client.call_endpoint("bus.subscribe", fetch.clone()).await?;
                    let received = epoch_micros();
                    let messages = fetched["messages"].as_array().cloned().unwrap_or_default();
                    if messages.is_empty() {
                        continue;
                    }
                    for message in &messages {
                        let sent = message["payload"]["sent_us"].as_u64().unwrap_or(received);
                        if sent >= measured_from {
                            latencies.saturating_record(received.saturating_sub(sent).max(1));
                        }
                    }
                    let acks: Vec<&Value> = messages.iter().map(|m| &m["ack"]).collect();
                    let ack = json!({ "topic": "latency", "group": "bench", "acks": acks });
                    client.call_endpoint("bus.ack", ack).await?;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    let mut all = histogram();
    for consumer in consumers {
        all.add(consumer.await??)?;
    }
    drop(kernel);
    Ok(Figures::from(&all, measure))
}

fn print_report(r: &Report) {
    println!(
        "{:<18} {:>12} {:>10} {:>10} {:>10}",
        "", "msgs/s", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, f) in [
        ("batched", &r.batched),
        ("fsync reference", &r.fsync_reference),
        ("unbatched", &r.unbatched),
        ("delivery", &r.delivery),
    ] {
        println!(
            "{name:<18} {:>12.0} {:>10} {:>10} {:>10}",
            f.ops_per_sec, f.p50_us, f.p99_us, f.p999_us
        );
    }
    println!(
        "batched: {} messages of {} B a batch, {:.0} messages and {} B journaled a sync; the fsync loop at that size: {:.0} messages/s ({:.0} %)",
        r.batch,
        r.message_bytes,
        r.batched_messages_per_sync,
        r.batched_bytes_per_sync,
        r.fsync_reference_messages_per_sec,
        100.0 * r.batched.ops_per_sec / r.fsync_reference_messages_per_sec.max(1.0)
    );
    println!(
        "unbatched: {} publishers; delivery at {:.0} messages/s to {} consumers",
        r.publishers, r.rate, r.consumers
    );
    match (&r.redis, r.ratio_to_redis) {
        (Some(redis), Some((batched, unbatched))) => println!(
            "redis {} (appendfsync always): batched {:.0} msgs/s, unbatched {:.0} msgs/s; BBX is {batched:.2}x and {unbatched:.2}x",
            redis.version, redis.batched.ops_per_sec, redis.unbatched.ops_per_sec
        ),
        _ => println!("redis: {}", r.redis_missing.as_deref().unwrap_or("not measured")),
    }
    println!("targets: {}", serde_json::to_string(&r.targets).unwrap_or_default());
}
