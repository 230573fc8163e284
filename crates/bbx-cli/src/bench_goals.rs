//! `bbx bench goals`: the GoalEngine in process. Bare `noop` ops submitted and
//! awaited one after another, each keyed by a run and a step as a run's steps
//! are (the reference: the same op, through the same path, its key made
//! durable as theirs is); a chain of noop steps (what each step costs over its op); many
//! independent noop steps; independent `sleep` steps (how parallel they run).
//! Each workflow runs `--runs` times: the median, with the range.

use crate::bench::histogram;
use crate::cli::{BenchGoalsArgs, Cli};
use anyhow::{Result, bail};
use bbx_core::op::{SubmitBatch, SubmitOp};
use bbx_core::{AgentId, OpId};
use bbx_goal::Goals;
use bbx_goal::run::{RunStatus, StepRecord};
use bbx_kernel::{Caller, Kernel};
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Quantiles {
    samples: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

impl Quantiles {
    fn of(micros: &Histogram<u64>) -> Self {
        Self {
            samples: micros.len(),
            p50_us: micros.value_at_quantile(0.5) as f64,
            p99_us: micros.value_at_quantile(0.99) as f64,
            p999_us: micros.value_at_quantile(0.999) as f64,
        }
    }
}

/// Wall times of the runs of one workflow, from submitting `goal.run` to
/// seeing the run's end.
#[derive(Serialize)]
struct Walls {
    steps: usize,
    runs: usize,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    steps_per_sec: f64,
}

impl Walls {
    fn of(steps: usize, mut walls: Vec<f64>) -> Self {
        walls.sort_by(f64::total_cmp);
        let median = walls[walls.len() / 2];
        Self {
            steps,
            runs: walls.len(),
            median_ms: median,
            min_ms: walls[0],
            max_ms: walls[walls.len() - 1],
            steps_per_sec: steps as f64 / (median / 1000.0),
        }
    }
}

#[derive(Serialize)]
struct Chain {
    wall: Walls,
    /// From one step's op completing to the next's: the op and the engine.
    step_cycle: Quantiles,
    /// From one step's op completing to the engine starting the next one.
    dispatch_gap: Quantiles,
    /// The step cycle's quantile less the bare op's.
    overhead_p50_us: f64,
    overhead_p99_us: f64,
}

#[derive(Serialize)]
struct Targets {
    overhead_per_step_p99_under_100us: bool,
    independent_1000_noop_under_1s: bool,
    chain_1000_noop_under_2s: bool,
    sleeps_8x100ms_under_200ms: bool,
}

#[derive(Serialize)]
struct Report {
    /// A keyed noop submitted and awaited, one after another: the reference.
    bare_noop: Quantiles,
    chain_noop: Chain,
    independent_noop: Walls,
    independent_noop_parallel_1024: Walls,
    independent_sleep_100ms: Walls,
    targets: Targets,
}

struct Bench {
    kernel: Arc<Kernel>,
    caller: Caller,
    goals: Arc<Goals>,
    agent: AgentId,
}

impl Bench {
    async fn bare(&self, ops: usize) -> Result<Histogram<u64>> {
        let mut micros = histogram();
        let run = OpId::generate().to_string();
        for step in 0..ops {
            let started = Instant::now();
            let op = SubmitOp {
                run_id: Some(run.clone()),
                step: Some(step as u64),
                ..SubmitOp::new(self.agent, "noop", json!({}))
            };
            let batch = SubmitBatch {
                ops: vec![op],
                wait_ms: None,
            };
            let id = self.kernel.submit(&self.caller, batch).await?.ops[0].op_id;
            self.kernel.wait_op(&self.caller, &id, Duration::from_secs(10)).await?;
            micros.record(started.elapsed().as_micros() as u64)?;
        }
        Ok(micros)
    }

    /// Runs `workflow` to its end; its wall time and its steps' records.
    async fn run(&self, workflow: &Value) -> Result<(f64, Vec<(String, StepRecord)>)> {
        let started = Instant::now();
        let op = SubmitOp::new(self.agent, "goal.run", json!({ "workflow": workflow }));
        let submitted = self
            .kernel
            .submit(
                &self.caller,
                SubmitBatch {
                    ops: vec![op],
                    wait_ms: None,
                },
            )
            .await?;
        let id: OpId = submitted.ops[0].op_id;
        let created = self.kernel.wait_op(&self.caller, &id, Duration::from_secs(60)).await?;
        if let Some(error) = created.completion.and_then(|c| c.error) {
            bail!("a benchmark run was refused: {error}");
        }
        let (run, steps) = self.goals.finished(&id).await?;
        let wall = started.elapsed().as_secs_f64() * 1000.0;
        if run.status != RunStatus::Succeeded {
            bail!("a benchmark run ended {:?}: {:?}", run.status, run.error);
        }
        Ok((wall, steps))
    }

    async fn walls(&self, workflow: &Value, steps: usize, runs: usize) -> Result<Walls> {
        let mut walls = Vec::with_capacity(runs);
        for _ in 0..runs {
            walls.push(self.run(workflow).await?.0);
        }
        Ok(Walls::of(steps, walls))
    }
}

fn workflow(steps: usize, step: impl Fn(usize) -> Value, parallel: Option<u32>) -> Value {
    let name = |i: usize| format!("s{i:05}");
    let steps: Map<String, Value> = (0..steps).map(|i| (name(i), step(i))).collect();
    let mut workflow = json!({ "steps": steps });
    if let Some(parallel) = parallel {
        workflow["max_parallel"] = json!(parallel);
    }
    workflow
}

fn micros_between(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<u64> {
    (b? - a?).num_microseconds().and_then(|us| u64::try_from(us).ok())
}

async fn measure(dir: &std::path::Path, args: &BenchGoalsArgs) -> Result<Report> {
    let (kernel, caller) = crate::bench::open_in_process(dir, Default::default()).await?;
    let goals = kernel
        .component::<Goals>()
        .ok_or_else(|| anyhow::anyhow!("the kernel has no goal component"))?;
    let agent = kernel
        .create_agent(&caller, serde_json::from_value(json!({ "name": "bench" }))?)
        .await?
        .id;
    let bench = Bench {
        kernel,
        caller,
        goals,
        agent,
    };
    let n = args.steps;
    eprintln!("bare noop ops, one after another...");
    bench.bare(200).await?;
    let bare = bench.bare(n).await?;

    eprintln!("a chain of {n} noop steps...");
    let chain = workflow(
        n,
        |i| match i {
            0 => json!({ "kind": "noop" }),
            _ => json!({ "kind": "noop", "depends_on": [format!("s{:05}", i - 1)] }),
        },
        None,
    );
    let mut cycle = histogram();
    let mut gap = histogram();
    let mut walls = Vec::new();
    for _ in 0..args.runs {
        let (wall, mut steps) = bench.run(&chain).await?;
        walls.push(wall);
        steps.sort_by(|a, b| a.0.cmp(&b.0));
        for pair in steps.windows(2) {
            let (previous, next) = (&pair[0].1, &pair[1].1);
            if let Some(us) = micros_between(previous.finished_at, next.finished_at) {
                cycle.record(us)?;
            }
            if let Some(us) = micros_between(previous.finished_at, next.started_at) {
                gap.record(us)?;
            }
        }
    }
    let chain = Chain {
        wall: Walls::of(n, walls),
        overhead_p50_us: (cycle.value_at_quantile(0.5) as f64 - bare.value_at_quantile(0.5) as f64).max(0.0),
        overhead_p99_us: (cycle.value_at_quantile(0.99) as f64 - bare.value_at_quantile(0.99) as f64).max(0.0),
        step_cycle: Quantiles::of(&cycle),
        dispatch_gap: Quantiles::of(&gap),
    };

    eprintln!("{n} independent noop steps...");
    let independent = bench
        .walls(&workflow(n, |_| json!({ "kind": "noop" }), None), n, args.runs)
        .await?;
    let wide = bench
        .walls(&workflow(n, |_| json!({ "kind": "noop" }), Some(1024)), n, args.runs)
        .await?;
    eprintln!("8 independent sleeps of 100 ms...");
    let sleeps = bench
        .walls(
            &workflow(8, |_| json!({ "kind": "sleep", "args": { "ms": 100 } }), None),
            8,
            args.runs,
        )
        .await?;
    bench.kernel.shutdown().await;
    let targets = Targets {
        overhead_per_step_p99_under_100us: chain.overhead_p99_us < 100.0,
        independent_1000_noop_under_1s: independent.median_ms < 1000.0,
        chain_1000_noop_under_2s: chain.wall.median_ms < 2000.0,
        sleeps_8x100ms_under_200ms: sleeps.median_ms < 200.0,
    };
    Ok(Report {
        bare_noop: Quantiles::of(&bare),
        chain_noop: chain,
        independent_noop: independent,
        independent_noop_parallel_1024: wide,
        independent_sleep_100ms: sleeps,
        targets,
    })
}

pub async fn goals(cli: &Cli, args: &BenchGoalsArgs) -> Result<()> {
    if args.steps < 2 || args.runs == 0 {
        bail!("--steps must be at least 2 and --runs at least 1");
    }
    let _ = cli;
    let scratch_dir = args.scratch_dir.clone();
    let args = args.clone();
    crate::bench::report_in_process(
        scratch_dir.as_deref(),
        move |dir| async move { measure(&dir, &args).await },
    )
}
