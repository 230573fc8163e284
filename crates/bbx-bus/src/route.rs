//! Routes: a consumer group that BBX runs itself, turning each message of a topic
//! into an op of one agent, exactly once.
//!
//! Each message becomes an op whose idempotency key names the message's place
//! (`bus:ROUTE:PARTITION:OFFSET`). The ring journals an op's acceptance with its
//! key in one write, so that write is where the message is consumed and its
//! effect decided, atomically: a message delivered again (after a crash, a lease
//! that ran out) submits the same key and joins the op already there, and its
//! effect happens once. The ack that follows is bookkeeping. This holds while the
//! ring keeps the key (`ring.retention_secs`, a day by default).
//!
//! An op's args are the route's template with these whole-string placeholders
//! replaced: `{{payload}}` (the message's payload), `{{id}}`, `{{key}}`,
//! `{{topic}}`, `{{partition}}`, `{{offset}}`. The op runs as the agent (a
//! credential confined to it): its quotas and flow policies apply. An op refused
//! for good (a bad template, a policy) nacks its message with the reason, so it
//! ends in the dead letters; a refusal worth retrying (a quota) is retried while
//! the message's lease lasts.

use crate::bus::{Bus, Delivered, Start, Topic};
use crate::group::Token;
use crate::keys::TopicKey;
use bbx_auth::{Caller, Role};
use bbx_core::op::{SubmitBatch, SubmitOp};
use bbx_core::{AgentId, Error, ErrorCode, KeyId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// tenant, route name -> [`Route`] as JSON.
pub const BUS_ROUTES: KeyspaceDef = KeyspaceDef {
    id: 26,
    name: "bus_routes",
};

/// Messages a route takes at a time.
const BATCH: usize = 100;
/// How long a route's messages are leased while their ops are submitted.
const LEASE: Duration = Duration::from_secs(60);
/// How long a route waits before submitting again an op refused for now.
const RETRY: Duration = Duration::from_secs(1);
/// How long a route that cannot read waits before trying again; a route
/// refused (a grant revoked) waits twice as long each time, up to the last:
/// it is refused, and audited, at most once a minute.
const READ_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(60));
/// Routes one tenant has at most.
pub const MAX_ROUTES_PER_TENANT: usize = 64;

/// A route as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Route {
    pub name: String,
    pub tenant: String,
    pub topic: String,
    /// The consumer group the route consumes as (`route:NAME` by default).
    pub group: String,
    pub agent: AgentId,
    /// The op kind each message becomes.
    pub kind: String,
    /// The kinds its maker's credential was confined to, if it was: its ops
    /// may do no more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Its args, with placeholders.
    pub args: Value,
    /// Who made it: its ops run under this key's id, confined to the agent.
    pub by: KeyId,
    pub created_at: DateTime<Utc>,
}

impl Route {
    pub fn key(tenant: &str, name: &str) -> Vec<u8> {
        [tenant.as_bytes(), b"\0", name.as_bytes()].concat()
    }

    /// The op `message` becomes.
    pub fn op(&self, message: &Delivered) -> SubmitOp {
        let args = fill(&self.args, message);
        // The message's place in the topic the route consumes and the group it
        // consumes as: a route made again over the same group goes on with the
        // same keys, one over another topic or group never meets them.
        let place = format!("{}:{}:{}:{}", self.topic, self.group, message.partition, message.offset);
        SubmitOp {
            idempotency_key: Some(format!("bus:{}:{place}", self.name)),
            ..SubmitOp::new(self.agent, self.kind.clone(), args)
        }
    }

    /// The credential its ops run with: the agent's own, of its tenant.
    fn caller(&self) -> Caller {
        let mut caller = Caller::of_tenant(self.by, self.tenant.clone(), Role::Agent);
        caller.agent = Some(self.agent);
        caller.kinds = self.kinds.clone();
        caller
    }
}

/// `template` with its placeholders filled from `message`.
fn fill(template: &Value, message: &Delivered) -> Value {
    match template {
        Value::String(text) => match text.as_str() {
            "{{payload}}" => message.payload.clone(),
            "{{id}}" => Value::String(message.id.clone()),
            "{{key}}" => message.key.clone().map_or(Value::Null, Value::String),
            "{{topic}}" => Value::String(message.topic.clone()),
            "{{partition}}" => message.partition.into(),
            "{{offset}}" => message.offset.into(),
            _ => template.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(|item| fill(item, message)).collect()),
        Value::Object(fields) => Value::Object(fields.iter().map(|(k, v)| (k.clone(), fill(v, message))).collect()),
        other => other.clone(),
    }
}

/// A route running, with what stops it.
pub(crate) type Running = (Arc<Route>, tokio_util::sync::CancellationToken);

/// Puts or removes a route.
#[derive(Debug)]
pub(crate) enum RouteWrite {
    Put(Route),
    Remove(Vec<u8>),
}

impl Staged for RouteWrite {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        match self {
            Self::Put(route) => {
                let value = serde_json::to_vec(route).map_err(|e| Error::internal(e.to_string()))?;
                tx.put(BUS_ROUTES, Route::key(&route.tenant, &route.name), value);
            }
            Self::Remove(key) => tx.remove(BUS_ROUTES, key.clone()),
        }
        Ok(Applied::Done)
    }
}

/// Whether a refused submission is worth submitting again later.
fn transient(error: &Error) -> bool {
    matches!(
        error.code,
        ErrorCode::ResourceExhausted | ErrorCode::QuotaExceeded | ErrorCode::Unavailable | ErrorCode::Timeout
    )
}

impl Bus {
    /// Runs `route` until it is removed (its token cancelled) or the kernel stops.
    pub(crate) fn run_route(&self, route: Arc<Route>, stop: tokio_util::sync::CancellationToken) -> Result<()> {
        let ctx = self.ctx()?.clone();
        let bus = self.clone();
        ctx.tasks.clone().spawn(async move {
            let caller = route.caller();
            let mut wait = READ_RETRY.0;
            loop {
                let pass = async {
                    let topic = bus.topic(&TopicKey::new(&route.tenant, &route.topic))?;
                    // A grant revoked since stops the route's reading.
                    bus.may_use(&topic, Some(route.agent), bbx_component::access::Right::Read)?;
                    let group = Bus::group_of(&topic, Some(route.agent), &route.group)?;
                    let messages = bus
                        .fetch(&topic, &group, Start::Earliest, BATCH, LEASE, Duration::from_secs(1))
                        .await?;
                    bus.submit_routed(&route, &caller, (&topic, &group), messages).await
                };
                let failed = tokio::select! {
                    () = stop.cancelled() => return,
                    () = ctx.stopping.cancelled() => return,
                    outcome = pass => outcome.err(),
                };
                let Some(error) = failed else {
                    wait = READ_RETRY.0;
                    continue;
                };
                // Only a refusal, or a route that cannot be run as it is, waits
                // longer each time: a topic that does not exist yet, or a kernel
                // starting, is tried again soon.
                let lasting = matches!(error.code, ErrorCode::PolicyDenied | ErrorCode::InvalidArgument);
                if !lasting {
                    wait = READ_RETRY.0;
                }
                // The topic may not exist yet, the kernel may be starting, a
                // grant may be revoked until it is given again.
                tracing::debug!(route = route.name, %error, ?wait, "a bus route waits");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = ctx.stopping.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
                if lasting {
                    wait = (wait * 2).min(READ_RETRY.1);
                }
            }
        });
        Ok(())
    }

    /// Submits the ops of `messages` (one batch, one journal write), then acks
    /// them; a batch refused is submitted op by op, so that one bad message does
    /// not hold the others back.
    async fn submit_routed(
        &self,
        route: &Route,
        caller: &Caller,
        (topic, group): (&Topic, &str),
        messages: Vec<Delivered>,
    ) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let submitter = self.ctx()?.submitter.clone();
        let tokens =
            |messages: &[&Delivered]| -> Result<Vec<Token>> { messages.iter().map(|m| m.ack.parse()).collect() };
        let batch = SubmitBatch {
            ops: messages.iter().map(|m| route.op(m)).collect(),
            wait_ms: None,
        };
        if submitter.submit(caller, batch).await.is_ok() {
            let all: Vec<&Delivered> = messages.iter().collect();
            self.ack(topic, group, &tokens(&all)?).await?;
            return Ok(());
        }
        for message in &messages {
            let token = tokens(&[message])?;
            let mut waited = Duration::ZERO;
            loop {
                let batch = SubmitBatch {
                    ops: vec![route.op(message)],
                    wait_ms: None,
                };
                match submitter.submit(caller, batch).await {
                    Ok(_) => {
                        self.ack(topic, group, &token).await?;
                        break;
                    }
                    // Worth retrying (a quota, a full queue): retried while the
                    // lease lasts, without spending a delivery; then left to be
                    // delivered again.
                    Err(error) if transient(&error) => {
                        if waited >= LEASE / 2 {
                            break;
                        }
                        tokio::time::sleep(RETRY).await;
                        waited += RETRY;
                    }
                    Err(error) => {
                        let reason = format!("route {} could not submit its op: {}", route.name, error.message);
                        let nack = Some((Some(reason), None));
                        self.nack_or_extend(topic, group, &token, nack, Duration::ZERO).await?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// `bus.route`'s input.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteReq {
    name: String,
    topic: String,
    /// The agent whose ops the messages become.
    agent: String,
    /// The op kind, e.g. `state.set`.
    kind: String,
    /// The op's args, with `{{payload}}`, `{{id}}`, `{{key}}`, `{{topic}}`,
    /// `{{partition}}` and `{{offset}}` as whole-string placeholders.
    #[serde(default)]
    args: Value,
    /// The group it consumes as [default: route:NAME].
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
}

impl Bus {
    /// Loads the stored routes and runs each.
    pub(crate) fn start_routes(&self) -> Result<()> {
        let store = self.store()?.clone();
        for item in fjall::Readable::iter(&*store.view(), store.keyspace(BUS_ROUTES)) {
            let value = item.value().map_err(|e| bbx_store::storage_error("load routes", e))?;
            let route: Route = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a stored route is unreadable: {e}")))?;
            self.launch(route)?;
        }
        Ok(())
    }

    fn launch(&self, route: Route) -> Result<()> {
        let stop = tokio_util::sync::CancellationToken::new();
        let route = Arc::new(route);
        let key = Route::key(&route.tenant, &route.name);
        if let Some((_, before)) = self.0.routes.lock().insert(key, (route.clone(), stop.clone())) {
            before.cancel();
        }
        self.run_route(route, stop)
    }

    /// Makes (or replaces) a route of `tenant`, acting for an agent the caller may
    /// act for.
    pub(crate) async fn put_route(&self, caller: &Caller, tenant: String, req: RouteReq) -> Result<Route> {
        caller.may(bbx_auth::Action::Act)?;
        bbx_core::validate::name("name", &req.name)?;
        bbx_core::validate::name("topic", &req.topic)?;
        bbx_core::validate::name("kind", &req.kind)?;
        caller.check_kind(&req.kind)?;
        // A route outlives the call: a credential that expires cannot make one.
        if caller.expires_at.is_some() {
            return Err(Error::permission_denied(
                "a route runs until removed: make it with an API key, not an access token",
            ));
        }
        let agent: AgentId = req.agent.parse()?;
        let owner = bbx_agents::stored_agent(self.store()?, &agent)?.tenant;
        caller.check_owner(&owner, "agent", agent)?;
        caller.check_agent(&agent)?;
        if owner != tenant {
            return Err(Error::not_found("agent", agent));
        }
        // A mailbox is read by its own agent only, routed or not.
        if let Some(mailbox) = crate::direct::mailbox_owner(&req.topic)
            && mailbox? != agent
        {
            return Err(Error::permission_denied(
                "an agent's mailbox routes into its own ops only",
            ));
        }
        self.check_route_owner(caller, &tenant, &req.name)?;
        let group = req.group.unwrap_or_else(|| format!("route:{}", req.name));
        bbx_core::validate::name("group", &group)?;
        // An agent's topic routes into the ops of the agents it grants read,
        // each through a group of its own.
        if let Ok(topic) = self.topic(&TopicKey::new(&tenant, &req.topic)) {
            self.may_use(&topic, Some(agent), bbx_component::access::Right::Read)?;
            Bus::group_of(&topic, Some(agent), &group)?;
        }
        let key = Route::key(&tenant, &req.name);
        let (held, replacing) = {
            let routes = self.0.routes.lock();
            let prefix = Route::key(&tenant, "");
            (
                routes.keys().filter(|k| k.starts_with(&prefix)).count(),
                routes.contains_key(&key),
            )
        };
        if held >= MAX_ROUTES_PER_TENANT && !replacing {
            return Err(Error::new(
                ErrorCode::ResourceExhausted,
                format!("tenant {tenant} has {MAX_ROUTES_PER_TENANT} routes already"),
            ));
        }
        let route = Route {
            name: req.name,
            tenant,
            topic: req.topic,
            group,
            agent,
            kind: req.kind,
            kinds: caller.kinds.clone(),
            args: req.args,
            by: caller.key_id,
            created_at: Utc::now(),
        };
        self.store()?.write(RouteWrite::Put(route.clone())).await?;
        self.launch(route.clone())?;
        Ok(route)
    }

    /// A route of that name, if there is one, must be of an agent `caller` may
    /// act for: a key confined to one agent neither replaces nor removes
    /// another's.
    fn check_route_owner(&self, caller: &Caller, tenant: &str, name: &str) -> Result<()> {
        let held = self
            .0
            .routes
            .lock()
            .get(&Route::key(tenant, name))
            .map(|(route, _)| route.agent);
        match held {
            Some(agent) => caller.check_agent(&agent),
            None => Ok(()),
        }
    }

    /// Removes a route: it stops taking messages (its group stays, with its place).
    pub(crate) async fn remove_route(&self, caller: &Caller, tenant: &str, name: &str) -> Result<Route> {
        self.check_route_owner(caller, tenant, name)?;
        let key = Route::key(tenant, name);
        let route = self
            .0
            .routes
            .lock()
            .get(&key)
            .map(|(route, _)| Route::clone(route))
            .ok_or_else(|| Error::not_found("route", name))?;
        self.store()?.write(RouteWrite::Remove(key.clone())).await?;
        if let Some((_, stop)) = self.0.routes.lock().remove(&key) {
            stop.cancel();
        }
        Ok(route)
    }

    /// The routes of `tenant` (a key confined to an agent sees that agent's).
    pub(crate) fn routes_of(&self, caller: &Caller, tenant: &str) -> Vec<Route> {
        let prefix = Route::key(tenant, "");
        let mut routes: Vec<Route> = self
            .0
            .routes
            .lock()
            .iter()
            .filter(|(key, (route, _))| key.starts_with(&prefix) && caller.check_agent(&route.agent).is_ok())
            .map(|(_, (route, _))| Route::clone(route))
            .collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes
    }

    /// Removes the routes into a deleted agent, off the caller's path.
    pub(crate) fn forget_agent_routes(&self, agent: &AgentId) {
        let gone: Vec<(Vec<u8>, tokio_util::sync::CancellationToken)> = {
            let mut routes = self.0.routes.lock();
            let keys: Vec<Vec<u8>> = routes
                .iter()
                .filter(|(_, (route, _))| route.agent == *agent)
                .map(|(key, _)| key.clone())
                .collect();
            keys.into_iter()
                .filter_map(|key| routes.remove(&key).map(|(_, stop)| (key, stop)))
                .collect()
        };
        for (key, stop) in gone {
            stop.cancel();
            if let Ok(ctx) = self.ctx() {
                ctx.write_later(RouteWrite::Remove(key), "the removal of a deleted agent's route");
            }
        }
    }
}
