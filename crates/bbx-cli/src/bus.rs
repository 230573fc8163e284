//! `bbx bus ...`: the MessageBus. `publish` and `subscribe` are commands of
//! their own (a payload as JSON, messages printed one a line and then acked);
//! every other verb is the bus's endpoint of that name.

use crate::cli::Cli;
use crate::{client, endpoint, output};
use anyhow::{Context, Result};
use bbx_core::api::prelude::*;
use clap::Subcommand;
use serde_json::{Value, json};

#[derive(Subcommand, Debug)]
pub enum BusCommand {
    /// Publish PAYLOAD (JSON; other text is sent as a JSON string; @PATH reads
    /// it from a file) to TOPIC;
    /// prints its id, partition and offset once it is durable.
    Publish {
        topic: String,
        payload: String,
        /// Its id: publishing it again within the dedup window stores nothing.
        #[arg(long)]
        id: Option<String>,
        /// Its ordering key (one partition, in order).
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Fetch messages of TOPIC for a consumer group and print them one JSON
    /// object a line; then ack them, unless --no-ack.
    Subscribe {
        topic: String,
        #[arg(long)]
        group: String,
        /// Return once this many messages came (or at the timeout).
        #[arg(long, default_value_t = 1)]
        max: usize,
        /// How long each message is leased before it is delivered again.
        #[arg(long)]
        ack_wait_ms: Option<u64>,
        /// How long to wait for messages [default: 5 s].
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Leave them unacknowledged (they are delivered again after the ack wait).
        #[arg(long)]
        no_ack: bool,
        /// Where a new group starts: earliest or latest.
        #[arg(long)]
        start: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// `VERB ...`: an endpoint of the bus (`topics`, `stats`, `create-topic TOPIC`,
    /// `ack TOPIC GROUP --acks '[..]'`, `nack`, `extend`, `dlq TOPIC`,
    /// `dlq-replay TOPIC`, `dlq-purge TOPIC`).
    #[command(external_subcommand)]
    Endpoint(Vec<String>),
}

/// The report's paths: `bbx v2 message-bus stats|publish TOPIC MESSAGE|dlq TOPIC`.
#[derive(Subcommand, Debug)]
pub enum MessageBusCommand {
    Stats,
    Publish { topic: String, message: String },
    Dlq { topic: String },
}

/// JSON as given, or text as a JSON string; `@PATH`: the file at PATH so read.
fn payload(text: &str) -> Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?,
        None => text.to_owned(),
    };
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn run(cli: &Cli, command: &BusCommand) -> Result<()> {
    let api = client(cli)?;
    match command {
        BusCommand::Endpoint(words) => {
            let words: Vec<String> = std::iter::once("bus".to_owned()).chain(words.iter().cloned()).collect();
            endpoint::run(cli, &words).await
        }
        BusCommand::Publish {
            topic,
            payload: text,
            id,
            key,
            tenant,
        } => {
            let input = json!({ "topic": topic, "payload": payload(text)?, "id": id, "key": key, "tenant": tenant });
            output::json(&api.call_endpoint("bus.publish", input).await?);
            Ok(())
        }
        BusCommand::Subscribe {
            topic,
            group,
            max,
            ack_wait_ms,
            timeout_ms,
            no_ack,
            start,
            tenant,
        } => {
            let input = json!({
                "topic": topic, "group": group, "max": max, "ack_wait_ms": ack_wait_ms,
                "timeout_ms": timeout_ms, "start": start, "tenant": tenant,
            });
            let fetched = api.call_endpoint("bus.subscribe", input).await?;
            let messages = fetched["messages"]
                .as_array()
                .context("the kernel answered no messages")?;
            for message in messages {
                println!("{message}");
            }
            let acks: Vec<&Value> = messages.iter().map(|m| &m["ack"]).collect();
            if !*no_ack && !acks.is_empty() {
                let input = json!({ "topic": topic, "group": group, "acks": acks, "tenant": tenant });
                api.call_endpoint("bus.ack", input).await?;
            }
            Ok(())
        }
    }
}

pub async fn report(cli: &Cli, command: &MessageBusCommand) -> Result<()> {
    let (name, input) = match command {
        MessageBusCommand::Stats => ("message_bus.stats", json!({})),
        MessageBusCommand::Publish { topic, message } => (
            "message_bus.publish",
            json!({ "topic": topic, "message": payload(message)? }),
        ),
        MessageBusCommand::Dlq { topic } => ("message_bus.dlq", json!({ "topic": topic })),
    };
    output::json(&client(cli)?.call_endpoint(name, input).await?);
    Ok(())
}
