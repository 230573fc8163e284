//! The bus's op kinds: `bus.publish` (to a topic) and `bus.send` (to an agent's
//! mailbox, as the op's agent), each message staged with its op's completion in
//! one atomic write, so an op publishes exactly once whatever crashes and a
//! resubmission with its idempotency key publishes nothing more; and `bus.fetch`
//! and `bus.ack`, a group consumed through the ring as the op's agent (what it
//! fetched is untrusted to FlowIntegrity: messages come from other agents).

use crate::bus::Bus;
use crate::bus::Start;
use crate::direct::{MAILBOX_PREFIX, mailbox, mailbox_owner, reserved};
use crate::group::Token;
use crate::keys::TopicKey;
use crate::log::{Outgoing, Publish, stage_publish};
use crate::topic::{TopicConfig, TopicSettings};
use bbx_component::access::Right;
use bbx_component::{EffectOp, OpKind, Prepared, Running, Staging, TaskContext, TaskOp, parse_args};
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
    OpKind {
        name: "bus.fetch",
        effects: Effects::None,
    },
    OpKind {
        name: "bus.ack",
        effects: Effects::None,
    },
];

/// The longest a `bus.fetch` op waits for messages.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);

/// What a fetch asks for: `bus.fetch`'s args, and `bus.subscribe`'s but the
/// tenant.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FetchArgs {
    /// A topic of the tenant (or, for an agent, its own mailbox: `mailbox.AGENT`,
    /// group `inbox`).
    pub topic: String,
    pub group: String,
    /// Messages to return at most [default: 1, at most 1000].
    #[serde(default)]
    max: Option<usize>,
    /// How long each is leased before it is delivered again [default: the topic's].
    #[serde(default)]
    ack_wait_ms: Option<u64>,
    /// How long to wait for a first message [default: 0; at most 300 s, 30 s in an op].
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Where a new group starts: earliest (default) or latest.
    #[serde(default)]
    start: Option<Start>,
    /// The tenant [default: the caller's]; an op acts in its agent's.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// A fetch, checked.
#[derive(Debug)]
pub(crate) struct Fetch {
    pub topic: String,
    pub group: String,
    pub max: usize,
    /// None: the topic's.
    pub ack_wait: Option<Duration>,
    pub timeout: Duration,
    pub start: Start,
}

impl FetchArgs {
    /// Checked, with a wait of at most `max_wait`.
    pub(crate) fn checked(self, max_wait: Duration) -> Result<Fetch> {
        bbx_core::validate::name("topic", &self.topic)?;
        let max = self.max.unwrap_or(1);
        if !(1..=1000).contains(&max) {
            return Err(Error::invalid_field("max", "max must be 1-1000"));
        }
        let timeout = Duration::from_millis(self.timeout_ms.unwrap_or(0));
        if timeout > max_wait {
            return Err(Error::invalid_field(
                "timeout_ms",
                format!("timeout_ms must be at most {}", max_wait.as_millis()),
            ));
        }
        let ack_wait = self.ack_wait_ms.map(Duration::from_millis);
        if ack_wait.is_some_and(|w| w.is_zero() || w > Duration::from_secs(12 * 3600)) {
            return Err(Error::invalid_field(
                "ack_wait_ms",
                "ack_wait_ms must be 1 ms to 12 hours",
            ));
        }
        Ok(Fetch {
            topic: self.topic,
            group: self.group,
            max,
            ack_wait,
            timeout,
            start: self.start.unwrap_or_default(),
        })
    }
}

/// `bus.ack`'s args.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AckArgs {
    topic: String,
    group: String,
    acks: Vec<String>,
}

/// `bus.fetch` and `bus.ack`: a group consumed through the ring, as the op's
/// agent. Neither changes anything durable but acks, which are idempotent here
/// (an ack that runs again after a crash finds its messages settled).
#[derive(Debug)]
enum Consume {
    Fetch(Fetch),
    Ack {
        topic: String,
        group: String,
        tokens: Vec<Token>,
    },
}

/// One message to publish, as a client gives it (one of a `bus.publish`
/// endpoint's batch, or a `bus.publish` op's).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Message {
    pub payload: Value,
    /// Its id [default: a new one]: publishing an id again within the dedup
    /// window stores nothing.
    #[serde(default)]
    pub id: Option<String>,
    /// The ordering key: messages with one key go to one partition, in order.
    #[serde(default)]
    pub key: Option<String>,
}

/// `bus.publish`'s args.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PublishArgs {
    /// A topic of the agent's tenant.
    topic: String,
    #[serde(flatten)]
    message: Message,
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
        "bus.fetch" => schemars::schema_for!(FetchArgs),
        "bus.ack" => schemars::schema_for!(AckArgs),
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
    bus: Bus,
}

pub(crate) fn prepare(bus: &Bus, kind: &str, args: &Value) -> Result<Prepared> {
    let (to, id, key, payload) = match kind {
        "bus.publish" => {
            let PublishArgs {
                topic,
                message: Message { payload, id, key },
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
        "bus.fetch" => {
            let fetch = parse_args::<FetchArgs>(kind, args)?;
            if fetch.tenant.is_some() {
                return Err(Error::invalid_field("args.tenant", "an op acts in its agent's tenant"));
            }
            let fetch = fetch.checked(MAX_FETCH_WAIT)?;
            let consume = Consume::Fetch(fetch);
            return Ok(Prepared::Task(Arc::new(ConsumeTask {
                bus: bus.clone(),
                consume,
            })));
        }
        "bus.ack" => {
            let AckArgs { topic, group, acks } = parse_args(kind, args)?;
            bbx_core::validate::name("topic", &topic)?;
            if acks.is_empty() || acks.len() > 1000 {
                return Err(Error::invalid_field("args.acks", "give 1 to 1000 ack tokens"));
            }
            let tokens = acks.iter().map(|a| a.parse()).collect::<Result<Vec<Token>>>()?;
            let consume = Consume::Ack { topic, group, tokens };
            return Ok(Prepared::Task(Arc::new(ConsumeTask {
                bus: bus.clone(),
                consume,
            })));
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
        bus: bus.clone(),
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
        // Checked again as the op runs: the topic may have come, with an
        // owner, or a grant gone, since the op was accepted.
        if let Ok(owned) = self.bus.topic(&TopicKey::new(staging.tenant, &topic)) {
            self.bus.may_use(&owned, Some(*staging.agent), Right::Write)?;
        }
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

/// A `bus.fetch` or `bus.ack` op, run on a task of its own.
struct ConsumeTask {
    bus: Bus,
    consume: Consume,
}

impl std::fmt::Debug for ConsumeTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.consume.fmt(f)
    }
}

impl ConsumeTask {
    /// The topic, of the op's tenant, if the op's agent reads it now (a grant
    /// may have gone, or the topic come, since the op was accepted), with the
    /// group it consumes as; a mailbox only its own agent's.
    fn topic<'g>(
        &self,
        ctx: &TaskContext<'_>,
        topic: &str,
        group: &'g str,
    ) -> Result<(Arc<crate::bus::Topic>, std::borrow::Cow<'g, str>)> {
        if let Some(owner) = mailbox_owner(topic)
            && owner? != ctx.agent
        {
            return Err(Error::permission_denied("an agent reads its own mailbox only"));
        }
        let topic = self.bus.topic(&TopicKey::new(ctx.tenant, topic))?;
        self.bus.may_use(&topic, Some(ctx.agent), Right::Read)?;
        let group = Bus::group_of(&topic, Some(ctx.agent), group)?;
        Ok((topic, group))
    }
}

impl TaskOp for ConsumeTask {
    fn effects(&self) -> Effects {
        Effects::None
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext<'a>) -> Running<'a> {
        Box::pin(async move {
            match &self.consume {
                Consume::Fetch(fetch) => {
                    let (topic, group) = self.topic(ctx, &fetch.topic, &fetch.group)?;
                    let ack_wait = fetch
                        .ack_wait
                        .unwrap_or(Duration::from_millis(topic.config.ack_wait_ms));
                    let (max, timeout) = (fetch.max, fetch.timeout);
                    let messages = self
                        .bus
                        .fetch(&topic, &group, fetch.start, max, ack_wait, timeout)
                        .await?;
                    Ok(json!({ "topic": topic.name(), "group": fetch.group, "messages": messages }))
                }
                Consume::Ack { topic, group, tokens } => {
                    let (topic, group) = self.topic(ctx, topic, group)?;
                    let acked = self.bus.ack_some(&topic, &group, tokens, true).await?;
                    Ok(json!({ "acked": acked }))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind publishes the schema of the args its parser takes: the same
    /// required fields, and unknown ones refused by both.
    #[test]
    fn each_kind_publishes_the_schema_its_parser_holds_to() {
        let required = |kind: &str| {
            let schema = args_schema(kind).unwrap_or_else(|| panic!("{kind} has no schema"));
            let mut fields: Vec<String> = serde_json::from_value(schema["required"].clone()).unwrap_or_default();
            fields.sort();
            (fields, schema["additionalProperties"].clone())
        };
        assert_eq!(
            required("bus.publish"),
            (vec!["payload".into(), "topic".into()], json!(false))
        );
        assert_eq!(required("bus.send").0, ["payload", "to"]);
        assert_eq!(required("bus.fetch").0, ["group", "topic"]);
        assert_eq!(required("bus.ack").0, ["acks", "group", "topic"]);
        for kind in KINDS {
            assert!(args_schema(kind.name).is_some(), "{}", kind.name);
        }
        let unknown = json!({ "topic": "t", "payload": 1, "extra": true });
        assert!(parse_args::<PublishArgs>("bus.publish", &unknown).is_err());
        assert!(parse_args::<PublishArgs>("bus.publish", &json!({ "topic": "t" })).is_err());
        assert!(parse_args::<PublishArgs>("bus.publish", &json!({ "topic": "t", "payload": 1, "key": "k" })).is_ok());
    }
}
