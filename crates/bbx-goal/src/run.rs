//! What is durable of a run: its record (the workflow, its inputs, where it
//! stands), each step's once it has ended (or started waiting on a timer), the
//! signals and approvals sent to it, and the index of an agent's runs.
//!
//! A run's id is the id of the `goal.run` op that created it, and each step's
//! op carries the run and the step's number, so the ring derives the step's
//! idempotency key from (agent, run, step): a step submitted again after a
//! crash joins or returns the op it already was, and never runs twice.

use crate::planner::GoalSpec;
use crate::workflow::Workflow;
use bbx_core::{AgentId, Error, OpId, Result};
use bbx_store::{KeyspaceDef, Store, storage_error};
use chrono::{DateTime, Utc};
use fjall::Readable;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// run id -> [`RunRecord`] as JSON.
pub const GOAL_RUNS: KeyspaceDef = KeyspaceDef {
    id: 37,
    name: "goal_runs",
};
/// run id, step name -> [`StepRecord`] as JSON.
pub const GOAL_STEPS: KeyspaceDef = KeyspaceDef {
    id: 38,
    name: "goal_steps",
};
/// run id, `\0`-free name -> the signal's payload as JSON (approvals are the
/// signals `approval:STEP`).
pub const GOAL_SIGNALS: KeyspaceDef = KeyspaceDef {
    id: 39,
    name: "goal_signals",
};
/// agent, run id -> nothing: an agent's runs, oldest first.
pub const GOAL_BY_AGENT: KeyspaceDef = KeyspaceDef {
    id: 40,
    name: "goal_by_agent",
};

/// run id -> nothing: the runs not yet ended, which a start resumes.
pub const GOAL_ACTIVE: KeyspaceDef = KeyspaceDef {
    id: 41,
    name: "goal_active",
};

/// sha256 of a workflow (hex) -> the workflow as JSON: a workflow too large
/// for an op's args, stored first and named by `goal.run`.
pub const GOAL_WORKFLOWS: KeyspaceDef = KeyspaceDef {
    id: 42,
    name: "goal_workflows",
};

pub const KEYSPACES: [KeyspaceDef; 6] = [
    GOAL_RUNS,
    GOAL_STEPS,
    GOAL_SIGNALS,
    GOAL_BY_AGENT,
    GOAL_ACTIVE,
    GOAL_WORKFLOWS,
];

/// A workflow's name in [`GOAL_WORKFLOWS`]: the sha256 of its JSON, in hex.
pub fn workflow_digest(json: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(json))
}

/// Stores a workflow under its digest (what it stores twice is one record).
#[derive(Debug)]
pub struct StoreWorkflow {
    pub digest: String,
    pub json: Vec<u8>,
}

impl bbx_store::Staged for StoreWorkflow {
    fn stage(&self, tx: &mut bbx_store::GroupTx<'_>) -> Result<bbx_store::Applied> {
        if self.json.len() > tx.max_value() {
            return Err(Error::invalid_field(
                "workflow",
                format!(
                    "the workflow is {} bytes; the store takes {} at most",
                    self.json.len(),
                    tx.max_value()
                ),
            ));
        }
        tx.put(GOAL_WORKFLOWS, self.digest.as_bytes().to_vec(), self.json.clone());
        Ok(bbx_store::Applied::Done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn is_final(self) -> bool {
        self != Self::Running
    }
}

/// The run a child run is a step of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Parent {
    pub run: OpId,
    pub step: String,
    /// The run at the top of the tree (the parent's own when it is the top).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<OpId>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: OpId,
    pub agent: AgentId,
    pub tenant: String,
    pub workflow: Workflow,
    /// The workflow's inputs with the run's given ones over their defaults.
    pub inputs: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// The goal it was planned for: what a replan is asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goal: Option<GoalSpec>,
    /// The op kinds its steps may submit (its creator's confinement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    /// Plans it has had since the first: each one's steps have ring keys of
    /// their own, so no new step can meet an old step's op.
    #[serde(default)]
    pub generation: u32,
    pub status: RunStatus,
    #[serde(default)]
    pub paused: bool,
    /// Asked to stop: it ends `cancelled` once its running steps are stopped.
    #[serde(default)]
    pub cancelling: bool,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

impl RunRecord {
    /// The run at the top of its tree: every op of the tree is in its flow
    /// scope, so what one run read from outside taints the others' ops
    /// (FlowIntegrity), as within one run.
    pub fn root(&self) -> OpId {
        self.parent
            .as_ref()
            .map_or(self.id, |parent| parent.root.unwrap_or(parent.run))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    /// A durable wait: a timer, a signal, an approval, a child run.
    Waiting,
    Succeeded,
    Failed,
    /// Its tool may or may not have acted before a crash: never run again.
    InDoubt,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running | Self::Waiting)
    }

    /// Ended without its effect: its dependants follow its `on_failure`.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::InDoubt)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<OpId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    /// The labels of the op's completion (its taint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub attempts: u32,
    /// Its output is its fallback's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fallback: bool,
    /// When its timer fires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<DateTime<Utc>>,
    /// Why it was skipped, or waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What its op cost, in micro-dollars (its result's `cost_micros`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cost_micros: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl StepRecord {
    pub fn pending() -> Self {
        Self {
            status: StepStatus::Pending,
            op_id: None,
            output: None,
            error: None,
            labels: Vec::new(),
            started_at: None,
            finished_at: None,
            attempts: 0,
            fallback: false,
            wake_at: None,
            reason: None,
            cost_micros: 0,
        }
    }
}

pub fn run_key(run: &OpId) -> Vec<u8> {
    run.as_bytes().to_vec()
}

pub fn step_key(run: &OpId, step: &str) -> Vec<u8> {
    [run.as_bytes().as_slice(), step.as_bytes()].concat()
}

pub fn signal_key(run: &OpId, name: &str) -> Vec<u8> {
    [run.as_bytes().as_slice(), name.as_bytes()].concat()
}

pub fn agent_key(agent: &AgentId, run: &OpId) -> Vec<u8> {
    [agent.as_bytes().as_slice(), run.as_bytes()].concat()
}

/// The signal an operator's decision on a `wait.approval` step is.
pub fn approval_signal(step: &str) -> String {
    format!("approval:{step}")
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("a goal record cannot be encoded: {e}")))
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::internal(format!("a stored {what} is unreadable: {e}")))
}

/// The run's record as durable, if there is one.
pub fn load_run(store: &Store, run: &OpId) -> Result<Option<RunRecord>> {
    let bytes = store
        .view()
        .get(store.keyspace(GOAL_RUNS), run_key(run))
        .map_err(|e| storage_error("read a run", e))?;
    bytes.map(|bytes| decode(&bytes, "run")).transpose()
}

/// The run's step records that are durable, by step name.
pub fn load_steps(store: &Store, run: &OpId) -> Result<Vec<(String, StepRecord)>> {
    let mut steps = Vec::new();
    for item in store.view().prefix(store.keyspace(GOAL_STEPS), run.as_bytes()) {
        let (key, value) = item.into_inner().map_err(|e| storage_error("read a run's steps", e))?;
        let name = String::from_utf8_lossy(&key[16..]).into_owned();
        steps.push((name, decode(&value, "step")?));
    }
    Ok(steps)
}

/// The signals sent to the run, by name.
pub fn load_signals(store: &Store, run: &OpId) -> Result<Vec<(String, Value)>> {
    let mut signals = Vec::new();
    for item in store.view().prefix(store.keyspace(GOAL_SIGNALS), run.as_bytes()) {
        let (key, value) = item
            .into_inner()
            .map_err(|e| storage_error("read a run's signals", e))?;
        let name = String::from_utf8_lossy(&key[16..]).into_owned();
        signals.push((name, decode(&value, "signal")?));
    }
    Ok(signals)
}

/// The ids of the agent's runs, newest first, at most `limit`, before `before`.
pub fn agent_runs(store: &Store, agent: &AgentId, before: Option<&OpId>, limit: usize) -> Result<Vec<OpId>> {
    let view = store.view();
    let keyspace = store.keyspace(GOAL_BY_AGENT);
    let upper = match before {
        Some(run) => agent_key(agent, run),
        None => [agent.as_bytes().as_slice(), &[0xff; 17]].concat(),
    };
    let mut runs = Vec::new();
    for item in view.range(keyspace, agent.as_bytes().to_vec()..upper).rev().take(limit) {
        let (key, _) = item.into_inner().map_err(|e| storage_error("list runs", e))?;
        if let Some(bytes) = key.get(16..32).and_then(|b| <[u8; 16]>::try_from(b).ok()) {
            runs.push(OpId::from_bytes(bytes));
        }
    }
    Ok(runs)
}

/// Every run not yet ended (what a start resumes).
pub fn unfinished_runs(store: &Store) -> Result<Vec<RunRecord>> {
    let mut runs = Vec::new();
    for item in store.view().iter(store.keyspace(GOAL_ACTIVE)) {
        let (key, _) = item.into_inner().map_err(|e| storage_error("list active runs", e))?;
        let Some(bytes) = <[u8; 16]>::try_from(&key[..]).ok() else {
            continue;
        };
        if let Some(run) = load_run(store, &OpId::from_bytes(bytes))?
            && !run.status.is_final()
        {
            runs.push(run);
        }
    }
    Ok(runs)
}
