//! What the ring writes to the journal: one [`Entry`] per record.
//!
//! An accepted op is journaled whole ([`OpRecord`]), so recovery can run it again
//! from the record alone. Entries are tagged, so that later kinds of entry (the
//! `started` mark of tools with external effects) extend the format instead of
//! replacing it.
//!
//! An op with external effects gets a second entry, [`Entry::Started`], made
//! durable before its executor first runs. Recovery reads the pair: accepted and
//! never started means it is safe to run; started without a completion means the
//! world may or may not have seen its effect, and it is reported `in_doubt`
//! instead of being run again.

use bbx_core::compact::{Reader, put_instant, put_str};
use bbx_core::op::{Priority, RetryPolicy, TraceContext};
use bbx_core::quota::Reservation;
use bbx_core::{AgentId, Error, OpId, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

/// The idempotency key of an op and the digest of what it was submitted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: String,
    pub digest: String,
}

/// An accepted op, as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    pub op_id: OpId,
    pub agent: AgentId,
    pub tenant: Arc<str>,
    pub kind: Cow<'static, str>,
    pub args: Value,
    pub priority: Priority,
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<OpId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency: Option<Idempotency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    pub submitted_at: DateTime<Utc>,
    /// 0 when submitted; one more each time an operator retries it after it was
    /// in doubt (the op is journaled again under the same id).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnation: u32,
    /// Held for approval when it was accepted. An approval journals the record
    /// again without it, so that recovery finds the op held exactly while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// What the components' checks said of the op (see [`Completion::labels`]).
    ///
    /// [`Completion::labels`]: bbx_core::op::Completion::labels
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The run it is a step of: what it reads from outside taints that run's
    /// later ops (and the agent's own, outside runs, do too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// Why an op waits for approval, who held it, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The component whose check held it (a policy engine, say).
    pub by: String,
    pub reason: String,
    /// Denied if not approved by then.
    pub until: DateTime<Utc>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The first byte of an [`Entry::Accepted`] in its compact form. Entries in JSON
/// start with `{`, and the store's redo records, which share the journal, with a
/// tag of their own.
const COMPACT_ACCEPTED: u8 = 1;

impl OpRecord {
    /// This op's [`Entry::Accepted`], encoded without copying the record (its args
    /// included) into an entry first. An op that uses none of the rarely set fields
    /// (retries, dependencies, an idempotency key, user data, trace context, a hold) is
    /// written compact: ids, numbers and the time in place, strings behind a u16
    /// length, only `args` as JSON. That is under half the bytes of its JSON (about
    /// 100 against 250 for a `state.set`), and formats no id and no date, on the path
    /// of every journaled op.
    pub fn encode_accepted(&self) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(tag = "entry", rename_all = "snake_case")]
        enum Borrowed<'a> {
            Accepted(&'a OpRecord),
        }
        let compact = self.retries.is_none()
            && self.depends_on.is_empty()
            && self.idempotency.is_none()
            && self.user_data.is_none()
            && self.trace.is_none()
            && self.hold.is_none()
            && self.labels.is_empty()
            && self.run.is_none()
            && self.tenant.len() <= usize::from(u16::MAX)
            && self.kind.len() <= usize::from(u16::MAX);
        if !compact {
            return serde_json::to_vec(&Borrowed::Accepted(self)).expect("journal entries always serialize");
        }
        let mut bytes = Vec::with_capacity(96 + self.tenant.len() + self.kind.len());
        bytes.push(COMPACT_ACCEPTED);
        bytes.extend_from_slice(self.op_id.as_bytes());
        bytes.extend_from_slice(self.agent.as_bytes());
        bytes.push(self.priority.rank() as u8);
        bytes.extend_from_slice(&self.timeout_ms.to_le_bytes());
        put_instant(&mut bytes, self.submitted_at);
        bytes.extend_from_slice(&self.incarnation.to_le_bytes());
        put_str(&mut bytes, &self.tenant);
        put_str(&mut bytes, &self.kind);
        serde_json::to_writer(&mut bytes, &self.args).expect("journal entries always serialize");
        bytes
    }

    /// Reads what [`Self::encode_accepted`] wrote compact (after its first byte).
    fn decode_compact(bytes: &[u8]) -> Option<Self> {
        let mut reader = Reader(bytes);
        let op_id = OpId::from_bytes(reader.array()?);
        let agent = AgentId::from_bytes(reader.array()?);
        let priority = *Priority::ALL.get(usize::from(reader.u8()?))?;
        let timeout_ms = reader.u64()?;
        let submitted_at = reader.instant()?;
        let incarnation = reader.u32()?;
        let tenant = reader.str()?;
        let kind = reader.str()?;
        let args = serde_json::from_slice(reader.0).ok()?;
        Some(Self {
            op_id,
            agent,
            tenant: tenant.into(),
            kind: kind.into(),
            args,
            priority,
            timeout_ms,
            retries: None,
            depends_on: Vec::new(),
            idempotency: None,
            user_data: None,
            trace: None,
            submitted_at,
            incarnation,
            hold: None,
            labels: Vec::new(),
            run: None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
// An entry lives only from being built to being encoded (or from being decoded to
// being read): never held in bulk, so boxing the record would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Entry {
    Accepted(OpRecord),
    /// The op's executor is about to touch the world for the first time.
    Started {
        op_id: OpId,
        #[serde(default)]
        incarnation: u32,
        /// The budget reserved for it, charged in full if it ends in doubt.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reserved: Option<Reservation>,
    },
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Accepted(record) => record.encode_accepted(),
            Self::Started { .. } => serde_json::to_vec(self).expect("journal entries always serialize"),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        match bytes.split_first() {
            Some((&COMPACT_ACCEPTED, compact)) => OpRecord::decode_compact(compact)
                .map(Self::Accepted)
                .ok_or_else(|| Error::internal("a journal record is unreadable: its compact form is damaged")),
            _ => serde_json::from_slice(bytes)
                .map_err(|e| Error::internal(format!("a journal record is unreadable: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("\\PC{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn entries_round_trip(args in json_value(), kind in "[a-z.]{1,12}", priority in 0usize..4,
                              timeout_ms in any::<u64>(), key in proptest::option::of("\\PC{1,20}"),
                              deps in 0usize..3, retries in any::<bool>(), tenant in "\\PC{0,12}",
                              held in any::<bool>(), labelled in any::<bool>(),
                              seconds in 0i64..4_000_000_000, nanos in 0u32..1_000_000_000) {
            let record = OpRecord {
                op_id: OpId::generate(),
                agent: AgentId::generate(),
                tenant: tenant.into(),
                kind: kind.into(),
                args,
                priority: Priority::ALL[priority],
                timeout_ms,
                retries: retries.then_some(RetryPolicy { count: 2, backoff_ms: 5, max_backoff_ms: 9 }),
                depends_on: (0..deps).map(|_| OpId::generate()).collect(),
                idempotency: key.map(|key| Idempotency { key, digest: "d".into() }),
                user_data: None,
                trace: None,
                labels: if labelled { vec!["taint:web".into()] } else { Vec::new() },
                run: labelled.then(|| "run-1".to_owned()),
                submitted_at: DateTime::from_timestamp(seconds, nanos).unwrap(),
                incarnation: priority as u32,
                hold: held.then(|| Hold {
                    by: "flow".into(),
                    reason: "needs a look".into(),
                    until: DateTime::from_timestamp(seconds, 0).unwrap(),
                }),
            };
            let started = Entry::Started {
                op_id: record.op_id,
                incarnation: 2,
                reserved: Some(Reservation {
                    micros: timeout_ms,
                    tokens: 7,
                    nodes: vec!["tenant/t".into(), "group/t/g".into()],
                    day: "2026-11-24".into(),
                    month: "2026-11".into(),
                }),
            };
            let borrowed = record.encode_accepted();
            let rare = record.retries.is_some()
                || !record.depends_on.is_empty()
                || record.idempotency.is_some()
                || record.hold.is_some()
                || !record.labels.is_empty();
            prop_assert_eq!(borrowed[0] == COMPACT_ACCEPTED, !rare);
            let entry = Entry::Accepted(record);
            prop_assert_eq!(&borrowed, &entry.encode());
            prop_assert_eq!(Entry::decode(&entry.encode()).unwrap(), entry);
            prop_assert_eq!(Entry::decode(&started.encode()).unwrap(), started);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = Entry::decode(&bytes);
            let _ = Entry::decode(&[&[COMPACT_ACCEPTED], bytes.as_slice()].concat());
        }
    }

    #[test]
    fn a_cut_compact_record_is_an_error() {
        let record = OpRecord {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "acme".into(),
            kind: "state.set".into(),
            args: serde_json::json!({"key": "d1", "value": 7}),
            priority: Priority::Normal,
            timeout_ms: 30_000,
            retries: None,
            depends_on: Vec::new(),
            idempotency: None,
            user_data: None,
            trace: None,
            labels: Vec::new(),
            run: None,
            submitted_at: DateTime::from_timestamp(1_700_000_000, 5).unwrap(),
            incarnation: 0,
            hold: None,
        };
        let bytes = record.encode_accepted();
        assert_eq!(bytes[0], COMPACT_ACCEPTED);
        assert!(bytes.len() * 2 < serde_json::to_vec(&Entry::Accepted(record.clone())).unwrap().len());
        assert_eq!(Entry::decode(&bytes).unwrap(), Entry::Accepted(record));
        for cut in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
