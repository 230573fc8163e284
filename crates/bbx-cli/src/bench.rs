//! `bbx bench api`: the kernel's HTTP state path under load, against references
//! measured in the same run.
//!
//! Phases: cold start to `/readyz` (fresh data directories), a bare append+fdatasync
//! loop on the same disk (the floor for any acknowledged write), `set` flat out with
//! many concurrent writers (group commit), `set` at a fixed rate over the same
//! writers, `get` flat out, then `get` at half that rate. Flat-out phases measure
//! capacity; their latency is mostly queueing (Little's law: clients / throughput).
//! Fixed-rate phases measure latency under load, counted from each request's
//! scheduled start so that a stalled server cannot hide delay (no coordinated
//! omission).

use crate::cli::{BenchApiArgs, Cli};
use anyhow::{Context, Result, bail};
use bbx_client::Client;
use bbx_core::AgentId;
use bbx_core::api::prelude::*;
use bbx_core::config::{ConfigLayer, KernelConfig};
use bbx_core::model::CreateAgent;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::http::{HeaderValue, Method, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One phase, end to end as the client saw it (`p50_us`...), and two views that
/// tell apart where time went: the kernel's own handling time for the route, read
/// from its `/metrics` histogram over the phase (bucket upper bounds, so "at most"),
/// and, for fixed-rate phases, how late the load generator itself started requests.
#[derive(Serialize, Debug, Clone)]
pub struct Figures {
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_p99_us_at_most: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_p999_us_at_most: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generator_lag_p99_us: Option<u64>,
}

impl Figures {
    /// One row of a human report: name, throughput and percentiles in µs.
    pub(crate) fn print_row(&self, name: &str) {
        println!(
            "{name:<14} {:>12.0} {:>10} {:>10} {:>10}",
            self.ops_per_sec, self.p50_us, self.p99_us, self.p999_us
        );
    }

    pub(crate) fn from(histogram: &Histogram<u64>, elapsed: Duration) -> Self {
        Self {
            ops: histogram.len(),
            ops_per_sec: histogram.len() as f64 / elapsed.as_secs_f64(),
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            kernel_p99_us_at_most: None,
            kernel_p999_us_at_most: None,
            generator_lag_p99_us: None,
        }
    }
}

/// The route every state read and write of this benchmark takes.
const STATE_ROUTE: &str = "route=\"/v1/agents/{id}/state/{key}\"";

/// The kernel's own latency histogram for the state route, read from `/metrics`.
struct KernelView {
    http: reqwest::Client,
    url: String,
}

impl KernelView {
    async fn buckets(&self, method: &str) -> Result<Vec<(f64, u64)>> {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(parse_buckets(&text, method))
    }

    /// Adds the kernel's p99/p99.9 over the requests since `before` to `figures`.
    async fn annotate(&self, mut figures: Figures, method: &str, before: &[(f64, u64)]) -> Result<Figures> {
        let after = self.buckets(method).await?;
        figures.kernel_p99_us_at_most = bucket_quantile(before, &after, 0.99);
        figures.kernel_p999_us_at_most = bucket_quantile(before, &after, 0.999);
        Ok(figures)
    }
}

/// Cumulative bucket counts (upper bound in seconds, count) of the kernel's latency
/// histogram for `method` on the state route, from the classic text format.
fn parse_buckets(text: &str, method: &str) -> Vec<(f64, u64)> {
    let method = format!("method=\"{method}\"");
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some(labels) = line.strip_prefix("bbx_http_request_duration_seconds_bucket{") else {
            continue;
        };
        if !labels.contains(&method) || !labels.contains(STATE_ROUTE) {
            continue;
        }
        let le = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next());
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<u64>().ok());
        if let (Some(le), Some(count)) = (le, count) {
            let le = if le == "+Inf" {
                Some(f64::INFINITY)
            } else {
                le.parse().ok()
            };
            if let Some(le) = le {
                buckets.push((le, count));
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The smallest bucket bound (µs) under which a fraction `q` of the requests
/// between two scrapes finished; `None` if they fall in the open-ended bucket.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<u64> {
    let delta = |le: f64| {
        let count = |buckets: &[(f64, u64)]| buckets.iter().find(|(b, _)| *b == le).map_or(0, |(_, c)| *c);
        count(after).saturating_sub(count(before))
    };
    let total = delta(f64::INFINITY);
    after
        .iter()
        .find(|(le, _)| total > 0 && delta(*le) as f64 >= q * total as f64)
        .filter(|(le, _)| le.is_finite())
        .map(|(le, _)| (le * 1e6).round() as u64)
}

#[derive(Serialize, Debug)]
struct Report {
    target: String,
    /// The kernel's and the load generator's cores; absent when they shared all CPUs.
    isolated_cores: Option<Cores>,
    cold_start_ms: Option<ColdStart>,
    fdatasync: Figures,
    set: Figures,
    set_clients: usize,
    set_paced: Figures,
    set_paced_rate: f64,
    writes_per_sync: f64,
    get_max: Figures,
    get_clients: usize,
    get_half_load: Figures,
    get_half_load_rate: f64,
    targets: Targets,
}

#[derive(Serialize, Debug)]
struct ColdStart {
    runs: Vec<f64>,
    median: f64,
}

#[derive(Serialize, Debug)]
struct Targets {
    get_at_least_30k_ops: bool,
    get_p99_under_2ms_at_half_load: bool,
    set_at_least_10k_ops: bool,
    set_p99_within_2ms_of_fdatasync_p99_at_paced_rate: bool,
    cold_start_under_100ms: Option<bool>,
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static bounds are valid")
}

/// A fresh temporary directory, inside `under` if given: where a benchmark keeps
/// its scratch kernels and reference files.
pub(crate) fn scratch_dir(under: Option<&Path>) -> Result<tempfile::TempDir> {
    Ok(match under {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    })
}

/// A phase measured in nanoseconds (for checks well under a microsecond).
#[derive(Serialize)]
pub(crate) struct NanoFigures {
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
}

impl NanoFigures {
    pub(crate) fn from(histogram: &Histogram<u64>, elapsed: Duration) -> Self {
        Self {
            ops: histogram.len(),
            ops_per_sec: histogram.len() as f64 / elapsed.as_secs_f64(),
            p50_ns: histogram.value_at_quantile(0.50),
            p99_ns: histogram.value_at_quantile(0.99),
            p999_ns: histogram.value_at_quantile(0.999),
        }
    }
}

/// Times `step` one call at a time for `measure`, in nanoseconds.
/// Prints figures measured in process as a table, one row per scenario.
pub(crate) fn print_nano_table(rows: &[(&str, &NanoFigures)]) {
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    println!(
        "{:<width$} {:>12} {:>10} {:>10} {:>10}",
        "", "ops/s", "p50 ns", "p99 ns", "p99.9 ns"
    );
    for (name, f) in rows {
        println!(
            "{name:<width$} {:>12.0} {:>10} {:>10} {:>10}",
            f.ops_per_sec, f.p50_ns, f.p99_ns, f.p999_ns
        );
    }
}

pub(crate) fn time_each(measure: Duration, mut step: impl FnMut()) -> NanoFigures {
    let mut latencies = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let started = Instant::now();
    while started.elapsed() < measure {
        for _ in 0..1000 {
            let t = Instant::now();
            step();
            latencies.saturating_record(t.elapsed().as_nanos().max(1) as u64);
        }
    }
    NanoFigures::from(&latencies, started.elapsed())
}

/// A kernel this benchmark started, stopped when dropped.
pub(crate) struct Scratch {
    child: Child,
    pub url: String,
    pub key: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn readyz(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && &head == b"HTTP/1.1 200"
}

/// Which cores the kernel and the load generator run on, when isolated.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Cores {
    pub kernel: usize,
    pub load: usize,
}

/// The first two CPUs this process may run on, if there are two.
pub(crate) fn two_cores() -> Result<Option<Cores>> {
    let allowed = rustix::thread::sched_getaffinity(None)?;
    let mut cpus = (0..rustix::thread::CpuSet::MAX_CPU).filter(|&cpu| allowed.is_set(cpu));
    Ok(cpus
        .next()
        .zip(cpus.next())
        .map(|(kernel, load)| Cores { kernel, load }))
}

/// Restricts the calling thread, and every thread or process it starts from now
/// on, to one CPU.
fn pin_to(cpu: usize) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).context("cannot set CPU affinity")
}

/// `clients` tasks calling `call` in a closed loop for `measure`, each call
/// carrying `per_call` messages (its latency counted once for each).
pub(crate) async fn call_loop<F, Fut, E>(clients: usize, measure: Duration, per_call: u64, call: F) -> Result<Figures>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = std::result::Result<(), E>> + Send,
    E: std::error::Error + Send + Sync + 'static,
{
    let started = Instant::now();
    let end = started + measure;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut latencies = histogram();
                while Instant::now() < end {
                    let sent = Instant::now();
                    call().await?;
                    latencies.saturating_record_n(sent.elapsed().as_micros().max(1) as u64, per_call);
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok(Figures::from(&all, started.elapsed()))
}

/// Runs `measure` on a scratch directory (under `scratch_dir`, or the system's
/// temporary one), on a multi-threaded runtime and a thread of its own (an
/// in-process kernel needs one, and the CLI's runtime is single-threaded),
/// and prints its report as JSON.
pub(crate) fn report_in_process<R, F>(
    scratch_dir: Option<&Path>,
    measure: impl FnOnce(std::path::PathBuf) -> F + Send + 'static,
) -> Result<()>
where
    R: serde::Serialize + Send + 'static,
    F: std::future::Future<Output = Result<R>>,
{
    let scratch = self::scratch_dir(scratch_dir)?;
    let dir = scratch.path().to_path_buf();
    let report = std::thread::spawn(move || -> Result<R> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(measure(dir))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the benchmark panicked"))??;
    crate::output::json(&report);
    Ok(())
}

/// An in-process kernel on `dir` with the settings of `over` (logging warnings
/// only), and its administrator.
pub(crate) async fn open_in_process(
    dir: &Path,
    over: ConfigLayer,
) -> Result<(std::sync::Arc<bbx_kernel::Kernel>, bbx_kernel::Caller)> {
    let over = ConfigLayer {
        data_dir: Some(dir.to_path_buf()),
        log: Some("warn".into()),
        ..over
    };
    let kernel = bbx_kernel::Kernel::open(KernelConfig::resolve(ConfigLayer::default(), over)?)
        .await?
        .kernel;
    let token = std::fs::read_to_string(dir.join(bbx_kernel::ADMIN_KEY_FILE))?;
    let caller = kernel.authenticate(token.trim())?;
    Ok((kernel, caller))
}

/// Starts `bbx serve` on a fresh data directory; returns it and the time to ready.
pub(crate) fn start_kernel(dir: &Path, cores: Option<Cores>) -> Result<(Scratch, Duration)> {
    let port = free_port()?;
    if let Some(cores) = cores {
        pin_to(cores.kernel)?;
    }
    let started = Instant::now();
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log",
            "warn",
            "--data-dir",
        ])
        .arg(dir)
        .env_remove("BBX_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe
    // system call. It kills the scratch kernel when the bench dies without running
    // its destructors (a signal), instead of leaving it behind.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let child = command.spawn().context("cannot start a scratch kernel")?;
    if let Some(cores) = cores {
        pin_to(cores.load)?;
    }
    let mut scratch = Scratch {
        child,
        url: format!("http://127.0.0.1:{port}"),
        key: String::new(),
    };
    while !readyz(port) {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the scratch kernel did not become ready in 30 s");
        }
        if let Some(status) = scratch.child.try_wait()? {
            bail!("the scratch kernel exited with {status}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let ready = started.elapsed();
    scratch.key = std::fs::read_to_string(dir.join(bbx_kernel::ADMIN_KEY_FILE))?
        .trim()
        .to_owned();
    Ok((scratch, ready))
}

/// Append `record_bytes` and fdatasync, `count` times: the physical floor for one
/// acknowledged write on this disk.
fn fdatasync_reference(dir: &Path, record_bytes: usize, duration: Duration) -> Result<Figures> {
    let path = dir.join("fdatasync-reference.bin");
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let record = vec![0x5au8; record_bytes];
    let mut latencies = histogram();
    let started = Instant::now();
    while started.elapsed() < duration {
        let t = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        latencies.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    let elapsed = started.elapsed();
    std::fs::remove_file(&path)?;
    Ok(Figures::from(&latencies, elapsed))
}

/// One persistent HTTP/1.1 connection per load worker, with requests built ahead
/// of time: the cheapest client there is, so that the benchmark spends its CPU on
/// the kernel rather than on itself.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// Sends one request and reads the whole response; anything but 2xx is an error.
    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<()> {
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("the kernel answered {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }
}

/// The state requests of this benchmark, on one agent.
#[derive(Clone)]
struct StateRequests {
    host: HeaderValue,
    bearer: HeaderValue,
    agent: AgentId,
}

impl StateRequests {
    fn builder(&self, method: Method, key: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("/v1/agents/{}/state/{key}", self.agent))
            .header(header::HOST, self.host.clone())
            .header(header::AUTHORIZATION, self.bearer.clone())
    }

    fn get(&self, key: &str) -> Request<Full<Bytes>> {
        self.builder(Method::GET, key)
            .body(Full::default())
            .expect("static request parts are valid")
    }

    fn set(&self, key: &str, n: u64) -> Request<Full<Bytes>> {
        let body = Bytes::from(format!(r#"{{"value":{{"n":{n}}}}}"#));
        self.builder(Method::PUT, key)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("static request parts are valid")
    }
}

/// Closed loop: `clients` workers each send `request(worker, iteration)` back to back
/// for `duration`. Measures the most the target sustains.
pub(crate) async fn closed_loop<F>(addr: SocketAddr, clients: usize, duration: Duration, request: F) -> Result<Figures>
where
    F: Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let measure_from = Instant::now();
    let end = measure_from + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut connection = Connection::open(addr).await?;
                let mut latencies = histogram();
                let mut last = None;
                let mut iteration = 0u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    connection.send(request(client, iteration)).await?;
                    if sent >= measure_from {
                        latencies.saturating_record(sent.elapsed().as_micros().max(1) as u64);
                        last = Some(Instant::now());
                    }
                    iteration += 1;
                }
                anyhow::Ok(Measured {
                    latencies,
                    lag: histogram(),
                    last,
                })
            })
        })
        .collect();
    merge(tasks, measure_from, duration).await
}

/// Open loop: requests are scheduled at a fixed total `rate` and spread over
/// `clients` workers; latency counts from each request's scheduled time, so a slow
/// response delays the requests queued behind it and that delay is measured (no
/// coordinated omission). The schedule is kept by a dedicated thread, because tokio
/// timers round up to whole milliseconds.
async fn open_loop<F>(addr: SocketAddr, clients: usize, duration: Duration, rate: f64, request: F) -> Result<Figures>
where
    F: Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let mut connections = Vec::with_capacity(clients);
    for _ in 0..clients {
        connections.push(Connection::open(addr).await?);
    }
    let begin = Instant::now() + Duration::from_millis(20);
    let measure_from = begin;
    let end = measure_from + duration;
    // One queue that every idle worker takes the next due request from.
    let (queue, due) = tokio::sync::mpsc::unbounded_channel::<(Instant, u64)>();
    let due = Arc::new(tokio::sync::Mutex::new(due));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = std::thread::spawn(move || {
        let mut scheduled = begin;
        let mut n = 0u64;
        while scheduled < end {
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            // Everything due by now goes out at once; lateness is counted, not hidden.
            while scheduled <= Instant::now() && scheduled < end {
                let _ = queue.send((scheduled, n));
                n += 1;
                scheduled += interval;
            }
        }
    });
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(client, mut connection)| {
            let (request, due) = (request.clone(), due.clone());
            tokio::spawn(async move {
                let (mut latencies, mut lag) = (histogram(), histogram());
                let mut last = None;
                loop {
                    let next = due.lock().await.recv().await;
                    let Some((scheduled, iteration)) = next else { break };
                    let started_late_by = scheduled.elapsed();
                    connection.send(request(client, iteration)).await?;
                    if scheduled >= measure_from {
                        latencies.saturating_record(scheduled.elapsed().as_micros().max(1) as u64);
                        lag.saturating_record(started_late_by.as_micros().max(1) as u64);
                        last = Some(Instant::now());
                    }
                }
                anyhow::Ok(Measured { latencies, lag, last })
            })
        })
        .collect();
    let figures = merge(tasks, measure_from, duration).await;
    pacer.join().map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    figures
}

/// What one load task measured: its latencies, how late it started each request
/// (fixed-rate phases only), and when its last measured request completed.
struct Measured {
    latencies: Histogram<u64>,
    lag: Histogram<u64>,
    last: Option<Instant>,
}

/// Merges the tasks' histograms. Throughput is over the time from the start of the
/// measurement to the last completion, not the nominal window, so a target that
/// falls behind a fixed rate shows it.
async fn merge(
    tasks: Vec<tokio::task::JoinHandle<Result<Measured>>>,
    measure_from: Instant,
    duration: Duration,
) -> Result<Figures> {
    let (mut all, mut lag) = (histogram(), histogram());
    let mut last_completion = None;
    for task in tasks {
        let measured = task.await??;
        all.add(measured.latencies)?;
        lag.add(measured.lag)?;
        last_completion = last_completion.max(measured.last);
    }
    let elapsed = last_completion.map_or(duration, |last| last.duration_since(measure_from));
    let mut figures = Figures::from(&all, elapsed.max(duration));
    figures.generator_lag_p99_us = (!lag.is_empty()).then(|| lag.value_at_quantile(0.99));
    Ok(figures)
}

pub async fn api(cli: &Cli, args: &BenchApiArgs) -> Result<()> {
    let scratch_root = scratch_dir(args.scratch_dir.as_deref())?;
    for (what, value) in [
        ("--seconds", Some(args.seconds)),
        ("--set-rate", Some(args.set_rate)),
        ("--get-rate", args.get_rate),
    ] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{what} must be a positive number");
        }
    }
    let measure = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs_f64((args.seconds / 5.0).min(1.0));

    // Cold starts (only for a kernel we start ourselves); the last one stays up.
    let mut kernel: Option<Scratch> = None;
    let mut cold_runs = Vec::new();
    let cores = if cli.url.is_none() && !args.no_isolate {
        two_cores()?
    } else {
        None
    };
    let (url, key) = match &cli.url {
        Some(url) => (url.clone(), crate::api_key(cli)?),
        None => {
            for run in 0..args.cold_starts.max(1) {
                let dir: PathBuf = scratch_root.path().join(format!("kernel-{run}"));
                let (started, ready) = start_kernel(&dir, cores)?;
                cold_runs.push(ready.as_secs_f64() * 1000.0);
                kernel = Some(started);
            }
            let k = kernel.as_ref().expect("at least one kernel started");
            (k.url.clone(), k.key.clone())
        }
    };
    let client = Client::new(&url, &key)?;
    client.status().await?;

    let record_bytes = 16 + 32 + 48; // state header, key and value of a `set` below, about
    let reference_dir = scratch_root.path().to_path_buf();
    let fdatasync =
        tokio::task::spawn_blocking(move || fdatasync_reference(&reference_dir, record_bytes, measure)).await??;

    let agent = client
        .create_agent(CreateAgent {
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .id;
    let base = reqwest::Url::parse(&url)?;
    if base.scheme() != "http" {
        bail!("bench api drives plain HTTP/1.1 connections; give it an http:// URL");
    }
    let addr = tokio::net::lookup_host((
        base.host_str().unwrap_or("127.0.0.1"),
        base.port_or_known_default().unwrap_or(80),
    ))
    .await?
    .next()
    .with_context(|| format!("{url} resolves to no address"))?;
    let requests = StateRequests {
        host: HeaderValue::from_str(&addr.to_string())?,
        bearer: HeaderValue::from_str(&format!("Bearer {key}"))?,
        agent,
    };
    let kernel = KernelView {
        http: reqwest::Client::new(),
        url: url.clone(),
    };

    let storage = || async {
        let status = client.status().await?;
        status.storage.context("bench api needs an administrator key")
    };
    let writes = requests.clone();
    let set = move |c: usize, i: u64| writes.set(&format!("key-{c}"), i);
    let keys = args.set_clients.max(1);
    let get = move |c: usize, _| requests.get(&format!("key-{}", c % keys));

    // Every phase first runs for `warmup` unmeasured; the kernel's histogram is read
    // just before and just after the measured run, so both views cover one window.
    closed_loop(addr, args.set_clients, warmup, set.clone()).await?;
    let (before, buckets) = (storage().await?, kernel.buckets("PUT").await?);
    let set_max = closed_loop(addr, args.set_clients, measure, set.clone()).await?;
    let set_max = kernel.annotate(set_max, "PUT", &buckets).await?;
    let after = storage().await?;
    let writes_per_sync =
        (after.writes_committed - before.writes_committed) as f64 / (after.syncs - before.syncs).max(1) as f64;

    open_loop(addr, args.set_clients, warmup, args.set_rate, set.clone()).await?;
    let buckets = kernel.buckets("PUT").await?;
    let set_paced = open_loop(addr, args.set_clients, measure, args.set_rate, set).await?;
    let set_paced = kernel.annotate(set_paced, "PUT", &buckets).await?;

    closed_loop(addr, args.get_clients, warmup, get.clone()).await?;
    let buckets = kernel.buckets("GET").await?;
    let get_max = closed_loop(addr, args.get_clients, measure, get.clone()).await?;
    let get_max = kernel.annotate(get_max, "GET", &buckets).await?;

    let half_rate = args.get_rate.unwrap_or(get_max.ops_per_sec / 2.0);
    if !(half_rate.is_finite() && half_rate > 0.0) {
        bail!("no get completed at full speed, so there is no rate to halve");
    }
    open_loop(addr, args.get_clients, warmup, half_rate, get.clone()).await?;
    let buckets = kernel.buckets("GET").await?;
    let get_half_load = open_loop(addr, args.get_clients, measure, half_rate, get).await?;
    let get_half_load = kernel.annotate(get_half_load, "GET", &buckets).await?;

    let cold_start_ms = (!cold_runs.is_empty()).then(|| {
        let mut sorted = cold_runs.clone();
        sorted.sort_by(f64::total_cmp);
        ColdStart {
            median: sorted[sorted.len() / 2],
            runs: cold_runs,
        }
    });
    let report = Report {
        target: url,
        isolated_cores: cores,
        targets: Targets {
            get_at_least_30k_ops: get_max.ops_per_sec >= 30_000.0,
            get_p99_under_2ms_at_half_load: get_half_load.p99_us < 2_000,
            set_at_least_10k_ops: set_max.ops_per_sec >= 10_000.0,
            set_p99_within_2ms_of_fdatasync_p99_at_paced_rate: set_paced.p99_us <= fdatasync.p99_us + 2_000,
            cold_start_under_100ms: cold_start_ms.as_ref().map(|c| c.median < 100.0),
        },
        cold_start_ms,
        fdatasync,
        set: set_max,
        set_clients: args.set_clients,
        set_paced,
        set_paced_rate: args.set_rate,
        writes_per_sync,
        get_max,
        get_clients: args.get_clients,
        get_half_load,
        get_half_load_rate: half_rate,
    };
    drop(kernel);
    if cli.json {
        crate::output::json(&report);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!("bbx bench api against {}", r.target);
    match r.isolated_cores {
        Some(c) => println!(
            "kernel on CPU {}, load generator on CPU {} (--no-isolate to share)",
            c.kernel, c.load
        ),
        None => println!("kernel and load generator share the CPUs"),
    }
    if let Some(cold) = &r.cold_start_ms {
        let runs: Vec<String> = cold.runs.iter().map(|ms| format!("{ms:.1}")).collect();
        println!(
            "cold start to /readyz: median {:.1} ms (runs: {})",
            cold.median,
            runs.join(", ")
        );
    }
    println!(
        "{:<32} {:>8} {:>8} {:>8} {:>9} {:>8} | {:>12} {:>13} | {:>10}",
        "scenario", "ops/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "kernel p99 ≤", "kernel p99.9 ≤", "gen lag p99"
    );
    let shown = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let row = |name: &str, f: &Figures| {
        println!(
            "{name:<32} {:>8.0} {:>8} {:>8} {:>9} {:>8} | {:>12} {:>13} | {:>10}",
            f.ops_per_sec,
            f.p50_us,
            f.p99_us,
            f.p999_us,
            f.max_us,
            shown(f.kernel_p99_us_at_most),
            shown(f.kernel_p999_us_at_most),
            shown(f.generator_lag_p99_us)
        );
    };
    row("fdatasync (reference, 1 writer)", &r.fdatasync);
    row(&format!("set max ({} clients)", r.set_clients), &r.set);
    row(
        &format!("set at {:.0}/s ({} clients)", r.set_paced_rate, r.set_clients),
        &r.set_paced,
    );
    row(&format!("get max ({} clients)", r.get_clients), &r.get_max);
    row(
        &format!("get at {:.0}/s (half of max)", r.get_half_load_rate),
        &r.get_half_load,
    );
    println!("group commit: {:.1} writes per fdatasync", r.writes_per_sync);
    println!("targets: {}", serde_json::to_string(&r.targets).expect("serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_quantiles_come_from_bucket_deltas() {
        let scrape = |counts: [u64; 4]| {
            let les = ["0.0001", "0.001", "0.01", "+Inf"];
            les.iter()
                .zip(counts)
                .map(|(le, n)| {
                    format!(
                        "bbx_http_request_duration_seconds_bucket{{le=\"{le}\",method=\"GET\",{STATE_ROUTE}}} {n}\n"
                    )
                })
                .collect::<String>()
                + "bbx_http_request_duration_seconds_bucket{le=\"0.0001\",method=\"PUT\",route=\"/x\"} 99\n"
        };
        let before = parse_buckets(&scrape([10, 10, 10, 10]), "GET");
        let after = parse_buckets(&scrape([900, 990, 1000, 1010]), "GET");
        assert_eq!(before.len(), 4);
        // 1000 requests in between: 890 under 100 µs, 980 under 1 ms, 990 under 10 ms.
        assert_eq!(bucket_quantile(&before, &after, 0.5), Some(100));
        assert_eq!(bucket_quantile(&before, &after, 0.98), Some(1000));
        assert_eq!(bucket_quantile(&before, &after, 0.99), Some(10_000));
        assert_eq!(
            bucket_quantile(&before, &after, 0.999),
            None,
            "past the last finite bucket"
        );
        assert_eq!(bucket_quantile(&after, &after, 0.99), None, "no requests");
    }
}
