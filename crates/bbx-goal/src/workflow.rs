//! The workflow file format: a DAG of steps, each an op of any kind (or one of
//! the engine's own: durable waits and sub-workflows), in YAML or JSON. Its JSON
//! Schema is [`schema`], published as `docs/goal-workflow.schema.json`.

use bbx_core::op::RetryPolicy;
use bbx_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Steps a workflow may have.
pub const MAX_STEPS: usize = 10_000;
/// The longest step name.
pub const MAX_NAME_LEN: usize = 64;
/// The most steps that run at once in a run, and the default.
pub const MAX_PARALLEL: u32 = 1_024;
pub const DEFAULT_PARALLEL: u32 = 64;

/// A workflow: named steps, the order among them given by `depends_on` and by
/// the references their args make to earlier outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The run's inputs and their defaults (`${inputs.NAME}`); a run may give others.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub inputs: Map<String, Value>,
    /// The steps by name (letters, digits, `_` and `-`, starting with a letter or `_`).
    pub steps: BTreeMap<String, Step>,
    /// Steps that run at once, at most (64 by default, up to 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
    /// The most the run's steps may cost, in USD (what their results report as
    /// `cost_micros`: `llm.chat`'s, at the price table). A step whose estimate,
    /// with what was spent and what running steps may still spend, would pass
    /// it does not start: see `on_cost_cap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// What such a step does: `fail` the run (the default), or wait for an
    /// operator's `approval` (`bbx goals approve RUN STEP`; denied, it fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_cost_cap: Option<OnCostCap>,
    /// The run's output, with references to its steps' outputs; the outputs of
    /// every step that succeeded when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// One step: an op of `kind` with `args`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// An op kind the kernel serves (`state.incr`, `tool.http`, `llm.chat`, ...),
    /// or the engine's: `wait.timer`, `wait.signal`, `wait.approval`,
    /// `workflow` (a child workflow), `goal` (a sub-goal, planned when reached).
    pub kind: String,
    /// The op's args; strings may hold references: `${steps.NAME.output.PATH}`,
    /// `${steps.NAME.status}`, `${inputs.NAME.PATH}`, `${run.id}`, `${run.agent}`. A
    /// string that is one reference takes the value's JSON type; `$${` is a
    /// literal `${`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    /// Steps that must have ended first (a reference to a step's output makes
    /// it one too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Run only if this condition holds, e.g. `${steps.check.output.value} > 3`;
    /// skipped otherwise (and so are the steps that depend on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// Further attempts after a failed one, with exponential backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    /// Time allowed for one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// What runs instead when the step fails past its retries; its output
    /// becomes the step's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
    /// What the step's failure does: `fail` the run (the default), `skip` the
    /// steps that depend on it, or `continue` with them.
    #[serde(default, skip_serializing_if = "OnFailure::is_fail")]
    pub on_failure: OnFailure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A step's fallback: an op of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub args: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    #[default]
    Fail,
    Skip,
    Continue,
}

impl OnFailure {
    fn is_fail(&self) -> bool {
        *self == Self::Fail
    }
}

/// The engine's own step kinds: they are not ops.
pub mod engine_kinds {
    pub const TIMER: &str = "wait.timer";
    pub const SIGNAL: &str = "wait.signal";
    pub const APPROVAL: &str = "wait.approval";
    pub const WORKFLOW: &str = "workflow";
    /// A sub-goal: planned, then run as a child run.
    pub const GOAL: &str = "goal";
    pub const ALL: [&str; 5] = [TIMER, SIGNAL, APPROVAL, WORKFLOW, GOAL];
}

/// `wait.timer`'s args: a duration or a moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimerArgs {
    /// Wait this long from when the step is reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
    /// Or until this moment (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// `wait.signal`'s args: the signal's name; its output is the signal's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalArgs {
    pub name: String,
}

/// `wait.approval`'s args: what the operator is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalArgs {
    #[serde(default)]
    pub reason: String,
}

/// `workflow`'s args: a child workflow run with `inputs`; its output is the
/// child run's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowArgs {
    pub workflow: Workflow,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub inputs: Value,
}

/// The longest wait a timer may ask for: a year.
pub const MAX_TIMER_MS: u64 = 366 * 24 * 3_600_000;

impl Workflow {
    /// A workflow from a file's text: JSON if it starts with `{`, YAML otherwise.
    pub fn parse(text: &str) -> Result<Value> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| Error::invalid_field("workflow", format!("not valid JSON: {e}")))
        } else {
            yaml_serde::from_str(text).map_err(|e| Error::invalid_field("workflow", format!("not valid YAML: {e}")))
        }
    }

    /// The workflow in `value`, its shape checked (not its references or kinds:
    /// see [`crate::validate`]).
    pub fn from_value(value: &Value) -> Result<Self> {
        Self::deserialize(value).map_err(|e| Error::invalid_field("workflow", format!("not a workflow: {e}")))
    }

    pub fn parallelism(&self) -> usize {
        self.max_parallel.unwrap_or(DEFAULT_PARALLEL) as usize
    }

    /// The cost cap in micro-dollars, if there is one.
    pub fn cost_cap_micros(&self) -> Option<u64> {
        self.max_cost_usd.map(|usd| (usd * 1e6).floor() as u64)
    }

    /// Whether a step that would pass the cost cap waits for an approval.
    pub fn cost_cap_waits(&self) -> bool {
        self.max_cost_usd.is_some() && self.on_cost_cap == Some(OnCostCap::Approval)
    }
}

/// What a step that would pass a run's cost cap does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnCostCap {
    Fail,
    Approval,
}

/// The JSON Schema of the workflow format.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(Workflow)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_give_the_same_workflow() {
        let yaml =
            "steps:\n  a: {kind: state.incr, args: {key: a, by: 1}}\n  c:\n    kind: noop\n    depends_on: [a]\n";
        let json = r#"{"steps": {"a": {"kind": "state.incr", "args": {"key": "a", "by": 1}}, "c": {"kind": "noop", "depends_on": ["a"]}}}"#;
        let from_yaml = Workflow::from_value(&Workflow::parse(yaml).unwrap()).unwrap();
        assert_eq!(
            from_yaml,
            Workflow::from_value(&Workflow::parse(json).unwrap()).unwrap()
        );
        assert_eq!(from_yaml.steps["c"].depends_on, ["a"]);
    }

    #[test]
    fn unknown_fields_and_bad_text_are_refused() {
        let unknown = Workflow::parse("steps: {a: {kind: noop, colour: red}}").unwrap();
        assert!(Workflow::from_value(&unknown).unwrap_err().message.contains("colour"));
        assert!(Workflow::parse("{not json").is_err());
        assert!(Workflow::parse("steps: [unclosed").is_err());
    }

    #[test]
    fn the_schema_names_the_step_fields() {
        let schema = schema().to_string();
        for field in ["depends_on", "when", "fallback", "on_failure", "retries", "timeout_ms"] {
            assert!(schema.contains(field), "{field}");
        }
    }
}
