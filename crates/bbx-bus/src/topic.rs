//! A topic's settings, stored with it, and how they are given.

use bbx_core::config::TopicDefaults;
use bbx_core::{AgentId, Error, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A topic as stored: its settings, fixed when it is made but for retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TopicConfig {
    pub partitions: u32,
    pub ack_wait_ms: u64,
    pub max_deliveries: u32,
    pub backoff_ms: u64,
    pub retention: Retention,
    pub created_at: DateTime<Utc>,
    /// The agent whose topic it is: other agents use it only as it granted
    /// (FlowIntegrity, region `topic`); none: the tenant's, for any of its
    /// agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<AgentId>,
}

/// What a topic keeps. A message goes once it is past any limit, and not before
/// every consumer group has consumed it unless `drop_unconsumed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub max_age_secs: u64,
    #[serde(default)]
    pub max_messages: Option<u64>,
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Drop messages past a limit even if a group has not consumed them
    /// (counted as `dropped_unconsumed`).
    #[serde(default)]
    pub drop_unconsumed: bool,
}

/// Settings asked for a new topic; what is not given comes from `[bus.topic]`.
#[derive(Debug, Default, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub partitions: Option<u32>,
    pub ack_wait_ms: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub backoff_ms: Option<u64>,
    pub max_age_secs: Option<u64>,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub drop_unconsumed: bool,
    /// An agent of the tenant whose topic it is: other agents publish and
    /// consume only as it grants (region `topic`).
    #[serde(default)]
    pub owner: Option<AgentId>,
}

impl TopicConfig {
    /// The settings `asked` over `defaults`, checked.
    pub fn new(defaults: &TopicDefaults, asked: &TopicSettings, at: DateTime<Utc>) -> Result<Self> {
        let merged = TopicDefaults {
            partitions: asked.partitions.unwrap_or(defaults.partitions),
            ack_wait_ms: asked.ack_wait_ms.unwrap_or(defaults.ack_wait_ms),
            max_deliveries: asked.max_deliveries.unwrap_or(defaults.max_deliveries),
            backoff_ms: asked.backoff_ms.unwrap_or(defaults.backoff_ms),
            max_age_secs: asked.max_age_secs.unwrap_or(defaults.max_age_secs),
        };
        merged.validate("")?;
        if asked.max_messages == Some(0) || asked.max_bytes == Some(0) {
            return Err(Error::invalid_field(
                "max_messages",
                "max_messages and max_bytes must be at least 1 where given",
            ));
        }
        Ok(Self {
            partitions: merged.partitions,
            ack_wait_ms: merged.ack_wait_ms,
            max_deliveries: merged.max_deliveries,
            backoff_ms: merged.backoff_ms,
            retention: Retention {
                max_age_secs: merged.max_age_secs,
                max_messages: asked.max_messages,
                max_bytes: asked.max_bytes,
                drop_unconsumed: asked.drop_unconsumed,
            },
            created_at: at,
            owner: asked.owner,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::internal(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("a stored topic is unreadable: {e}")))
    }

    /// The partition of a message: by its ordering key's hash, or for a message
    /// without one, by its id's (spreading them).
    pub fn partition_of(&self, key: Option<&str>, id: &str) -> u32 {
        use std::hash::{Hash, Hasher};
        if self.partitions == 1 {
            return 0;
        }
        // FxHash is the same in every process and version of this build: a key's
        // partition must not change across restarts.
        let mut hasher = rustc_hash::FxHasher::default();
        key.unwrap_or(id).hash(&mut hasher);
        (hasher.finish() % u64::from(self.partitions)) as u32
    }

    /// The delay before redelivering a message nacked on its `delivery`th
    /// delivery: `backoff_ms` doubled each time, at most a minute.
    pub fn backoff(&self, delivery: u32) -> std::time::Duration {
        let doubled = self.backoff_ms.saturating_mul(1 << delivery.saturating_sub(1).min(16));
        std::time::Duration::from_millis(doubled.min(60_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_fall_back_to_the_defaults_and_are_checked() {
        let defaults = TopicDefaults::default();
        let asked = TopicSettings {
            partitions: Some(4),
            ..TopicSettings::default()
        };
        let config = TopicConfig::new(&defaults, &asked, Utc::now()).unwrap();
        assert_eq!((config.partitions, config.max_deliveries), (4, defaults.max_deliveries));
        for bad in [
            TopicSettings {
                partitions: Some(0),
                ..TopicSettings::default()
            },
            TopicSettings {
                partitions: Some(100_000),
                ..TopicSettings::default()
            },
            TopicSettings {
                max_deliveries: Some(0),
                ..TopicSettings::default()
            },
            TopicSettings {
                max_messages: Some(0),
                ..TopicSettings::default()
            },
        ] {
            assert!(TopicConfig::new(&defaults, &bad, Utc::now()).is_err(), "{bad:?}");
        }
        assert_eq!(TopicConfig::decode(&config.encode().unwrap()).unwrap(), config);
    }

    #[test]
    fn a_key_keeps_its_partition_and_backoff_doubles_to_a_minute() {
        let asked = TopicSettings {
            partitions: Some(8),
            ..TopicSettings::default()
        };
        let config = TopicConfig::new(&TopicDefaults::default(), &asked, Utc::now()).unwrap();
        let first = config.partition_of(Some("order-17"), "a");
        assert_eq!(config.partition_of(Some("order-17"), "b"), first);
        assert!(first < 8);
        let spread: std::collections::HashSet<u32> = (0..200)
            .map(|i| config.partition_of(None, &format!("id-{i}")))
            .collect();
        assert!(spread.len() > 4, "ids spread over the partitions: {spread:?}");
        assert_eq!(config.backoff(1).as_millis(), 1000);
        assert_eq!(config.backoff(2).as_millis(), 2000);
        assert_eq!(config.backoff(40).as_millis(), 60_000);
    }
}
