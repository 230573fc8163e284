//! `bbx bench tools`: what AgentQuotas and the tools add to an op, each next to a
//! reference measured in the same run.
//!
//! - `quota_check` (reference `mutex_counter`): the per-op admission work of
//!   AgentQuotas on one thread: the rate limits of an agent and its tenant (both
//!   with limits set), then claiming and giving back an op in flight on both.
//!   The reference is one mutex-guarded counter increment, the floor of any
//!   shared check.
//! - `shell_true` (reference `spawn_true`): `tool.shell` running `true`, submitted
//!   to an in-process kernel's ring and waited for, one at a time: its start mark
//!   journaled, its cgroup made and joined, namespaces entered, the tree killed
//!   and the group removed. The reference spawns `true` and waits for it.
//! - `http_tool` (reference `http_plain`): `tool.http` GETs of a loopback server
//!   through the tools (address policy, guarded resolver, response capture), next
//!   to the same GETs by a plain reqwest client; `http_overhead_p50_us` is the
//!   difference of their medians.

use crate::bench::{Figures, NanoFigures, histogram, scratch_dir, time_each};
use crate::cli::{BenchToolsArgs, Cli};
use anyhow::{Context, Result, bail};
use bbx_core::api::prelude::*;
use bbx_core::config::ConfigLayer;
use bbx_core::model::CreateAgent;
use bbx_core::op::{CompletionStatus, SubmitBatch, SubmitOp};
use bbx_core::quota::{Node, QuotaLimits, ToolSettings};
use bbx_core::{AgentId, OpId};
use bbx_quota::{Demand, Quotas};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Report {
    quota_check: NanoFigures,
    mutex_counter: NanoFigures,
    shell_true: Figures,
    spawn_true: Figures,
    http_tool: Figures,
    http_plain: Figures,
    http_overhead_p50_us: i64,
    /// How tool processes were confined in `shell_true`.
    shell_confinement: String,
    targets: Targets,
}

#[derive(Serialize)]
struct Targets {
    quota_check_p99_under_1us: bool,
    shell_true_p50_under_5ms: bool,
    http_overhead_p50_under_100us: bool,
}

pub async fn tools(cli: &Cli, args: &BenchToolsArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number");
    }
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let measure = Duration::from_secs_f64(args.seconds);
    let dir = scratch.path().to_path_buf();
    // The kernel and the servers want a multi-threaded runtime; this command's is not.
    let report = std::thread::spawn(move || -> Result<Report> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        runtime.block_on(measure_all(&dir, measure))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the benchmark panicked"))??;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

async fn measure_all(dir: &Path, measure: Duration) -> Result<Report> {
    let (quota_check, mutex_counter) = quota_checks(measure);
    let (shell_true, shell_confinement) = shell_true(&dir.join("kernel"), measure).await?;
    let spawn_true = spawn_true(measure)?;
    let (http_tool, http_plain) = http(&dir.join("tools"), measure).await?;
    let http_overhead_p50_us = http_tool.p50_us as i64 - http_plain.p50_us as i64;
    Ok(Report {
        targets: Targets {
            quota_check_p99_under_1us: quota_check.p99_ns < 1000,
            shell_true_p50_under_5ms: shell_true.p50_us < 5000,
            http_overhead_p50_under_100us: http_overhead_p50_us < 100,
        },
        quota_check,
        mutex_counter,
        shell_true,
        spawn_true,
        http_tool,
        http_plain,
        http_overhead_p50_us,
        shell_confinement,
    })
}

/// Times `step` back to back for `measure`, in nanoseconds each.
fn quota_checks(measure: Duration) -> (NanoFigures, NanoFigures) {
    let quotas = Quotas::new();
    let agent = AgentId::generate();
    let roomy = QuotaLimits {
        requests_per_second: Some(u32::MAX),
        tool_calls_per_minute: Some(u32::MAX),
        concurrent_ops: Some(u32::MAX),
        ..Default::default()
    };
    quotas
        .set(Node::Tenant("bench".into()), roomy.clone())
        .expect("a tenant's limits are always set");
    quotas
        .set(Node::Agent(agent), roomy)
        .expect("an idle agent's limits are always set");
    let demand = Demand { ops: 1, tool_calls: 1 };
    let check = time_each(measure, || {
        let checked = quotas.check_rates("bench", agent, demand, Instant::now());
        let acquired = quotas.acquire("bench", agent, 1);
        assert!(checked.is_ok() && acquired.is_ok(), "roomy limits always admit");
        quotas.release("bench", agent, 1);
    });
    let counter = parking_lot::Mutex::new(0u64);
    let reference = time_each(measure, || *counter.lock() += 1);
    (check, reference)
}

async fn shell_true(dir: &Path, measure: Duration) -> Result<(Figures, String)> {
    let (kernel, caller) = crate::bench::open_in_process(dir, ConfigLayer::default()).await?;
    let confinement = kernel.cgroup_status(&caller)?;
    let session = kernel.session(caller);
    let agent = session
        .create_agent(CreateAgent {
            name: "bench".into(),
            ..Default::default()
        })
        .await?
        .id;
    let mut latencies = histogram();
    let started = Instant::now();
    while started.elapsed() < measure {
        let t = Instant::now();
        let op = SubmitOp::new(agent, "tool.shell", json!({"program": "true"}));
        let id: OpId = session
            .submit_ops(SubmitBatch {
                ops: vec![op],
                wait_ms: None,
            })
            .await?
            .ops[0]
            .op_id;
        let done = session.wait_op(id, Duration::from_secs(30)).await?;
        let completion = done.completion.context("tool.shell true did not finish in 30 s")?;
        if completion.status != CompletionStatus::Ok {
            bail!("tool.shell true failed: {:?}", completion.error);
        }
        latencies.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    let figures = Figures::from(&latencies, started.elapsed());
    kernel.shutdown().await;
    let how = format!(
        "{}{}",
        confinement.driver,
        if confinement.isolated { ", namespaces" } else { "" }
    );
    Ok((figures, how))
}

fn spawn_true(measure: Duration) -> Result<Figures> {
    let mut latencies = histogram();
    let started = Instant::now();
    while started.elapsed() < measure {
        let t = Instant::now();
        std::process::Command::new("true").status()?;
        latencies.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    Ok(Figures::from(&latencies, started.elapsed()))
}

async fn http(dir: &Path, measure: Duration) -> Result<(Figures, Figures)> {
    let url = loopback_server().await?;
    let tools = bbx_tools::Tools::new(
        bbx_tools::ToolsConfig {
            workspaces: dir.join("workspaces"),
            run_as: (65534, 65534),
            unsandboxed_shell: true,
            llm: Default::default(),
            mcp: Default::default(),
        },
        Box::new(bbx_quota::cgroup::Rlimits),
    )?;
    let call =
        bbx_tools::Call::parse("tool.http", &json!({"method": "GET", "url": url})).context("tool.http is a tool")??;
    let ctx = bbx_tools::Context {
        op_id: OpId::generate(),
        agent: AgentId::generate(),
        tenant: "bench".into(),
        idempotency_key: None,
        settings: ToolSettings {
            allow_networks: vec!["127.0.0.0/8".into()],
            ..Default::default()
        },
        limits: Default::default(),
    };
    let plain = reqwest::Client::new();
    // Warm both connection pools.
    tools.run(&call, &ctx).await?;
    plain.get(&url).send().await?.bytes().await?;
    // Interleaved, so that both see the same machine.
    let (mut tool_latencies, mut plain_latencies) = (histogram(), histogram());
    let started = Instant::now();
    while started.elapsed() < measure {
        let t = Instant::now();
        tools.run(&call, &ctx).await?;
        tool_latencies.saturating_record(t.elapsed().as_micros().max(1) as u64);
        let t = Instant::now();
        plain.get(&url).send().await?.bytes().await?;
        plain_latencies.saturating_record(t.elapsed().as_micros().max(1) as u64);
    }
    let elapsed = started.elapsed() / 2;
    Ok((
        Figures::from(&tool_latencies, elapsed),
        Figures::from(&plain_latencies, elapsed),
    ))
}

/// An HTTP/1.1 server on loopback answering every request with a small JSON body.
async fn loopback_server() -> Result<String> {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/ok", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(br#"{"ok":true}"#));
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(body)
                            .expect("a valid response"),
                    )
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(url)
}

fn print_report(r: &Report) {
    println!(
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "scenario", "ops/s", "p50 ns", "p99 ns", "p99.9 ns"
    );
    for (name, f) in [("quota_check", &r.quota_check), ("mutex_counter", &r.mutex_counter)] {
        println!(
            "{name:<14} {:>12.0} {:>10} {:>10} {:>10}",
            f.ops_per_sec, f.p50_ns, f.p99_ns, f.p999_ns
        );
    }
    println!(
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "", "", "p50 us", "p99 us", "p99.9 us"
    );
    for (name, f) in [
        ("shell_true", &r.shell_true),
        ("spawn_true", &r.spawn_true),
        ("http_tool", &r.http_tool),
        ("http_plain", &r.http_plain),
    ] {
        f.print_row(name);
    }
    println!(
        "http overhead p50: {} us; shell runs confined by {}",
        r.http_overhead_p50_us, r.shell_confinement
    );
    println!("targets: {}", serde_json::to_string(&r.targets).expect("serializes"));
}
