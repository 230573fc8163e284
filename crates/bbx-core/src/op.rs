//! Types of the AgentRing's ops, shared by the ring, the kernel and every front end.
//!
//! An op is submitted as a [`SubmitOp`] (in a [`SubmitBatch`]), acknowledged with its
//! [`OpId`] once it is durable, and ends in exactly one [`Completion`].

use crate::error::Error;
use crate::{AgentId, OpId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

/// How urgently an op should run. Higher runs first; the ring ages waiting ops so
/// that `Low` is delayed, never starved.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Realtime,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::Low, Priority::Normal, Priority::High, Priority::Realtime];

    /// 0 for `Low` up to 3 for `Realtime`.
    pub fn rank(self) -> usize {
        self as usize
    }
}

/// How often, and how patiently, a failed attempt is tried again. The wait after
/// the `n`th failed attempt is `backoff_ms` times `2^(n-1)`, capped at
/// `max_backoff_ms`, and is spent on a timer: a waiting retry holds no worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Further attempts after the first (0 = none).
    pub count: u32,
    #[serde(default = "RetryPolicy::default_backoff_ms")]
    pub backoff_ms: u64,
    #[serde(default = "RetryPolicy::default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl RetryPolicy {
    fn default_backoff_ms() -> u64 {
        100
    }
    fn default_max_backoff_ms() -> u64 {
        30_000
    }

    /// Most further attempts an op may ask for.
    pub const MAX_COUNT: u32 = 100;
    /// The longest wait between two attempts.
    pub const MAX_BACKOFF_MS: u64 = 3_600_000;

    /// Refuses a policy that would keep an op (and its quota) for days.
    pub fn validate(&self) -> crate::Result<()> {
        if self.count > Self::MAX_COUNT {
            return Err(crate::Error::invalid_field(
                "retries.count",
                format!("retries.count is at most {}", Self::MAX_COUNT),
            ));
        }
        for (field, value) in [
            ("retries.backoff_ms", self.backoff_ms),
            ("retries.max_backoff_ms", self.max_backoff_ms),
        ] {
            if value > Self::MAX_BACKOFF_MS {
                return Err(crate::Error::invalid_field(
                    field,
                    format!("{field} is at most {} (an hour)", Self::MAX_BACKOFF_MS),
                ));
            }
        }
        Ok(())
    }

    /// The wait before attempt `attempt + 1`, after `attempt` attempts failed.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u64.checked_shl(attempt.saturating_sub(1)).unwrap_or(u64::MAX);
        std::time::Duration::from_millis(self.backoff_ms.saturating_mul(factor).min(self.max_backoff_ms))
    }
}

/// W3C trace context, carried from the submitter to the executor and the completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TraceContext {
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// One op to submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitOp {
    /// The agent the op acts for (and whose state `state.*` ops touch).
    pub agent: AgentId,
    /// The executor: `noop`, `sleep`, `state.get`, `state.set`, `state.incr`, `state.delete`.
    pub kind: String,
    /// The executor's arguments, e.g. `{"key": "k", "value": 1}` for `state.set`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub args: Value,
    #[serde(default)]
    pub priority: Priority,
    /// Time allowed for one attempt; the executor is cancelled when it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Ops that must complete with `ok` first: op ids, or `#N` for the Nth op (from 0)
    /// of the same batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Submitting the same key again returns the first op instead of running twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// With `step`, derives the idempotency key when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Returned untouched on the completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub user_data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
}

impl SubmitOp {
    pub fn new(agent: AgentId, kind: impl Into<String>, args: Value) -> Self {
        Self {
            agent,
            kind: kind.into(),
            args,
            priority: Priority::Normal,
            timeout_ms: None,
            retries: None,
            depends_on: Vec::new(),
            idempotency_key: None,
            run_id: None,
            step: None,
            user_data: None,
            trace: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBatch {
    pub ops: Vec<SubmitOp>,
    /// When the submission queue is full: wait up to this long for room instead of
    /// being refused with 429 at once; at most [`SubmitBatch::MAX_WAIT_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

impl SubmitBatch {
    /// The longest `wait_ms`: a submitter that wants longer tries again.
    pub const MAX_WAIT_MS: u64 = 60_000;
}

/// The answer to a submission, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct Submitted {
    pub ops: Vec<SubmittedOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct SubmittedOp {
    pub op_id: OpId,
    /// The idempotency key was known: this is the op first submitted with it.
    pub deduplicated: bool,
}

/// How an op ended.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CompletionStatus {
    Ok,
    Error,
    Timeout,
    Cancelled,
    /// The op may or may not have acted on the world before a crash; it is never
    /// re-run silently.
    InDoubt,
}

impl CompletionStatus {
    pub const ALL: [CompletionStatus; 5] = [Self::Ok, Self::Error, Self::Timeout, Self::Cancelled, Self::InDoubt];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::InDoubt => "in_doubt",
        }
    }
}

/// The one result of an op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct Completion {
    pub op_id: OpId,
    pub agent: AgentId,
    /// Shared with the op's record: a completion is made for every op, and copying
    /// two strings into it was a tenth of the `inproc` bench's allocations.
    #[schema(value_type = String)]
    pub tenant: Arc<str>,
    /// Borrowed from the kernel's list of kinds when the kernel made it.
    #[schema(value_type = String)]
    pub kind: Cow<'static, str>,
    pub status: CompletionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    pub attempts: u32,
    /// From acceptance to the first attempt's start.
    pub queue_us: u64,
    /// Time spent in attempts (all of them).
    pub exec_us: u64,
    /// From acceptance to completion.
    pub total_us: u64,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub user_data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// What components said of the op and its result (the taint of what it read,
    /// say): the op's own labels, then its result's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// Where an op is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// Waiting for its dependencies.
    Blocked,
    Queued,
    Running,
    /// Waiting to retry after a failed attempt.
    Backoff,
    /// Held until an operator approves it (it then runs) or denies it (it ends
    /// with an error); denied when its hold expires.
    PendingApproval,
    Done,
}

/// An op as `GET /v1/ops/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct OpInfo {
    pub op_id: OpId,
    pub agent: AgentId,
    pub kind: String,
    pub state: OpState,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
}

impl OpInfo {
    /// A completed op.
    pub fn done(completion: Completion) -> Self {
        Self {
            op_id: completion.op_id,
            agent: completion.agent,
            kind: completion.kind.to_string(),
            state: OpState::Done,
            attempts: completion.attempts,
            completion: Some(completion),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct Percentiles {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct BreakerInfo {
    /// The tenant whose calls go through it: each tenant has its own breakers.
    pub tenant: String,
    pub target: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub consecutive_failures: u32,
    pub opened_total: u64,
    pub rejected_total: u64,
}

/// `bbx ring stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct RingStats {
    /// Ops waiting to run, by priority.
    pub queued: BTreeMap<Priority, u64>,
    /// Ops accepted and not yet started (queued, blocked, in backoff).
    pub pending: u64,
    pub submission_capacity: u64,
    pub running: u64,
    pub max_running: u64,
    /// Completions waiting to be made durable.
    pub completing: u64,
    pub completion_capacity: u64,
    pub submitted_total: u64,
    pub deduplicated_total: u64,
    pub refused_total: u64,
    pub retries_total: u64,
    pub completed: BTreeMap<CompletionStatus, u64>,
    /// Completions per second over the last 10 seconds.
    pub completed_per_sec: f64,
    /// Submission to completion, by priority, since the kernel started.
    pub latency: BTreeMap<Priority, Percentiles>,
    pub breakers: Vec<BreakerInfo>,
    /// Shared-memory sessions being served.
    #[serde(default)]
    pub shm_sessions: u64,
}

/// `POST /v1/ring/shm`: open a shared-memory session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenShm {
    /// The size of each of the session's two queues: a multiple of 8 from 64 KiB to
    /// 64 MiB (1 MiB if left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<u64>,
}

/// A shared-memory session: the path (`/proc/KERNEL_PID/fd/N`, a sealed memfd) that
/// a client on the same machine, as the kernel's user, maps to submit ops and reap
/// completions. The path goes away as soon as the client attaches, and the session
/// ends if nobody attaches within 10 seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct ShmSession {
    pub path: String,
    pub queue_bytes: u64,
}

/// `bbx ring wal-status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
pub struct WalStatus {
    pub segments: u64,
    pub bytes: u64,
    pub next_lsn: u64,
    pub synced_lsn: u64,
    pub checkpoint_lsn: u64,
    /// What point-in-time recovery costs on disk: segments behind the
    /// checkpoint kept as history, their bytes, and how long they are kept.
    #[serde(default)]
    pub history_segments: u64,
    #[serde(default)]
    pub history_bytes: u64,
    #[serde(default)]
    pub history_secs: u64,
    pub records_total: u64,
    /// Bytes appended since start, framing included.
    pub bytes_total: u64,
    pub syncs_total: u64,
    /// Time spent appending and syncing groups since start: over a span of wall
    /// time, the share of it the journal's disk path was busy.
    pub sync_micros_total: u64,
    /// Time of one append + fdatasync group.
    pub sync_latency: Percentiles,
    /// The writer thread's nice value: `ring.journal_nice` where the process may
    /// raise it, its own otherwise (absent where it cannot be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_nice: Option<i32>,
    /// The writer thread's time slice in µs, where the kernel keeps a custom one
    /// (Linux 6.12 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_slice_us: Option<u64>,
    /// The store committer's nice value: `ring.committer_nice` where that is above
    /// the process's own, its own otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committer_nice: Option<i32>,
}

/// `bbx ring circuit-breaker --reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetBreakers {
    /// One target; every target when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// One tenant's breakers; every tenant's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// How an operator settles an op in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Its effect happened: it completes `ok`.
    Ok,
    /// Its effect did not happen, or must not count: it completes `error`.
    Failed,
    /// Run it again (the tool gets the same idempotency key).
    Retry,
}

/// `bbx ring resolve OP --as ok|failed|retry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveOp {
    #[serde(rename = "as")]
    pub resolution: Resolution,
}

/// What executing a kind can do to the world; it decides how an op is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effects {
    /// Nothing (`noop`, `sleep`, `state.get`): not journaled; lost ops are harmless.
    None,
    /// Changes kernel state: journaled, and its effect commits atomically with its
    /// completion, so it is re-run after a crash exactly when it had not happened.
    Kernel,
    /// Changes the world outside the kernel (a tool): journaled, marked started
    /// before it runs, and `in_doubt` after a crash that interrupted it.
    External,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RetryPolicy {
            count: 10,
            backoff_ms: 100,
            max_backoff_ms: 1000,
        };
        let waits: Vec<u128> = (1..=6).map(|a| policy.backoff(a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.backoff(200).as_millis(), 1000, "no overflow");
    }

    #[test]
    fn submit_ops_refuse_unknown_fields_and_negative_timeouts() {
        let agent = AgentId::generate();
        let ok = serde_json::json!({"agent": agent, "kind": "noop"});
        assert!(serde_json::from_value::<SubmitOp>(ok).is_ok());
        let negative = serde_json::json!({"agent": agent, "kind": "noop", "timeout_ms": -1});
        assert!(serde_json::from_value::<SubmitOp>(negative).is_err());
        let typo = serde_json::json!({"agent": agent, "kind": "noop", "priorty": "HIGH"});
        assert!(serde_json::from_value::<SubmitOp>(typo).is_err());
    }

    #[test]
    fn priorities_use_the_reference_names_and_order() {
        assert_eq!(serde_json::to_value(Priority::Realtime).unwrap(), "REALTIME");
        assert_eq!(serde_json::from_value::<Priority>("LOW".into()).unwrap(), Priority::Low);
        assert!(
            Priority::ALL
                .windows(2)
                .all(|w| w[0] < w[1] && w[0].rank() + 1 == w[1].rank())
        );
    }
}
