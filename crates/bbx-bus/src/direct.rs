//! Direct messages on topics: agent mailboxes, and request/reply.
//!
//! An agent's mailbox is the topic `mailbox.AGENT_ID` of its tenant, read as the
//! group `inbox`. Only `bus.send` (and the op `bus.send`) publishes to it, with the
//! sender's agent id as the message's ordering key (so one sender's messages stay
//! in order, and the recipient sees who sent each); a key confined to an agent
//! sends as that agent and reads that agent's mailbox only.
//!
//! A request is a message whose id is its correlation id; `bus.request` publishes
//! it and waits for `bus.reply` naming that id, up to its timeout. Replies are not
//! stored: a reply for a request no longer waiting (it timed out, or was answered)
//! is `not_found`, as in NATS.

use crate::bus::{Bus, Start};
use crate::keys::TopicKey;
use crate::log::Published;
use bbx_auth::{Action, Caller};
use bbx_core::{AgentId, Error, Result};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// Topics whose name starts with it are mailboxes.
pub const MAILBOX_PREFIX: &str = "mailbox.";
/// The group a mailbox is read as.
pub const INBOX: &str = "inbox";
/// The longest a request waits for its reply.
const MAX_REPLY_WAIT: Duration = Duration::from_secs(300);

/// The mailbox topic of `agent`.
pub fn mailbox(agent: &AgentId) -> String {
    format!("{MAILBOX_PREFIX}{agent}")
}

/// The agent whose mailbox `topic` is; none for a topic that is not a mailbox.
pub fn mailbox_owner(topic: &str) -> Option<Result<AgentId>> {
    topic.strip_prefix(MAILBOX_PREFIX).map(str::parse)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendReq {
    /// The recipient agent.
    to: String,
    payload: Value,
    /// The sending agent [default: the caller's, for a key confined to one].
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InboxReq {
    agent: String,
    #[serde(default)]
    max: Option<usize>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    ack_wait_ms: Option<u64>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestInput {
    topic: String,
    payload: Value,
    /// How long to wait for the reply [default: 5 s, at most 300 s].
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReplyReq {
    /// The request's id.
    to: String,
    payload: Value,
    #[serde(default)]
    pub tenant: Option<String>,
}

impl Bus {
    /// The tenant of `agent`, which `caller` must see (another tenant's agent is
    /// not found) and may act for.
    fn agent_tenant(&self, caller: &Caller, agent: &AgentId) -> Result<String> {
        let tenant = bbx_agents::stored_agent(self.store()?, agent)?.tenant;
        caller.check_owner(&tenant, "agent", agent)?;
        Ok(tenant)
    }

    pub(crate) async fn send(&self, caller: &Caller, req: SendReq) -> Result<Published> {
        caller.may(Action::Act)?;
        let to: AgentId = req.to.parse()?;
        let tenant = self.agent_tenant(caller, &to)?;
        let from = match (caller.agent, req.from) {
            (Some(own), None) => Some(own),
            (Some(own), Some(from)) if from == own.to_string() => Some(own),
            (Some(_), Some(_)) => {
                return Err(Error::permission_denied(
                    "a key confined to an agent sends as that agent",
                ));
            }
            (None, None) => None,
            (None, Some(from)) => {
                let from: AgentId = from.parse()?;
                if self.agent_tenant(caller, &from)? != tenant {
                    return Err(Error::not_found("agent", from));
                }
                Some(from)
            }
        };
        let topic = TopicKey::new(&tenant, &mailbox(&to));
        let message = (req.id, from.map(|f| f.to_string()), req.payload);
        let mut published = self.publish(topic, vec![message]).await?;
        Ok(published.remove(0))
    }

    pub(crate) async fn inbox(&self, caller: &Caller, req: InboxReq) -> Result<Value> {
        caller.may(Action::Act)?;
        let agent: AgentId = req.agent.parse()?;
        let tenant = self.agent_tenant(caller, &agent)?;
        caller.check_agent(&agent)?;
        let key = TopicKey::new(&tenant, &mailbox(&agent));
        if self.topic(&key).is_err() {
            // Made on first read too, so that a mailbox can be waited on before
            // anything was sent to it.
            let _ = self.create_topic(key.clone(), &Default::default()).await;
        }
        let topic = self.topic(&key)?;
        let max = req.max.unwrap_or(1).clamp(1, 1000);
        let ack_wait = Duration::from_millis(
            req.ack_wait_ms
                .unwrap_or(topic.config.ack_wait_ms)
                .clamp(1, 12 * 3600 * 1000),
        );
        let timeout = Duration::from_millis(req.timeout_ms.unwrap_or(0)).min(Duration::from_secs(300));
        let messages = self
            .fetch(&topic, INBOX, Start::Earliest, max, ack_wait, timeout)
            .await?;
        Ok(json!({ "topic": topic.name(), "group": INBOX, "messages": messages }))
    }

    /// Publishes a request and waits for its reply.
    pub(crate) async fn request(&self, caller: &Caller, tenant: String, req: RequestInput) -> Result<Value> {
        caller.may(Action::Act)?;
        bbx_core::validate::name("topic", &req.topic)?;
        if req.topic.starts_with(MAILBOX_PREFIX) {
            return Err(reserved());
        }
        if let Ok(topic) = self.topic(&TopicKey::new(&tenant, &req.topic)) {
            self.may_use(&topic, caller.agent, bbx_component::access::Right::Write)?;
        }
        let wait = Duration::from_millis(req.timeout_ms.unwrap_or(5000));
        if wait > MAX_REPLY_WAIT {
            return Err(Error::invalid_field("timeout_ms", "timeout_ms must be at most 300000"));
        }
        let id = uuid::Uuid::now_v7().to_string();
        let (reply, answer) = tokio::sync::oneshot::channel();
        {
            let mut replies = self.0.replies.lock();
            if replies.len() >= MAX_WAITING {
                return Err(Error::resource_exhausted(
                    format!("{MAX_WAITING} requests wait for replies already"),
                    Duration::from_secs(1),
                ));
            }
            replies.insert((tenant.clone(), id.clone()), reply);
        }
        // However this call ends (answered, timed out, or dropped with its client),
        // nothing waits for the reply any more.
        let _waiting = Unwait {
            bus: self,
            key: (tenant.clone(), id.clone()),
        };
        self.publish(
            TopicKey::new(&tenant, &req.topic),
            vec![(Some(id.clone()), req.key, req.payload)],
        )
        .await?;
        let answered = tokio::time::timeout(wait, answer).await.ok().and_then(Result::ok);
        Ok(match answered {
            Some(reply) => json!({ "id": id, "reply": reply, "timed_out": false }),
            None => json!({ "id": id, "reply": null, "timed_out": true }),
        })
    }

    pub(crate) fn reply(&self, caller: &Caller, tenant: String, req: ReplyReq) -> Result<Value> {
        caller.may(Action::Act)?;
        let waiting = self.0.replies.lock().remove(&(tenant, req.to.clone()));
        match waiting.map(|reply| reply.send(req.payload)) {
            Some(Ok(())) => Ok(json!({ "replied": req.to })),
            _ => Err(Error::new(
                bbx_core::ErrorCode::FailedPrecondition,
                format!(
                    "no request {:?} waits for a reply: it timed out, was answered, or never was",
                    req.to
                ),
            )),
        }
    }
}

/// Requests waiting for replies at most, in all.
const MAX_WAITING: usize = 100_000;

/// Removes a request's waiter when its call ends.
struct Unwait<'a> {
    bus: &'a Bus,
    key: (String, String),
}

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.bus.0.replies.lock().remove(&self.key);
    }
}

/// A publish to a mailbox other than through `bus.send`.
pub(crate) fn reserved() -> Error {
    Error::invalid_field(
        "topic",
        format!("topics named {MAILBOX_PREFIX}* are agents' mailboxes: send to one with bus.send"),
    )
}
