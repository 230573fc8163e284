//! How the bus lays its data out in the kernel's store: keys that sort by topic,
//! partition and offset, and the compact encoding of a message.
//!
//! A topic's keys start with its [`TopicKey`] (`tenant \0 topic \0`), so one
//! tenant's topic is never a prefix of another's. Numbers are big-endian so that
//! keys sort as the numbers do.

use bbx_core::{Error, Result};
use chrono::{DateTime, Utc};

/// `tenant \0 topic \0`: the prefix of every key of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicKey(Vec<u8>);

impl TopicKey {
    pub fn new(tenant: &str, topic: &str) -> Self {
        Self([tenant.as_bytes(), b"\0", topic.as_bytes(), b"\0"].concat())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The tenant and topic it names.
    pub fn parts(&self) -> (&str, &str) {
        let text = std::str::from_utf8(&self.0[..self.0.len() - 1]).unwrap_or_default();
        text.split_once('\0').unwrap_or((text, ""))
    }

    /// The key of message `offset` of `partition`.
    pub fn message(&self, partition: u32, offset: u64) -> Vec<u8> {
        [&self.0[..], &partition.to_be_bytes(), &offset.to_be_bytes()].concat()
    }

    /// The prefix of every message key of `partition`.
    pub fn partition(&self, partition: u32) -> Vec<u8> {
        [&self.0[..], &partition.to_be_bytes()].concat()
    }

    /// The key remembering a published message id.
    pub fn dedup(&self, id: &str) -> Vec<u8> {
        [&self.0[..], id.as_bytes()].concat()
    }

    /// The prefix of every key of consumer group `group`.
    pub fn group(&self, group: &str) -> Vec<u8> {
        [&self.0[..], group.as_bytes(), b"\0"].concat()
    }

    /// The key of a dead letter.
    pub fn dead(&self, seq: u64) -> Vec<u8> {
        [&self.0[..], &seq.to_be_bytes()].concat()
    }

    /// Reads the topic key back from a key that starts with it.
    pub fn of_key(key: &[u8]) -> Option<Self> {
        let first = key.iter().position(|b| *b == 0)?;
        let second = first + 1 + key[first + 1..].iter().position(|b| *b == 0)?;
        Some(Self(key[..=second].to_vec()))
    }
}

/// The partition and offset at the end of a message key.
pub fn position(key: &[u8]) -> Option<(u32, u64)> {
    let tail = key.len().checked_sub(12)?;
    let partition = u32::from_be_bytes(key[tail..tail + 4].try_into().ok()?);
    let offset = u64::from_be_bytes(key[tail + 4..].try_into().ok()?);
    Some((partition, offset))
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    /// The ordering key it was published with.
    pub key: Option<String>,
    pub published_at: DateTime<Utc>,
    /// The payload's JSON text.
    pub payload: Vec<u8>,
}

/// The encoding's version: the first byte of every stored message.
const VERSION: u8 = 1;

impl Stored {
    /// `VERSION, published_at (ms, i64), id (u16 length), key (u16 length, 0xFFFF
    /// for none), payload`.
    pub fn encode(&self) -> Vec<u8> {
        let key = self.key.as_deref().unwrap_or_default();
        let mut out = Vec::with_capacity(13 + self.id.len() + key.len() + self.payload.len());
        out.push(VERSION);
        out.extend_from_slice(&self.published_at.timestamp_millis().to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
        match &self.key {
            Some(key) => {
                out.extend_from_slice(&(key.len() as u16).to_be_bytes());
                out.extend_from_slice(key.as_bytes());
            }
            None => out.extend_from_slice(&u16::MAX.to_be_bytes()),
        }
        out.extend_from_slice(&self.payload);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let broken = || Error::internal("a stored bus message is unreadable");
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(broken)?;
            rest = tail;
            Ok(head)
        };
        if take(1)? != [VERSION] {
            return Err(broken());
        }
        let millis = i64::from_be_bytes(take(8)?.try_into().map_err(|_| broken())?);
        let id_len = u16::from_be_bytes(take(2)?.try_into().map_err(|_| broken())?);
        let id = String::from_utf8(take(usize::from(id_len))?.to_vec()).map_err(|_| broken())?;
        let key_len = u16::from_be_bytes(take(2)?.try_into().map_err(|_| broken())?);
        let key = match key_len {
            u16::MAX => None,
            len => Some(String::from_utf8(take(usize::from(len))?.to_vec()).map_err(|_| broken())?),
        };
        Ok(Self {
            id,
            key,
            published_at: DateTime::from_timestamp_millis(millis).ok_or_else(broken)?,
            payload: rest.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_message_reads_back_as_written(
            id in "[a-z0-9-]{0,64}",
            key in proptest::option::of("[ -~]{0,300}"),
            millis in 0i64..4_000_000_000_000,
            payload in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let stored = Stored { id, key, published_at: DateTime::from_timestamp_millis(millis).unwrap(), payload };
            prop_assert_eq!(Stored::decode(&stored.encode()).unwrap(), stored);
        }

        #[test]
        fn no_bytes_make_decoding_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Stored::decode(&bytes);
        }

        #[test]
        fn keys_sort_by_partition_then_offset(a in (0u32..300, any::<u64>()), b in (0u32..300, any::<u64>())) {
            let topic = TopicKey::new("acme", "orders");
            let (ka, kb) = (topic.message(a.0, a.1), topic.message(b.0, b.1));
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(position(&ka), Some(a));
            prop_assert_eq!(TopicKey::of_key(&ka), Some(topic.clone()));
        }
    }

    #[test]
    fn a_topic_key_names_its_tenant_and_topic() {
        let topic = TopicKey::new("acme", "orders.eu");
        assert_eq!(topic.parts(), ("acme", "orders.eu"));
        assert!(!topic.as_bytes().starts_with(TopicKey::new("acme", "orders").as_bytes()));
    }
}
