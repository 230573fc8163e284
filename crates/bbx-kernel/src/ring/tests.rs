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

/// A kernel on `dir`, its administrator, and an agent.
pub(super) async fn kernel(dir: &std::path::Path) -> (Arc<crate::Kernel>, Caller, AgentId) {
    let layer = bbx_core::config::ConfigLayer {
        data_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let config = bbx_core::config::KernelConfig::resolve(Default::default(), layer).unwrap();
    let kernel = crate::Kernel::open(config).await.unwrap().kernel;
    let token = std::fs::read_to_string(dir.join(crate::ADMIN_KEY_FILE)).unwrap();
    let admin = kernel.authenticate(token.trim()).unwrap();
    let agent = kernel
        .create_agent(
            &admin,
            bbx_core::model::CreateAgent {
                name: "a".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id;
    (kernel, admin, agent)
}

#[tokio::test]
async fn a_panic_under_the_lock_stops_the_kernel_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin, agent) = kernel(dir.path()).await;
    assert!(kernel.is_ready());
    let ring = kernel.ring.clone();
    let struck = std::thread::spawn(move || {
        let _state = ring.lock();
        panic!("a bug while the state is held");
    })
    .join();
    assert!(struck.is_err());
    assert!(!kernel.is_ready(), "not ready once its state may be half changed");
    let batch = bbx_core::op::SubmitBatch {
        ops: vec![SubmitOp::new(agent, "noop", serde_json::json!({}))],
        wait_ms: None,
    };
    let refused = kernel.submit(&admin, batch).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable);
    kernel.shutdown().await;
}

/// A caller that polls an op with short timeouts leaves nothing behind: each
/// timed-out wait takes its waiter with it, and so does one dropped mid-way (a
/// closed HTTP connection).
#[tokio::test]
async fn waits_that_time_out_or_are_dropped_leave_no_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, admin, agent) = kernel(dir.path()).await;
    let sleep = bbx_core::op::SubmitOp::new(agent, "sleep", serde_json::json!({ "ms": 60_000 }));
    let batch = bbx_core::op::SubmitBatch {
        ops: vec![sleep],
        wait_ms: None,
    };
    let id = kernel.submit(&admin, batch).await.unwrap().ops[0].op_id;
    for _ in 0..200 {
        let info = kernel.wait_op(&admin, &id, Duration::from_millis(1)).await.unwrap();
        assert_ne!(info.state, OpState::Done);
    }
    assert_eq!(kernel.ring.waiting_on(&id), 0);
    let dropped = tokio::time::timeout(
        Duration::from_millis(5),
        kernel.wait_op(&admin, &id, Duration::from_secs(60)),
    )
    .await;
    assert!(dropped.is_err(), "the wait was still waiting when dropped");
    assert_eq!(kernel.ring.waiting_on(&id), 0);
    kernel.cancel_op(&admin, &id).await.unwrap();
    kernel.shutdown().await;
}
