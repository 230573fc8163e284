//! `goal.*`: the op kinds that start a run and steer it. Each stages its change
//! to the run's record with its op's completion, so a run exists exactly when
//! the `goal.run` op that created it completed, and a cancel, pause, resume,
//! signal or approval is applied exactly once.

use crate::Goals;
use crate::planner::GoalSpec;
use crate::run::{
    self, GOAL_ACTIVE, GOAL_BY_AGENT, GOAL_RUNS, GOAL_SIGNALS, Parent, RunRecord, RunStatus, agent_key, run_key,
    signal_key,
};
use crate::validate::{self, Compiled};
use crate::workflow::{Workflow, engine_kinds};
use bbx_component::{EffectOp, OpKind, Prepared, Staging, parse_args};
use bbx_core::op::Effects;
use bbx_core::{Error, ErrorCode, OpId, Result};
use bbx_store::GroupTx;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;

pub const RUN: &str = "goal.run";
pub const CANCEL: &str = "goal.cancel";
pub const PAUSE: &str = "goal.pause";
pub const RESUME: &str = "goal.resume";
pub const SIGNAL: &str = "goal.signal";
pub const APPROVE: &str = "goal.approve";

pub const KINDS: &[OpKind] = &[
    OpKind {
        name: RUN,
        effects: Effects::Kernel,
    },
    OpKind {
        name: CANCEL,
        effects: Effects::Kernel,
    },
    OpKind {
        name: PAUSE,
        effects: Effects::Kernel,
    },
    OpKind {
        name: RESUME,
        effects: Effects::Kernel,
    },
    OpKind {
        name: SIGNAL,
        effects: Effects::Kernel,
    },
    OpKind {
        name: APPROVE,
        effects: Effects::Kernel,
    },
];

/// `goal.run`: start a run of a workflow.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunArgs {
    /// The workflow, inline; or
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<Workflow>,
    /// the sha256 (hex) of a workflow stored first (too large for an op's
    /// args: the goals API stores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_ref: Option<String>,
    /// Values for the workflow's declared inputs (over their defaults).
    #[serde(default)]
    pub inputs: Map<String, Value>,
    /// The run and step it is a child run of (a `workflow` or `goal` step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// The goal the workflow was planned for: a step that fails past its
    /// retries has the rest planned again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goal: Option<GoalSpec>,
    /// The op kinds its steps may submit: a credential confined to some kinds
    /// must give its own (the goals API does), and every step is checked
    /// against them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
}

/// `goal.cancel`, `goal.pause`, `goal.resume`: the run they steer.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRef {
    pub run: OpId,
}

/// `goal.signal`: a named signal with a payload, which a `wait.signal` step of
/// that name takes as its output; the first of a name is kept.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalArgs {
    pub run: OpId,
    pub name: String,
    #[serde(default)]
    pub payload: Value,
}

/// `goal.approve`: an operator's decision on a `wait.approval` step.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveArgs {
    pub run: OpId,
    pub step: String,
    /// false denies it: the step fails.
    #[serde(default = "yes")]
    pub approve: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

fn yes() -> bool {
    true
}

pub fn args_schema(kind: &str) -> Option<Value> {
    let schema = match kind {
        RUN => schemars::schema_for!(RunArgs),
        CANCEL | PAUSE | RESUME => schemars::schema_for!(RunRef),
        SIGNAL => schemars::schema_for!(SignalArgs),
        APPROVE => schemars::schema_for!(ApproveArgs),
        _ => return None,
    };
    serde_json::to_value(schema).ok()
}

pub fn prepare(goals: &Goals, kind: &str, args: &Value) -> Result<Prepared> {
    let effect: Arc<dyn EffectOp> = match kind {
        RUN => {
            let args: RunArgs = parse_args(kind, args)?;
            let source = match (args.workflow, args.workflow_ref) {
                (Some(workflow), None) => {
                    let compiled = validate::compile(workflow, goals.kinds())?;
                    inputs(&compiled.workflow, args.inputs.clone())?;
                    Source::Inline(Box::new(compiled))
                }
                (None, Some(digest)) if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    Source::Stored(digest.to_ascii_lowercase())
                }
                (None, Some(_)) => {
                    return Err(Error::invalid_field(
                        "workflow_ref",
                        "a workflow_ref is a sha256, in hex",
                    ));
                }
                _ => {
                    return Err(Error::invalid_field(
                        "workflow",
                        "give a workflow, or a workflow_ref: one of them",
                    ));
                }
            };
            Arc::new(StartRun {
                source,
                inputs: args.inputs,
                parent: args.parent,
                goal: args.goal,
                kinds: args.kinds,
            })
        }
        CANCEL | PAUSE | RESUME => {
            let args: RunRef = parse_args(kind, args)?;
            let change = match kind {
                CANCEL => Steer::Cancel,
                PAUSE => Steer::Pause,
                _ => Steer::Resume,
            };
            Arc::new(SteerRun { run: args.run, change })
        }
        SIGNAL => {
            let args: SignalArgs = parse_args(kind, args)?;
            validate::check_signal_name(&args.name).map_err(|why| Error::invalid_field("name", why))?;
            if args.name.starts_with("approval:") {
                return Err(Error::invalid_field(
                    "name",
                    "approval: signals are an operator's, sent with goal.approve",
                ));
            }
            Arc::new(SendSignal {
                run: args.run,
                name: args.name,
                payload: args.payload,
                approval_of: None,
            })
        }
        APPROVE => {
            let args: ApproveArgs = parse_args(kind, args)?;
            Arc::new(SendSignal {
                run: args.run,
                name: run::approval_signal(&args.step),
                payload: json!({ "approved": args.approve, "reason": args.reason }),
                approval_of: Some(args.step),
            })
        }
        _ => return Err(Error::internal(format!("goal serves no op kind {kind}"))),
    };
    Ok(Prepared::Effect(effect))
}

/// The run's inputs: its workflow's defaults, with `given` over them; an input
/// the workflow does not declare is refused.
fn inputs(workflow: &Workflow, given: Map<String, Value>) -> Result<Map<String, Value>> {
    let mut inputs = workflow.inputs.clone();
    for (name, value) in given {
        if !inputs.contains_key(&name) {
            return Err(Error::invalid_field(
                &format!("inputs.{name}"),
                format!("the workflow declares no input {name:?}"),
            ));
        }
        inputs.insert(name, value);
    }
    Ok(inputs)
}

#[derive(Debug)]
enum Source {
    Inline(Box<Compiled>),
    /// Its digest in the stored workflows: read (and checked) when staged.
    Stored(String),
}

#[derive(Debug)]
struct StartRun {
    source: Source,
    /// As given: the workflow's defaults go under them when it is staged.
    inputs: Map<String, Value>,
    parent: Option<Parent>,
    goal: Option<GoalSpec>,
    kinds: Option<Vec<String>>,
}

impl EffectOp for StartRun {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let id = staging.op_id;
        if tx.read(GOAL_RUNS, &run_key(&id))?.is_some() {
            return Err(Error::new(ErrorCode::AlreadyExists, format!("run {id} exists already")));
        }
        let stored;
        let compiled = match &self.source {
            Source::Inline(compiled) => compiled,
            Source::Stored(digest) => {
                let Some(json) = tx.read(run::GOAL_WORKFLOWS, digest.as_bytes())? else {
                    return Err(Error::not_found("workflow", digest));
                };
                let workflow: Workflow = run::decode(&json, "workflow")?;
                stored = validate::compile(workflow, None)?;
                &stored
            }
        };
        let record = RunRecord {
            id,
            agent: *staging.agent,
            tenant: staging.tenant.to_owned(),
            workflow: compiled.workflow.clone(),
            inputs: inputs(&compiled.workflow, self.inputs.clone())?,
            parent: self.parent.clone(),
            goal: self.goal.clone(),
            kinds: self.kinds.clone(),
            generation: 0,
            status: RunStatus::Running,
            paused: false,
            cancelling: false,
            created_at: staging.at,
            finished_at: None,
            error: None,
            output: None,
        };
        let encoded = run::encode(&record)?;
        if encoded.len() > tx.max_value() {
            return Err(Error::invalid_field(
                "workflow",
                format!(
                    "the run's record would be {} bytes; the store takes {} at most",
                    encoded.len(),
                    tx.max_value()
                ),
            ));
        }
        tx.put(GOAL_RUNS, run_key(&id), encoded);
        tx.put(GOAL_BY_AGENT, agent_key(staging.agent, &id), Vec::new());
        tx.put(GOAL_ACTIVE, run_key(&id), Vec::new());
        Ok(json!({ "run_id": id, "status": "running", "steps": compiled.names.len() }))
    }
}

/// The agent's run as staged so far, or `not_found` (another agent's run
/// is not found either); `failed_precondition` once it has ended.
fn running_run(tx: &GroupTx<'_>, staging: &Staging<'_>, run: &OpId) -> Result<RunRecord> {
    let record: RunRecord = match tx.read(GOAL_RUNS, &run_key(run))? {
        Some(bytes) => run::decode(&bytes, "run")?,
        None => return Err(Error::not_found("run", run)),
    };
    if record.agent != *staging.agent {
        return Err(Error::not_found("run", run));
    }
    if record.status.is_final() {
        return Err(Error::new(
            ErrorCode::FailedPrecondition,
            format!("run {run} has ended ({})", status_name(record.status)),
        ));
    }
    Ok(record)
}

pub fn status_name(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Steer {
    Cancel,
    Pause,
    Resume,
}

#[derive(Debug)]
struct SteerRun {
    run: OpId,
    change: Steer,
}

impl EffectOp for SteerRun {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut record = running_run(tx, staging, &self.run)?;
        match self.change {
            Steer::Cancel => record.cancelling = true,
            Steer::Pause => record.paused = true,
            Steer::Resume => record.paused = false,
        }
        tx.put(GOAL_RUNS, run_key(&self.run), run::encode(&record)?);
        Ok(json!({
            "run_id": self.run,
            "status": status_name(record.status),
            "paused": record.paused,
            "cancelling": record.cancelling,
        }))
    }
}

#[derive(Debug)]
struct SendSignal {
    run: OpId,
    name: String,
    payload: Value,
    /// The `wait.approval` step an approval decides.
    approval_of: Option<String>,
}

impl EffectOp for SendSignal {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let record = running_run(tx, staging, &self.run)?;
        // A signal is for a step that waits for it: a name none waits for
        // (a typo, say) is refused, and a run keeps no more signals than it
        // has such steps.
        let awaited = record.workflow.steps.values().any(|s| {
            s.kind == engine_kinds::SIGNAL && s.args.get("name").and_then(Value::as_str) == Some(self.name.as_str())
        });
        if self.approval_of.is_none() && !awaited {
            return Err(Error::invalid_field(
                "name",
                format!("run {} has no wait.signal step named {:?}", self.run, self.name),
            ));
        }
        if let Some(step) = &self.approval_of {
            // A wait.approval step, or an op step waiting past the run's cost cap.
            let waits_for_approval = match record.workflow.steps.get(step) {
                Some(s) if s.kind == engine_kinds::APPROVAL => true,
                Some(s) if record.workflow.cost_cap_waits() && !engine_kinds::ALL.contains(&s.kind.as_str()) => {
                    let saved = tx.read(run::GOAL_STEPS, &run::step_key(&self.run, step))?;
                    let saved: Option<run::StepRecord> =
                        saved.as_deref().map(|s| run::decode(s, "a step")).transpose()?;
                    saved.is_some_and(|s| s.status == run::StepStatus::Waiting)
                }
                _ => false,
            };
            if !waits_for_approval {
                return Err(Error::invalid_field(
                    "step",
                    format!("run {} has no wait.approval step {step:?}", self.run),
                ));
            }
        }
        let key = signal_key(&self.run, &self.name);
        if tx.read(GOAL_SIGNALS, &key)?.is_some() {
            return Ok(
                json!({ "run_id": self.run, "name": self.name, "delivered": false, "reason": "a signal of this name was sent before; the first is kept" }),
            );
        }
        tx.put(GOAL_SIGNALS, key, run::encode(&self.payload)?);
        Ok(json!({ "run_id": self.run, "name": self.name, "delivered": true }))
    }
}
