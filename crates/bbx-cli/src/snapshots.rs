//! `bbx snapshot ...` (StateSnapshots through the kernel's endpoints) and
//! `bbx v2 distributed-snapshots ...` (the report's paths).

use crate::cli::Cli;
use crate::{client, output};
use anyhow::Result;
use bbx_core::api::prelude::*;
use clap::Subcommand;
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot AGENT now; prints the snapshot's id (with --json: its summary,
    /// `id` and `bytes_written` among it).
    Create {
        agent: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// AGENT's snapshots, oldest first.
    List { agent: String },
    /// One snapshot: its summary, the agent record and quota limits it holds.
    Show { snapshot: String },
    /// What changed from snapshot FROM to snapshot TO.
    Diff { from: String, to: String },
    /// Restore SNAPSHOT into AGENT (the snapshot's own agent or another of its tenant).
    Restore { agent: String, snapshot: String },
    /// A new agent named --name whose data is SNAPSHOT's; prints its id.
    Fork {
        snapshot: String,
        #[arg(long)]
        name: String,
    },
    /// Delete a snapshot (its chunks go at the next garbage collection).
    Delete { snapshot: String },
    /// Read every chunk of a snapshot and check it.
    Verify { snapshot: String },
    /// Recover AGENT to the moment --at (RFC 3339).
    Pitr {
        agent: String,
        #[arg(long)]
        at: String,
    },
    /// Totals of the snapshot stores.
    Stats,
    /// Each snapshot store's state and lag.
    ListReplicas,
    /// Collect snapshot garbage now.
    Gc,
}

/// The report's paths: `bbx v2 distributed-snapshots stats|list-replicas|pitr <timestamp> -a <agent>`.
#[derive(Subcommand, Debug)]
pub enum V2SnapshotsCommand {
    Stats,
    ListReplicas,
    /// Recover --agent to TIMESTAMP (RFC 3339).
    Pitr {
        timestamp: String,
        #[arg(short, long, env = "BBX_AGENT")]
        agent: String,
    },
}

pub async fn run(cli: &Cli, command: &SnapshotCommand) -> Result<()> {
    let (name, input) = match command {
        SnapshotCommand::Create { agent, idempotency_key } => (
            "snapshots.create",
            json!({ "agent": agent, "idempotency_key": idempotency_key }),
        ),
        SnapshotCommand::List { agent } => ("snapshots.list", json!({ "agent": agent })),
        SnapshotCommand::Show { snapshot } => ("snapshots.show", json!({ "snapshot": snapshot })),
        SnapshotCommand::Diff { from, to } => ("snapshots.diff", json!({ "snapshot": from, "to": to })),
        SnapshotCommand::Restore { agent, snapshot } => {
            ("snapshots.restore", json!({ "snapshot": snapshot, "agent": agent }))
        }
        SnapshotCommand::Fork { snapshot, name } => ("snapshots.fork", json!({ "snapshot": snapshot, "name": name })),
        SnapshotCommand::Delete { snapshot } => ("snapshots.delete", json!({ "snapshot": snapshot })),
        SnapshotCommand::Verify { snapshot } => ("snapshots.verify", json!({ "snapshot": snapshot })),
        SnapshotCommand::Pitr { agent, at } => ("snapshots.pitr", json!({ "agent": agent, "at": at })),
        SnapshotCommand::Stats => ("snapshots.stats", json!({})),
        SnapshotCommand::ListReplicas => ("snapshots.replicas", json!({})),
        SnapshotCommand::Gc => ("snapshots.gc", json!({})),
    };
    let answer = client(cli)?.call_endpoint(name, input).await?;
    if cli.json {
        output::json(&answer);
        return Ok(());
    }
    match name {
        "snapshots.create" | "snapshots.fork" => println!("{}", answer["id"].as_str().unwrap_or_default()),
        "snapshots.list" => {
            for s in answer["snapshots"].as_array().into_iter().flatten() {
                println!(
                    "{}  {}  {:>12} bytes  {:>10} written  {}",
                    text(&s["id"]),
                    text(&s["created_at"]),
                    s["bytes"],
                    s["bytes_written"],
                    text(&s["trigger"])
                );
            }
        }
        _ => output::json(&answer),
    }
    Ok(())
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

pub async fn report(cli: &Cli, command: &V2SnapshotsCommand) -> Result<()> {
    let (name, input) = match command {
        V2SnapshotsCommand::Stats => ("snapshots.stats", json!({})),
        V2SnapshotsCommand::ListReplicas => ("snapshots.replicas", json!({})),
        V2SnapshotsCommand::Pitr { timestamp, agent } => {
            ("distributed_snapshots.pitr", json!({ "agent": agent, "at": timestamp }))
        }
    };
    output::json(&client(cli)?.call_endpoint(name, input).await?);
    Ok(())
}
