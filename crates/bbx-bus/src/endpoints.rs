//! The bus's endpoints: HTTP routes, MCP tools (`bus_*`, and the report's
//! `message_bus_*`) and `bbx bus VERB` commands.

use crate::bus::{Bus, DeadLetter, Start, Topic};
use crate::group::Token;
use crate::keys::TopicKey;
use crate::topic::TopicSettings;
use bbx_auth::{Action, Caller};
use bbx_component::Endpoint;
use bbx_component::access::Right;
use bbx_core::{Error, Result};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Messages one fetch returns at most.
const MAX_FETCH: usize = 1000;
/// The longest a fetch waits.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Messages a stream fetches (and so leases) at a time, and holds for a slow
/// client before it waits: at most twice this many are leased ahead of it.
const STREAM_BATCH: usize = 32;
/// How long a stream's fetch waits before it looks again (and sees a client gone).
const STREAM_WAIT: Duration = Duration::from_secs(10);
/// Messages one publish carries at most.
const MAX_BATCH: usize = 10_000;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PublishReq {
    topic: String,
    /// One message's payload (or give `messages`).
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    key: Option<String>,
    /// A batch, stored whole or not at all.
    #[serde(default)]
    messages: Option<Vec<crate::ops::Message>>,
    /// The tenant [default: the caller's, or `default`].
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct StreamReq {
    topic: String,
    group: String,
    /// How long each is leased before it is delivered again [default: the topic's].
    #[serde(default)]
    ack_wait_ms: Option<u64>,
    /// Where a new group starts: earliest (default) or latest.
    #[serde(default)]
    start: Option<Start>,
    /// End the stream after this many messages [default: never].
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AckReq {
    topic: String,
    group: String,
    /// The `ack` tokens of deliveries.
    acks: Vec<String>,
    /// For a nack: why (kept with the message if it goes to the dead letters).
    #[serde(default)]
    reason: Option<String>,
    /// For a nack: redeliver after this long [default: the topic's backoff]; for
    /// an extend: the lease's new length from now [default: the topic's ack wait].
    #[serde(default)]
    ms: Option<u64>,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TopicReq {
    topic: String,
    #[serde(default)]
    tenant: Option<String>,
    /// Dead letters to list at most [default: 1000].
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateReq {
    topic: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(flatten)]
    settings: TopicSettings,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReplayReq {
    topic: String,
    /// The dead letters to publish again, by `seq` [default: all].
    #[serde(default)]
    seqs: Option<Vec<u64>>,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TenantOnly {
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RouteName {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReportPublish {
    topic: String,
    /// The payload: JSON, or text taken as a JSON string.
    message: Value,
    #[serde(default)]
    tenant: Option<String>,
}

/// The tenant a request acts in: the one it names, else the caller's, else
/// `default` (an administrator's key has no tenant).
fn tenant(caller: &Caller, asked: Option<String>) -> Result<String> {
    let tenant = asked
        .or_else(|| caller.tenant.clone())
        .unwrap_or_else(|| "default".to_owned());
    bbx_core::validate::tenant(&tenant)?;
    caller.check_tenant(&tenant)?;
    Ok(tenant)
}

fn topic_key(caller: &Caller, tenant_asked: Option<String>, topic: &str) -> Result<TopicKey> {
    bbx_core::validate::name("topic", topic)?;
    // A mailbox is its agent's: a key confined to another agent may not touch it.
    if let Some(owner) = crate::direct::mailbox_owner(topic) {
        caller.check_agent(&owner?)?;
    }
    Ok(TopicKey::new(&tenant(caller, tenant_asked)?, topic))
}

fn tokens(acks: &[String]) -> Result<Vec<Token>> {
    if acks.is_empty() || acks.len() > MAX_FETCH {
        return Err(Error::invalid_field(
            "acks",
            format!("give 1 to {MAX_FETCH} ack tokens"),
        ));
    }
    acks.iter().map(|a| a.parse()).collect()
}

impl Bus {
    async fn publish_req(&self, caller: &Caller, req: PublishReq) -> Result<Value> {
        caller.may(Action::Act)?;
        if req.topic.starts_with(crate::direct::MAILBOX_PREFIX) {
            return Err(crate::direct::reserved());
        }
        let key = topic_key(caller, req.tenant, &req.topic)?;
        if let Ok(topic) = self.topic(&key) {
            self.may_use(&topic, caller.agent, Right::Write)?;
        }
        let (batch, messages) = match (req.payload, req.messages) {
            (Some(payload), None) => (false, vec![(req.id, req.key, payload)]),
            (None, Some(messages))
                if req.id.is_none() && req.key.is_none() && (1..=MAX_BATCH).contains(&messages.len()) =>
            {
                (true, messages.into_iter().map(|m| (m.id, m.key, m.payload)).collect())
            }
            (None, Some(_)) => {
                return Err(Error::invalid_field(
                    "messages",
                    format!("a batch holds 1 to {MAX_BATCH} messages, each with its own id and key"),
                ));
            }
            _ => {
                return Err(Error::invalid_field(
                    "payload",
                    "give payload (one message) or messages (a batch)",
                ));
            }
        };
        let published = self.publish(key, messages).await?;
        Ok(match (batch, published.as_slice()) {
            (false, [one]) => {
                json!({ "topic": req.topic, "id": one.id, "partition": one.partition, "offset": one.offset, "duplicate": one.duplicate })
            }
            _ => json!({ "topic": req.topic, "messages": published }),
        })
    }

    /// A topic the caller uses with `right` (fetch, settle, stream and dead
    /// letters read; replaying and purging dead letters write).
    fn known_topic(
        &self,
        caller: &Caller,
        tenant_asked: Option<String>,
        topic: &str,
        right: Right,
    ) -> Result<Arc<Topic>> {
        let topic = self.topic(&topic_key(caller, tenant_asked, topic)?)?;
        self.may_use(&topic, caller.agent, right)?;
        Ok(topic)
    }

    async fn fetch_req(&self, caller: &Caller, mut req: crate::ops::FetchArgs) -> Result<Value> {
        caller.may(Action::Act)?;
        let tenant = req.tenant.take();
        let fetch = req.checked(MAX_WAIT)?;
        let topic = self.known_topic(caller, tenant, &fetch.topic, Right::Read)?;
        let ack_wait = fetch
            .ack_wait
            .unwrap_or(Duration::from_millis(topic.config.ack_wait_ms));
        let (max, timeout) = (fetch.max, fetch.timeout);
        let group = Self::group_of(&topic, caller.agent, &fetch.group)?;
        let messages = self.fetch(&topic, &group, fetch.start, max, ack_wait, timeout).await?;
        Ok(json!({ "messages": messages }))
    }

    async fn settle_req(&self, caller: &Caller, req: AckReq, verb: Verb) -> Result<Value> {
        caller.may(Action::Act)?;
        let topic = self.known_topic(caller, req.tenant, &req.topic, Right::Read)?;
        let group = Self::group_of(&topic, caller.agent, &req.group)?;
        let tokens = tokens(&req.acks)?;
        let ms = req.ms.map(Duration::from_millis);
        if ms.is_some_and(|ms| ms > Duration::from_secs(12 * 3600)) {
            return Err(Error::invalid_field("ms", "ms must be at most 12 hours"));
        }
        let count = match verb {
            Verb::Ack => self.ack(&topic, &group, &tokens).await?,
            Verb::Nack => {
                self.nack_or_extend(&topic, &group, &tokens, Some((req.reason, ms)), Duration::ZERO)
                    .await?
            }
            Verb::Extend => {
                let by = ms.unwrap_or(Duration::from_millis(topic.config.ack_wait_ms));
                self.nack_or_extend(&topic, &group, &tokens, None, by).await?
            }
        };
        Ok(json!({ verb.done(): count }))
    }

    /// A topic as listed: its settings, counts, partitions and groups with lag.
    async fn describe(&self, topic: &Topic) -> Result<Value> {
        let store = self.store()?;
        let mut heads = Vec::new();
        let mut partitions = Vec::new();
        for partition in 0..topic.config.partitions {
            let (first, head) = crate::log::bounds(store, &topic.key, partition)?;
            heads.push(head);
            partitions.push(json!({ "partition": partition, "first": first, "head": head }));
        }
        let groups: Vec<_> = topic.groups.lock().values().cloned().collect();
        let mut listed = Vec::new();
        for group in groups {
            let group = group.group.lock().await;
            let per: Vec<Value> = group
                .cursors
                .iter()
                .zip(&heads)
                .enumerate()
                .map(|(partition, (cursor, head))| {
                    let lag = head
                        .saturating_sub(cursor.floor)
                        .saturating_sub(cursor.acked.len() as u64);
                    json!({ "partition": partition, "floor": cursor.floor, "lag": lag, "pending": cursor.leased.len() })
                })
                .collect();
            let lag: u64 = per.iter().filter_map(|p| p["lag"].as_u64()).sum();
            let pending: u64 = per.iter().filter_map(|p| p["pending"].as_u64()).sum();
            listed.push(json!({ "group": group.name, "lag": lag, "pending": pending, "partitions": per }));
        }
        listed.sort_by(|a, b| a["group"].as_str().cmp(&b["group"].as_str()));
        let counts = &topic.counts;
        let (tenant, name) = topic.key.parts();
        Ok(json!({
            "topic": name, "tenant": tenant, "config": topic.config, "partitions": partitions, "groups": listed,
            "published": counts.published.load(Ordering::Relaxed),
            "duplicates": counts.duplicates.load(Ordering::Relaxed),
            "delivered": counts.delivered.load(Ordering::Relaxed),
            "redelivered": counts.redelivered.load(Ordering::Relaxed),
            "dead_lettered": counts.dead.load(Ordering::Relaxed),
            "dropped": counts.dropped.load(Ordering::Relaxed),
            "dropped_unconsumed": counts.dropped_unconsumed.load(Ordering::Relaxed),
        }))
    }

    /// The caller's topics (every tenant's for an administrator naming none).
    async fn topics_req(&self, caller: &Caller, asked: Option<String>) -> Result<Value> {
        caller.may(Action::Read)?;
        if let Some(asked) = &asked {
            caller.check_tenant(asked)?;
        }
        let mut topics: Vec<Arc<Topic>> = self
            .all_topics()
            .into_iter()
            .filter(|t| {
                let own = t.key.parts().0;
                asked.as_deref().map_or(caller.sees(own), |asked| asked == own)
            })
            .collect();
        topics.sort_by(|a, b| a.key.cmp(&b.key));
        let mut listed = Vec::with_capacity(topics.len());
        for topic in topics {
            listed.push(self.describe(&topic).await?);
        }
        Ok(json!({ "topics": listed }))
    }

    /// A group's messages as a stream: each delivered (and leased) as it comes,
    /// until `limit`, the client goes, or the kernel stops. Unacked ones come again
    /// after their ack wait, to this stream or another of the group.
    async fn stream(&self, caller: &Caller, req: StreamReq) -> Result<bbx_component::Events> {
        caller.may(Action::Act)?;
        let topic = self.known_topic(caller, req.tenant, &req.topic, Right::Read)?;
        let group = Self::group_of(&topic, caller.agent, &req.group)?.into_owned();
        let ack_wait = Duration::from_millis(req.ack_wait_ms.unwrap_or(topic.config.ack_wait_ms));
        if ack_wait.is_zero() || ack_wait > Duration::from_secs(12 * 3600) {
            return Err(Error::invalid_field(
                "ack_wait_ms",
                "ack_wait_ms must be 1 ms to 12 hours",
            ));
        }
        let start = req.start.unwrap_or_default();
        // Made now, so that a bad group name is this call's error.
        self.group(&topic, &group, start).await?;
        let (events, receiver) = tokio::sync::mpsc::channel(STREAM_BATCH);
        let (bus, ctx) = (self.clone(), self.ctx()?.clone());
        let mut left = req.limit.unwrap_or(u64::MAX);
        let reader = caller.agent;
        ctx.tasks.clone().spawn(async move {
            while left > 0 {
                // A grant revoked since ends the stream.
                if let Err(error) = bus.may_use(&topic, reader, Right::Read) {
                    let _ = events.send(json!({ "error": error })).await;
                    return;
                }
                let max = usize::try_from(left).unwrap_or(STREAM_BATCH).min(STREAM_BATCH);
                let fetched = tokio::select! {
                    () = events.closed() => return,
                    () = ctx.stopping.cancelled() => return,
                    fetched = bus.fetch(&topic, &group, start, max, ack_wait, STREAM_WAIT) => fetched,
                };
                let messages = match fetched {
                    Ok(messages) => messages,
                    Err(error) => {
                        let _ = events.send(json!({ "error": error })).await;
                        return;
                    }
                };
                for message in messages {
                    let Ok(message) = serde_json::to_value(message) else {
                        continue;
                    };
                    if events.send(message).await.is_err() {
                        return;
                    }
                    left -= 1;
                }
            }
        });
        Ok(receiver)
    }

    fn dlq_req(&self, caller: &Caller, req: TopicReq) -> Result<Value> {
        caller.may(Action::Read)?;
        let topic = self.known_topic(caller, req.tenant, &req.topic, Right::Read)?;
        let messages: Vec<DeadLetter> = self.dead_letters(&topic, req.limit.unwrap_or(1000).clamp(1, 10_000))?;
        Ok(json!({ "topic": req.topic, "messages": messages }))
    }
}

#[derive(Clone, Copy)]
enum Verb {
    Ack,
    Nack,
    Extend,
}

impl Verb {
    fn done(self) -> &'static str {
        match self {
            Self::Ack => "acked",
            Self::Nack => "nacked",
            Self::Extend => "extended",
        }
    }
}

pub(crate) fn endpoints(bus: &Bus) -> Vec<Endpoint> {
    let settle = |name, path, description, verb: Verb| {
        Endpoint::serving(
            bus,
            name,
            ("POST", path),
            description,
            move |b: Bus, caller, req: AckReq| async move { b.settle_req(&caller, req, verb).await },
        )
    };
    let stats = |name, path| {
        Endpoint::serving(
            bus,
            name,
            ("GET", path),
            "The bus's topics with their figures: messages published, duplicates, delivered, redelivered, dead-lettered, dropped; each group's lag and pending leases per partition.",
            |b: Bus, caller, req: TenantOnly| async move { b.topics_req(&caller, req.tenant).await },
        )
    };
    let dlq = |name, path| {
        Endpoint::serving(
            bus,
            name,
            ("GET", path),
            "A topic's dead letters, oldest first: messages delivered the topic's max_deliveries times without an ack, with the reason and the group.",
            |b: Bus, caller, req: TopicReq| async move { b.dlq_req(&caller, req) },
        )
    };
    vec![
        Endpoint::serving(
            bus,
            "bus.publish",
            ("POST", "/v1/bus/topics/{topic}/messages"),
            "Publish a message (payload, with an optional id and ordering key) or a batch (messages) to a topic; answers once durable with each message's id, partition and offset. An id published again within the dedup window stores nothing.",
            |b: Bus, caller, req: PublishReq| async move { b.publish_req(&caller, req).await },
        ),
        Endpoint::serving(
            bus,
            "bus.subscribe",
            ("POST", "/v1/bus/topics/{topic}/groups/{group}/fetch"),
            "Fetch up to max messages for a consumer group (made at the earliest message, or the latest), waiting up to timeout_ms for the first; each is leased for ack_wait_ms and delivered again unless acked.",
            |b: Bus, caller, req: crate::ops::FetchArgs| async move { b.fetch_req(&caller, req).await },
        ),
        settle(
            "bus.ack",
            "/v1/bus/topics/{topic}/groups/{group}/ack",
            "Acknowledge deliveries by their ack tokens: durable before answered, all or none (an expired or unknown lease is an error).",
            Verb::Ack,
        ),
        settle(
            "bus.nack",
            "/v1/bus/topics/{topic}/groups/{group}/nack",
            "Nack deliveries by their ack tokens, with a reason: each is delivered again after the topic's backoff (or ms), and after max_deliveries goes to the dead letters.",
            Verb::Nack,
        ),
        settle(
            "bus.extend",
            "/v1/bus/topics/{topic}/groups/{group}/extend",
            "Extend the leases of deliveries still being worked on: each then ends ms from now (the topic's ack wait by default, at most 12 hours).",
            Verb::Extend,
        ),
        Endpoint::serving(
            bus,
            "bus.create_topic",
            ("PUT", "/v1/bus/topics/{topic}"),
            "Make a topic with its settings: partitions, ack_wait_ms, max_deliveries, backoff_ms, retention (max_age_secs, max_messages, max_bytes, drop_unconsumed), and an owner: an agent whose topic it is, which other agents use only as it grants.",
            |b: Bus, caller, req: CreateReq| async move {
                caller.may(Action::Operate)?;
                let key = topic_key(&caller, req.tenant, &req.topic)?;
                // A key confined to an agent makes topics of that agent only.
                if let Some(owner) = &req.settings.owner {
                    caller.check_agent(owner)?;
                }
                let config = b.create_topic(key, &req.settings).await?;
                Ok(json!({ "topic": req.topic, "config": config }))
            },
        ),
        stats("bus.topics", "/v1/bus/topics"),
        stats("bus.stats", "/v1/bus/stats"),
        stats("message_bus.stats", "/v1/message-bus/stats"),
        dlq("bus.dlq", "/v1/bus/topics/{topic}/dlq"),
        dlq("message_bus.dlq", "/v1/message-bus/dlq/{topic}"),
        Endpoint::serving(
            bus,
            "bus.dlq_replay",
            ("POST", "/v1/bus/topics/{topic}/dlq/replay"),
            "Publish dead letters again (all, or by seq) as new messages of their topic, and take them out of the dead letters, in one write.",
            |b: Bus, caller, req: ReplayReq| async move {
                caller.may(Action::Operate)?;
                let topic = b.known_topic(&caller, req.tenant, &req.topic, Right::Write)?;
                let replayed = b.replay(&topic, req.seqs.as_deref()).await?;
                Ok(json!({ "replayed": replayed }))
            },
        ),
        Endpoint::serving(
            bus,
            "bus.dlq_purge",
            ("DELETE", "/v1/bus/topics/{topic}/dlq"),
            "Delete every dead letter of a topic, for every group; how many went.",
            |b: Bus, caller, req: TopicReq| async move {
                caller.may(Action::Operate)?;
                let topic = b.known_topic(&caller, req.tenant, &req.topic, Right::Write)?;
                Ok(json!({ "purged": b.purge(&topic).await? }))
            },
        ),
        Endpoint::serving(
            bus,
            "bus.route",
            ("PUT", "/v1/bus/routes/{name}"),
            "Route a topic into an agent's ops: each message becomes an op of kind with args (placeholders {{payload}}, {{id}}, {{key}}, {{offset}}), keyed by the message's place, so its effect happens exactly once across crashes.",
            |b: Bus, caller, mut req: crate::route::RouteReq| async move {
                let tenant = tenant(&caller, req.tenant.take())?;
                b.put_route(&caller, tenant, req).await
            },
        ),
        Endpoint::serving(
            bus,
            "bus.routes",
            ("GET", "/v1/bus/routes"),
            "The routes of the tenant: each topic routed into an agent's ops, with its kind, args template and group.",
            |b: Bus, caller, req: TenantOnly| async move {
                caller.may(Action::Read)?;
                let tenant = tenant(&caller, req.tenant)?;
                Ok(json!({ "routes": b.routes_of(&caller, &tenant) }))
            },
        ),
        Endpoint::serving(
            bus,
            "bus.unroute",
            ("DELETE", "/v1/bus/routes/{name}"),
            "Remove a route: it stops taking messages; its group keeps its place, so a route made again goes on from there.",
            |b: Bus, caller, req: RouteName| async move {
                caller.may(Action::Act)?;
                let tenant = tenant(&caller, req.tenant)?;
                b.remove_route(&caller, &tenant, &req.name).await
            },
        ),
        {
            let bus = bus.clone();
            Endpoint::streaming(
                "bus.stream",
                "/v1/bus/topics/{topic}/groups/{group}/stream",
                "A consumer group's messages as server-sent events, each leased as it is sent (ack them with bus.ack; unacked ones come again after the ack wait), until limit or the client goes.",
                move |caller, req: StreamReq| {
                    let bus = bus.clone();
                    async move { bus.stream(&caller, req).await }
                },
            )
        },
        Endpoint::serving(
            bus,
            "bus.send",
            ("POST", "/v1/bus/mailboxes/{to}"),
            "Send a message to an agent's mailbox (the topic mailbox.AGENT of its tenant), from an agent (the caller's own, for a key confined to one): the sender is the message's key.",
            |b: Bus, caller, req: crate::direct::SendReq| async move { b.send(&caller, req).await },
        ),
        Endpoint::serving(
            bus,
            "bus.inbox",
            ("POST", "/v1/bus/mailboxes/{agent}/fetch"),
            "Fetch messages from an agent's mailbox (group inbox), waiting up to timeout_ms; ack them with bus.ack on topic mailbox.AGENT, group inbox.",
            |b: Bus, caller, req: crate::direct::InboxReq| async move { b.inbox(&caller, req).await },
        ),
        Endpoint::serving(
            bus,
            "bus.request",
            ("POST", "/v1/bus/topics/{topic}/request"),
            "Publish a request (its id is the correlation id) and wait up to timeout_ms for bus.reply to it: the reply, or timed_out.",
            |b: Bus, caller, req: crate::direct::RequestInput| async move {
                let tenant = tenant(&caller, req.tenant.clone())?;
                b.request(&caller, tenant, req).await
            },
        ),
        Endpoint::serving(
            bus,
            "bus.reply",
            ("POST", "/v1/bus/replies/{to}"),
            "Reply to a request by its id: the waiting requester gets the payload; a request no longer waiting is an error.",
            |b: Bus, caller, req: crate::direct::ReplyReq| async move {
                let tenant = tenant(&caller, req.tenant.clone())?;
                b.reply(&caller, tenant, req)
            },
        ),
        Endpoint::serving(
            bus,
            "message_bus.publish",
            ("POST", "/v1/message-bus/publish"),
            "Publish one message to a topic (the report's path): answers once durable with its id and offset.",
            |b: Bus, caller, req: ReportPublish| async move {
                let req = PublishReq {
                    topic: req.topic,
                    payload: Some(req.message),
                    id: None,
                    key: None,
                    messages: None,
                    tenant: req.tenant,
                };
                b.publish_req(&caller, req).await
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields() {
        let made: std::result::Result<CreateReq, _> = serde_json::from_value(json!({ "topic": "t", "partitionz": 2 }));
        assert!(made.is_err(), "a misspelled setting is refused");
        let made: CreateReq = serde_json::from_value(json!({ "topic": "t", "partitions": 2, "tenant": "a" })).unwrap();
        assert_eq!((made.settings.partitions, made.tenant.as_deref()), (Some(2), Some("a")));
        let route: std::result::Result<crate::route::RouteReq, _> =
            serde_json::from_value(json!({ "name": "r", "topic": "t", "agent": "a", "kind": "noop", "argz": {} }));
        assert!(route.is_err());
    }
}
