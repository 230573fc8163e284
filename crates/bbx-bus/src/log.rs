//! The embedded log: messages are written once, into the kernel's store, by the
//! store's group-commit writer (so a publish shares the journal's `fdatasync`
//! with every other write of its group, and is acknowledged once that returns).
//!
//! Offsets are given on the committer thread, in commit order, from each
//! partition's head (the next offset, stored beside the messages so that a
//! partition emptied by retention goes on where it was). A message id seen within
//! the dedup window is answered with the offset it was stored at, and stored again
//! nowhere.

use crate::keys::{Stored, TopicKey, position};
use crate::topic::TopicConfig;
use crate::{BUS_DEDUP, BUS_HEADS, BUS_MESSAGES, BUS_TOPICS};
use bbx_core::{Error, ErrorCode, Result};
use bbx_store::{Applied, CommitterCache, GroupTx, Staged, StagedWrites, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::time::Duration;

/// One message to publish; its partition is chosen from its key (or id) by the
/// topic's settings as stored when it commits.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: String,
    /// The id was given by the publisher, so it may come again and is kept for
    /// the dedup window; an id the bus made (a UUIDv7) never repeats, and is
    /// neither looked up nor kept.
    pub given_id: bool,
    pub key: Option<String>,
    /// JSON text.
    pub payload: Vec<u8>,
}

/// Where a published message is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Published {
    pub id: String,
    pub partition: u32,
    pub offset: u64,
    /// Its id was published within the dedup window: nothing was stored, and
    /// this is where the first one is.
    pub duplicate: bool,
}

/// Publishes messages to one topic, all or none; makes the topic in the same
/// write if `create` holds its settings.
#[derive(Debug)]
pub struct Publish {
    pub topic: TopicKey,
    pub create: Option<TopicConfig>,
    pub messages: Vec<Outgoing>,
    pub dedup_window: Duration,
    pub at: DateTime<Utc>,
}

impl Staged for Publish {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let published = tx.all_or_nothing(|tx| stage_publish(tx, self))?;
        Ok(Applied::output(published))
    }
}

/// Stages `publish` in `tx`; returns where each message is.
pub fn stage_publish(tx: &mut GroupTx<'_>, publish: &Publish) -> Result<Vec<Published>> {
    // The topic's settings as they commit: a topic made meanwhile (with other
    // partitions than a publisher assumed) is the one the messages go to.
    let config = match tx.read(BUS_TOPICS, publish.topic.as_bytes())? {
        Some(stored) => TopicConfig::decode(&stored)?,
        None => {
            let config = publish
                .create
                .clone()
                .ok_or_else(|| Error::not_found("topic", publish.topic.parts().1))?;
            tx.put(BUS_TOPICS, publish.topic.as_bytes().to_vec(), config.encode()?);
            config
        }
    };
    // What one commit can journal: a larger publish would fail every write of
    // its group, so it is refused alone.
    let mut room = tx.max_value();
    let mut heads: FxHashMap<u32, u64> = FxHashMap::default();
    let mut published = Vec::with_capacity(publish.messages.len());
    let at_ms = publish.at.timestamp_millis();
    for message in &publish.messages {
        let dedup_key = message.given_id.then(|| publish.topic.dedup(&message.id));
        if let Some(dedup_key) = &dedup_key
            && let Some(seen) = tx.read(BUS_DEDUP, dedup_key)?.as_deref().and_then(Dedup::decode)
            && at_ms - seen.at_ms < publish.dedup_window.as_millis() as i64
        {
            published.push(Published {
                id: message.id.clone(),
                partition: seen.partition,
                offset: seen.offset,
                duplicate: true,
            });
            continue;
        }
        let partition = config.partition_of(message.key.as_deref(), &message.id);
        let offset = match heads.get(&partition) {
            Some(next) => *next,
            None => head(tx, &publish.topic, partition)?,
        };
        heads.insert(partition, offset + 1);
        let stored = Stored {
            id: message.id.clone(),
            key: message.key.clone(),
            published_at: publish.at,
            payload: message.payload.clone(),
        }
        .encode();
        room = room
            .checked_sub(stored.len() + dedup_key.as_ref().map_or(0, Vec::len) + 64)
            .ok_or_else(|| too_large(stored.len(), tx.max_value()))?;
        tx.put(BUS_MESSAGES, publish.topic.message(partition, offset), stored);
        if let Some(dedup_key) = dedup_key {
            let dedup = Dedup {
                partition,
                offset,
                at_ms,
            };
            tx.put(BUS_DEDUP, dedup_key, dedup.encode());
        }
        published.push(Published {
            id: message.id.clone(),
            partition,
            offset,
            duplicate: false,
        });
    }
    for (partition, next) in heads {
        let key = publish.topic.partition(partition);
        tx.put(BUS_HEADS, key.clone(), next.to_be_bytes().to_vec());
        tx.cache::<Heads>().0.insert(key, next);
    }
    Ok(published)
}

/// The next offset of a partition: from the committer's cache, else as stored.
fn head(tx: &mut GroupTx<'_>, topic: &TopicKey, partition: u32) -> Result<u64> {
    let key = topic.partition(partition);
    if let Some(next) = tx.cache::<Heads>().0.get(&key) {
        return Ok(*next);
    }
    Ok(tx.read(BUS_HEADS, &key)?.as_deref().map_or(0, decode_u64))
}

pub(crate) fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Each partition's next offset as last written, kept on the committer thread
/// so that a publish need not read it.
#[derive(Default)]
struct Heads(FxHashMap<Vec<u8>, u64>);

impl CommitterCache for Heads {
    fn committed(&mut self, _writes: &StagedWrites) {}

    fn invalidate(&mut self) {
        self.0.clear();
    }
}

/// Where a message id was stored, and when.
struct Dedup {
    partition: u32,
    offset: u64,
    at_ms: i64,
}

impl Dedup {
    fn encode(&self) -> Vec<u8> {
        [
            &self.partition.to_be_bytes()[..],
            &self.offset.to_be_bytes(),
            &self.at_ms.to_be_bytes(),
        ]
        .concat()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            partition: u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?),
            offset: u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?),
            at_ms: i64::from_be_bytes(bytes.get(12..20)?.try_into().ok()?),
        })
    }
}

/// Whether a remembered id was published before `before_ms` (out of the window).
pub(crate) fn dedup_expired(bytes: &[u8], before_ms: i64) -> bool {
    Dedup::decode(bytes).is_none_or(|d| d.at_ms < before_ms)
}

/// Up to `max` messages of `partition` from `from` on, as durable.
pub fn read(store: &Store, topic: &TopicKey, partition: u32, from: u64, max: usize) -> Result<Vec<(u64, Stored)>> {
    let prefix = topic.partition(partition);
    let view = store.view();
    let mut out = Vec::new();
    for item in view.range(store.keyspace(BUS_MESSAGES), topic.message(partition, from)..) {
        if out.len() >= max {
            break;
        }
        let (key, value) = item.into_inner().map_err(|e| storage_error("read messages", e))?;
        if !key.starts_with(&prefix) {
            break;
        }
        let (_, offset) = position(&key).ok_or_else(|| Error::internal("a bus message key is malformed"))?;
        out.push((offset, Stored::decode(&value)?));
    }
    Ok(out)
}

/// The first retained offset and the next offset of `partition`.
pub fn bounds(store: &Store, topic: &TopicKey, partition: u32) -> Result<(u64, u64)> {
    let view = store.view();
    let head = view
        .get(store.keyspace(BUS_HEADS), topic.partition(partition))
        .map_err(|e| storage_error("read a partition's head", e))?
        .as_deref()
        .map_or(0, decode_u64);
    let first = match view
        .prefix(store.keyspace(BUS_MESSAGES), topic.partition(partition))
        .next()
    {
        Some(item) => {
            let key = item.key().map_err(|e| storage_error("read messages", e))?;
            position(&key).map_or(head, |(_, offset)| offset)
        }
        None => head,
    };
    Ok((first, head))
}

/// A message, or a batch, over what may be published at once.
pub fn too_large(bytes: usize, max: usize) -> Error {
    Error::new(
        ErrorCode::PayloadTooLarge,
        format!("the message is {bytes} bytes; at most {max} bytes may be published at once"),
    )
}
