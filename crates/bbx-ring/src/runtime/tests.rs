//! Unit tests of the ring that need its insides: slot accounting, waiters, and
//! what a panic under its lock does.

use super::*;
use bbx_core::op::OpState;

/// The race a shared-memory session can cause: one claimer holds the last
/// slots for a moment and gives them back unused while another, finding none,
/// gave up. The one that gave up must be woken.
#[tokio::test]
async fn a_claimer_that_went_without_is_woken_when_slots_come_back() {
    let wake = Arc::new(Notify::new());
    let pool = Capacity::new(4, wake.clone());
    assert_eq!(pool.claim(64), 4);
    assert_eq!(pool.claim(64), 0);
    pool.unclaim(4);
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("the starved claimer is woken");
    // With nobody starved, giving slots back wakes nobody.
    assert_eq!(pool.claim(2), 2);
    pool.unclaim(2);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), wake.notified())
            .await
            .is_err()
    );
    // A finished op's permit counts as giving back.
    assert_eq!(pool.claim(64), 4);
    assert_eq!(pool.claim(1), 0);
    drop(pool.permit());
    tokio::time::timeout(Duration::from_secs(5), wake.notified())
        .await
        .expect("a returned permit wakes the starved claimer");
}

/// A ring on its own journal and store in `dir`, serving `sleep` and the state
/// kinds, as the kernel opens it.
pub(super) struct Fixture {
    pub ring: Arc<Ring>,
    pub store: Arc<Store>,
    pub tasks: TaskTracker,
    pub admin: Caller,
    pub agent: AgentId,
}

impl Fixture {
    pub async fn open(dir: &std::path::Path) -> Self {
        let config = RingConfig::default();
        let db = bbx_store::open_database(&dir.join("db")).unwrap();
        let (journal, recovery) = bbx_journal::Journal::open(&dir.join("journal"), Default::default()).unwrap();
        let lsns = recovery.records.iter().map(|r| r.lsn).collect();
        let journal = JournalWriter::start(journal, lsns, Default::default(), config.journal_nice).unwrap();
        let mut keyspaces = bbx_agents::KEYSPACES.to_vec();
        keyspaces.extend(store::KEYSPACES);
        keyspaces.extend(bbx_quota::stored::KEYSPACES);
        let options = bbx_store::StoreOptions {
            commit_max_batch: 256,
            max_record: bbx_journal::max_payload(config.journal_segment_bytes),
            committer_nice: config.committer_nice,
            next_lsn: 0,
        };
        let store = Arc::new(Store::open(db, &keyspaces, journal.clone(), &recovery.records, options).unwrap());
        let mut components = bbx_component::Components::default();
        components.register(Arc::new(bbx_component::builtin::Builtin)).unwrap();
        components.register(Arc::new(bbx_agents::StateOps)).unwrap();
        let services = Services {
            quotas: Arc::new(Quotas::new()),
            components: Arc::new(components),
        };
        let tasks = TaskTracker::new();
        let ring = Ring::open(
            config,
            store.clone(),
            journal,
            RingMetrics::new(),
            recovery.records,
            tasks.clone(),
            services,
        )
        .await
        .unwrap();
        let admin = Caller::admin(bbx_core::KeyId::generate());
        Self {
            ring,
            store,
            tasks,
            admin,
            agent: AgentId::generate(),
        }
    }

    pub async fn submit(&self, op: SubmitOp) -> Result<OpId> {
        let submitted = self
            .ring
            .submit(
                &self.admin,
                vec![op],
                Placement::tenants(vec![Arc::from("default")]),
                None,
                None,
            )
            .await?;
        self.ring.dispatch_once();
        Ok(submitted.ops[0].op_id)
    }

    pub async fn close(self) {
        self.ring.close().await;
        self.store.close().await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test]
async fn a_panic_under_the_lock_stops_the_ring_serving() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::open(dir.path()).await;
    assert!(!fixture.ring.is_poisoned());
    let ring = fixture.ring.clone();
    let struck = std::thread::spawn(move || {
        let _state = ring.lock();
        panic!("a bug while the state is held");
    })
    .join();
    assert!(struck.is_err());
    assert!(fixture.ring.is_poisoned(), "its state may be half changed");
    let refused = fixture
        .submit(SubmitOp::new(fixture.agent, "noop", serde_json::json!({})))
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable);
    fixture.close().await;
}

/// A caller that polls an op with short timeouts leaves nothing behind: each
/// timed-out wait takes its waiter with it, and so does one dropped mid-way (a
/// closed HTTP connection).
#[tokio::test]
async fn waits_that_time_out_or_are_dropped_leave_no_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::open(dir.path()).await;
    let (ring, admin) = (&fixture.ring, &fixture.admin);
    let sleep = SubmitOp::new(fixture.agent, "sleep", serde_json::json!({ "ms": 60_000 }));
    let id = fixture.submit(sleep).await.unwrap();
    for _ in 0..200 {
        let info = ring.wait(admin, &id, Duration::from_millis(1)).await.unwrap();
        assert_ne!(info.state, OpState::Done);
    }
    assert_eq!(ring.waiting_on(&id), 0);
    let dropped = tokio::time::timeout(Duration::from_millis(5), ring.wait(admin, &id, Duration::from_secs(60))).await;
    assert!(dropped.is_err(), "the wait was still waiting when dropped");
    assert_eq!(ring.waiting_on(&id), 0);
    ring.cancel(admin, &id).await.unwrap();
    fixture.close().await;
}
