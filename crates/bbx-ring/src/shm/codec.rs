//! The messages of the shared-memory ring.
//!
//! Each message opens with the client's tag (a little-endian u64, echoed in the
//! completion) and a form byte. The common shapes of an op and of a completion, those
//! that use none of the rarely set fields (retries, dependencies, keys, user data,
//! trace context, an error), have a compact binary form: ids and numbers in place,
//! strings behind a length, and only the free-form values (`args`, `result`) as JSON
//! text (a completion's is [`bbx_core::compact`]'s, which the store keeps too).
//! Everything else, refusals included, travels as JSON. So a `noop`'s round
//! trip formats no date and parses no id, which is most of what JSON cost it.
//!
//! The kernel decodes what a client wrote, so every length is checked and a bad
//! message is an error, never a panic.

use bbx_core::compact::{self, Reader, put_str};
use bbx_core::op::{Completion, Priority, SubmitOp};
use bbx_core::{AgentId, Error};
use serde_json::Value;

const SUBMISSION_JSON: u8 = 0;
const SUBMISSION_COMPACT: u8 = 1;
const COMPLETION_JSON: u8 = 0;
const REFUSAL_JSON: u8 = 1;
const COMPLETION_COMPACT: u8 = 2;

/// A submission: the tag, then the op.
pub fn encode_submission(tag: u64, op: &SubmitOp, into: &mut Vec<u8>) {
    into.clear();
    into.extend_from_slice(&tag.to_le_bytes());
    let compact = op.retries.is_none()
        && op.depends_on.is_empty()
        && op.idempotency_key.is_none()
        && op.run_id.is_none()
        && op.step.is_none()
        && op.user_data.is_none()
        && op.trace.is_none()
        && op.kind.len() <= usize::from(u16::MAX);
    if compact {
        into.push(SUBMISSION_COMPACT);
        into.extend_from_slice(op.agent.as_bytes());
        into.push(op.priority.rank() as u8);
        match op.timeout_ms {
            Some(ms) => {
                into.push(1);
                into.extend_from_slice(&ms.to_le_bytes());
            }
            None => into.push(0),
        }
        put_str(into, &op.kind);
        json_into(into, &op.args);
    } else {
        into.push(SUBMISSION_JSON);
        json_into(into, op);
    }
}

pub fn decode_submission(message: &[u8]) -> Result<(u64, SubmitOp), (Option<u64>, Error)> {
    let mut reader = Reader(message);
    let tag = reader
        .u64()
        .ok_or((None, Error::malformed("a submission is shorter than its tag")))?;
    let malformed = |what: String| {
        (
            Some(tag),
            Error::malformed(format!("the submitted op is not valid: {what}")),
        )
    };
    match reader.u8() {
        Some(SUBMISSION_COMPACT) => {
            let truncated = || malformed("it ends early".into());
            let agent = AgentId::from_bytes(reader.array().ok_or_else(truncated)?);
            let priority = reader.u8().ok_or_else(truncated)?;
            let priority = *Priority::ALL
                .get(usize::from(priority))
                .ok_or_else(|| malformed(format!("priority {priority} is not one of 0 to 3")))?;
            let timeout_ms = match reader.u8().ok_or_else(truncated)? {
                0 => None,
                1 => Some(reader.u64().ok_or_else(truncated)?),
                other => return Err(malformed(format!("timeout flag {other} is not 0 or 1"))),
            };
            let kind = reader
                .str()
                .ok_or_else(|| malformed("the kind is cut short or not UTF-8".into()))?;
            let args: Value = serde_json::from_slice(reader.0).map_err(|e| malformed(e.to_string()))?;
            let mut op = SubmitOp::new(agent, kind, args);
            op.priority = priority;
            op.timeout_ms = timeout_ms;
            Ok((tag, op))
        }
        Some(SUBMISSION_JSON) => serde_json::from_slice(reader.0)
            .map(|op| (tag, op))
            .map_err(|e| malformed(e.to_string())),
        Some(other) => Err(malformed(format!("form {other} is unknown"))),
        None => Err(malformed("it has no form byte".into())),
    }
}

/// A completion message: the tag, then either the op's completion or the reason
/// the submission was refused.
pub fn encode_completion(tag: u64, outcome: Result<&Completion, &Error>, into: &mut Vec<u8>) {
    into.clear();
    into.extend_from_slice(&tag.to_le_bytes());
    match outcome {
        Ok(completion) => {
            let form = into.len();
            into.push(COMPLETION_COMPACT);
            if !compact::encode_completion(completion, into) {
                into[form] = COMPLETION_JSON;
                json_into(into, completion);
            }
        }
        Err(error) => {
            into.push(REFUSAL_JSON);
            json_into(into, error);
        }
    }
}

pub fn decode_completion(message: &[u8]) -> Result<(u64, Result<Completion, Error>), Error> {
    let mut reader = Reader(message);
    let tag = reader.u64().ok_or_else(|| malformed("too short"))?;
    match reader.u8() {
        Some(COMPLETION_COMPACT) => {
            let completion =
                compact::decode_completion(reader.0).ok_or_else(|| malformed("a field is cut short or invalid"))?;
            Ok((tag, Ok(completion)))
        }
        Some(COMPLETION_JSON) => Ok((tag, Ok(json(reader.0)?))),
        Some(REFUSAL_JSON) => Ok((tag, Err(json(reader.0)?))),
        _ => Err(malformed("unknown outcome")),
    }
}

fn malformed(what: &str) -> Error {
    Error::internal(format!("the kernel sent a malformed completion: {what}"))
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| malformed(&e.to_string()))
}

fn json_into(into: &mut Vec<u8>, value: &impl serde::Serialize) {
    // Writing these types to a Vec cannot fail: their maps have string keys.
    let _ = serde_json::to_writer(&mut *into, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_core::OpId;
    use bbx_core::op::{CompletionStatus, RetryPolicy, TraceContext};
    use chrono::DateTime;
    use proptest::prelude::*;
    use serde_json::json;

    fn completion(result: Option<Value>) -> Completion {
        let at = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        Completion {
            op_id: OpId::generate(),
            agent: AgentId::generate(),
            tenant: "acme".into(),
            kind: "noop".into(),
            status: CompletionStatus::Timeout,
            result,
            error: None,
            attempts: 3,
            queue_us: 1,
            exec_us: 2,
            total_us: 3,
            submitted_at: at,
            completed_at: at + chrono::Duration::microseconds(3),
            idempotency_key: None,
            user_data: None,
            trace: None,
            labels: Vec::new(),
        }
    }

    fn round_trip(completion: &Completion) -> Completion {
        let mut buf = Vec::new();
        encode_completion(9, Ok(completion), &mut buf);
        let (tag, back) = decode_completion(&buf).unwrap();
        assert_eq!(tag, 9);
        back.unwrap()
    }

    #[test]
    fn common_completions_travel_compact_and_the_rest_as_json() {
        for result in [None, Some(json!({"slept_ms": 5}))] {
            let plain = completion(result);
            let mut buf = Vec::new();
            encode_completion(1, Ok(&plain), &mut buf);
            assert_eq!(buf[8], COMPLETION_COMPACT);
            assert_eq!(round_trip(&plain), plain);
        }
        // As through JSON, a null result reads back as none.
        let null = completion(Some(Value::Null));
        let through_json: Completion = serde_json::from_slice(&serde_json::to_vec(&null).unwrap()).unwrap();
        assert_eq!(through_json.result, None);
        assert_eq!(round_trip(&null), through_json);
        let keyed = Completion {
            idempotency_key: Some("k".into()),
            error: Some(Error::malformed("bad")),
            ..completion(None)
        };
        let mut buf = Vec::new();
        encode_completion(1, Ok(&keyed), &mut buf);
        assert_eq!(buf[8], COMPLETION_JSON);
        assert_eq!(round_trip(&keyed), keyed);
        encode_completion(7, Err(&Error::malformed("no")), &mut buf);
        let (tag, outcome) = decode_completion(&buf).unwrap();
        assert_eq!((tag, outcome.unwrap_err().message), (7, "no".to_owned()));
        assert!(decode_completion(&[0; 9]).is_err(), "a JSON form with no JSON");
        assert!(decode_completion(&[0; 8]).is_err());
    }

    #[test]
    fn ops_with_rare_fields_travel_as_json() {
        let agent = AgentId::generate();
        let mut op = SubmitOp::new(agent, "state.set", json!({"key": "k", "value": 1}));
        op.retries = Some(RetryPolicy {
            count: 2,
            backoff_ms: 10,
            max_backoff_ms: 100,
        });
        op.trace = Some(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: None,
        });
        let mut buf = Vec::new();
        encode_submission(5, &op, &mut buf);
        assert_eq!(buf[8], SUBMISSION_JSON);
        assert_eq!(decode_submission(&buf).unwrap(), (5, op));
    }

    #[test]
    fn malformed_submissions_are_refused_with_their_tag() {
        assert!(decode_submission(b"short").unwrap_err().0.is_none());
        let mut buf = Vec::new();
        encode_submission(3, &SubmitOp::new(AgentId::generate(), "noop", Value::Null), &mut buf);
        buf[8 + 1 + 16] = 9;
        let (tag, error) = decode_submission(&buf).unwrap_err();
        assert_eq!(tag, Some(3));
        assert!(error.message.contains("priority 9"), "{}", error.message);
        buf[8] = 7;
        assert!(decode_submission(&buf).unwrap_err().1.message.contains("form 7"));
    }

    proptest! {
        #[test]
        fn compact_submissions_round_trip(
            kind in "[a-z.]{0,20}",
            priority in 0usize..4,
            timeout_ms in proptest::option::of(any::<u64>()),
            args in prop_oneof![Just(Value::Null), any::<i64>().prop_map(Value::from), "[ -~]{0,30}".prop_map(Value::from)],
        ) {
            let mut op = SubmitOp::new(AgentId::generate(), kind, args);
            op.priority = Priority::ALL[priority];
            op.timeout_ms = timeout_ms;
            let mut buf = Vec::new();
            encode_submission(11, &op, &mut buf);
            prop_assert_eq!(buf[8], SUBMISSION_COMPACT);
            prop_assert_eq!(decode_submission(&buf).unwrap(), (11, op));
        }

        /// Whatever a client writes, decoding answers; it never panics.
        #[test]
        fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..120), form in 0u8..3) {
            let mut message = bytes.clone();
            if message.len() > 8 {
                message[8] = form;
            }
            let _ = decode_submission(&message);
            let _ = decode_completion(&message);
        }
    }
}
