//! The AgentRing through the kernel, on a real data directory: exactly-once effects,
//! idempotency across restarts, dependencies, cancel, timeouts and retries,
//! scheduling fairness and backpressure.

mod support;

use bbx_core::config::{ConfigLayer, KernelConfig, RingConfig};
use bbx_core::model::CreateAgent;
use bbx_core::op::{CompletionStatus, OpInfo, OpState, Priority, RetryPolicy, SubmitBatch, SubmitOp, Submitted};
use bbx_core::{AgentId, ErrorCode, OpId};
use bbx_kernel::{Caller, Kernel};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

struct Open {
    kernel: Arc<Kernel>,
    admin: Caller,
}

async fn open(dir: &Path, ring: RingConfig) -> Open {
    let over = ConfigLayer {
        ring: Some(ring),
        ..Default::default()
    };
    let (kernel, admin) = support::open_with(dir, over).await;
    Open { kernel, admin }
}

impl Open {
    async fn agent(&self) -> AgentId {
        let req = CreateAgent {
            name: "a".into(),
            ..Default::default()
        };
        self.kernel.create_agent(&self.admin, req).await.unwrap().id
    }

    async fn submit(&self, ops: Vec<SubmitOp>) -> bbx_core::Result<Submitted> {
        self.kernel
            .submit(&self.admin, SubmitBatch { ops, wait_ms: None })
            .await
    }

    async fn one(&self, op: SubmitOp) -> OpId {
        self.submit(vec![op]).await.unwrap().ops[0].op_id
    }

    async fn wait(&self, id: OpId) -> OpInfo {
        let info = self
            .kernel
            .wait_op(&self.admin, &id, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(info.state, OpState::Done, "{info:?}");
        info
    }

    async fn result(&self, id: OpId) -> Value {
        let completion = self.wait(id).await.completion.unwrap();
        assert_eq!(completion.status, CompletionStatus::Ok, "{completion:?}");
        completion.result.unwrap()
    }
}

fn op(agent: AgentId, kind: &str, args: Value) -> SubmitOp {
    SubmitOp::new(agent, kind, args)
}

fn keyed(agent: AgentId, kind: &str, args: Value, key: &str) -> SubmitOp {
    let mut op = op(agent, kind, args);
    op.idempotency_key = Some(key.into());
    op
}

#[tokio::test]
async fn state_ops_apply_exactly_once_and_concurrent_increments_all_count() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let ops: Vec<SubmitOp> = (0..200)
        .map(|_| op(agent, "state.incr", json!({"key": "n", "by": 1})))
        .collect();
    let submitted = ring.submit(ops).await.unwrap();
    for op in &submitted.ops {
        ring.wait(op.op_id).await;
    }
    let got = ring
        .result(ring.one(op(agent, "state.get", json!({"key": "n"}))).await)
        .await;
    assert_eq!(got["value"], 200);
    assert_eq!(got["version"], 200);
    let set = ring
        .result(
            ring.one(op(agent, "state.set", json!({"key": "s", "value": {"a": 1}})))
                .await,
        )
        .await;
    assert_eq!(set, json!({"key": "s", "version": 1}));
    let entry = ring.kernel.state_get(&ring.admin, &agent, "s").unwrap();
    assert_eq!(entry.value, json!({"a": 1}), "ops and the state API see one store");

    let not_a_number = ring.one(op(agent, "state.incr", json!({"key": "s"}))).await;
    let completion = ring.wait(not_a_number).await.completion.unwrap();
    assert_eq!(completion.status, CompletionStatus::Error);
    assert_eq!(completion.error.unwrap().code, ErrorCode::FailedPrecondition);
    assert_eq!(
        ring.kernel.state_get(&ring.admin, &agent, "s").unwrap().version,
        1,
        "a failed effect changes nothing"
    );
}

#[tokio::test]
async fn a_repeated_key_returns_the_first_op_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (first, agent) = {
        let ring = open(dir.path(), RingConfig::default()).await;
        let agent = ring.agent().await;
        let first = ring.one(keyed(agent, "state.incr", json!({"key": "n"}), "k1")).await;
        // In flight or done, the same key joins the same op.
        let again = ring
            .submit(vec![keyed(agent, "state.incr", json!({"key": "n"}), "k1")])
            .await
            .unwrap();
        assert_eq!(again.ops[0].op_id, first);
        assert!(again.ops[0].deduplicated);
        assert_eq!(ring.result(first).await["value"], 1);
        let conflict = ring
            .submit(vec![keyed(agent, "state.incr", json!({"key": "n", "by": 5}), "k1")])
            .await
            .unwrap_err();
        assert_eq!(conflict.code, ErrorCode::AlreadyExists);
        assert!(conflict.message.contains("different"), "{}", conflict.message);
        // Derived from run and step: the same step of the same run is one op.
        let mut step = op(agent, "noop", json!({}));
        step.run_id = Some("run-7".into());
        step.step = Some(3);
        let a = ring.one(step.clone()).await;
        let b = ring.one(step).await;
        assert_eq!(a, b);
        ring.wait(a).await;
        ring.kernel.shutdown().await;
        (first, agent)
    };
    let ring = open(dir.path(), RingConfig::default()).await;
    let again = ring
        .submit(vec![keyed(agent, "state.incr", json!({"key": "n"}), "k1")])
        .await
        .unwrap();
    assert_eq!(again.ops[0].op_id, first, "the key table survives a restart");
    assert_eq!(ring.result(first).await["value"], 1, "and the op did not run again");
    let get = ring.one(op(agent, "state.get", json!({"key": "n"}))).await;
    assert_eq!(ring.result(get).await["value"], 1);
}

#[tokio::test]
async fn a_completion_queue_gets_its_own_ops_once_each_deduplicated_ones_included() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let done = ring.one(keyed(agent, "state.incr", json!({"key": "q"}), "done")).await;
    ring.wait(done).await;
    let mut late = op(agent, "state.set", json!({"key": "late", "value": 1}));
    late.depends_on = vec!["#1".into()];
    let batch = SubmitBatch {
        ops: vec![
            op(agent, "noop", json!(null)),
            op(agent, "sleep", json!({"ms": 20})),
            late,
            keyed(agent, "state.incr", json!({"key": "q"}), "done"),
            op(agent, "sleep", json!({"ms": 1, "bad": true})),
        ],
        wait_ms: None,
    };
    let mut queue = bbx_kernel::CompletionQueue::new();
    // A refused batch hands nothing to the queue.
    let refused = ring
        .kernel
        .submit_to(&ring.admin, batch.clone(), &queue)
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
    let mut batch = batch;
    batch.ops.pop();
    // Another submitter's op, never handed to this queue.
    let other = ring.one(op(agent, "noop", json!(null))).await;
    let submitted = ring.kernel.submit_to(&ring.admin, batch, &queue).await.unwrap();
    assert!(submitted.ops[3].deduplicated);
    assert_eq!(submitted.ops[3].op_id, done);

    let mut reaped = Vec::new();
    while reaped.len() < 4 {
        tokio::time::timeout(Duration::from_secs(10), queue.reap(&mut reaped, 16))
            .await
            .expect("every op of the batch completes");
    }
    let mut ids: Vec<OpId> = reaped.iter().map(|c| c.op_id).collect();
    let mut expected: Vec<OpId> = submitted.ops.iter().map(|op| op.op_id).collect();
    ids.sort_unstable_by_key(|id| *id.as_bytes());
    expected.sort_unstable_by_key(|id| *id.as_bytes());
    assert_eq!(ids, expected);
    assert!(!ids.contains(&other));
    assert!(reaped.iter().all(|c| c.status == CompletionStatus::Ok), "{reaped:?}");
    let position = |id: OpId| reaped.iter().position(|c| c.op_id == id).unwrap();
    assert!(
        position(submitted.ops[1].op_id) < position(submitted.ops[2].op_id),
        "a dependent completes after its dependency"
    );
    let nothing_more = tokio::time::timeout(Duration::from_millis(100), queue.reap(&mut reaped, 16)).await;
    assert!(nothing_more.is_err(), "each op is reaped once: {reaped:?}");
}

#[tokio::test]
async fn idempotency_records_expire_by_completion_time_once_the_journal_will_not_replay_them() {
    let dir = tempfile::tempdir().unwrap();
    let ring = RingConfig {
        retention_secs: RingConfig::MIN_RETENTION_SECS,
        ..Default::default()
    };
    let retention = chrono::Duration::seconds(ring.retention_secs as i64);
    let ring = open(dir.path(), ring).await;
    let agent = ring.agent().await;
    let first = ring.one(keyed(agent, "noop", json!({}), "k")).await;
    let done = ring.wait(first).await.completion.unwrap();

    // Within the retention, counted from completion, nothing goes.
    let within = done.completed_at + retention - chrono::Duration::milliseconds(1);
    assert_eq!(ring.kernel.expire_completions(within).await.unwrap(), 0);
    let again = ring.submit(vec![keyed(agent, "noop", json!({}), "k")]).await.unwrap();
    assert!(again.ops[0].deduplicated);

    // Past it, the completion goes once the journal's checkpoint (once a second)
    // has passed the op's records, and the key starts a new op.
    let past = done.completed_at + retention + chrono::Duration::seconds(1);
    let mut expired = 0;
    for _ in 0..100 {
        expired = ring.kernel.expire_completions(past).await.unwrap();
        if expired > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(expired, 1, "the completion expires once nothing replays its op");
    let fresh = ring.submit(vec![keyed(agent, "noop", json!({}), "k")]).await.unwrap();
    assert!(!fresh.ops[0].deduplicated, "an expired key starts a new op");
    ring.wait(fresh.ops[0].op_id).await;
}

#[test]
fn retention_is_bounded() {
    for retention_secs in [0, 59, RingConfig::MAX_RETENTION_SECS + 1, u64::MAX] {
        let over = ConfigLayer {
            ring: Some(RingConfig {
                retention_secs,
                ..Default::default()
            }),
            ..Default::default()
        };
        let refused = KernelConfig::resolve(ConfigLayer::default(), over).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidArgument);
        assert!(refused.message.contains("ring.retention_secs"), "{}", refused.message);
    }
}

#[tokio::test]
async fn dependencies_order_ops_and_a_failed_dependency_cancels_its_dependents() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let mut second = op(agent, "state.set", json!({"key": "order", "value": "second"}));
    second.depends_on = vec!["#0".into()];
    let batch = vec![op(agent, "sleep", json!({"ms": 30})), second];
    let submitted = ring.submit(batch).await.unwrap();
    let (a, b) = (submitted.ops[0].op_id, submitted.ops[1].op_id);
    assert_eq!(ring.kernel.op(&ring.admin, &b).unwrap().state, OpState::Blocked);
    let first = ring.wait(a).await.completion.unwrap();
    let then = ring.wait(b).await.completion.unwrap();
    assert!(then.completed_at >= first.completed_at);

    // On a later op of the same batch: it waits for it all the same.
    let mut early = op(agent, "state.get", json!({"key": "late"}));
    early.depends_on = vec!["#1".into()];
    let submitted = ring
        .submit(vec![early, op(agent, "state.set", json!({"key": "late", "value": 7}))])
        .await
        .unwrap();
    assert_eq!(
        ring.result(submitted.ops[0].op_id).await["value"],
        7,
        "ran after its dependency"
    );

    // On an op that already completed, by id.
    let mut after = op(agent, "noop", json!({}));
    after.depends_on = vec![b.to_string()];
    ring.result(ring.one(after).await).await;

    // A failing dependency cancels what depends on it.
    let mut doomed = op(agent, "noop", json!({}));
    doomed.depends_on = vec!["#0".into()];
    let submitted = ring
        .submit(vec![op(agent, "state.get", json!({"key": "missing"})), doomed])
        .await
        .unwrap();
    let cancelled = ring.wait(submitted.ops[1].op_id).await.completion.unwrap();
    assert_eq!(cancelled.status, CompletionStatus::Cancelled);
    assert!(cancelled.error.unwrap().message.contains("dependency"));

    // Unknown and cyclic dependencies are refused and nothing is submitted.
    let before = ring.kernel.ring_stats(&ring.admin).submitted_total;
    let mut unknown = op(agent, "noop", json!({}));
    unknown.depends_on = vec![OpId::generate().to_string()];
    assert_eq!(
        ring.submit(vec![op(agent, "noop", json!({})), unknown])
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
    let mut x = op(agent, "noop", json!({}));
    x.depends_on = vec!["#1".into()];
    let mut y = op(agent, "noop", json!({}));
    y.depends_on = vec!["#0".into()];
    let cycle = ring.submit(vec![x, y]).await.unwrap_err();
    assert_eq!(cycle.code, ErrorCode::InvalidArgument);
    assert_eq!(ring.kernel.ring_stats(&ring.admin).submitted_total, before);
}

#[tokio::test]
async fn bad_batches_are_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let cases: Vec<(Vec<SubmitOp>, ErrorCode)> = vec![
        (vec![], ErrorCode::InvalidArgument),
        (
            vec![
                op(agent, "state.incr", json!({"key": "n"})),
                op(agent, "launch", json!({})),
            ],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![op(agent, "sleep", json!({"ms": "soon"}))],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![op(agent, "state.set", json!({"key": "k", "value": "x".repeat(70_000)}))],
            ErrorCode::PayloadTooLarge,
        ),
        (
            (0..100_000).map(|_| op(agent, "noop", json!({}))).collect(),
            ErrorCode::PayloadTooLarge,
        ),
        (vec![op(AgentId::generate(), "noop", json!({}))], ErrorCode::NotFound),
        (
            vec![SubmitOp {
                timeout_ms: Some(0),
                ..op(agent, "noop", json!({}))
            }],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![SubmitOp {
                retries: Some(RetryPolicy {
                    count: u32::MAX,
                    backoff_ms: 1,
                    max_backoff_ms: 1,
                }),
                ..op(agent, "noop", json!({}))
            }],
            ErrorCode::InvalidArgument,
        ),
        (
            vec![SubmitOp {
                retries: Some(RetryPolicy {
                    count: 1,
                    backoff_ms: u64::MAX,
                    max_backoff_ms: u64::MAX,
                }),
                ..op(agent, "noop", json!({}))
            }],
            ErrorCode::InvalidArgument,
        ),
    ];
    for (ops, code) in cases {
        let n = ops.len();
        let err = ring.submit(ops).await.unwrap_err();
        assert_eq!(err.code, code, "{n} ops: {}", err.message);
    }
    let forever = SubmitBatch {
        ops: vec![op(agent, "noop", json!({}))],
        wait_ms: Some(u64::MAX),
    };
    let err = ring.kernel.submit(&ring.admin, forever).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{}", err.message);
    let stats = ring.kernel.ring_stats(&ring.admin);
    assert_eq!(stats.submitted_total, 0);
    let get = ring.one(op(agent, "state.get", json!({"key": "n"}))).await;
    assert_eq!(
        ring.wait(get).await.completion.unwrap().status,
        CompletionStatus::Error,
        "no half-applied incr"
    );
}

#[tokio::test]
async fn timeouts_cancel_the_executor_and_retries_back_off_without_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(
        dir.path(),
        RingConfig {
            max_running: 1,
            ..Default::default()
        },
    )
    .await;
    let agent = ring.agent().await;
    let mut slow = op(agent, "sleep", json!({"ms": 10_000}));
    slow.timeout_ms = Some(20);
    slow.retries = Some(RetryPolicy {
        count: 2,
        backoff_ms: 150,
        max_backoff_ms: 1000,
    });
    let slow = ring.one(slow).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    // The only worker is free while the slow op backs off.
    let quick = ring.one(op(agent, "noop", json!({}))).await;
    let quick_done = ring.wait(quick).await.completion.unwrap();
    let slow_done = ring.wait(slow).await.completion.unwrap();
    assert!(quick_done.completed_at < slow_done.completed_at);
    assert_eq!(slow_done.status, CompletionStatus::Timeout);
    assert_eq!(slow_done.error.unwrap().code, ErrorCode::Timeout);
    assert_eq!(slow_done.attempts, 3);
    assert!(slow_done.exec_us < 1_000_000, "each attempt was cut at its timeout");
    assert!(slow_done.total_us >= 450_000, "backoffs of 150 and 300 ms");
    assert_eq!(ring.kernel.ring_stats(&ring.admin).retries_total, 2);
}

#[tokio::test]
async fn cancel_stops_queued_and_running_ops() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(
        dir.path(),
        RingConfig {
            max_running: 1,
            ..Default::default()
        },
    )
    .await;
    let agent = ring.agent().await;
    let running = ring.one(op(agent, "sleep", json!({"ms": 60_000}))).await;
    let queued = ring.one(op(agent, "sleep", json!({"ms": 1}))).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(ring.kernel.op(&ring.admin, &running).unwrap().state, OpState::Running);
    let info = ring.kernel.cancel_op(&ring.admin, &queued).await.unwrap();
    assert_eq!(info.completion.unwrap().status, CompletionStatus::Cancelled);
    let info = ring.kernel.cancel_op(&ring.admin, &running).await.unwrap();
    let completion = info.completion.unwrap();
    assert_eq!(completion.status, CompletionStatus::Cancelled);
    assert!(completion.exec_us < 10_000_000);
    let again = ring.kernel.cancel_op(&ring.admin, &running).await.unwrap_err();
    assert_eq!(again.code, ErrorCode::FailedPrecondition);
    assert_eq!(
        ring.kernel
            .cancel_op(&ring.admin, &OpId::generate())
            .await
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn low_priority_is_not_starved_and_a_flooding_agent_waits_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(
        dir.path(),
        RingConfig {
            max_running: 1,
            aging_ms: 20,
            ..Default::default()
        },
    )
    .await;
    let flooder = ring.agent().await;
    let other = ring.agent().await;
    // The only worker is busy first, so LOW queues (an idle ring starts it at once).
    let mut stream = vec![
        ring.one(SubmitOp {
            priority: Priority::Realtime,
            ..op(flooder, "sleep", json!({"ms": 5}))
        })
        .await,
    ];
    let low = ring
        .one(SubmitOp {
            priority: Priority::Low,
            ..op(other, "sleep", json!({"ms": 1}))
        })
        .await;
    // REALTIME ops arrive every millisecond and take 5 ms each: without aging the
    // LOW op would wait for as long as the stream lasts.
    for _ in 0..1500 {
        let realtime = SubmitOp {
            priority: Priority::Realtime,
            ..op(flooder, "sleep", json!({"ms": 5}))
        };
        stream.push(ring.one(realtime).await);
        tokio::time::sleep(Duration::from_millis(1)).await;
        if ring.kernel.op(&ring.admin, &low).unwrap().state == OpState::Done {
            break;
        }
    }
    let low_done = ring.wait(low).await.completion.unwrap();
    assert!(stream.len() < 1500, "LOW ran while the REALTIME stream went on");
    let mut realtime_after = 0;
    for id in &stream {
        let info = ring.kernel.op(&ring.admin, id).unwrap();
        if info.completion.is_none_or(|c| c.completed_at > low_done.completed_at) {
            realtime_after += 1;
        }
    }
    assert!(
        realtime_after > 10,
        "a REALTIME backlog was waiting when LOW ran: {realtime_after}"
    );
    for id in stream {
        ring.kernel.cancel_op(&ring.admin, &id).await.ok();
    }

    let flood: Vec<SubmitOp> = (0..100).map(|_| op(flooder, "sleep", json!({"ms": 5}))).collect();
    let flood = ring.submit(flood).await.unwrap();
    let mine = ring.one(op(other, "sleep", json!({"ms": 1}))).await;
    let mine_done = ring.wait(mine).await.completion.unwrap();
    let mut ahead = 0;
    for op in &flood.ops {
        if ring.wait(op.op_id).await.completion.unwrap().completed_at < mine_done.completed_at {
            ahead += 1;
        }
    }
    assert!(
        ahead <= 3,
        "the other agent's op took its turn, behind {ahead} of the flood"
    );
}

#[tokio::test]
async fn a_full_queue_refuses_with_retry_after_or_waits_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(
        dir.path(),
        RingConfig {
            max_running: 1,
            submission_capacity: 4,
            ..Default::default()
        },
    )
    .await;
    let agent = ring.agent().await;
    ring.one(op(agent, "sleep", json!({"ms": 200}))).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let queued: Vec<SubmitOp> = (0..4).map(|_| op(agent, "sleep", json!({"ms": 10}))).collect();
    ring.submit(queued).await.unwrap();
    let full = ring.submit(vec![op(agent, "noop", json!({}))]).await.unwrap_err();
    assert_eq!(full.code, ErrorCode::ResourceExhausted);
    assert_eq!(full.http_status(), 429);
    assert!(full.retry_after().is_some());
    assert_eq!(ring.kernel.ring_stats(&ring.admin).refused_total, 1);
    let waited = ring
        .kernel
        .submit(
            &ring.admin,
            SubmitBatch {
                ops: vec![op(agent, "noop", json!({}))],
                wait_ms: Some(10_000),
            },
        )
        .await
        .unwrap();
    ring.wait(waited.ops[0].op_id).await;
}

#[tokio::test]
async fn tenant_keys_see_only_their_tenants_ops() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let id = ring.one(op(agent, "noop", json!({}))).await;
    ring.wait(id).await;
    let key = ring
        .kernel
        .create_key(
            &ring.admin,
            bbx_core::model::CreateApiKey {
                name: "t".into(),
                tenant: Some("other".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let tenant = ring.kernel.authenticate(&key.key).unwrap();
    // Another tenant's op and agent read as missing, done or still running.
    let running = ring.one(op(agent, "sleep", json!({"ms": 60_000}))).await;
    for op_id in [id, running] {
        assert_eq!(ring.kernel.op(&tenant, &op_id).unwrap_err().code, ErrorCode::NotFound);
        let waited = ring.kernel.wait_op(&tenant, &op_id, Duration::from_millis(1)).await;
        assert_eq!(waited.unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(
            ring.kernel.cancel_op(&tenant, &op_id).await.unwrap_err().code,
            ErrorCode::NotFound
        );
    }
    let batch = SubmitBatch {
        ops: vec![op(agent, "noop", json!({}))],
        wait_ms: None,
    };
    assert_eq!(
        ring.kernel.submit(&tenant, batch).await.unwrap_err().code,
        ErrorCode::NotFound
    );
    ring.kernel.cancel_op(&ring.admin, &running).await.unwrap();
}

#[tokio::test]
async fn a_long_running_op_does_not_pin_the_journal_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = RingConfig {
        journal_copy_forward_secs: 1,
        ..Default::default()
    };
    let waiting = {
        let ring = open(dir.path(), config.clone()).await;
        let agent = ring.agent().await;
        let first_lsn = ring.kernel.wal_status(&ring.admin).await.unwrap().next_lsn;
        // A journaled op that stays live: it waits for a long sleep.
        let sleep = ring.one(op(agent, "sleep", json!({"ms": 60_000}))).await;
        let waiting = ring
            .one(SubmitOp {
                depends_on: vec![sleep.to_string()],
                ..op(agent, "state.set", json!({"key": "k", "value": 1}))
            })
            .await;
        // Journal more (store writes) until the checkpoint has passed the waiting
        // op's record: only a copy of it can let the checkpoint go by.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            ring.result(ring.one(op(agent, "state.incr", json!({"key": "n", "by": 1}))).await)
                .await;
            let wal = ring.kernel.wal_status(&ring.admin).await.unwrap();
            if wal.checkpoint_lsn > first_lsn {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the checkpoint stayed behind the live op: {wal:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ring.kernel.shutdown().await;
        waiting
    };
    // Its first record is behind the checkpoint now; the copy brings it back. Its
    // dependency, a sleep, left no record, so it ends cancelled, naming that.
    let ring = open(dir.path(), config).await;
    let completion = ring.wait(waiting).await.completion.unwrap();
    assert_eq!(completion.status, CompletionStatus::Cancelled, "{completion:?}");
    assert!(completion.error.unwrap().message.contains("lost in a restart"));
    ring.kernel.shutdown().await;
}

// Two workers: the op's end and its reaper run on different threads, as they do
// in a kernel, so a quota given back after the completion is handed out is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_completion_has_given_its_concurrency_quota_back() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let one_at_a_time = bbx_core::quota::QuotaLimits {
        concurrent_ops: Some(1),
        ..Default::default()
    };
    ring.kernel
        .set_quota(&ring.admin, &bbx_core::quota::Node::Agent(agent), one_at_a_time)
        .await
        .unwrap();
    // A `sleep` ends on a timer task, a `noop` on the submitter's own, and a
    // `state.set` after its store write: whichever, once its completion is reaped
    // (or read by id) the next op fits in the quota again.
    let mut queue = bbx_kernel::CompletionQueue::new();
    let mut reaped = Vec::new();
    for i in 0..120 {
        let (kind, args) = match i % 3 {
            0 => ("sleep", json!({"ms": 1})),
            1 => ("noop", json!(null)),
            _ => ("state.set", json!({"key": "k", "value": i})),
        };
        let batch = SubmitBatch {
            ops: vec![op(agent, kind, args)],
            wait_ms: None,
        };
        ring.kernel
            .submit_to(&ring.admin, batch, &queue)
            .await
            .unwrap_or_else(|e| panic!("op {i} was refused: {e:?}"));
        reaped.clear();
        tokio::time::timeout(Duration::from_secs(10), queue.reap(&mut reaped, 1))
            .await
            .expect("the op completes");
        assert_eq!(reaped[0].status, CompletionStatus::Ok, "{:?}", reaped[0]);
    }
    for i in 0..60 {
        let (kind, args) = match i % 2 {
            0 => ("sleep", json!({"ms": 1})),
            _ => ("noop", json!(null)),
        };
        let id = ring.one(op(agent, kind, args)).await;
        ring.result(id).await;
    }
}

/// The journal's status as a fresh kernel with `ring` reports it.
async fn wal_status_with(ring: RingConfig) -> bbx_core::op::WalStatus {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), ring).await;
    let wal = ring.kernel.wal_status(&ring.admin).await.unwrap();
    ring.kernel.shutdown().await;
    wal
}

/// This thread's nice value.
fn own_nice() -> i32 {
    // SAFETY: plain system call on the calling thread, no pointers.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[tokio::test]
async fn the_committer_runs_at_the_configured_lower_priority_and_the_journal_thread_is_left_alone() {
    let own = own_nice();
    let asked = 13;
    if own >= asked {
        eprintln!("the lowering itself was not tested: this process already runs at nice {own}");
    }
    for (committer_nice, expected) in [(asked, asked.max(own)), (0, own)] {
        let wal = wal_status_with(RingConfig {
            committer_nice,
            ..Default::default()
        })
        .await;
        assert_eq!(
            wal.committer_nice,
            Some(expected),
            "asked for {committer_nice} from {own}"
        );
        assert_eq!(wal.writer_nice, Some(own), "the journal thread keeps the process's own");
    }
    assert_eq!(own_nice(), own, "only the committer's thread changes");
}

#[tokio::test]
async fn the_journal_writer_runs_at_the_configured_nice_value_where_the_process_may_raise_it() {
    let own = own_nice();
    let asked = (own.min(0) - 4).max(-20);
    // Whether this process may raise a thread's priority, tried on a thread of its own.
    // SAFETY: plain system call on that thread, no pointers.
    let may_raise = asked < own
        && std::thread::spawn(move || unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, asked) } == 0)
            .join()
            .unwrap();
    if !may_raise {
        eprintln!("the raise itself was not tested: this process may not raise a thread's priority");
    }
    for (journal_nice, expected) in [(asked, if may_raise { asked } else { own }), (0, own)] {
        let wal = wal_status_with(RingConfig {
            journal_nice,
            ..Default::default()
        })
        .await;
        assert_eq!(
            wal.writer_nice,
            Some(expected),
            "asked for {journal_nice}, may raise: {may_raise}"
        );
    }
    assert_eq!(own_nice(), own, "only the journal's thread changes");
}

/// Submitters of one key race its op's completion: whichever moment each one's
/// lookup falls in (the op live, being recorded, or recorded and gone from the
/// ring), every one of them joins the same op, and it runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_submitted_while_its_op_completes_joins_it() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Arc::new(open(dir.path(), RingConfig::default()).await);
    let agent = ring.agent().await;
    for round in 0..20 {
        let key = format!("race-{round}");
        let mut racers = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (ring, key) = (ring.clone(), key.clone());
            racers.spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..5 {
                    let incr = keyed(agent, "state.incr", json!({"key": key, "by": 1}), &key);
                    ids.push(ring.one(incr).await);
                    tokio::task::yield_now().await;
                }
                ids
            });
        }
        let ids: std::collections::BTreeSet<OpId> = racers.join_all().await.into_iter().flatten().collect();
        assert_eq!(ids.len(), 1, "round {round}: one op per key, not {ids:?}");
        let value = ring.result(*ids.first().unwrap()).await;
        assert_eq!(value["value"], 1, "round {round}: the op ran once");
    }
}

/// A sweep runs in bounded steps, each going on where the last stopped: more
/// completions than one step takes all expire, and the ops passed over (in doubt,
/// or completed after the cutoff) stay.
#[tokio::test]
async fn a_sweep_expires_more_than_one_step_in_steps() {
    let dir = tempfile::tempdir().unwrap();
    let ring = open(dir.path(), RingConfig::default()).await;
    let agent = ring.agent().await;
    let ops: Vec<SubmitOp> = (0..1500)
        .map(|i| keyed(agent, "noop", json!({}), &format!("k{i}")))
        .collect();
    let submitted = ring.submit(ops).await.unwrap();
    let mut last_done = None;
    for op in &submitted.ops {
        last_done = Some(ring.wait(op.op_id).await.completion.unwrap().completed_at);
    }
    let later = ring.one(keyed(agent, "noop", json!({}), "later")).await;
    let later_done = ring.wait(later).await.completion.unwrap().completed_at;
    // A cutoff just after the batch's completions: the later op's is at or after it,
    // unless both fell in one millisecond.
    let retention = chrono::Duration::seconds(RingConfig::default().retention_secs as i64);
    let cutoff = last_done.unwrap() + chrono::Duration::milliseconds(1);
    let mut expired = 0;
    for _ in 0..100 {
        expired += ring.kernel.expire_completions(cutoff + retention).await.unwrap();
        if expired >= 1500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(expired >= 1500, "{expired} of the batch expired");
    let again = ring
        .submit(vec![keyed(agent, "noop", json!({}), "later")])
        .await
        .unwrap();
    if later_done >= cutoff {
        assert!(again.ops[0].deduplicated, "the op completed after the cutoff stays");
    }
}
