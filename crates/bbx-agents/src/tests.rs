//! Agent and state writes, group by group: what each sees of the writes before
//! it, what a refused one leaves, and what the journal alone rebuilds.

use super::*;
use bbx_core::ErrorCode;
use bbx_core::model::AgentStatus;
use bbx_store::DetachedStore;
use chrono::Utc;

fn agent() -> Agent {
    Agent {
        id: AgentId::generate(),
        name: "a".into(),
        tenant: "t".into(),
        labels: Default::default(),
        status: AgentStatus::Idle,
        created_at: Utc::now(),
        tools: Default::default(),
    }
}

fn set(agent: &Agent, key: &str, if_version: Option<u64>) -> AgentWrite {
    AgentWrite::SetState {
        agent: agent.id,
        key: key.into(),
        value: b"1".to_vec(),
        if_version,
        at: Utc::now(),
        labels: Vec::new(),
    }
}

fn delete(agent: &Agent, key: &str, if_version: Option<u64>) -> AgentWrite {
    AgentWrite::DeleteState {
        agent: agent.id,
        key: key.into(),
        if_version,
        at: Utc::now(),
    }
}

fn code(result: Result<Applied>) -> ErrorCode {
    result.unwrap_err().code
}

/// The kernel's keyspaces without a committer: groups are driven by hand.
fn fresh() -> (tempfile::TempDir, DetachedStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DetachedStore::open(dir.path(), &KEYSPACES).unwrap();
    (dir, store)
}

fn count(store: &DetachedStore) -> u64 {
    store
        .keyspace(META)
        .get(AGENT_COUNT)
        .unwrap()
        .map_or(0, |v| decode_u64(&v))
}

#[test]
fn writes_in_one_group_see_each_other() {
    let (_dir, mut store) = fresh();
    let a = agent();
    store
        .group(usize::MAX, |tx| {
            assert_eq!(AgentWrite::Create(a.clone()).stage(tx).unwrap(), Applied::Done);
            assert_eq!(set(&a, "k", Some(0)).stage(tx).unwrap(), Applied::Version(1));
            // A second create-only CAS in the same group sees the first.
            assert_eq!(code(set(&a, "k", Some(0)).stage(tx)), ErrorCode::VersionConflict);
            assert_eq!(set(&a, "k", Some(1)).stage(tx).unwrap(), Applied::Version(2));
        })
        .unwrap();
    let stored = store.keyspace(STATE).get(state_key(&a.id, "k")).unwrap().unwrap();
    assert_eq!(decode_state(&stored).unwrap().version, 2);
    assert_eq!(count(&store), 1);
}

#[test]
fn a_deleted_agents_state_is_purged_in_bounded_steps() {
    let (_dir, mut store) = fresh();
    let a = agent();
    store
        .group(usize::MAX, |tx| {
            AgentWrite::Create(a.clone()).stage(tx).unwrap();
            for i in 0..5 {
                set(&a, &format!("k{i}"), None).stage(tx).unwrap();
            }
        })
        .unwrap();
    let purge = AgentWrite::PurgeState {
        agent: a.id,
        max_keys: 2,
    };
    store
        .group(usize::MAX, |tx| {
            set(&a, "staged-in-the-same-group", None).stage(tx).unwrap();
            AgentWrite::Delete(a.id).stage(tx).unwrap();
            // Once deleted, the agent takes no more writes in the same group.
            assert_eq!(code(set(&a, "after", None).stage(tx)), ErrorCode::NotFound);
            assert_eq!(purge.stage(tx).unwrap(), Applied::More, "a bounded step");
        })
        .unwrap();
    assert!(store.keyspace(AGENTS).get(a.id.as_bytes()).unwrap().is_none());
    assert_eq!(count(&store), 0);
    assert!(
        store.keyspace(META).get(purge_marker(&a.id)).unwrap().is_some(),
        "the purge is remembered"
    );

    let mut steps = 1;
    loop {
        let applied = store.group(usize::MAX, |tx| purge.stage(tx).unwrap()).unwrap();
        steps += 1;
        if applied == Applied::Done {
            break;
        }
    }
    assert_eq!(steps, 3, "6 keys, 2 per step, and a last step that finds fewer than 2");
    assert_eq!(store.keyspace(STATE).prefix(a.id.as_bytes()).count(), 0);
    assert!(store.keyspace(META).get(purge_marker(&a.id)).unwrap().is_none());
}

#[test]
fn a_refused_write_stages_nothing() {
    let (_dir, mut store) = fresh();
    let a = agent();
    store
        .group(usize::MAX, |tx| {
            assert_eq!(code(set(&a, "k", None).stage(tx)), ErrorCode::NotFound);
            assert_eq!(code(AgentWrite::Delete(a.id).stage(tx)), ErrorCode::NotFound);
            assert!(tx.is_empty());
            AgentWrite::Create(a.clone()).stage(tx).unwrap();
            let staged: Vec<_> = tx
                .writes()
                .map(|(i, k, v)| (i, k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect();
            assert_eq!(code(set(&a, "k", Some(3)).stage(tx)), ErrorCode::VersionConflict);
            assert_eq!(code(delete(&a, "k", None).stage(tx)), ErrorCode::NotFound);
            let after: Vec<_> = tx
                .writes()
                .map(|(i, k, v)| (i, k.to_vec(), v.map(<[u8]>::to_vec)))
                .collect();
            assert_eq!(after, staged);
        })
        .unwrap();
}

#[test]
fn versions_survive_deletion_so_stale_cas_cannot_win() {
    let (_dir, mut store) = fresh();
    let a = agent();
    store
        .group(usize::MAX, |tx| {
            AgentWrite::Create(a.clone()).stage(tx).unwrap();
            set(&a, "k", None).stage(tx).unwrap();
            delete(&a, "k", Some(1)).stage(tx).unwrap();
        })
        .unwrap();
    store
        .group(usize::MAX, |tx| {
            // A client still holding version 1 must not overwrite a re-created key.
            assert_eq!(code(set(&a, "k", Some(1)).stage(tx)), ErrorCode::VersionConflict);
            assert_eq!(code(delete(&a, "k", None).stage(tx)), ErrorCode::NotFound);
            assert_eq!(set(&a, "k", Some(0)).stage(tx).unwrap(), Applied::Version(2));
            assert_eq!(code(set(&a, "k", Some(1)).stage(tx)), ErrorCode::VersionConflict);
        })
        .unwrap();
}

#[tokio::test]
async fn readers_see_a_write_once_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_store(dir.path(), 1 << 20).await;
    let a = agent();
    let visible = |store: &Store| {
        store
            .view()
            .get(store.keyspace(AGENTS), a.id.as_bytes())
            .unwrap()
            .is_some()
    };
    assert!(!visible(&store));
    store.write(AgentWrite::Create(a.clone())).await.unwrap();
    assert!(visible(&store), "an acknowledged write is in the published snapshot");
    assert_eq!(agent_count(&store).unwrap(), 1);
    store.close().await;
    assert_eq!(
        store.write(AgentWrite::Delete(a.id)).await.unwrap_err().code,
        ErrorCode::Unavailable
    );
}

/// A store on `dir/db` journaling to `dir/journal`, and the journal's first
/// record, held so that no checkpoint passes the records after it.
async fn open_store(dir: &std::path::Path, max_record: usize) -> (Store, bbx_journal::Lsn) {
    let (journal, recovery) =
        bbx_journal::Journal::open(&dir.join("journal"), bbx_journal::JournalOptions::default()).unwrap();
    let held = recovery.records.iter().map(|r| r.lsn).collect();
    let writer = bbx_store::JournalWriter::start(journal, held, Default::default(), 0).unwrap();
    let pin = writer.append(vec![b"{}".to_vec()]).await.unwrap()[0];
    let db = bbx_store::open_database(&dir.join("db")).unwrap();
    let options = bbx_store::StoreOptions {
        commit_max_batch: 16,
        max_record,
        committer_nice: 0,
        next_lsn: 0,
    };
    let store = Store::open(db, &KEYSPACES, writer, &recovery.records, options).unwrap();
    (store, pin)
}

#[tokio::test]
async fn the_journal_alone_rebuilds_every_acknowledged_write() {
    let live = tempfile::tempdir().unwrap();
    let (store, _) = open_store(live.path(), 1 << 20).await;
    let a = agent();
    store.write(AgentWrite::Create(a.clone())).await.unwrap();
    let big = vec![b'7'; 300_000];
    let writes = (0..50)
        .map(|i| set(&a, &format!("k{i}"), None))
        .chain([AgentWrite::SetState {
            agent: a.id,
            key: "big".into(),
            value: big.clone(),
            if_version: None,
            at: Utc::now(),
            labels: Vec::new(),
        }])
        .map(|write| Box::new(write) as Box<dyn Staged>)
        .collect();
    assert!(store.write_all(writes).await.iter().all(Result::is_ok));
    store.write(delete(&a, "k3", Some(1))).await.unwrap();

    // A copy of the journal as it is now, next to an empty database: what a
    // crash that lost every unsynced write of fjall would leave.
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("journal");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(live.path().join("journal")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let (rebuilt, _) = open_store(crashed.path(), 1 << 20).await;
    let view = rebuilt.view();
    assert!(view.get(rebuilt.keyspace(AGENTS), a.id.as_bytes()).unwrap().is_some());
    assert_eq!(agent_count(&rebuilt).unwrap(), 1);
    let state = |key: &str| {
        view.get(rebuilt.keyspace(STATE), state_key(&a.id, key))
            .unwrap()
            .map(|v| decode_state(&v).unwrap().is_tombstone())
    };
    assert_eq!(state("k0"), Some(false));
    assert_eq!(state("k49"), Some(false));
    assert_eq!(state("k3"), Some(true), "the delete is replayed after the set");
    let stored = view
        .get(rebuilt.keyspace(STATE), state_key(&a.id, "big"))
        .unwrap()
        .unwrap();
    assert_eq!(decode_state(&stored).unwrap().json, big.as_slice());
    store.close().await;
    rebuilt.close().await;
}

/// Each write its own group: versions come from what the committer recorded
/// after earlier groups, and must agree with what fjall holds.
#[tokio::test]
async fn versions_carried_between_groups_match_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_store(dir.path(), 1 << 20).await;
    let a = agent();
    store.write(AgentWrite::Create(a.clone())).await.unwrap();
    assert_eq!(store.write(set(&a, "k", None)).await.unwrap(), Applied::Version(1));
    assert_eq!(store.write(set(&a, "k", Some(1))).await.unwrap(), Applied::Version(2));
    store.write(delete(&a, "k", Some(2))).await.unwrap();
    // Deleted keeps its version: the key must not exist, and then goes on from 2.
    assert_eq!(
        code(store.write(set(&a, "k", Some(2))).await),
        ErrorCode::VersionConflict
    );
    assert_eq!(store.write(set(&a, "k", Some(0))).await.unwrap(), Applied::Version(3));
    // A refused write leaves the version where it was.
    assert_eq!(
        code(store.write(set(&a, "k", Some(9))).await),
        ErrorCode::VersionConflict
    );
    assert_eq!(store.write(set(&a, "k", Some(3))).await.unwrap(), Applied::Version(4));
    let stored = store
        .view()
        .get(store.keyspace(STATE), state_key(&a.id, "k"))
        .unwrap()
        .unwrap();
    assert_eq!(decode_state(&stored).unwrap().version, 4);
    store.close().await;
}

#[tokio::test]
async fn a_write_too_large_for_the_journal_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_store(dir.path(), 4096).await;
    let a = agent();
    store.write(AgentWrite::Create(a.clone())).await.unwrap();
    let big = AgentWrite::SetState {
        agent: a.id,
        key: "big".into(),
        value: vec![b'1'; 8192],
        if_version: None,
        at: Utc::now(),
        labels: Vec::new(),
    };
    assert_eq!(store.write(big).await.unwrap_err().code, ErrorCode::PayloadTooLarge);
    assert!(!store.has_failed());
    assert_eq!(store.write(set(&a, "small", None)).await.unwrap(), Applied::Version(1));
    store.close().await;
}

#[test]
fn short_stored_values_are_errors_not_panics() {
    assert!(decode_state(&[0u8; 15]).is_err());
    assert!(decode_state(&[]).is_err());
    let tombstone = encode_state(7, Utc::now(), &[]);
    let decoded = decode_state(&tombstone).unwrap();
    assert!(decoded.is_tombstone());
    assert_eq!(decoded.version, 7);
}
