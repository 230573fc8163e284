//! The ring's keyspaces and writes, staged through [`bbx_store`]: completions with
//! their effects, idempotency keys and charges ([`Write::Complete`]), the settling
//! of ops in doubt, and the expiry of old completions. Each [`Write`] checks its
//! preconditions against the group so far, then stages its keys.
//!
//! Layout (all keys big-endian or raw bytes, so key order is the listing order):
//! - `ops`:      op id (16 bytes, time-ordered)       -> Completion as JSON
//! - `idem`:     agent id (16 bytes), idempotency key -> op id (16 bytes), args digest
//! - `doubt`:    op id (16 bytes)                    -> the journal entry of an op in doubt

use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
pub use bbx_store::{Applied, Store, storage_error};
use bbx_store::{GroupTx, KeyspaceDef, Staged};
use chrono::{DateTime, Utc};
use std::sync::Arc;

mod codec;

pub use codec::*;

/// A write the committer applies atomically, or not at all.
#[derive(Debug)]
pub enum Write {
    /// Records an op's completion and, for a kernel-service op, applies its effect in
    /// the same atomic batch: after a crash either both are there or neither is. An
    /// effect that fails turns the completion into that error and changes nothing.
    Complete {
        completion: Arc<Completion>,
        effect: Option<Arc<dyn bbx_component::EffectOp>>,
        /// The args digest, recorded with the key so a later duplicate is recognized.
        digest: Option<String>,
        /// For an `in_doubt` completion: the op's journal entry, kept until an
        /// operator resolves it.
        doubt: Option<Vec<u8>>,
        /// Micro-dollars to add to each of these spend counters.
        charge: Option<(Vec<String>, u64)>,
    },
    /// Settles an op in doubt: replaces its completion with `completion`, or, with
    /// none, removes it so the op can run again. Refused unless the op is in doubt.
    Resolve {
        op_id: OpId,
        completion: Option<Box<Completion>>,
    },
    /// Forgets up to `max` completions (and their idempotency keys) of ops that
    /// completed before `before`.
    ExpireOps {
        before: DateTime<Utc>,
        max: usize,
        /// Where the previous step of the sweep stopped: the ops before it that are
        /// left (in doubt, or completed late) are not read again.
        after: Option<OpId>,
    },
}

/// The ring's keyspaces. Their ids are what redo records carry: never change one.
pub const OPS: KeyspaceDef = KeyspaceDef { id: 5, name: "ops" };
pub const IDEM: KeyspaceDef = KeyspaceDef { id: 6, name: "idem" };
pub const DOUBT: KeyspaceDef = KeyspaceDef { id: 7, name: "doubt" };
pub const KEYSPACES: [KeyspaceDef; 3] = [OPS, IDEM, DOUBT];

impl Staged for Write {
    /// Checks the write's preconditions, then stages it. Every fallible read comes
    /// before the first `put`, so a write that fails stages nothing.
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        stage(tx, self)
    }
}

fn stage(tx: &mut GroupTx, write: &Write) -> Result<Applied> {
    match write {
        Write::Complete {
            completion,
            effect,
            digest,
            doubt,
            charge,
        } => {
            let mut completion = Box::new(Completion::clone(completion));
            if let Some(effect) = effect {
                let staging = bbx_component::Staging {
                    op_id: completion.op_id,
                    agent: &completion.agent,
                    tenant: &completion.tenant,
                    at: completion.completed_at,
                    labels: &completion.labels,
                };
                match effect.stage(tx, &staging) {
                    Ok(result) => completion.result = Some(result),
                    Err(error) => {
                        completion.status = CompletionStatus::Error;
                        completion.error = Some(error);
                    }
                }
            }
            let mut encoded = encode_completion(&completion)?;
            if encoded.len() > tx.max_value() && effect.is_none() {
                // Too large to journal (a tool's huge output): the op ends with
                // an error naming the size, instead of never ending at all.
                completion.status = CompletionStatus::Error;
                completion.result = None;
                completion.error = Some(Error::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the op's completion is {} bytes; at most {} bytes can be recorded",
                        encoded.len(),
                        tx.max_value()
                    ),
                ));
                encoded = encode_completion(&completion)?;
            }
            tx.put(OPS, completion.op_id.as_bytes().to_vec(), encoded);
            if let (Some(key), Some(digest)) = (&completion.idempotency_key, digest) {
                let mut value = completion.op_id.as_bytes().to_vec();
                value.extend_from_slice(digest.as_bytes());
                tx.put(IDEM, idempotency_key(&completion.agent, key), value);
            }
            if let Some(entry) = doubt {
                tx.put(DOUBT, completion.op_id.as_bytes().to_vec(), entry.clone());
            }
            if let Some((keys, micros)) = charge {
                bbx_quota::stored::stage_charge(tx, keys, *micros)?;
            }
            Ok(Applied::output(completion))
        }
        Write::Resolve { op_id, completion } => {
            let key = op_id.as_bytes().to_vec();
            let current = tx
                .read(OPS, &key)?
                .map(|bytes| decode_completion(&bytes))
                .transpose()?
                .ok_or_else(|| Error::not_found("op", op_id))?;
            let entry = tx.read(DOUBT, &key)?;
            let (CompletionStatus::InDoubt, Some(entry)) = (current.status, entry) else {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("op {op_id} is not in doubt (it is {})", current.status.as_str()),
                ));
            };
            match completion {
                Some(completion) => tx.put(OPS, key.clone(), encode_completion(completion)?),
                None => tx.remove(OPS, key.clone()),
            }
            tx.remove(DOUBT, key);
            Ok(Applied::output(entry))
        }
        Write::ExpireOps { before, max, after } => {
            // An op in doubt waits for an operator, however old it is: it is
            // passed over, and the step ends only when `max` others are found
            // or the old ops run out (so old ops in doubt cannot stall expiry).
            // An op completes after it is submitted, and op ids are ordered by
            // submission: every op that completed in time is in this range; the
            // ones of it that completed later (long runs) are passed over too.
            let submitted_before = OpId::lowest_at(before.timestamp_millis().max(0) as u64);
            let start = match after {
                Some(id) => std::ops::Bound::Excluded(id.as_bytes().to_vec()),
                None => std::ops::Bound::Unbounded,
            };
            let end = std::ops::Bound::Excluded(submitted_before.as_bytes().to_vec());
            let mut expired = Vec::new();
            let mut resume = None;
            for item in tx.keyspace(OPS)?.range((start, end)) {
                let value = item.value().map_err(|e| storage_error("scan ops", e))?;
                let completion = decode_completion(&value)?;
                if completion.status == CompletionStatus::InDoubt || completion.completed_at >= *before {
                    continue;
                }
                expired.push(completion);
                if expired.len() == *max {
                    resume = expired.last().map(|c| c.op_id);
                    break;
                }
            }
            let count = expired.len();
            for completion in expired {
                if let Some(idempotency) = &completion.idempotency_key {
                    tx.remove(IDEM, idempotency_key(&completion.agent, idempotency));
                }
                tx.remove(OPS, completion.op_id.as_bytes().to_vec());
            }
            Ok(Applied::output(Expired { count, resume }))
        }
    }
}

/// What one expiry step forgot: how many completions, and where the next step
/// goes on (none: the sweep is done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub count: usize,
    pub resume: Option<OpId>,
}

#[cfg(test)]
mod tests;
