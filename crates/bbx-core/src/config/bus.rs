//! The MessageBus's settings (`[bus]`): the defaults a new topic takes, and the
//! limits every topic keeps.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[bus]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// The largest payload a message may carry, in bytes [default: 1 MiB].
    pub max_message_bytes: usize,
    /// How long a message id is remembered so that publishing it again stores
    /// nothing [default: 120 s].
    pub dedup_window_secs: u64,
    /// A topic is made on its first publish, with the defaults below [default:
    /// true]; otherwise publishing to a topic not made first is `not_found`.
    pub auto_create_topics: bool,
    /// The defaults of a new topic.
    pub topic: TopicDefaults,
}

/// What a topic made without settings of its own gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    /// Partitions, chosen by a message's ordering key [default: 1].
    pub partitions: u32,
    /// How long a delivered message is leased to its consumer before it is
    /// delivered again [default: 30 s].
    pub ack_wait_ms: u64,
    /// Deliveries of a message before it goes to the dead letters [default: 5].
    pub max_deliveries: u32,
    /// The first redelivery's delay after a nack; each next one doubles, up to
    /// a minute [default: 1 s].
    pub backoff_ms: u64,
    /// Messages older than this may go [default: 7 days].
    pub max_age_secs: u64,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            dedup_window_secs: 120,
            auto_create_topics: true,
            topic: TopicDefaults::default(),
        }
    }
}

impl Default for TopicDefaults {
    fn default() -> Self {
        Self {
            partitions: 1,
            ack_wait_ms: 30_000,
            max_deliveries: 5,
            backoff_ms: 1000,
            max_age_secs: 7 * 24 * 3600,
        }
    }
}

/// The longest a topic keeps messages: 100 years.
pub const MAX_AGE_SECS: u64 = 100 * 365 * 24 * 3600;

/// The most partitions a topic has.
pub const MAX_PARTITIONS: u32 = 256;

impl BusConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err(Error::invalid_field(
                "bus.max_message_bytes",
                "bus.max_message_bytes must be 1 to 64 MiB",
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&self.dedup_window_secs) {
            return Err(Error::invalid_field(
                "bus.dedup_window_secs",
                "bus.dedup_window_secs must be 1 s to 7 days",
            ));
        }
        self.topic.validate("bus.topic.")
    }
}

impl TopicDefaults {
    /// Checks each setting; `at` prefixes the names of fields in errors.
    pub fn validate(&self, at: &str) -> Result<()> {
        let bad = |field: &str, why: &str| Error::invalid_field(&format!("{at}{field}"), format!("{at}{field} {why}"));
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            return Err(bad("partitions", &format!("must be 1-{MAX_PARTITIONS}")));
        }
        if !(1..=12 * 3600 * 1000).contains(&self.ack_wait_ms) {
            return Err(bad("ack_wait_ms", "must be 1 ms to 12 hours"));
        }
        if !(1..=1000).contains(&self.max_deliveries) {
            return Err(bad("max_deliveries", "must be 1-1000"));
        }
        if self.backoff_ms > 3600 * 1000 {
            return Err(bad("backoff_ms", "must be at most an hour"));
        }
        if !(1..=MAX_AGE_SECS).contains(&self.max_age_secs) {
            return Err(bad("max_age_secs", "must be 1 s to 100 years"));
        }
        Ok(())
    }
}
