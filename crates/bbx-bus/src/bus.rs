//! The bus at run time: the topics and groups in memory, tied to the store.

use crate::group::{Group, Settled, Token};
use crate::keys::{Stored, TopicKey};
use crate::log::{self, Outgoing, Publish, Published};
use crate::topic::{TopicConfig, TopicSettings};
use crate::{BUS_ACKS, BUS_DEAD, BUS_GROUPS, BUS_MESSAGES, BUS_TOPICS};
use bbx_component::Context;
use bbx_component::access::{Region, RegionAccess, Right};
use bbx_core::config::BusConfig;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::Utc;
use fjall::Readable;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The MessageBus, as a component of the kernel.
#[derive(Clone)]
pub struct Bus(pub(crate) Arc<Inner>);

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub config: BusConfig,
    pub ctx: OnceLock<Context>,
    /// Who may use an agent's topic (FlowIntegrity's grants).
    pub access: OnceLock<Arc<dyn RegionAccess>>,
    pub topics: parking_lot::RwLock<FxHashMap<TopicKey, Arc<Topic>>>,
    /// The routes running, by key.
    pub routes: parking_lot::Mutex<FxHashMap<Vec<u8>, crate::route::Running>>,
    /// Requests waiting for their reply, by tenant and request id.
    pub replies: parking_lot::Mutex<FxHashMap<(String, String), Waiting>>,
}

/// Where a request's reply goes.
pub(crate) type Waiting = tokio::sync::oneshot::Sender<Value>;

/// What is counted of a topic since the kernel started.
#[derive(Default)]
pub(crate) struct Counts {
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub delivered: AtomicU64,
    pub redelivered: AtomicU64,
    pub dead: AtomicU64,
    pub dropped: AtomicU64,
    pub dropped_unconsumed: AtomicU64,
}

/// A topic and its groups.
pub(crate) struct Topic {
    pub key: TopicKey,
    pub config: TopicConfig,
    /// Held while a group is made, so that two fetches make it once.
    creating: tokio::sync::Mutex<()>,
    pub groups: parking_lot::Mutex<FxHashMap<String, Arc<Consumers>>>,
    /// Counts the sweeps that removed messages: a group whose floor may now be
    /// below the first retained message catches up when it changed.
    pub trimmed: AtomicU64,
    pub counts: Counts,
    /// The next dead letter's sequence number.
    pub dead_seq: AtomicU64,
}

/// A group and its consumers waiting for messages.
pub(crate) struct Consumers {
    pub group: tokio::sync::Mutex<Group>,
    /// Woken (one at a time) by publishes and nacks.
    pub waiting: Notify,
}

impl Consumers {
    fn new(group: Group) -> Self {
        Self {
            group: tokio::sync::Mutex::new(group),
            waiting: Notify::new(),
        }
    }
}

/// A message as delivered to a consumer.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Delivered {
    pub id: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub payload: Value,
    /// Which delivery of it this is (1 for the first).
    pub delivery: u32,
    pub published_at: chrono::DateTime<Utc>,
    /// What acks, nacks or extends this delivery.
    pub ack: String,
}

/// A message that went to the dead letters.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeadLetter {
    pub seq: u64,
    pub id: String,
    pub group: String,
    pub partition: u32,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub payload: Value,
    pub reason: String,
    pub deliveries: u32,
    pub published_at: chrono::DateTime<Utc>,
    pub dead_at: chrono::DateTime<Utc>,
}

/// Writes to several keyspaces, all in one commit.
#[derive(Debug, Default)]
pub(crate) struct Writes(pub Vec<(KeyspaceDef, Vec<u8>, Option<Vec<u8>>)>);

impl Staged for Writes {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        for (keyspace, key, value) in &self.0 {
            match value {
                Some(value) => tx.put(*keyspace, key.clone(), value.clone()),
                None => tx.remove(*keyspace, key.clone()),
            }
        }
        Ok(Applied::Done)
    }
}

impl Writes {
    pub fn put(&mut self, keyspace: KeyspaceDef, key: Vec<u8>, value: Vec<u8>) {
        self.0.push((keyspace, key, Some(value)));
    }

    pub fn remove(&mut self, keyspace: KeyspaceDef, key: Vec<u8>) {
        self.0.push((keyspace, key, None));
    }

    /// The durable part of settling offsets of a group's partition.
    fn settle(&mut self, topic: &TopicKey, group: &str, partition: u32, settled: &Settled) {
        let base = topic.group(group);
        if let Some(floor) = settled.floor {
            self.put(BUS_GROUPS, floor_key(&base, partition), floor.to_be_bytes().to_vec());
        }
        for offset in &settled.acked {
            self.put(BUS_ACKS, ack_key(&base, partition, *offset), Vec::new());
        }
        for offset in &settled.passed {
            self.remove(BUS_ACKS, ack_key(&base, partition, *offset));
        }
    }
}

fn floor_key(group: &[u8], partition: u32) -> Vec<u8> {
    [group, b"f", &partition.to_be_bytes()].concat()
}

fn meta_key(group: &[u8]) -> Vec<u8> {
    [group, b"m"].concat()
}

fn ack_key(group: &[u8], partition: u32, offset: u64) -> Vec<u8> {
    [group, &partition.to_be_bytes(), &offset.to_be_bytes()].concat()
}

/// Where a new group starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// At the earliest retained message.
    #[default]
    Earliest,
    /// After the last message published before it was made.
    Latest,
}

impl Topic {
    fn new(key: TopicKey, config: TopicConfig) -> Self {
        Self {
            key,
            config,
            creating: tokio::sync::Mutex::new(()),
            trimmed: AtomicU64::new(0),
            groups: Default::default(),
            counts: Counts::default(),
            dead_seq: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        self.key.parts().1
    }

    pub fn group(&self, name: &str) -> Option<Arc<Consumers>> {
        self.groups.lock().get(name).cloned()
    }

    /// Wakes one waiting consumer of each group: there is something to fetch.
    pub fn wake(&self) {
        for consumers in self.groups.lock().values() {
            consumers.waiting.notify_one();
        }
    }
}

impl Bus {
    pub fn new(config: &BusConfig) -> Self {
        Self(Arc::new(Inner {
            config: config.clone(),
            ctx: OnceLock::new(),
            access: OnceLock::new(),
            topics: Default::default(),
            routes: Default::default(),
            replies: Default::default(),
        }))
    }

    pub(crate) fn ctx(&self) -> Result<&Context> {
        self.0
            .ctx
            .get()
            .ok_or_else(|| Error::unavailable("the bus has not started"))
    }

    pub(crate) fn store(&self) -> Result<&Arc<Store>> {
        Ok(&self.ctx()?.store)
    }

    pub(crate) fn topic(&self, key: &TopicKey) -> Result<Arc<Topic>> {
        self.0
            .topics
            .read()
            .get(key)
            .cloned()
            .ok_or_else(|| Error::not_found("topic", key.parts().1))
    }

    pub(crate) fn all_topics(&self) -> Vec<Arc<Topic>> {
        self.0.topics.read().values().cloned().collect()
    }

    /// Loads topics, groups and their acks, as stored.
    pub(crate) fn load(&self, store: &Store) -> Result<()> {
        let view = store.view();
        let mut topics = FxHashMap::default();
        for item in view.iter(store.keyspace(BUS_TOPICS)) {
            let (key, value) = item.into_inner().map_err(|e| storage_error("load topics", e))?;
            let key = TopicKey::of_key(&key).ok_or_else(|| Error::internal("a stored topic key is malformed"))?;
            let topic = Topic::new(key.clone(), TopicConfig::decode(&value)?);
            topics.insert(key, topic);
        }
        // Groups: their floors, then the acks above them.
        let mut floors: FxHashMap<(TopicKey, String), Vec<u64>> = FxHashMap::default();
        for item in view.iter(store.keyspace(BUS_GROUPS)) {
            let (key, value) = item.into_inner().map_err(|e| storage_error("load groups", e))?;
            let Some((topic, group, rest)) = split_group_key(&key) else {
                continue;
            };
            let Some(partitions) = topics.get(&topic).map(|t| t.config.partitions as usize) else {
                continue;
            };
            let entry = floors.entry((topic, group)).or_insert_with(|| vec![0; partitions]);
            if let [b'f', partition @ ..] = rest
                && let Ok(partition) = <[u8; 4]>::try_from(partition)
                && let Some(floor) = entry.get_mut(u32::from_be_bytes(partition) as usize)
            {
                *floor = log::decode_u64(&value);
            }
        }
        let mut acked: FxHashMap<(TopicKey, String), Vec<BTreeSet<u64>>> = FxHashMap::default();
        for item in view.iter(store.keyspace(BUS_ACKS)) {
            let key = item.key().map_err(|e| storage_error("load acks", e))?;
            let Some((topic, group, rest)) = split_group_key(&key) else {
                continue;
            };
            let Some(partitions) = topics.get(&topic).map(|t| t.config.partitions as usize) else {
                continue;
            };
            let (Some(partition), Some(offset)) = (rest.get(..4), rest.get(4..12)) else {
                continue;
            };
            let partition = u32::from_be_bytes(partition.try_into().unwrap_or_default()) as usize;
            let sets = acked
                .entry((topic, group))
                .or_insert_with(|| vec![BTreeSet::new(); partitions]);
            if let Some(set) = sets.get_mut(partition) {
                set.insert(log::decode_u64(offset));
            }
        }
        for ((topic, group), floors) in floors {
            let acks = acked.remove(&(topic.clone(), group.clone())).unwrap_or_default();
            if let Some(t) = topics.get(&topic) {
                let loaded = Group::new(group.clone(), floors, acks);
                t.groups.lock().insert(group, Arc::new(Consumers::new(loaded)));
            }
        }
        for topic in topics.values() {
            let last = view.prefix(store.keyspace(BUS_DEAD), topic.key.as_bytes()).next_back();
            if let Some(item) = last {
                let key = item.key().map_err(|e| storage_error("load dead letters", e))?;
                let seq = key.len().checked_sub(8).map_or(0, |at| log::decode_u64(&key[at..]));
                topic.dead_seq.store(seq + 1, Ordering::Relaxed);
            }
        }
        *self.0.topics.write() = topics.into_iter().map(|(k, t)| (k, Arc::new(t))).collect();
        Ok(())
    }

    /// Hands over who may use an agent's topic; before the kernel starts.
    pub fn set_access(&self, access: Arc<dyn RegionAccess>) {
        let _ = self.0.access.set(access);
    }

    /// Whether `agent` (none: a credential of the tenant, not confined to an
    /// agent) may use `right` on `topic`: a topic with an owner is its own and
    /// its grantees'.
    pub(crate) fn may_use(&self, topic: &Topic, agent: Option<AgentId>, right: Right) -> Result<()> {
        let (Some(owner), Some(agent)) = (topic.config.owner, agent) else {
            return Ok(());
        };
        if owner == agent {
            return Ok(());
        }
        let access = self.0.access.get().ok_or_else(|| {
            Error::new(
                ErrorCode::PolicyDenied,
                format!(
                    "topic {} is agent {owner}'s, and no grants are kept",
                    topic.key.parts().1
                ),
            )
        })?;
        let (tenant, name) = topic.key.parts();
        access.check(tenant, &owner, &agent, (Region::Topic, name), right)
    }

    /// The group `agent` (none: a credential of the tenant) consumes as when it
    /// names `group`, once [`Bus::may_use`] let it read `topic`: on another
    /// agent's topic, a grantee's groups are its own (`AGENT/GROUP` in the
    /// topic's stats), so that a read grant never settles messages of the
    /// owner's groups or another grantee's.
    pub(crate) fn group_of<'a>(
        topic: &Topic,
        agent: Option<AgentId>,
        group: &'a str,
    ) -> Result<std::borrow::Cow<'a, str>> {
        bbx_core::validate::name("group", group)?;
        let (Some(owner), Some(agent)) = (topic.config.owner, agent) else {
            return Ok(group.into());
        };
        if owner == agent {
            return Ok(group.into());
        }
        let own = format!("{agent}/{group}");
        if own.len() > bbx_core::validate::MAX_NAME_BYTES {
            return Err(Error::invalid_field(
                "group",
                format!(
                    "on another agent's topic a group is the agent's own ({agent}/GROUP): GROUP is at most {} bytes",
                    bbx_core::validate::MAX_NAME_BYTES - agent.to_string().len() - 1
                ),
            ));
        }
        Ok(own.into())
    }

    /// Makes a topic; `already_exists` if there is one of that name. An owner
    /// must be an agent of the topic's tenant.
    pub async fn create_topic(&self, key: TopicKey, settings: &TopicSettings) -> Result<TopicConfig> {
        let config = TopicConfig::new(&self.0.config.topic, settings, Utc::now())?;
        if let Some(owner) = config.owner {
            let agent = bbx_agents::stored_agent(self.store()?, &owner)?;
            if agent.tenant != key.parts().0 {
                return Err(Error::not_found("agent", owner));
            }
        }
        if self.0.topics.read().contains_key(&key) {
            return Err(exists(&key));
        }
        let create = CreateTopic(key.clone(), config.clone());
        self.store()?.write(create).await?;
        self.0
            .topics
            .write()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Topic::new(key, config.clone())));
        Ok(config)
    }

    /// Publishes `messages` (id, key, payload) to a topic, making it if asked and
    /// allowed; answers once they are durable.
    pub async fn publish(
        &self,
        key: TopicKey,
        messages: Vec<(Option<String>, Option<String>, Value)>,
    ) -> Result<Vec<Published>> {
        let known = self.0.topics.read().get(&key).cloned();
        let create = match known {
            Some(_) => None,
            None if self.0.config.auto_create_topics => Some(TopicConfig::new(
                &self.0.config.topic,
                &TopicSettings::default(),
                Utc::now(),
            )?),
            None => return Err(Error::not_found("topic", key.parts().1)),
        };
        let mut outgoing = Vec::with_capacity(messages.len());
        for (id, ordering, payload) in messages {
            let given_id = id.is_some();
            let id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let payload = self.checked_payload(&id, ordering.as_deref(), &payload)?;
            outgoing.push(Outgoing {
                id,
                given_id,
                key: ordering,
                payload,
            });
        }
        let publish = Publish {
            topic: key.clone(),
            create: create.clone(),
            messages: outgoing,
            dedup_window: Duration::from_secs(self.0.config.dedup_window_secs),
            at: Utc::now(),
        };
        let published: Vec<Published> = self.store()?.write(publish).await?.into_output()?;
        if create.is_some() {
            self.learn_topic(&key)?;
        }
        let topic = self.topic(&key)?;
        let fresh = published.iter().filter(|p| !p.duplicate).count() as u64;
        topic.counts.published.fetch_add(fresh, Ordering::Relaxed);
        topic
            .counts
            .duplicates
            .fetch_add(published.len() as u64 - fresh, Ordering::Relaxed);
        topic.wake();
        Ok(published)
    }

    /// A message's payload as stored, once its id, key and size are checked.
    pub(crate) fn checked_payload(&self, id: &str, ordering: Option<&str>, payload: &Value) -> Result<Vec<u8>> {
        bbx_core::validate::name("id", id)?;
        if let Some(ordering) = ordering {
            bbx_core::validate::name("key", ordering)?;
        }
        let payload = serde_json::to_vec(payload).map_err(|e| Error::internal(e.to_string()))?;
        let max = self.0.config.max_message_bytes;
        if payload.len() > max {
            return Err(log::too_large(payload.len(), max));
        }
        Ok(payload)
    }

    /// Adds a topic made in the store (by a publish that made it) to memory.
    pub(crate) fn learn_topic(&self, key: &TopicKey) -> Result<()> {
        if self.0.topics.read().contains_key(key) {
            return Ok(());
        }
        let store = self.store()?;
        let stored = store
            .view()
            .get(store.keyspace(BUS_TOPICS), key.as_bytes())
            .map_err(|e| storage_error("read a topic", e))?
            .ok_or_else(|| Error::not_found("topic", key.parts().1))?;
        let topic = Topic::new(key.clone(), TopicConfig::decode(&stored)?);
        self.0
            .topics
            .write()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(topic));
        Ok(())
    }

    /// The group `name` of `topic`, made (durably) at `start` if it is new.
    pub(crate) async fn group(&self, topic: &Topic, name: &str, start: Start) -> Result<Arc<Consumers>> {
        if let Some(group) = topic.group(name) {
            return Ok(group);
        }
        bbx_core::validate::name("group", name)?;
        let _creating = topic.creating.lock().await;
        if let Some(group) = topic.group(name) {
            return Ok(group);
        }
        let store = self.store()?;
        let mut floors = Vec::with_capacity(topic.config.partitions as usize);
        for partition in 0..topic.config.partitions {
            let (first, head) = log::bounds(store, &topic.key, partition)?;
            floors.push(if start == Start::Latest { head } else { first });
        }
        let base = topic.key.group(name);
        let mut writes = Writes::default();
        let meta = json!({ "start": start, "created_at": Utc::now() });
        writes.put(BUS_GROUPS, meta_key(&base), meta.to_string().into_bytes());
        for (partition, floor) in floors.iter().enumerate() {
            writes.put(
                BUS_GROUPS,
                floor_key(&base, partition as u32),
                floor.to_be_bytes().to_vec(),
            );
        }
        store.write(writes).await?;
        let made = Arc::new(Consumers::new(Group::new(name.to_owned(), floors, Vec::new())));
        Ok(topic.groups.lock().entry(name.to_owned()).or_insert(made).clone())
    }

    /// Up to `max` messages for `group`: due redeliveries, then new messages, each
    /// leased for `ack_wait`; waits up to `timeout` for the first.
    pub(crate) async fn fetch(
        &self,
        topic: &Arc<Topic>,
        group: &str,
        start: Start,
        max: usize,
        ack_wait: Duration,
        timeout: Duration,
    ) -> Result<Vec<Delivered>> {
        let consumers = self.group(topic, group, start).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let arrived = consumers.waiting.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (delivered, next_due) = self.take(topic, &consumers.group, max, ack_wait).await?;
            if delivered.len() == max {
                // There may be more: another waiting consumer takes its share.
                consumers.waiting.notify_one();
            }
            let now = Instant::now();
            if !delivered.is_empty() || now >= deadline {
                return Ok(delivered);
            }
            let wake = next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                () = &mut arrived => {}
                () = tokio::time::sleep_until(wake.into()) => {}
                () = self.ctx()?.stopping.cancelled() => return Ok(delivered),
            }
        }
    }

    /// One pass of [`Bus::fetch`]: what is due and new, and when a lease next falls due.
    async fn take(
        &self,
        topic: &Arc<Topic>,
        group: &tokio::sync::Mutex<Group>,
        max: usize,
        ack_wait: Duration,
    ) -> Result<(Vec<Delivered>, Option<Instant>)> {
        let store = self.store()?;
        let mut group = group.lock().await;
        let trimmed = topic.trimmed.load(Ordering::Acquire);
        if group.trimmed_seen != Some(trimmed) {
            self.catch_up(topic, &mut group).await?;
            group.trimmed_seen = Some(trimmed);
        }
        let now = Instant::now();
        let partitions = topic.config.partitions;
        // Each pass starts at the next partition, so that none starves.
        group.turn = group.turn.wrapping_add(1);
        let turn = group.turn % partitions;
        let due = group.due(&topic.config, ack_wait, now, max, turn);
        if !due.dead.is_empty() {
            self.bury(topic, &mut group, due.dead).await?;
        }
        let mut delivered = Vec::with_capacity(max);
        let view = store.view();
        for (partition, offset, delivery) in due.redeliver {
            let stored = view
                .get(store.keyspace(BUS_MESSAGES), topic.key.message(partition, offset))
                .map_err(|e| storage_error("read a message", e))?;
            match stored {
                Some(bytes) => delivered.push(deliver(topic, partition, offset, delivery, Stored::decode(&bytes)?)),
                // Gone by retention meanwhile: the next pass's catch-up settles it.
                None => {
                    group.cursors[partition as usize].leased.remove(&offset);
                }
            }
        }
        let redelivered = delivered.len() as u64;
        for step in 0..partitions {
            let partition = (turn + step) % partitions;
            while delivered.len() < max {
                let from = group.cursors[partition as usize].next;
                let read = log::read(store, &topic.key, partition, from, max - delivered.len())?;
                if read.is_empty() {
                    break;
                }
                for (offset, stored) in read {
                    // Acked before a restart, above the floor: not delivered again.
                    if !group.skip_acked(partition, offset) {
                        group.lease_new(partition, offset, ack_wait, now);
                        delivered.push(deliver(topic, partition, offset, 1, stored));
                    }
                }
            }
        }
        topic.counts.redelivered.fetch_add(redelivered, Ordering::Relaxed);
        topic
            .counts
            .delivered
            .fetch_add(delivered.len() as u64, Ordering::Relaxed);
        Ok((delivered, group.next_due()))
    }

    /// Moves each partition's floor up to its first retained message, durably:
    /// what retention removed below it is settled for the group.
    async fn catch_up(&self, topic: &Topic, group: &mut Group) -> Result<()> {
        let store = self.store()?;
        let mut writes = Writes::default();
        let mut applied = Vec::new();
        for partition in 0..topic.config.partitions {
            let (first, _) = log::bounds(store, &topic.key, partition)?;
            if let Some(settled) = group.caught_up(partition, first) {
                writes.settle(&topic.key, &group.name, partition, &settled);
                applied.push((partition, settled));
            }
        }
        if applied.is_empty() {
            return Ok(());
        }
        store.write(writes).await?;
        for (partition, settled) in applied {
            group.apply(partition, &[], &settled);
        }
        Ok(())
    }

    /// Moves messages past their deliveries to the dead letters, settling them for
    /// the group, in one write.
    async fn bury(&self, topic: &Topic, group: &mut Group, dead: Vec<(u32, u64, u32, String)>) -> Result<()> {
        let store = self.store()?;
        let mut writes = Writes::default();
        let mut settles = Vec::new();
        let view = store.view();
        for (partition, offset, deliveries, reason) in dead {
            let stored = view
                .get(store.keyspace(BUS_MESSAGES), topic.key.message(partition, offset))
                .map_err(|e| storage_error("read a message", e))?;
            if let Some(bytes) = stored {
                let stored = Stored::decode(&bytes)?;
                let seq = topic.dead_seq.fetch_add(1, Ordering::Relaxed);
                let letter = DeadLetter {
                    seq,
                    id: stored.id,
                    group: group.name.clone(),
                    partition,
                    offset,
                    key: stored.key,
                    payload: serde_json::from_slice(&stored.payload).unwrap_or(Value::Null),
                    reason,
                    deliveries,
                    published_at: stored.published_at,
                    dead_at: Utc::now(),
                };
                let encoded = serde_json::to_vec(&letter).map_err(|e| Error::internal(e.to_string()))?;
                writes.put(BUS_DEAD, topic.key.dead(seq), encoded);
            }
            settles.push((partition, offset));
        }
        let mut applied = Vec::new();
        for partition in 0..topic.config.partitions {
            let offsets: Vec<u64> = settles.iter().filter(|s| s.0 == partition).map(|s| s.1).collect();
            if !offsets.is_empty() {
                let settled = group.settle(partition, &offsets);
                writes.settle(&topic.key, &group.name, partition, &settled);
                applied.push((partition, offsets, settled));
            }
        }
        store.write(writes).await?;
        topic.counts.dead.fetch_add(settles.len() as u64, Ordering::Relaxed);
        for (partition, offsets, settled) in applied {
            group.apply(partition, &offsets, &settled);
        }
        Ok(())
    }

    /// Acknowledges deliveries of `group`: all of them, durably, or none. The
    /// write is queued under the group's lock (so acks reach the store in the
    /// order they change the group) and waited for outside it, so that fetches
    /// do not wait for the sync; the group changes at once, which only a failed
    /// store (after which nothing is acknowledged) could leave unwritten.
    pub(crate) async fn ack(&self, topic: &Topic, group: &str, tokens: &[Token]) -> Result<usize> {
        self.ack_some(topic, group, tokens, false).await
    }

    /// [`Bus::ack`]; with `settled_ok`, a token whose message is acknowledged
    /// already counts as acked (an op's ack that runs again after a crash).
    pub(crate) async fn ack_some(
        &self,
        topic: &Topic,
        group: &str,
        tokens: &[Token],
        settled_ok: bool,
    ) -> Result<usize> {
        let consumers = topic.group(group).ok_or_else(|| Error::not_found("group", group))?;
        let mut group = consumers.group.lock().await;
        let now = Instant::now();
        let (settled, tokens): (Vec<Token>, Vec<Token>) =
            tokens.iter().partition(|t| settled_ok && group.is_settled(t));
        let (settled, tokens) = (settled.len(), tokens.as_slice());
        for token in tokens {
            group.check(token, now)?;
        }
        let mut writes = Writes::default();
        let mut count = 0;
        for partition in 0..topic.config.partitions {
            let offsets: BTreeSet<u64> = tokens
                .iter()
                .filter(|t| t.partition == partition)
                .map(|t| t.offset)
                .collect();
            if offsets.is_empty() {
                continue;
            }
            let offsets: Vec<u64> = offsets.into_iter().collect();
            let settled = group.settle(partition, &offsets);
            writes.settle(&topic.key, &group.name, partition, &settled);
            group.apply(partition, &offsets, &settled);
            count += offsets.len();
        }
        let durable = self.store()?.queue(writes).await;
        drop(group);
        durable.await?;
        Ok(count + settled)
    }

    /// Nacks deliveries (each due again after its backoff, or `delay`), or extends
    /// their leases by `extend`: all of them, or none if one is not a live lease.
    pub(crate) async fn nack_or_extend(
        &self,
        topic: &Topic,
        group: &str,
        tokens: &[Token],
        nack: Option<(Option<String>, Option<Duration>)>,
        extend: Duration,
    ) -> Result<usize> {
        let consumers = topic.group(group).ok_or_else(|| Error::not_found("group", group))?;
        let mut group = consumers.group.lock().await;
        let now = Instant::now();
        for token in tokens {
            group.check(token, now)?;
        }
        for token in tokens {
            match &nack {
                Some((reason, delay)) => group.nack(token, reason.clone(), *delay, &topic.config, now),
                None => group.extend(token, extend, now),
            }
        }
        drop(group);
        consumers.waiting.notify_one();
        Ok(tokens.len())
    }

    /// The dead letters of a topic, oldest first.
    pub(crate) fn dead_letters(&self, topic: &Topic, limit: usize) -> Result<Vec<DeadLetter>> {
        let store = self.store()?;
        let mut out = Vec::new();
        for item in store
            .view()
            .prefix(store.keyspace(BUS_DEAD), topic.key.as_bytes())
            .take(limit)
        {
            let value = item.value().map_err(|e| storage_error("read dead letters", e))?;
            out.push(
                serde_json::from_slice(&value)
                    .map_err(|e| Error::internal(format!("a dead letter is unreadable: {e}")))?,
            );
        }
        Ok(out)
    }
}

/// A message as handed to a consumer.
fn deliver(topic: &Topic, partition: u32, offset: u64, delivery: u32, stored: Stored) -> Delivered {
    Delivered {
        id: stored.id,
        topic: topic.name().to_owned(),
        partition,
        offset,
        key: stored.key,
        payload: serde_json::from_slice(&stored.payload).unwrap_or(Value::Null),
        delivery,
        published_at: stored.published_at,
        ack: Token {
            partition,
            offset,
            delivery,
        }
        .to_string(),
    }
}

/// `topic, group \0, rest` from a group's key.
fn split_group_key(key: &[u8]) -> Option<(TopicKey, String, &[u8])> {
    let topic = TopicKey::of_key(key)?;
    let rest = &key[topic.as_bytes().len()..];
    let end = rest.iter().position(|b| *b == 0)?;
    let group = String::from_utf8(rest[..end].to_vec()).ok()?;
    Some((topic, group, &rest[end + 1..]))
}

fn exists(topic: &TopicKey) -> Error {
    Error::new(
        ErrorCode::AlreadyExists,
        format!("topic {:?} exists already", topic.parts().1),
    )
}

/// Makes a topic unless it exists.
#[derive(Debug)]
struct CreateTopic(TopicKey, TopicConfig);

impl Staged for CreateTopic {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        if tx.read(BUS_TOPICS, self.0.as_bytes())?.is_some() {
            return Err(exists(&self.0));
        }
        tx.put(BUS_TOPICS, self.0.as_bytes().to_vec(), self.1.encode()?);
        Ok(Applied::Done)
    }
}
