//! `bbx bench context`: ContextTiering in process (no HTTP). A get from each
//! tier, timed in nanoseconds, alone and while the migrator moves another
//! agent's items; durable puts through the ring; a window of `--budget`
//! tokens assembled over `--assemble-items` items, one new turn each time;
//! the memory that agents cost loaded and idle; and, on generated sessions,
//! the importance model and the windows' cache share
//! ([`crate::bench_context_sim`]).

use crate::bench::scratch_dir;
use crate::bench_context_sim::{self, Assembly, Importance};
use crate::cli::{BenchContextArgs, Cli};
use anyhow::{Result, bail};
use bbx_context::Contexts;
use bbx_context::codec::Tier;
use bbx_core::AgentId;
use bbx_core::config::{ConfigLayer, ContextConfig, TierBudgets};
use bbx_core::op::{CompletionStatus, SubmitBatch, SubmitOp};
use bbx_kernel::{Caller, Kernel};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Latency {
    samples: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

impl Latency {
    fn of(nanos: &Histogram<u64>) -> Self {
        let us = |q: f64| nanos.value_at_quantile(q) as f64 / 1000.0;
        Self {
            samples: nanos.len(),
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: nanos.max() as f64 / 1000.0,
        }
    }
}

#[derive(Serialize)]
struct Gets {
    hot: Latency,
    warm: Latency,
    cool: Latency,
    cold: Latency,
    hot_while_migrating: Latency,
    cool_while_migrating: Latency,
}

#[derive(Serialize)]
struct Assemble {
    items: usize,
    context_tokens: u64,
    budget: u32,
    latency: Latency,
    compactions: usize,
    max_window_tokens: u64,
}

#[derive(Serialize)]
struct Agents {
    agents: usize,
    items_per_agent: usize,
    imported_items_per_sec: f64,
    rss_mb_before: f64,
    rss_mb_after_imports: f64,
    /// After every agent was loaded once, in turn (those idle meanwhile let go).
    rss_mb_after_loading_each: f64,
    rss_mb_idle: f64,
    agents_in_memory_idle: usize,
}

#[derive(Serialize)]
struct Targets {
    get_hot_p99_under_5us: bool,
    get_warm_p99_under_50us: bool,
    get_cool_p99_under_1ms: bool,
    assemble_p99_under_5ms: bool,
    migration_keeps_gets_within_their_tier_p99: bool,
    idle_agents_under_2gb_rss: Option<bool>,
    model_auc_beats_lru: bool,
    model_hot_hit_rate_beats_lru: bool,
}

#[derive(Serialize)]
struct Report {
    items: usize,
    put_durable_per_sec: f64,
    get: Gets,
    assemble: Assemble,
    agents: Option<Agents>,
    importance: Importance,
    assembly_quality: Assembly,
    targets: Targets,
}

fn nanos() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid")
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A text of about `bytes` bytes that compresses like prose.
fn text(seed: u64, bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "agent", "result", "request", "service", "error", "config", "deploy", "cluster", "query", "table", "the", "of",
        "to", "and", "in", "is", "for", "with", "latency", "worker",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        out.push(if x.is_multiple_of(11) { '.' } else { ' ' });
        if x.is_multiple_of(23) {
            out.push_str(&(x % 100_000).to_string());
            out.push(' ');
        }
    }
    out
}

struct Bench {
    kernel: Arc<Kernel>,
    caller: Caller,
    contexts: Arc<Contexts>,
}

impl Bench {
    async fn open(dir: &Path, context: ContextConfig) -> Result<Self> {
        let over = ConfigLayer {
            context: Some(context),
            ..ConfigLayer::default()
        };
        let (kernel, caller) = crate::bench::open_in_process(dir, over).await?;
        let contexts = kernel
            .component::<Contexts>()
            .ok_or_else(|| anyhow::anyhow!("the kernel has no context component"))?;
        Ok(Self {
            kernel,
            caller,
            contexts,
        })
    }

    async fn agent(&self) -> Result<AgentId> {
        let agent = self
            .kernel
            .create_agent(&self.caller, serde_json::from_value(json!({ "name": "bench" }))?)
            .await?;
        Ok(agent.id)
    }

    /// Puts `items` (agent, text) through the ring, durably, in batches;
    /// answers puts a second.
    async fn put(&self, items: impl Iterator<Item = (AgentId, String)>) -> Result<f64> {
        let started = Instant::now();
        let mut count = 0usize;
        let mut batch = Vec::new();
        let mut items = items.peekable();
        while items.peek().is_some() {
            batch.clear();
            batch.extend(items.by_ref().take(256).map(|(agent, text)| {
                SubmitOp::new(
                    agent,
                    "context.put",
                    json!({ "content": text, "kind": "message", "role": "user" }),
                )
            }));
            count += batch.len();
            let submitted = self
                .kernel
                .submit(
                    &self.caller,
                    SubmitBatch {
                        ops: batch.clone(),
                        wait_ms: Some(10_000),
                    },
                )
                .await?;
            for op in submitted.ops {
                let info = self
                    .kernel
                    .wait_op(&self.caller, &op.op_id, Duration::from_secs(60))
                    .await?;
                match info.completion {
                    Some(c) if c.status == CompletionStatus::Ok => {}
                    other => bail!("a put did not complete: {other:?}"),
                }
            }
        }
        Ok(count as f64 / started.elapsed().as_secs_f64())
    }

    /// Gets each of `ids` once (on this thread), timed; each must come from
    /// `tier` (when given), or the sample would be another tier's.
    fn get_each(&self, agent: AgentId, ids: &[u64], tier: Option<Tier>, into: &mut Histogram<u64>) -> Result<()> {
        for id in ids {
            let started = Instant::now();
            let got = self.contexts.get(agent, *id)?;
            into.saturating_record(started.elapsed().as_nanos() as u64);
            if tier.is_some_and(|tier| got.tier != tier) {
                bail!("item {id} came from {:?}, not {tier:?}", got.tier);
            }
            std::hint::black_box(got);
        }
        Ok(())
    }
}

fn budgets() -> ContextConfig {
    let big = TierBudgets {
        hot_bytes: 1 << 40,
        warm_bytes: 1 << 40,
        cool_bytes: 1 << 40,
    };
    ContextConfig {
        agent: big,
        global: big,
        // The bench times context alone: nothing goes to memory.
        cold_search: false,
        migrate_every_ms: 60_000,
        idle_secs: 3600,
        // A prefetched item would be a HOT sample among another tier's.
        prefetch: false,
        ..ContextConfig::default()
    }
}

fn shuffled(n: usize, seed: u64) -> Vec<u64> {
    let mut ids: Vec<u64> = (1..=n as u64).collect();
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D)
        | 1;
    for i in (1..ids.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ids.swap(i, (x % (i as u64 + 1)) as usize);
    }
    ids
}

/// `rounds` times: the items moved down to `tier`, then each got once from it.
async fn samples_from(
    bench: &Arc<Bench>,
    agent: AgentId,
    ids: &[u64],
    tier: Tier,
    rounds: usize,
) -> Result<Histogram<u64>> {
    let mut h = nanos();
    for _ in 0..rounds {
        bench.contexts.move_down(agent, ids, tier).await?;
        let (b, ids) = (bench.clone(), ids.to_vec());
        h = tokio::task::spawn_blocking(move || {
            b.get_each(agent, &ids, Some(tier), &mut h)?;
            Ok::<_, anyhow::Error>(h)
        })
        .await??;
    }
    Ok(h)
}

/// Gets from each tier: items placed there by the migrator's own moves,
/// each got once (a get promotes it), several rounds.
async fn gets(bench: &Arc<Bench>, items: usize) -> Result<(f64, Gets)> {
    let agent = bench.agent().await?;
    let put_rate = bench
        .put((0..items as u64).map(|i| (agent, text(i, 200 + (i as usize * 37) % 1800))))
        .await?;
    let other = bench.agent().await?;
    bench.put((0..items as u64).map(|i| (other, text(i + 7, 1000)))).await?;
    bench.contexts.stats(agent)?;
    bench.contexts.stats(other)?;
    let ids = shuffled(items, 7);
    let mut hot = nanos();
    for round in 0..5 {
        let bench = bench.clone();
        let ids = shuffled(items, round);
        hot = tokio::task::spawn_blocking(move || {
            bench.get_each(agent, &ids, Some(Tier::Hot), &mut hot)?;
            Ok::<_, anyhow::Error>(hot)
        })
        .await??;
    }
    let warm = samples_from(bench, agent, &ids, Tier::Warm, 3).await?;
    let cool = samples_from(bench, agent, &ids, Tier::Cool, 3).await?;
    // The migrator busy with the other agent: down to COOL and back, over
    // and over, while this agent's HOT and COOL items are got.
    let busy = Arc::new(AtomicBool::new(true));
    let migrating = {
        let (bench, busy) = (bench.clone(), busy.clone());
        let all: Vec<u64> = (1..=items as u64).collect();
        tokio::spawn(async move {
            while busy.load(Ordering::Relaxed) {
                bench.contexts.move_down(other, &all, Tier::Cool).await?;
                let (b, all) = (bench.clone(), all.clone());
                tokio::task::spawn_blocking(move || b.get_each(other, &all, None, &mut nanos())).await??;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let (mut hot_busy, mut cool_busy) = (nanos(), nanos());
    for round in 0..3 {
        bench.contexts.move_down(agent, &ids, Tier::Cool).await?;
        let (b, cool_ids, hot_ids) = (bench.clone(), ids.clone(), shuffled(items, round + 100));
        (hot_busy, cool_busy) = tokio::task::spawn_blocking(move || {
            b.get_each(agent, &cool_ids, Some(Tier::Cool), &mut cool_busy)?;
            b.get_each(agent, &hot_ids, Some(Tier::Hot), &mut hot_busy)?;
            Ok::<_, anyhow::Error>((hot_busy, cool_busy))
        })
        .await??;
    }
    busy.store(false, Ordering::Relaxed);
    migrating.await??;
    // Last: an item moved to COLD is no longer COOL when moved "down" to it.
    let cold = samples_from(bench, agent, &ids, Tier::Cold, 1).await?;
    let [warm, cool, cold] = [&warm, &cool, &cold].map(Latency::of);
    Ok((
        put_rate,
        Gets {
            hot: Latency::of(&hot),
            warm,
            cool,
            cold,
            hot_while_migrating: Latency::of(&hot_busy),
            cool_while_migrating: Latency::of(&cool_busy),
        },
    ))
}

/// Windows over a long context: a new turn, then a window, each time.
async fn assemble(bench: &Arc<Bench>, items: usize, budget: u32) -> Result<Assemble> {
    let agent = bench.agent().await?;
    // Turns of 20 to 400 tokens (about 4 bytes a token), a system prompt first.
    bench
        .put(std::iter::once((agent, "You are a careful agent.".to_owned())))
        .await?;
    bench
        .put((1..items as u64).map(|i| (agent, text(i * 3, 80 + (i as usize * 7919) % 1520))))
        .await?;
    let context_tokens = bench.contexts.stats(agent)?["tokens"].as_u64().unwrap_or(0);
    // The model trains on what the load taught it, on a core of its own:
    // windows are timed after that, not against it.
    while bench.contexts.is_training() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut latency = nanos();
    let (mut compactions, mut max_tokens) = (0, 0);
    for turn in 0..300u64 {
        bench.put(std::iter::once((agent, text(turn + 1_000_000, 400)))).await?;
        let b = bench.clone();
        let (elapsed, window) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let window = b.contexts.assemble(agent, budget, bbx_context::Asker::Operator);
            (started.elapsed(), window)
        })
        .await?;
        let window = window?;
        latency.saturating_record(elapsed.as_nanos() as u64);
        compactions += usize::from(window["compacted"] == true);
        max_tokens = max_tokens.max(window["tokens"].as_u64().unwrap_or(0));
    }
    Ok(Assemble {
        items,
        context_tokens,
        budget,
        latency: Latency::of(&latency),
        compactions,
        max_window_tokens: max_tokens,
    })
}

/// Many agents' contexts: memory after the puts, with every agent loaded,
/// and once they are idle and let go.
async fn agents(dir: &Path, agents: usize, per_agent: usize) -> Result<Agents> {
    let config = ContextConfig {
        idle_secs: 2,
        migrate_every_ms: 250,
        cold_search: false,
        ..ContextConfig::default()
    };
    let bench = Bench::open(dir, config).await?;
    let rss_mb_before = rss_mb();
    // One agent's context put through the ring, then imported into each of
    // the others (one write each, as a snapshot's restore is).
    let template = bench.agent().await?;
    bench
        .put((0..per_agent as u64).map(|n| (template, text(n, 200))))
        .await?;
    let data = bench.kernel.export_agent(&bench.caller, &template)?;
    bench.contexts.stats(template)?;
    let mut ids = Vec::with_capacity(agents);
    for _ in 0..agents {
        ids.push(bench.agent().await?);
    }
    let mut copies: Vec<_> = ids
        .iter()
        .map(|agent| {
            let mut copy = data.clone();
            copy.agent = *agent;
            copy
        })
        .collect();
    let started = Instant::now();
    for copy in copies.drain(..) {
        bench.kernel.import_agent(&bench.caller, copy).await?;
    }
    let imported_items_per_sec = (agents * per_agent) as f64 / started.elapsed().as_secs_f64();
    let rss_mb_after_puts = rss_mb();
    for agent in &ids {
        let stats = bench.contexts.stats(*agent)?;
        if stats["items"] != per_agent {
            bail!("agent {agent} has {} items, not {per_agent}", stats["items"]);
        }
    }
    let rss_mb_all_loaded = rss_mb();
    let deadline = Instant::now() + Duration::from_secs(120);
    while bench.contexts.agents_in_memory() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The allocator hands freed pages back after a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = Agents {
        agents,
        items_per_agent: per_agent,
        imported_items_per_sec,
        rss_mb_before,
        rss_mb_after_imports: rss_mb_after_puts,
        rss_mb_after_loading_each: rss_mb_all_loaded,
        rss_mb_idle: rss_mb(),
        agents_in_memory_idle: bench.contexts.agents_in_memory(),
    };
    bench.kernel.shutdown().await;
    Ok(report)
}

pub async fn context(cli: &Cli, args: &BenchContextArgs) -> Result<()> {
    if args.items == 0 || args.assemble_items == 0 || args.turns == 0 || args.budget == 0 {
        bail!("--items, --assemble-items, --turns and --budget must be positive");
    }
    let scratch = scratch_dir(args.scratch_dir.as_deref())?;
    let args = args.clone();
    let dir = scratch.path().to_path_buf();
    // The kernel gets a multi-threaded runtime of its own: this command's
    // runtime is single-threaded.
    let (put_rate, gets, assembled, agents) = std::thread::spawn(move || -> Result<_> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(async {
                eprintln!("gets from each tier ({} items)...", args.items);
                let bench = Arc::new(Bench::open(&dir.join("tiers"), budgets()).await?);
                let (put_rate, gets) = gets(&bench, args.items).await?;
                eprintln!("assembly ({} items, budget {})...", args.assemble_items, args.budget);
                let assembled = assemble(&bench, args.assemble_items, args.budget).await?;
                bench.kernel.shutdown().await;
                drop(bench);
                let agents = if args.agents > 0 {
                    eprintln!("{} agents of {} items...", args.agents, args.items_per_agent);
                    Some(agents(&dir.join("agents"), args.agents, args.items_per_agent).await?)
                } else {
                    None
                };
                Ok((put_rate, gets, assembled, agents))
            })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the in-process phases panicked"))??;
    eprintln!("importance on generated sessions...");
    let (importance, model) =
        bench_context_sim::importance(args.train_sessions, args.test_sessions, args.turns, 64, 64 * 1024);
    eprintln!("windows over a 500-turn session...");
    let assembly_quality = bench_context_sim::assembly(500, 32_000, model.as_ref());
    let targets = Targets {
        get_hot_p99_under_5us: gets.hot.p99_us < 5.0,
        get_warm_p99_under_50us: gets.warm.p99_us < 50.0,
        get_cool_p99_under_1ms: gets.cool.p99_us < 1000.0,
        assemble_p99_under_5ms: assembled.latency.p99_us < 5000.0,
        migration_keeps_gets_within_their_tier_p99: gets.hot_while_migrating.p99_us < 5.0
            && gets.cool_while_migrating.p99_us < 1000.0,
        idle_agents_under_2gb_rss: agents.as_ref().map(|a| a.rss_mb_idle < 2048.0),
        model_auc_beats_lru: importance.auc.model > importance.auc.lru,
        model_hot_hit_rate_beats_lru: importance.hot_hit_rate.model > importance.hot_hit_rate.lru,
    };
    let report = Report {
        items: args.items,
        put_durable_per_sec: put_rate,
        get: gets,
        assemble: assembled,
        agents,
        importance,
        assembly_quality,
        targets,
    };
    crate::output::json(&report);
    let _ = cli;
    Ok(())
}
