//! The ring's completion writes: what a completion too large to journal becomes,
//! and the two forms a stored completion is read in.

use super::codec::COMPACT_COMPLETION;
use super::*;
use bbx_store::DetachedStore;
use serde_json::json;

fn fresh() -> (tempfile::TempDir, DetachedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DetachedStore::open(dir.path(), &KEYSPACES).unwrap();
    (dir, store)
}

#[test]
fn a_completion_too_large_to_journal_is_recorded_as_an_error() {
    let (_dir, mut store) = fresh();
    let completion = Completion {
        op_id: OpId::generate(),
        agent: AgentId::generate(),
        tenant: "t".into(),
        kind: "tool.http".into(),
        status: CompletionStatus::Ok,
        result: Some(json!("x".repeat(5000))),
        error: None,
        attempts: 1,
        queue_us: 0,
        exec_us: 0,
        total_us: 0,
        submitted_at: Utc::now(),
        completed_at: Utc::now(),
        idempotency_key: None,
        user_data: None,
        trace: None,
        labels: Vec::new(),
    };
    let write = Write::Complete {
        completion: Arc::new(completion),
        effect: None,
        digest: None,
        doubt: None,
        charge: None,
    };
    let recorded: Box<Completion> = store
        .group(1000, |tx| {
            let recorded = write.stage(tx).unwrap().into_output().unwrap();
            assert!(tx.writes().all(|(_, _, v)| v.is_none_or(|v| v.len() <= 1000)));
            recorded
        })
        .unwrap();
    assert_eq!(recorded.status, CompletionStatus::Error);
    assert_eq!(recorded.error.unwrap().code, ErrorCode::PayloadTooLarge);
}

#[test]
fn completions_are_stored_compact_where_they_can_be_and_read_in_either_form() {
    let plain = Completion {
        op_id: OpId::generate(),
        agent: AgentId::generate(),
        tenant: "t".into(),
        kind: "state.set".into(),
        status: CompletionStatus::Ok,
        result: Some(json!({"key": "k", "version": 3})),
        error: None,
        attempts: 1,
        queue_us: 5,
        exec_us: 6,
        total_us: 11,
        submitted_at: Utc::now(),
        completed_at: Utc::now(),
        idempotency_key: None,
        user_data: None,
        trace: None,
        labels: Vec::new(),
    };
    let compact = encode_completion(&plain).unwrap();
    assert_eq!(compact[0], COMPACT_COMPLETION);
    assert_eq!(decode_completion(&compact).unwrap(), plain);
    // What earlier versions stored, and what a completion with a rare field is.
    let json = serde_json::to_vec(&plain).unwrap();
    assert!(
        compact.len() * 2 < json.len(),
        "{} against {}",
        compact.len(),
        json.len()
    );
    assert_eq!(decode_completion(&json).unwrap(), plain);
    let keyed = Completion {
        idempotency_key: Some("k1".into()),
        ..plain
    };
    let stored = encode_completion(&keyed).unwrap();
    assert_eq!(stored[0], b'{');
    assert_eq!(decode_completion(&stored).unwrap(), keyed);
    assert!(decode_completion(&compact[..compact.len() / 2]).is_err());
}
