//! Consumer groups: each partition's cursor, the leases on what was delivered and
//! not yet acknowledged, and the acks that move its floor.
//!
//! A group's floor in each partition (every offset below it acknowledged or dead)
//! and the acks above it are durable; leases and delivery counts live in memory,
//! so after a restart every message not acknowledged is delivered again, counting
//! from one (at-least-once). What this module decides is pure: the bus applies it
//! to the store, then to the group.

use crate::topic::TopicConfig;
use bbx_core::{Error, ErrorCode, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// A delivered message not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Which delivery this is (1 for the first).
    pub delivery: u32,
    /// When it is due again: its ack wait passed, or its nack's backoff.
    pub until: Instant,
    /// Whether it was nacked (and waits out a backoff) rather than in flight.
    pub nacked: bool,
    /// Why it was last nacked.
    pub reason: Option<String>,
}

/// One partition of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every offset below it is acknowledged or dead.
    pub floor: u64,
    /// The next offset never delivered.
    pub next: u64,
    /// Acknowledged offsets at or above the floor.
    pub acked: BTreeSet<u64>,
    pub leased: BTreeMap<u64, Lease>,
}

/// What a group is to deliver now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// `(partition, offset, delivery)`: redeliveries first, in offset order.
    pub redeliver: Vec<(u32, u64, u32)>,
    /// Messages past their deliveries: `(partition, offset, deliveries, reason)`.
    pub dead: Vec<(u32, u64, u32, String)>,
}

/// A consumer group of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub cursors: Vec<Cursor>,
    /// Counts passes, to start each at another partition.
    pub turn: u32,
    /// The topic's trim count when the floors last caught up with retention.
    pub trimmed_seen: Option<u64>,
}

/// An acknowledgement token: `PARTITION:OFFSET:DELIVERY`, so that acking an
/// earlier delivery of a message delivered again is told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub partition: u32,
    pub offset: u64,
    pub delivery: u32,
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.partition, self.offset, self.delivery)
    }
}

impl std::str::FromStr for Token {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = || {
            Error::invalid_field(
                "acks",
                format!("{text:?} is not an ack token (PARTITION:OFFSET:DELIVERY, as delivered)"),
            )
        };
        let mut parts = text.split(':');
        let mut next = || parts.next().ok_or_else(bad);
        let token = Self {
            partition: next()?.parse().map_err(|_| bad())?,
            offset: next()?.parse().map_err(|_| bad())?,
            delivery: next()?.parse().map_err(|_| bad())?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(token)
    }
}

/// What acking or dead-lettering changes durably in one partition: its new floor,
/// acks to keep, and acks the floor passed (to remove).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub floor: Option<u64>,
    pub acked: Vec<u64>,
    pub passed: Vec<u64>,
}

impl Group {
    /// A group whose cursors start at `floors`, with the acks above them.
    pub fn new(name: String, floors: Vec<u64>, acked: Vec<BTreeSet<u64>>) -> Self {
        let cursors = floors
            .into_iter()
            .zip(acked.into_iter().chain(std::iter::repeat_with(BTreeSet::new)))
            .map(|(floor, acked)| Cursor {
                floor,
                next: floor,
                acked,
                leased: BTreeMap::new(),
            })
            .collect();
        Self {
            name,
            cursors,
            turn: 0,
            trimmed_seen: None,
        }
    }

    /// Leases that are due again, for redelivery or, past the topic's deliveries,
    /// for the dead letters. Redeliveries are leased again here.
    /// Starts at partition `first`, so that none starves, and finds every
    /// message due for the dead letters however many are redelivered.
    pub fn due(&mut self, config: &TopicConfig, ack_wait: Duration, now: Instant, max: usize, first: u32) -> Due {
        let mut due = Due::default();
        let count = self.cursors.len();
        for step in 0..count {
            let partition = (first as usize + step) % count;
            let cursor = &mut self.cursors[partition];
            for (offset, lease) in cursor.leased.iter_mut() {
                if lease.until > now {
                    continue;
                }
                if lease.delivery >= config.max_deliveries {
                    let reason = lease
                        .reason
                        .clone()
                        .unwrap_or_else(|| format!("not acknowledged in {} deliveries", lease.delivery));
                    if !due.dead.iter().any(|d| d.0 == partition as u32 && d.1 == *offset) {
                        due.dead.push((partition as u32, *offset, lease.delivery, reason));
                    }
                    continue;
                }
                if due.redeliver.len() >= max {
                    continue;
                }
                lease.delivery += 1;
                lease.until = now + ack_wait;
                lease.nacked = false;
                due.redeliver.push((partition as u32, *offset, lease.delivery));
            }
        }
        due
    }

    /// Leases a first delivery of `offset` in `partition`.
    pub fn lease_new(&mut self, partition: u32, offset: u64, ack_wait: Duration, now: Instant) {
        let cursor = &mut self.cursors[partition as usize];
        cursor.next = cursor.next.max(offset + 1);
        cursor.leased.insert(
            offset,
            Lease {
                delivery: 1,
                until: now + ack_wait,
                nacked: false,
                reason: None,
            },
        );
    }

    /// Passes over `offset` if it was acknowledged (above the floor, before a
    /// restart); whether it was.
    pub fn skip_acked(&mut self, partition: u32, offset: u64) -> bool {
        let cursor = &mut self.cursors[partition as usize];
        let acked = cursor.acked.contains(&offset);
        if acked {
            cursor.next = cursor.next.max(offset + 1);
        }
        acked
    }

    /// What moving the floor of `partition` up to `first`, the first message
    /// retained (everything below it is gone), changes durably; none if it is
    /// there already.
    pub fn caught_up(&self, partition: u32, first: u64) -> Option<Settled> {
        let cursor = &self.cursors[partition as usize];
        (cursor.floor < first).then(|| Settled {
            floor: Some(first),
            acked: Vec::new(),
            passed: cursor.acked.range(..first).copied().collect(),
        })
    }

    /// Whether the message `token` names is acknowledged (or dead) already.
    pub fn is_settled(&self, token: &Token) -> bool {
        self.cursors
            .get(token.partition as usize)
            .is_some_and(|c| token.offset < c.floor || c.acked.contains(&token.offset))
    }

    /// The lease `token` names, if it is still this delivery's and in time.
    pub fn check(&self, token: &Token, now: Instant) -> Result<()> {
        let cursor = self
            .cursors
            .get(token.partition as usize)
            .ok_or_else(|| Error::invalid_field("acks", format!("the topic has no partition {}", token.partition)))?;
        let Some(lease) = cursor.leased.get(&token.offset) else {
            let settled = token.offset < cursor.floor || cursor.acked.contains(&token.offset);
            return Err(if settled {
                Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("message {token} was acknowledged already"),
                )
            } else {
                Error::not_found("lease", token)
            });
        };
        if lease.delivery != token.delivery || (lease.until <= now && !lease.nacked) {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "the lease of {token} has expired: the message is delivered again (delivery {} is the latest)",
                    lease.delivery.max(token.delivery)
                ),
            ));
        }
        if lease.nacked {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("message {token} was nacked"),
            ));
        }
        Ok(())
    }

    /// What settling (acking or dead-lettering) `offsets` of `partition` changes
    /// durably; [`Group::apply`] then makes it so in memory.
    pub fn settle(&self, partition: u32, offsets: &[u64]) -> Settled {
        let cursor = &self.cursors[partition as usize];
        let settling: BTreeSet<u64> = offsets.iter().copied().collect();
        let mut floor = cursor.floor;
        let mut passed = Vec::new();
        loop {
            if cursor.acked.contains(&floor) {
                passed.push(floor);
            } else if !settling.contains(&floor) {
                break;
            }
            floor += 1;
        }
        Settled {
            floor: (floor != cursor.floor).then_some(floor),
            acked: settling.into_iter().filter(|o| *o >= floor).collect(),
            passed,
        }
    }

    /// Applies a durable [`Settled`] of `offsets` to memory.
    pub fn apply(&mut self, partition: u32, offsets: &[u64], settled: &Settled) {
        let cursor = &mut self.cursors[partition as usize];
        for offset in offsets {
            cursor.leased.remove(offset);
        }
        if let Some(floor) = settled.floor {
            cursor.floor = floor;
            cursor.next = cursor.next.max(floor);
            cursor.acked.retain(|o| *o >= floor);
            cursor.leased.retain(|o, _| *o >= floor);
        }
        cursor.acked.extend(settled.acked.iter().copied());
    }

    /// Nacks a lease: due again after the topic's backoff (or `delay`).
    pub fn nack(
        &mut self,
        token: &Token,
        reason: Option<String>,
        delay: Option<Duration>,
        config: &TopicConfig,
        now: Instant,
    ) {
        if let Some(lease) = self.cursors[token.partition as usize].leased.get_mut(&token.offset) {
            lease.until = now + delay.unwrap_or_else(|| config.backoff(lease.delivery));
            lease.nacked = true;
            lease.reason = reason.or_else(|| Some(format!("nacked on delivery {}", lease.delivery)));
        }
    }

    /// Gives a lease `by` more time.
    pub fn extend(&mut self, token: &Token, by: Duration, now: Instant) {
        if let Some(lease) = self.cursors[token.partition as usize].leased.get_mut(&token.offset) {
            lease.until = now + by;
        }
    }

    /// The earliest moment a lease falls due.
    pub fn next_due(&self) -> Option<Instant> {
        self.cursors
            .iter()
            .flat_map(|c| c.leased.values().map(|l| l.until))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicSettings;
    use bbx_core::config::TopicDefaults;

    fn config() -> TopicConfig {
        let asked = TopicSettings {
            ack_wait_ms: Some(100),
            max_deliveries: Some(3),
            backoff_ms: Some(10),
            ..TopicSettings::default()
        };
        TopicConfig::new(&TopicDefaults::default(), &asked, chrono::Utc::now()).unwrap()
    }

    const WAIT: Duration = Duration::from_millis(100);

    fn token(offset: u64, delivery: u32) -> Token {
        Token {
            partition: 0,
            offset,
            delivery,
        }
    }

    #[test]
    fn acks_out_of_order_move_the_floor_only_when_contiguous() {
        let now = Instant::now();
        let mut group = Group::new("g".into(), vec![0], vec![]);
        for offset in 0..4 {
            group.lease_new(0, offset, WAIT, now);
        }
        let settled = group.settle(0, &[1, 2]);
        assert_eq!(
            settled,
            Settled {
                floor: None,
                acked: vec![1, 2],
                passed: vec![]
            }
        );
        group.apply(0, &[1, 2], &settled);
        let settled = group.settle(0, &[0]);
        assert_eq!(
            settled,
            Settled {
                floor: Some(3),
                acked: vec![],
                passed: vec![1, 2]
            }
        );
        group.apply(0, &[0], &settled);
        assert_eq!((group.cursors[0].floor, group.cursors[0].acked.len()), (3, 0));
        assert!(group.check(&token(1, 1), now).is_err(), "acked already");
        assert!(group.check(&token(3, 1), now).is_ok());
        assert!(group.check(&token(3, 2), now).is_err(), "not that delivery");
        assert!(group.check(&token(9, 1), now).is_err(), "never delivered");
        assert!("0:3".parse::<Token>().is_err() && "0:3:1:2".parse::<Token>().is_err());
        assert_eq!("0:3:1".parse::<Token>().unwrap(), token(3, 1));
    }

    #[test]
    fn an_expired_lease_is_delivered_again_and_a_poison_message_goes_dead() {
        let config = config();
        let start = Instant::now();
        let mut group = Group::new("g".into(), vec![0], vec![]);
        group.lease_new(0, 0, WAIT, start);
        assert_eq!(
            group.due(&config, WAIT, start, 10, 0),
            Due::default(),
            "in its ack wait"
        );
        let later = start + Duration::from_millis(150);
        assert!(
            group.check(&token(0, 1), later).is_err(),
            "an expired lease cannot be acked"
        );
        assert_eq!(group.due(&config, WAIT, later, 10, 0).redeliver, vec![(0, 0, 2)]);
        group.nack(&token(0, 2), Some("bad input".into()), None, &config, later);
        assert_eq!(group.due(&config, WAIT, later, 10, 0), Due::default(), "backing off");
        let due = group.due(&config, WAIT, later + Duration::from_millis(25), 10, 0);
        assert_eq!(due.redeliver, vec![(0, 0, 3)]);
        group.nack(&token(0, 3), Some("still bad".into()), None, &config, later);
        let due = group.due(&config, WAIT, later + Duration::from_secs(1), 10, 0);
        assert_eq!(due.dead, vec![(0, 0, 3, "still bad".to_owned())], "never loops forever");
        let settled = group.settle(0, &[0]);
        group.apply(0, &[0], &settled);
        assert_eq!(group.cursors[0].floor, 1);
        assert!(group.next_due().is_none());
    }

    #[test]
    fn acks_kept_above_the_floor_are_skipped_and_the_floor_catches_up_with_retention() {
        let now = Instant::now();
        let mut group = Group::new("g".into(), vec![0], vec![BTreeSet::from([1, 3])]);
        assert!(!group.skip_acked(0, 0));
        assert!(group.skip_acked(0, 1), "acked before a restart");
        group.lease_new(0, 2, WAIT, now);
        let settled = group.caught_up(0, 3).unwrap();
        assert_eq!(
            settled,
            Settled {
                floor: Some(3),
                acked: vec![],
                passed: vec![1]
            }
        );
        group.apply(0, &[], &settled);
        assert_eq!(group.cursors[0].floor, 3);
        assert!(
            group.cursors[0].leased.is_empty(),
            "a lease on a message gone is dropped"
        );
        assert!(group.caught_up(0, 3).is_none());
    }

    #[test]
    fn due_starts_at_the_partition_it_is_given_and_finds_every_dead_letter() {
        let config = config();
        let start = Instant::now();
        let mut group = Group::new("g".into(), vec![0, 0], vec![]);
        group.lease_new(0, 0, WAIT, start);
        group.lease_new(1, 0, WAIT, start);
        let later = start + Duration::from_millis(150);
        assert_eq!(group.due(&config, WAIT, later, 1, 1).redeliver, vec![(1, 0, 2)]);
        assert_eq!(group.due(&config, WAIT, later, 1, 0).redeliver, vec![(0, 0, 2)]);
        let much_later = later + Duration::from_secs(10);
        group.due(&config, WAIT, much_later, 2, 0);
        let due = group.due(&config, WAIT, much_later + Duration::from_secs(10), 0, 0);
        assert_eq!(
            due.dead.len(),
            2,
            "with no room to redeliver, dead letters are still found: {due:?}"
        );
    }
}
