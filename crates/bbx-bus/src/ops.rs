//! The bus's op kinds: `bus.publish` (to a topic) and `bus.send` (to an agent's
//! mailbox, as the op's agent). Each message is staged with its op's completion
//! in one atomic write, so an op publishes exactly once whatever crashes, and a
//! resubmission with the op's idempotency key publishes nothing more.

use crate::bus::Bus;
use crate::direct::{MAILBOX_PREFIX, mailbox, reserved};
use crate::keys::TopicKey;
use crate::log::{Outgoing, Publish, stage_publish};
use crate::topic::{TopicConfig, TopicSettings};
use bbx_component::{EffectOp, OpKind, Prepared, Staging, parse_args};
use bbx_core::op::Effects;
use bbx_core::{AgentId, Error, Result};
use bbx_store::GroupTx;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

pub(crate) const KINDS: &[OpKind] = &[
    OpKind {
        name: "bus.publish",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "bus.send",
        effects: Effects::Kernel,
    },
];

/// `bus.publish`'s args.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PublishArgs {
    /// A topic of the agent's tenant.
    topic: String,
    payload: Value,
    /// Its id [default: a new one]; published again within the dedup window, it
    /// stores nothing.
    #[serde(default)]
    id: Option<String>,
    /// The ordering key.
    #[serde(default)]
    key: Option<String>,
}

/// `bus.send`'s args.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SendArgs {
    /// The recipient, an agent of the same tenant.
    to: AgentId,
    payload: Value,
    #[serde(default)]
    id: Option<String>,
}

pub(crate) fn args_schema(kind: &str) -> Option<Value> {
    let schema = match kind {
        "bus.publish" => schemars::schema_for!(PublishArgs),
        "bus.send" => schemars::schema_for!(SendArgs),
        _ => return None,
    };
    serde_json::to_value(schema).ok()
}

/// Where an op's message goes.
#[derive(Debug)]
enum Destination {
    Topic(String),
    /// The mailbox of this agent, with the op's agent as the sender.
    Mailbox(AgentId),
}

/// The message of a `bus.publish` or `bus.send` op, staged with its completion.
#[derive(Debug)]
struct PublishEffect {
    to: Destination,
    message: Outgoing,
    /// The settings of the topic if this publish makes it.
    create: Option<TopicConfig>,
    dedup_window: Duration,
}

pub(crate) fn prepare(bus: &Bus, kind: &str, args: &Value) -> Result<Prepared> {
    let (to, id, key, payload) = match kind {
        "bus.publish" => {
            let PublishArgs {
                topic,
                payload,
                id,
                key,
            } = parse_args(kind, args)?;
            bbx_core::validate::name("topic", &topic)?;
            if topic.starts_with(MAILBOX_PREFIX) {
                return Err(reserved());
            }
            (Destination::Topic(topic), id, key, payload)
        }
        "bus.send" => {
            let SendArgs { to, payload, id } = parse_args(kind, args)?;
            (Destination::Mailbox(to), id, None, payload)
        }
        other => return Err(Error::internal(format!("the bus serves no {other}"))),
    };
    let given_id = id.is_some();
    let id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let payload = bus.checked_payload(&id, key.as_deref(), &payload)?;
    // A mailbox is made on first use whatever auto_create_topics says.
    let create = match bus.0.config.auto_create_topics || matches!(to, Destination::Mailbox(_)) {
        true => Some(TopicConfig::new(
            &bus.0.config.topic,
            &TopicSettings::default(),
            Utc::now(),
        )?),
        false => None,
    };
    Ok(Prepared::Effect(Arc::new(PublishEffect {
        to,
        message: Outgoing {
            id,
            given_id,
            key,
            payload,
        },
        create,
        dedup_window: Duration::from_secs(bus.0.config.dedup_window_secs),
    })))
}

impl EffectOp for PublishEffect {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut message = self.message.clone();
        let topic = match &self.to {
            Destination::Topic(topic) => topic.clone(),
            Destination::Mailbox(recipient) => {
                // Another tenant's agent is not there at all, to this one.
                let known = tx.read(bbx_agents::AGENTS, recipient.as_bytes())?;
                let agent = known.as_deref().map(bbx_agents::decode_agent).transpose()?;
                if agent.is_none_or(|a| a.tenant != staging.tenant) {
                    return Err(Error::not_found("agent", recipient));
                }
                message.key = Some(staging.agent.to_string());
                mailbox(recipient)
            }
        };
        let publish = Publish {
            topic: TopicKey::new(staging.tenant, &topic),
            create: self.create.clone(),
            messages: vec![message],
            dedup_window: self.dedup_window,
            at: staging.at,
        };
        let published = tx.all_or_nothing(|tx| stage_publish(tx, &publish))?;
        let one = &published[0];
        Ok(json!({
            "topic": topic, "id": one.id, "partition": one.partition, "offset": one.offset, "duplicate": one.duplicate,
        }))
    }
}
