//! `bbx goals ...` (the GoalEngine through the kernel's endpoints) and
//! `bbx v2 goals ...` (the report's paths).

use crate::cli::Cli;
use crate::{client, output};
use anyhow::{Context as _, Result, bail};
use bbx_core::api::prelude::*;
use clap::Subcommand;
use serde_json::{Map, Value, json};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum GoalsCommand {
    /// Run the workflow in FILE (YAML or JSON; `-` reads standard input) as
    /// --agent; prints the run's id.
    Run {
        file: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        /// An input of the workflow, NAME=VALUE (a value that reads as JSON is
        /// taken as JSON); repeat for more.
        #[arg(long = "input", value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// Running again with this key starts nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the run to end and print its status (exit 1 unless it succeeded).
        #[arg(long)]
        wait: bool,
    },
    /// Plan GOAL (words) with the configured model, then run the plan as
    /// --agent; --dry-run prints the plan only.
    Plan {
        goal: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        /// An op kind the plan may use; repeat for more [default: every kind
        /// but goal.*].
        #[arg(long = "tool", value_name = "KIND")]
        tools: Vec<String>,
        /// The most the plan may be estimated to cost, in USD.
        #[arg(long)]
        max_cost_usd: Option<f64>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the workflow in FILE without running it.
    Validate { file: String },
    /// A run's status and its steps'.
    Status { run: String },
    /// --agent's runs, newest first.
    List {
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Cancel a run.
    Cancel { run: String },
    /// Pause a run: nothing new starts.
    Pause { run: String },
    /// Resume a paused run.
    Resume { run: String },
    /// Send a run the signal NAME, with PAYLOAD (JSON, or text).
    Signal {
        run: String,
        name: String,
        payload: Option<String>,
    },
    /// Approve a run's wait.approval step (--deny to deny it).
    Approve {
        run: String,
        step: String,
        #[arg(long)]
        deny: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// The JSON Schema of the workflow format.
    Schema,
}

/// The report's paths: `bbx v2 goals plan "<goal>"|status [RUN_ID]|list`.
#[derive(Subcommand, Debug)]
pub enum V2GoalsCommand {
    /// Plan a goal (and run it, unless --dry-run).
    Plan {
        goal: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        #[arg(long)]
        dry_run: bool,
    },
    /// A run's status, or (without one) --agent's runs.
    Status {
        run: Option<String>,
        #[arg(long, env = "BBX_AGENT")]
        agent: Option<String>,
    },
    List {
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
}

fn workflow_file(file: &str) -> Result<Value> {
    let text = if file == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the workflow from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read the workflow file {file}"))?
    };
    Ok(bbx_goal::Workflow::parse(&text)?)
}

fn inputs(given: &[String]) -> Result<Map<String, Value>> {
    let mut inputs = Map::new();
    for pair in given {
        let Some((name, value)) = pair.split_once('=') else {
            bail!("--input takes NAME=VALUE, not {pair:?}");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        inputs.insert(name.to_owned(), value);
    }
    Ok(inputs)
}

pub async fn run(cli: &Cli, command: &GoalsCommand) -> Result<()> {
    let api = client(cli)?;
    let (name, input) = match command {
        GoalsCommand::Run {
            file,
            agent,
            inputs: given,
            idempotency_key,
            wait,
        } => {
            let input = json!({
                "agent": agent, "workflow": workflow_file(file)?, "inputs": inputs(given)?,
                "idempotency_key": idempotency_key,
            });
            let started = api.call_endpoint("goals.run", input).await?;
            if !wait {
                return print(cli, &started, |s| s["run_id"].as_str().unwrap_or_default().to_owned());
            }
            let run = started["run_id"].as_str().unwrap_or_default().to_owned();
            let status = loop {
                let status = api.call_endpoint("goals.status", json!({ "run": run })).await?;
                if status["status"] != "running" {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            print(cli, &status, summary)?;
            if status["status"] != "succeeded" {
                std::process::exit(1);
            }
            return Ok(());
        }
        GoalsCommand::Plan {
            goal,
            agent,
            tools,
            max_cost_usd,
            dry_run,
        } => (
            "goals.plan",
            json!({ "agent": agent, "goal": goal, "tools": tools, "max_cost_usd": max_cost_usd, "dry_run": dry_run }),
        ),
        GoalsCommand::Validate { file } => ("goals.validate", json!({ "workflow": workflow_file(file)? })),
        GoalsCommand::Status { run } => ("goals.status", json!({ "run": run })),
        GoalsCommand::List { agent, limit } => ("goals.list", json!({ "agent": agent, "limit": limit })),
        GoalsCommand::Cancel { run } => ("goals.cancel", json!({ "run": run })),
        GoalsCommand::Pause { run } => ("goals.pause", json!({ "run": run })),
        GoalsCommand::Resume { run } => ("goals.resume", json!({ "run": run })),
        GoalsCommand::Signal { run, name, payload } => {
            let payload = payload
                .as_deref()
                .map(|p| serde_json::from_str(p).unwrap_or_else(|_| Value::String(p.to_owned())))
                .unwrap_or(Value::Null);
            ("goals.signal", json!({ "run": run, "name": name, "payload": payload }))
        }
        GoalsCommand::Approve {
            run,
            step,
            deny,
            reason,
        } => (
            "goals.approve",
            json!({ "run": run, "step": step, "approve": !deny, "reason": reason }),
        ),
        GoalsCommand::Schema => ("goals.schema", json!({})),
    };
    let answer = api.call_endpoint(name, input).await?;
    match name {
        "goals.status" => print(cli, &answer, summary),
        "goals.list" => print(cli, &answer, |answer| {
            let runs = answer["runs"].as_array().into_iter().flatten();
            runs.map(|r| {
                format!(
                    "{}  {:<9}  {:>5} steps  {}",
                    r["run_id"].as_str().unwrap_or_default(),
                    r["status"].as_str().unwrap_or_default(),
                    r["steps"],
                    r["name"].as_str().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
        }),
        _ => {
            output::json(&answer);
            Ok(())
        }
    }
}

pub async fn report(cli: &Cli, command: &V2GoalsCommand) -> Result<()> {
    let (name, input) = match command {
        V2GoalsCommand::Plan { goal, agent, dry_run } => (
            "goal_engine.plan",
            json!({ "agent": agent, "goal": goal, "dry_run": dry_run }),
        ),
        V2GoalsCommand::Status { run: Some(run), .. } => ("goal_engine.status", json!({ "run": run })),
        V2GoalsCommand::Status { run: None, agent } => {
            let Some(agent) = agent else {
                bail!("give a run's id, or --agent (or BBX_AGENT) for the agent's runs");
            };
            ("goal_engine.list", json!({ "agent": agent }))
        }
        V2GoalsCommand::List { agent } => ("goal_engine.list", json!({ "agent": agent })),
    };
    output::json(&client(cli)?.call_endpoint(name, input).await?);
    Ok(())
}

fn print(cli: &Cli, answer: &Value, text: impl Fn(&Value) -> String) -> Result<()> {
    if cli.json {
        output::json(answer);
    } else {
        println!("{}", text(answer));
    }
    Ok(())
}

/// A run in lines: its status, then a line a step.
fn summary(run: &Value) -> String {
    let mut lines = vec![format!(
        "run {}: {}{}",
        run["run_id"].as_str().unwrap_or_default(),
        run["status"].as_str().unwrap_or_default(),
        run["error"]["message"]
            .as_str()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    )];
    for (name, step) in run["steps"].as_object().into_iter().flatten() {
        lines.push(format!(
            "  {name:<24} {:<10} {}",
            step["status"].as_str().unwrap_or_default(),
            step["error"]["message"]
                .as_str()
                .or(step["reason"].as_str())
                .unwrap_or_default()
        ));
    }
    lines.join("\n")
}
