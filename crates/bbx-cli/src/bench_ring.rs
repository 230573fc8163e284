//! `bbx bench ring`: the AgentRing's submission paths, each next to the physical
//! limit measured in the same run.
//!
//! - `inproc`: `noop` ops in batches of 64 through an in-process kernel (nothing is
//!   journaled), from one submitter by default (`--inproc-submitters`); latency is
//!   from a batch's submission to each op's reaped completion.
//! - `durable`: 1024 concurrent in-process submitters of one `state.set` op each,
//!   acknowledged after the journal's group fdatasync; latency is submit to ack.
//!   The report adds what the phase wrote per op: to the journal, and to the disk
//!   in all (the store's own writes and the journal's next segment included).
//! - `fsync_ceiling`: a bare append + fdatasync loop on the same disk, writing the
//!   same number of records of the same size per sync as `durable` averaged: how
//!   fast any journal could acknowledge at that group size.
//! - `fsync_ceiling_preallocated`: the same loop overwriting a zero-filled file, as
//!   the journal does once its spare segment is ready (a sync then skips the file
//!   system's metadata commit): the tighter limit, reported beside the other.
//! - `http_batch` / `http_single`: durable `state.set` ops over loopback HTTP to a
//!   kernel process, 100 per request (16 connections) or one per request (8
//!   connections; both set by flags and echoed in the report).
//! - `shm`: `noop` ops through a shared-memory session with the same kernel
//!   process, one at a time; latency is from submission to reaped completion.

use crate::bench::{Figures, closed_loop, histogram, scratch_dir, start_kernel, two_cores};
use crate::cli::{BenchRingArgs, Cli};
use anyhow::{Context, Result, bail};
use bbx_client::Client;
use bbx_core::api::prelude::*;
use bbx_core::config::{ConfigLayer, RingConfig};
use bbx_core::model::CreateAgent;
use bbx_core::op::{SubmitBatch, SubmitOp};
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use hyper::http::{HeaderValue, Method, header};
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Report {
    inproc: Figures,
    durable: Figures,
    fsync_ceiling: Figures,
    fsync_ceiling_preallocated: Figures,
    http_batch: Figures,
    http_single: Figures,
    shm: Figures,
    /// Journal records per fdatasync during `durable`, and their average size.
    durable_records_per_sync: f64,
    record_bytes: u64,
    /// During `durable`: the share of the time the journal spent appending and
    /// syncing (the rest it waited for records or for a core); and the in-process
    /// kernel's group syncs (all but the one that created the bench's agent were
    /// `durable`'s): median, 99th percentile and slowest (a sync waits for
    /// whatever else the disk was asked to write first).
    durable_journal_busy: f64,
    durable_sync_p50_us: u64,
    durable_sync_p99_us: u64,
    durable_sync_max_us: u64,
    /// During `durable`, per op: the bytes journaled, and the bytes the data
    /// directory's disk wrote in all (the journal, the zeros of its next segment, the
    /// store's own journal and tables, and whatever else wrote to that disk; from
    /// `/proc/diskstats`, absent where the directory's device is not listed there).
    /// The ceilings write only the first.
    durable_journal_bytes_per_op: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    durable_disk_bytes_per_op: Option<u64>,
    /// The journal writer thread's nice value in the in-process kernel:
    /// `ring.journal_nice` where this process may raise it, its own otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    durable_journal_writer_nice: Option<i32>,
    /// The store committer's nice value in the in-process kernel:
    /// `ring.committer_nice` where that is above this process's own, its own
    /// otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    durable_committer_nice: Option<i32>,
    /// In-process submitters of inproc.
    inproc_submitters: usize,
    /// Whether 20 flow rules on the tool kinds were loaded (`--flow-rules`).
    flow_rules: bool,
    /// Whether anomaly detection was on in the in-process kernel.
    anomaly_detection: bool,
    /// Concurrent connections of http_batch and http_single.
    http_batch_clients: usize,
    http_single_clients: usize,
    targets: Targets,
}

#[derive(Serialize)]
struct Targets {
    inproc_at_least_1m_ops: bool,
    durable_at_least_50k_ops: bool,
    durable_at_least_90pct_of_fsync_ceiling: bool,
    http_batch_at_least_50k_ops: bool,
    http_single_p99_within_2ms_of_fsync_ceiling_p99: bool,
    shm_p99_under_10us: bool,
}

/// The in-process phases and what `durable` did to the journal.
struct InProcess {
    inproc: Figures,
    durable: Figures,
    records_per_sync: f64,
    record_bytes: u64,
    journal_busy: f64,
    sync_p50_us: u64,
    sync_p99_us: u64,
    sync_max_us: u64,
    journal_bytes_per_op: u64,
    disk_bytes_per_op: Option<u64>,
    writer_nice: Option<i32>,
    committer_nice: Option<i32>,
}

pub async fn ring(cli: &Cli, args: &BenchRingArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let measure = Duration::from_secs_f64(args.seconds);

    // The in-process kernel gets a multi-threaded runtime of its own, on its own
    // thread: this command's runtime is a single-threaded load generator.
    let dir = scratch.path().join("inproc");
    let submitters = (usize::from(args.inproc_submitters), args.durable_submitters);
    let flow = (args.flow_rules, !args.no_anomaly);
    let defaults = RingConfig::default();
    let ring = RingConfig {
        journal_nice: args.journal_nice.unwrap_or(defaults.journal_nice),
        committer_nice: args.committer_nice.unwrap_or(defaults.committer_nice),
        ..defaults
    };
    let in_process = std::thread::spawn(move || -> Result<InProcess> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(in_process(&dir, measure, submitters, ring, flow))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the in-process phases panicked"))??;

    let group = in_process.records_per_sync.round().max(1.0) as usize;
    let record_bytes = in_process.record_bytes as usize;
    // The physical limit is measured on a quiet disk: the kernel that just shut
    // down leaves its store's files dirty, and their writeback slowed the loop's
    // syncs (by 5-10 % in runs here), a ceiling lower than the disk's.
    std::fs::File::open(scratch.path())
        .and_then(|dir| Ok(rustix::fs::syncfs(dir)?))
        .context("cannot sync the scratch directory's file system")?;
    let fsync_ceiling = fsync_loop(scratch.path(), group, record_bytes, measure, false)?;
    let fsync_ceiling_preallocated = fsync_loop(scratch.path(), group, record_bytes, measure, true)?;

    let cores = if args.no_isolate { None } else { two_cores()? };
    let (kernel, _) = start_kernel(&scratch.path().join("http"), cores)?;
    let client = Client::new(&kernel.url, &kernel.key)?;
    let agent = client
        .create_agent(CreateAgent {
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .id;
    let addr: SocketAddr = kernel.url.trim_start_matches("http://").parse()?;
    let requests = OpRequests {
        host: HeaderValue::from_str(&addr.to_string())?,
        bearer: HeaderValue::from_str(&format!("Bearer {}", kernel.key))?,
        agent,
    };
    let warmup = Duration::from_millis(500);
    let batch = |requests: &OpRequests, size: usize| {
        let requests = requests.clone();
        move |client: usize, i: u64| requests.set_ops(client, i, size)
    };
    closed_loop(addr, args.http_clients, warmup, batch(&requests, 100)).await?;
    let mut http_batch = closed_loop(addr, args.http_clients, measure, batch(&requests, 100)).await?;
    http_batch.ops *= 100;
    http_batch.ops_per_sec *= 100.0;
    closed_loop(addr, args.http_single_clients, warmup, batch(&requests, 1)).await?;
    let http_single = closed_loop(addr, args.http_single_clients, measure, batch(&requests, 1)).await?;
    let shm = client.open_shm(None).await?;
    let shm = tokio::task::spawn_blocking(move || shm_noops(shm, agent, warmup, measure)).await??;
    drop(kernel);

    let report = Report {
        targets: Targets {
            inproc_at_least_1m_ops: in_process.inproc.ops_per_sec >= 1_000_000.0,
            durable_at_least_50k_ops: in_process.durable.ops_per_sec >= 50_000.0,
            durable_at_least_90pct_of_fsync_ceiling: in_process.durable.ops_per_sec >= 0.9 * fsync_ceiling.ops_per_sec,
            http_batch_at_least_50k_ops: http_batch.ops_per_sec >= 50_000.0,
            http_single_p99_within_2ms_of_fsync_ceiling_p99: http_single.p99_us <= fsync_ceiling.p99_us + 2_000,
            shm_p99_under_10us: shm.p99_us < 10,
        },
        inproc: in_process.inproc,
        durable: in_process.durable,
        fsync_ceiling,
        fsync_ceiling_preallocated,
        http_batch,
        http_single,
        shm,
        durable_records_per_sync: in_process.records_per_sync,
        durable_journal_busy: in_process.journal_busy,
        durable_sync_p50_us: in_process.sync_p50_us,
        durable_sync_p99_us: in_process.sync_p99_us,
        durable_sync_max_us: in_process.sync_max_us,
        durable_journal_bytes_per_op: in_process.journal_bytes_per_op,
        durable_disk_bytes_per_op: in_process.disk_bytes_per_op,
        durable_journal_writer_nice: in_process.writer_nice,
        durable_committer_nice: in_process.committer_nice,
        record_bytes: in_process.record_bytes,
        inproc_submitters: usize::from(args.inproc_submitters),
        flow_rules: args.flow_rules,
        anomaly_detection: !args.no_anomaly,
        http_batch_clients: args.http_clients,
        http_single_clients: args.http_single_clients,
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn in_process(
    dir: &Path,
    measure: Duration,
    (inproc_submitters, durable_submitters): (usize, usize),
    ring: RingConfig,
    (flow_rules, anomaly_detection): (bool, bool),
) -> Result<InProcess> {
    let mut flow = bbx_core::config::FlowConfig::default();
    flow.anomaly.enabled = anomaly_detection;
    let over = ConfigLayer {
        ring: Some(ring),
        flow: Some(flow),
        ..Default::default()
    };
    let (kernel, caller) = crate::bench::open_in_process(dir, over).await?;
    if flow_rules {
        for policy in crate::bench_flow::policies() {
            let input = json!({ "name": policy.name, "source": policy.source });
            kernel.call_endpoint(&caller, "flow.add_policy", input).await?;
        }
    }
    let agent = kernel
        .create_agent(
            &caller,
            CreateAgent {
                name: "bench".into(),
                ..Default::default()
            },
        )
        .await?
        .id;
    let session = Arc::new(kernel.session(caller.clone()));

    // inproc: each submitter sends a batch of 64 noops at a time and reaps all 64
    // from a completion queue of its own.
    let noops = move |session: Arc<bbx_kernel::Session>, end: Instant| async move {
        let mut queue = bbx_kernel::CompletionQueue::new();
        let mut reaped = Vec::with_capacity(64);
        let mut latencies = Latencies::new();
        while Instant::now() < end {
            let started = Instant::now();
            let batch = SubmitBatch {
                ops: (0..64).map(|_| SubmitOp::new(agent, "noop", json!(null))).collect(),
                wait_ms: Some(10_000),
            };
            let mut pending = session.submit_to(batch, &queue).await?.ops.len();
            while pending > 0 {
                reaped.clear();
                let n = queue.reap(&mut reaped, pending).await;
                if n == 0 {
                    bail!("the completion queue closed");
                }
                // All reaped at one moment: one clock read for them.
                let latency = started.elapsed().as_micros().max(1) as u64;
                if let Some(done) = reaped
                    .iter()
                    .find(|done| done.status != bbx_core::op::CompletionStatus::Ok)
                {
                    bail!("a noop ended {}", done.status.as_str());
                }
                latencies.push((latency, n as u64));
                pending -= n;
            }
        }
        anyhow::Ok(latencies)
    };
    let inproc = run_tasks(inproc_submitters, measure, |_| {
        noops(session.clone(), Instant::now() + measure)
    })
    .await?;

    // durable: many submitters, one state.set each, acknowledged once journaled.
    let before = kernel.wal_status(&caller).await?;
    let disk_before = disk_bytes_written(dir);
    let durable_started = Instant::now();
    let sets = move |session: Arc<bbx_kernel::Session>, n: usize, end: Instant| async move {
        let mut latencies = Latencies::new();
        let mut i = 0u64;
        while Instant::now() < end {
            let started = Instant::now();
            let op = SubmitOp::new(agent, "state.set", json!({"key": format!("d{n}"), "value": i}));
            let batch = SubmitBatch {
                ops: vec![op],
                wait_ms: Some(60_000),
            };
            session.submit_ops(batch).await?;
            latencies.push((started.elapsed().as_micros().max(1) as u64, 1));
            i += 1;
        }
        anyhow::Ok(latencies)
    };
    let durable = run_tasks(durable_submitters, measure, |n| {
        sets(session.clone(), n, Instant::now() + measure)
    })
    .await?;
    let after = kernel.wal_status(&caller).await?;
    let disk_after = disk_bytes_written(dir);
    let durable_took = durable_started.elapsed();
    kernel.shutdown().await;
    let records = after.records_total - before.records_total;
    let syncs = (after.syncs_total - before.syncs_total).max(1);
    if records == 0 {
        bail!("the durable phase journaled nothing");
    }
    let ops = durable.ops.max(1);
    Ok(InProcess {
        inproc,
        durable,
        records_per_sync: records as f64 / syncs as f64,
        journal_busy: (after.sync_micros_total - before.sync_micros_total) as f64 / durable_took.as_micros() as f64,
        sync_p50_us: after.sync_latency.p50_us,
        sync_p99_us: after.sync_latency.p99_us,
        sync_max_us: after.sync_latency.max_us,
        record_bytes: (after.bytes_total - before.bytes_total) / records,
        journal_bytes_per_op: (after.bytes_total - before.bytes_total) / ops,
        disk_bytes_per_op: disk_before
            .zip(disk_after)
            .map(|(before, after)| after.saturating_sub(before) / ops),
        writer_nice: after.writer_nice,
        committer_nice: after.committer_nice,
    })
}

/// The bytes written so far to the disk that holds `dir`, from its line in
/// `/proc/diskstats` (sectors of 512 bytes). Not the process's `write_bytes`: that
/// counts a whole folio each time one is dirtied, 2 MiB for a 330-byte write into a
/// preallocated file here, against the 4 KiB the disk then writes.
fn disk_bytes_written(dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let device = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (
        rustix::fs::major(device).to_string(),
        rustix::fs::minor(device).to_string(),
    );
    let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
    // major, minor, name, then the counters; the 7th is the sectors written.
    let line = stats.lines().find(|line| {
        let mut fields = line.split_whitespace();
        fields.next() == Some(major.as_str()) && fields.next() == Some(minor.as_str())
    })?;
    let sectors: u64 = line.split_whitespace().nth(9)?.parse().ok()?;
    Some(sectors * 512)
}

/// What one measuring task saw: latencies in µs, each with how many ops it took.
/// A histogram of its own (224 KiB, zeroed) per task would make the 1024 tasks of
/// `durable` zero 230 MB while they are being timed; the histogram is built after.
type Latencies = Vec<(u64, u64)>;

/// Runs `tasks` copies of a measuring task and merges their latencies; throughput is
/// over the measured window.
async fn run_tasks<F, Fut>(tasks: usize, measure: Duration, task: F) -> Result<Figures>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Latencies>> + Send + 'static,
{
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks).map(|n| tokio::spawn(task(n))).collect();
    let mut seen = Vec::with_capacity(tasks);
    for handle in handles {
        seen.push(handle.await??);
    }
    let elapsed = started.elapsed().max(measure);
    let mut all = histogram();
    for (latency, ops) in seen.into_iter().flatten() {
        all.saturating_record_n(latency, ops);
    }
    Ok(Figures::from(&all, elapsed))
}

/// One `noop` at a time through the shared-memory ring, after a warmup.
fn shm_noops(
    mut shm: bbx_client::ShmClient,
    agent: bbx_core::AgentId,
    warmup: Duration,
    measure: Duration,
) -> Result<Figures> {
    let op = SubmitOp::new(agent, "noop", json!(null));
    let mut run = |length: Duration, latencies: &mut hdrhistogram::Histogram<u64>| -> Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < length {
            let sent = Instant::now();
            let completion = shm.call(&op, Duration::from_secs(10))?;
            if completion.status != bbx_core::op::CompletionStatus::Ok {
                bail!("a noop through shared memory ended {}", completion.status.as_str());
            }
            latencies.saturating_record(sent.elapsed().as_nanos().div_ceil(1000).max(1) as u64);
        }
        Ok(started.elapsed())
    };
    run(warmup, &mut histogram())?;
    let mut latencies = histogram();
    let elapsed = run(measure, &mut latencies)?;
    Ok(Figures::from(&latencies, elapsed))
}

/// `records` records of `record_bytes` each, written in one write and made durable
/// with one fdatasync, in a loop: the journal's physical limit at that group size.
/// Appended to a growing file, or, `preallocated`, written over a zero-filled one
/// (from its start again when the end is reached).
pub(crate) fn fsync_loop(
    dir: &Path,
    records: usize,
    record_bytes: usize,
    measure: Duration,
    preallocated: bool,
) -> Result<Figures> {
    const PREALLOCATED_BYTES: usize = 64 << 20;
    let path = dir.join("fsync-ceiling.bin");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let group = vec![0x5au8; records * record_bytes];
    if preallocated {
        file.write_all(&vec![0; PREALLOCATED_BYTES])?;
        file.sync_all()?;
    }
    let mut offset = 0;
    let mut latencies = histogram();
    let started = Instant::now();
    while started.elapsed() < measure {
        if preallocated && offset + group.len() > PREALLOCATED_BYTES {
            offset = 0;
        }
        let t = Instant::now();
        std::os::unix::fs::FileExt::write_all_at(&file, &group, offset as u64)?;
        offset += group.len();
        file.sync_data()?;
        let took = t.elapsed().as_micros().max(1) as u64;
        // Each record of the group waited for the whole sync.
        latencies.record_n(took, records as u64)?;
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(&path)?;
    Ok(Figures::from(&latencies, elapsed))
}

#[derive(Clone)]
struct OpRequests {
    host: HeaderValue,
    bearer: HeaderValue,
    agent: bbx_core::AgentId,
}

impl OpRequests {
    /// `size` durable `state.set` ops in one request.
    fn set_ops(&self, client: usize, i: u64, size: usize) -> Request<Full<Bytes>> {
        let ops: Vec<serde_json::Value> = (0..size)
            .map(|n| json!({"agent": self.agent, "kind": "state.set", "args": {"key": format!("h{client}-{n}"), "value": i}}))
            .collect();
        let body = serde_json::to_vec(&json!({"ops": ops, "wait_ms": 60_000})).expect("JSON serializes");
        Request::builder()
            .method(Method::POST)
            .uri("/v1/ops")
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.bearer.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts are valid")
    }
}

fn print_report(r: &Report) {
    println!(
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "scenario", "ops/s", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, f) in [
        ("inproc", &r.inproc),
        ("durable", &r.durable),
        ("fsync_ceiling", &r.fsync_ceiling),
        ("fsync_prealloc", &r.fsync_ceiling_preallocated),
        ("http_batch", &r.http_batch),
        ("http_single", &r.http_single),
        ("shm", &r.shm),
    ] {
        f.print_row(name);
    }
    println!(
        "durable: {:.1} journal records of {} bytes per fdatasync (both ceilings use the same); \
         {:.0} % of fsync_ceiling, {:.0} % of fsync_ceiling_preallocated",
        r.durable_records_per_sync,
        r.record_bytes,
        100.0 * r.durable.ops_per_sec / r.fsync_ceiling.ops_per_sec,
        100.0 * r.durable.ops_per_sec / r.fsync_ceiling_preallocated.ops_per_sec,
    );
    println!(
        "durable: the journal was busy {:.0} % of the time; group syncs {} us median, {} us p99, {} us at most",
        100.0 * r.durable_journal_busy,
        r.durable_sync_p50_us,
        r.durable_sync_p99_us,
        r.durable_sync_max_us
    );
    let disk = r
        .durable_disk_bytes_per_op
        .map_or_else(|| "an unknown number of".to_owned(), |bytes| bytes.to_string());
    println!(
        "durable: {} bytes journaled per op, {disk} bytes written to disk per op in all",
        r.durable_journal_bytes_per_op
    );
    println!(
        "inproc submitters: {}; http connections: {} in http_batch, {} in http_single",
        r.inproc_submitters, r.http_batch_clients, r.http_single_clients
    );
    println!("targets: {}", serde_json::to_string(&r.targets).expect("serializes"));
}
