//! `bbx context ...` (ContextTiering through the kernel's endpoints) and
//! `bbx v2 enhanced-context ...` (the report's paths).

use crate::cli::Cli;
use crate::memory::text_arg;
use crate::{client, output};
use anyhow::Result;
use bbx_core::api::prelude::*;
use clap::Subcommand;
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum ContextCommand {
    /// Add TEXT to AGENT's context (`@PATH` reads a file, `-` standard
    /// input); prints its id once durable.
    Put {
        agent: String,
        text: String,
        /// message, tool_result, document, note or summary.
        #[arg(long, default_value = "message")]
        kind: String,
        /// system, user, assistant or tool.
        #[arg(long)]
        role: Option<String>,
        /// Always in an assembled window, and kept HOT.
        #[arg(long)]
        pinned: bool,
        /// How important it is, 0 to 1.
        #[arg(long)]
        importance: Option<f32>,
        /// An earlier item it refers to; repeat for more.
        #[arg(long = "ref", value_name = "ID")]
        refs: Vec<u64>,
        /// Putting again with this key adds nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// One item with its content and tier.
    Get { agent: String, id: String },
    /// AGENT's items in order, without content.
    List {
        agent: String,
        /// Only items in this tier (hot, warm, cool, cold).
        #[arg(long)]
        tier: Option<String>,
        /// Only items of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Items after this id.
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A window of AGENT's context under --budget tokens.
    Assemble {
        agent: String,
        #[arg(long)]
        budget: u32,
    },
    /// Search AGENT's items that reached COLD, through SemanticMemory.
    Search {
        agent: String,
        query: String,
        /// Items at most.
        #[arg(short, long, default_value_t = 10)]
        k: usize,
    },
    /// Pin an item (--unpin to let it go).
    Pin {
        agent: String,
        id: String,
        #[arg(long)]
        unpin: bool,
    },
    /// Delete an item.
    Delete { agent: String, id: String },
    /// Move an item to COOL or COLD now.
    Demote {
        agent: String,
        id: String,
        #[arg(long)]
        tier: String,
    },
    /// AGENT's context figures, per tier.
    Stats { agent: String },
    /// Bring an item into HOT now: it is about to be needed.
    PrefetchHint { agent: String, id: String },
    /// How important an item is now, and why.
    MlScore { agent: String, id: String },
}

/// The report's paths: `bbx v2 enhanced-context stats|prefetch-hint KEY|ml-score KEY`,
/// for the agent in --agent (or `$BBX_AGENT`); KEY is an item's id.
#[derive(Subcommand, Debug)]
pub enum EnhancedContextCommand {
    Stats {
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
    PrefetchHint {
        key: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
    MlScore {
        key: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
}

pub async fn run(cli: &Cli, command: &ContextCommand) -> Result<()> {
    let (name, input) = match command {
        ContextCommand::Put {
            agent,
            text,
            kind,
            role,
            pinned,
            importance,
            refs,
            idempotency_key,
        } => (
            "context.put",
            json!({
                "agent": agent, "content": text_arg(text)?, "kind": kind, "role": role, "pinned": pinned,
                "importance": importance, "refs": refs, "idempotency_key": idempotency_key,
            }),
        ),
        ContextCommand::Get { agent, id } => ("context.get", json!({ "agent": agent, "id": id })),
        ContextCommand::List {
            agent,
            tier,
            kind,
            after,
            limit,
        } => (
            "context.list",
            json!({ "agent": agent, "tier": tier, "kind": kind, "after": after, "limit": limit }),
        ),
        ContextCommand::Assemble { agent, budget } => ("context.assemble", json!({ "agent": agent, "budget": budget })),
        ContextCommand::Pin { agent, id, unpin } => {
            ("context.pin", json!({ "agent": agent, "id": id, "pinned": !unpin }))
        }
        ContextCommand::Delete { agent, id } => ("context.delete", json!({ "agent": agent, "id": id })),
        ContextCommand::Demote { agent, id, tier } => {
            ("context.demote", json!({ "agent": agent, "id": id, "tier": tier }))
        }
        ContextCommand::Stats { agent } => ("context.stats", json!({ "agent": agent })),
        ContextCommand::Search { agent, query, k } => {
            ("context.search", json!({ "agent": agent, "query": query, "k": k }))
        }
        ContextCommand::PrefetchHint { agent, id } => {
            ("context.prefetch", json!({ "agent": agent, "ids": [id_number(id)?] }))
        }
        ContextCommand::MlScore { agent, id } => ("context.score", json!({ "agent": agent, "id": id })),
    };
    call(cli, name, input).await
}

pub async fn report(cli: &Cli, command: &EnhancedContextCommand) -> Result<()> {
    let (name, input) = match command {
        EnhancedContextCommand::Stats { agent } => ("enhanced_context.stats", json!({ "agent": agent })),
        EnhancedContextCommand::PrefetchHint { key, agent } => {
            ("enhanced_context.prefetch", json!({ "agent": agent, "key": key }))
        }
        EnhancedContextCommand::MlScore { key, agent } => {
            ("enhanced_context.score", json!({ "agent": agent, "key": key }))
        }
    };
    call(cli, name, input).await
}

fn id_number(id: &str) -> Result<u64> {
    id.parse()
        .map_err(|_| anyhow::anyhow!("{id:?} is not an item id (a whole number)"))
}

async fn call(cli: &Cli, name: &str, input: Value) -> Result<()> {
    let answer = client(cli)?.call_endpoint(name, input).await?;
    if cli.json {
        output::json(&answer);
        return Ok(());
    }
    match name {
        "context.put" => println!("{}", answer["id"]),
        "context.get" => println!("{}", answer["content"].as_str().unwrap_or_default()),
        "context.list" => {
            for item in answer["items"].as_array().into_iter().flatten() {
                println!(
                    "{:>8}  {:<11}  {:<5}  {:>6} tokens{}",
                    item["id"],
                    item["kind"].as_str().unwrap_or_default(),
                    item["tier"].as_str().unwrap_or_default(),
                    item["tokens"],
                    if item["pinned"].as_bool() == Some(true) {
                        "  pinned"
                    } else {
                        ""
                    }
                );
            }
        }
        _ => output::json(&answer),
    }
    Ok(())
}
