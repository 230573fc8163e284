//! The retention sweeper: once a second, each topic's messages past its limits
//! (age, count, bytes) go, oldest first, but never one a group has not settled
//! unless the topic drops unconsumed messages; and message ids older than the
//! dedup window are forgotten.

use crate::bus::{Bus, Topic, Writes};
use crate::keys::{Stored, position};
use crate::{BUS_DEDUP, BUS_MESSAGES, log};
use bbx_core::Result;
use bbx_store::storage_error;
use chrono::Utc;
use fjall::Readable;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Keys one sweep removes from one topic at most, so that a sweep stays short.
const MAX_PER_SWEEP: usize = 10_000;
const EVERY: Duration = Duration::from_secs(1);

/// Sweeps until the kernel stops.
pub(crate) fn spawn(bus: &Bus) -> Result<()> {
    let ctx = bus.ctx()?.clone();
    let bus = bus.clone();
    ctx.tasks.clone().spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        loop {
            tokio::select! {
                () = ctx.stopping.cancelled() => return,
                _ = tick.tick() => {}
            }
            for topic in bus.all_topics() {
                if let Err(error) = sweep(&bus, &topic).await {
                    tracing::warn!(topic = topic.name(), %error, "bus retention sweep failed");
                }
            }
        }
    });
    Ok(())
}

/// One sweep of one topic.
pub(crate) async fn sweep(bus: &Bus, topic: &Topic) -> Result<()> {
    let store = bus.store()?;
    let retention = &topic.config.retention;
    let now_ms = Utc::now().timestamp_millis();
    let max_age_ms = i64::try_from(retention.max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let oldest_kept_ms = now_ms.saturating_sub(max_age_ms);
    // Count and byte limits are the topic's, spread evenly over its partitions.
    let partitions = u64::from(topic.config.partitions);
    let max_messages = retention.max_messages.map(|max| max.div_ceil(partitions));
    let max_bytes = retention.max_bytes.map(|max| max.div_ceil(partitions));
    let mut writes = Writes::default();
    let (mut dropped, mut unconsumed) = (0u64, 0u64);
    for partition in 0..topic.config.partitions {
        let floor = settled_floor(topic, partition).await;
        let (first, head) = log::bounds(store, &topic.key, partition)?;
        let mut count = head.saturating_sub(first);
        let mut bytes = match max_bytes {
            Some(_) => partition_bytes(bus, topic, partition)?,
            None => 0,
        };
        let view = store.view();
        for item in view.prefix(store.keyspace(BUS_MESSAGES), topic.key.partition(partition)) {
            if writes.0.len() >= MAX_PER_SWEEP {
                break;
            }
            let (key, value) = item.into_inner().map_err(|e| storage_error("sweep messages", e))?;
            let Some((_, offset)) = position(&key) else { continue };
            let stored = Stored::decode(&value)?;
            let past = stored.published_at.timestamp_millis() < oldest_kept_ms
                || max_messages.is_some_and(|max| count > max)
                || max_bytes.is_some_and(|max| bytes > max);
            if !past {
                break;
            }
            let consumed = floor.is_none_or(|floor| offset < floor);
            if !consumed && !retention.drop_unconsumed {
                break;
            }
            unconsumed += u64::from(!consumed);
            dropped += 1;
            count = count.saturating_sub(1);
            bytes = bytes.saturating_sub(value.len() as u64);
            writes.remove(BUS_MESSAGES, key.to_vec());
        }
    }
    let before_ms = now_ms.saturating_sub(bus.0.config.dedup_window_secs as i64 * 1000);
    let view = store.view();
    for item in view.prefix(store.keyspace(BUS_DEDUP), topic.key.as_bytes()) {
        if writes.0.len() >= MAX_PER_SWEEP {
            break;
        }
        let (key, value) = item.into_inner().map_err(|e| storage_error("sweep message ids", e))?;
        if log::dedup_expired(&value, before_ms) {
            writes.remove(BUS_DEDUP, key.to_vec());
        }
    }
    if writes.0.is_empty() {
        return Ok(());
    }
    store.write(writes).await?;
    if dropped > 0 {
        topic.trimmed.fetch_add(1, Ordering::Release);
    }
    topic.counts.dropped.fetch_add(dropped, Ordering::Relaxed);
    topic.counts.dropped_unconsumed.fetch_add(unconsumed, Ordering::Relaxed);
    Ok(())
}

/// The lowest floor of the topic's groups in `partition`: below it every group
/// has settled every message. None without groups.
async fn settled_floor(topic: &Topic, partition: u32) -> Option<u64> {
    let groups: Vec<_> = topic.groups.lock().values().cloned().collect();
    let mut lowest: Option<u64> = None;
    for group in groups {
        let floor = group.group.lock().await.cursors[partition as usize].floor;
        lowest = Some(lowest.map_or(floor, |l| l.min(floor)));
    }
    lowest
}

fn partition_bytes(bus: &Bus, topic: &Topic, partition: u32) -> Result<u64> {
    let store = bus.store()?;
    let mut bytes = 0u64;
    for item in store
        .view()
        .prefix(store.keyspace(BUS_MESSAGES), topic.key.partition(partition))
    {
        let value = item.value().map_err(|e| storage_error("size messages", e))?;
        bytes += value.len() as u64;
    }
    Ok(bytes)
}
