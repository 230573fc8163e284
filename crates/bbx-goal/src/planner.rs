//! The planner: a goal in words becomes a workflow. The model is asked, through
//! an `llm.chat` op of the agent (metered against its budgets, checked by its
//! policies), for a plan constrained by a JSON Schema (`response_format`): steps
//! whose kind is one of the allowed tools and whose dependencies name earlier
//! steps only, so every plan that parses is acyclic. The plan is then checked
//! like any workflow; while it fails, the model is shown the error and asked
//! again, a bounded number of times.

use crate::Goals;
use crate::validate::{self, Compiled};
use crate::workflow::{OnFailure, Step, Workflow};
use bbx_auth::Caller;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

/// Steps a plan may have.
pub const MAX_PLAN_STEPS: usize = 64;
/// The longest goal, in bytes.
pub const MAX_GOAL_BYTES: usize = 16 * 1024;

/// What to plan for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GoalSpec {
    /// The goal, in words.
    pub goal: String,
    /// The op kinds the plan may use; every kind but `goal.*` when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// The most the plan may be estimated to cost, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

/// A plan, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub compiled: Compiled,
    /// Answers the model gave (the first, and each repair).
    pub attempts: u32,
    /// Each rejected answer's error.
    pub errors: Vec<String>,
    /// What planning cost (the model's answers), in micro-dollars.
    pub planning_cost_micros: u64,
    /// What its `llm.chat` steps may cost at most, in micro-dollars, at the
    /// price table (other tools cost nothing here).
    pub estimated_cost_micros: u64,
}

impl Plan {
    pub fn view(&self) -> Value {
        let critical = self.compiled.critical_path().max(1);
        json!({
            "plan": self.compiled.workflow,
            "steps": self.compiled.names.len(),
            "critical_path": critical,
            "parallelism": self.compiled.names.len() as f64 / critical as f64,
            "attempts": self.attempts,
            "valid_first_attempt": self.attempts == 1,
            "errors": self.errors,
            "planning_cost_usd": self.planning_cost_micros as f64 / 1e6,
            "estimated_cost_usd": self.estimated_cost_micros as f64 / 1e6,
        })
    }
}

/// What a replan is given: the run so far, and what failed.
pub struct Replan<'a> {
    pub workflow: &'a Workflow,
    /// The steps that ended (they stay).
    pub ended: Vec<String>,
    /// Those of them that failed: they no longer fail the run.
    pub failed: Vec<String>,
    /// Outputs of the steps that succeeded, by name (new steps may depend on them).
    pub outputs: Map<String, Value>,
    pub failed_step: &'a str,
    pub failure: &'a Error,
}

impl Goals {
    /// Asks the model for a plan for `spec`, as `caller` on `agent`'s budgets,
    /// until one passes the checks or the attempts run out.
    pub async fn plan(
        &self,
        caller: &Caller,
        agent: AgentId,
        spec: &GoalSpec,
        replan: Option<&Replan<'_>>,
        scope: Option<OpId>,
    ) -> Result<Plan> {
        if let Some(max) = spec.max_cost_usd
            && !(max.is_finite() && (0.0..=1e9).contains(&max))
        {
            return Err(Error::invalid_field(
                "max_cost_usd",
                "max_cost_usd must be a number of USD from 0 to 1e9",
            ));
        }
        let config = self.config();
        let Some(model) = config.planner_model.clone() else {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "no planner is configured: set [goals] planner_model (and planner_endpoint, one of [tools.llm.endpoints])",
            ));
        };
        if spec.goal.trim().is_empty() || spec.goal.len() > MAX_GOAL_BYTES {
            return Err(Error::invalid_field(
                "goal",
                format!("a goal is 1-{MAX_GOAL_BYTES} bytes"),
            ));
        }
        let mut tools = self.tools(&spec.tools)?;
        // A confined caller's plans use its kinds only.
        if let Some(allowed) = &caller.kinds {
            tools.retain(|tool| allowed.contains(tool));
            if tools.is_empty() {
                return Err(Error::permission_denied(
                    "none of the tools is a kind this credential may submit",
                ));
            }
        }
        let schema = plan_schema(&tools);
        let mut messages = vec![
            json!({ "role": "system", "content": self.instructions(&tools) }),
            json!({ "role": "user", "content": prompt(spec, replan) }),
        ];
        let (mut attempts, mut errors, mut planning_cost_micros) = (0, Vec::new(), 0);
        while attempts < config.plan_attempts {
            attempts += 1;
            let args = json!({
                "endpoint": config.planner_endpoint,
                "model": model,
                "messages": messages,
                "max_tokens": config.planner_max_tokens,
                "temperature": 0,
                "timeout_ms": config.planner_timeout_ms,
                "response_format": { "type": "json_schema", "json_schema": { "name": "plan", "strict": false, "schema": schema } },
            });
            // In a run's flow scope, what the model is shown of the run's
            // outside reads taints its answer, and the run's later ops.
            let op = SubmitOp {
                timeout_ms: Some(config.planner_timeout_ms + 5_000),
                run_id: scope.map(|run| run.to_string()),
                ..SubmitOp::new(agent, "llm.chat", args)
            };
            let wait = Duration::from_millis(config.planner_timeout_ms + 10_000);
            let answer = bbx_component::run_op(&*self.context()?.submitter, caller, op, wait).await?;
            planning_cost_micros += answer["cost_micros"].as_u64().unwrap_or(0);
            let content = answer["content"].as_str().unwrap_or_default().to_owned();
            match self.check(&content, &tools, replan) {
                Ok(mut compiled) => {
                    // What the goal may cost caps its run too (a replan keeps the cap it had).
                    if replan.is_none() {
                        compiled.workflow.max_cost_usd = spec.max_cost_usd;
                    }
                    let estimated_cost_micros = self.estimate(&compiled);
                    if let Some(max) = spec.max_cost_usd
                        && estimated_cost_micros as f64 / 1e6 > max
                    {
                        return Err(Error::new(
                            ErrorCode::QuotaExceeded,
                            format!(
                                "the plan may cost ${:.6}, more than the ${max} allowed",
                                estimated_cost_micros as f64 / 1e6
                            ),
                        ));
                    }
                    return Ok(Plan {
                        compiled,
                        attempts,
                        errors,
                        planning_cost_micros,
                        estimated_cost_micros,
                    });
                }
                Err(e) => {
                    errors.push(e.message.clone());
                    messages.push(json!({ "role": "assistant", "content": content }));
                    messages.push(json!({ "role": "user", "content": format!(
                        "That plan is not valid: {}. Answer with the whole corrected plan, in the same JSON form.", e.message
                    ) }));
                }
            }
        }
        Err(Error::new(
            ErrorCode::FailedPrecondition,
            format!(
                "the planner gave no valid plan in {attempts} attempts; the last was refused: {}",
                errors.last().map(String::as_str).unwrap_or("no answer")
            ),
        )
        .with_details(json!({ "errors": errors })))
    }

    /// The tools a plan may use: those asked for (each a kind the kernel
    /// serves, none of the engine's own), or every kind but `goal.*`.
    fn tools(&self, asked: &[String]) -> Result<Vec<String>> {
        let known = self.kind_names();
        if asked.is_empty() {
            return Ok(known.into_iter().filter(|k| !k.starts_with("goal.")).collect());
        }
        for tool in asked {
            if !known.contains(tool) {
                return Err(Error::invalid_field("tools", format!("no op kind is named {tool:?}")));
            }
        }
        let mut tools = asked.to_vec();
        tools.sort_unstable();
        tools.dedup();
        Ok(tools)
    }

    /// What the model is told: the plan's form, and each tool with its args' schema.
    fn instructions(&self, tools: &[String]) -> String {
        let mut text = String::from(
            "You are the planner of BBX, an operating system for AI agents. Turn the user's goal into a plan: \
             a JSON object {\"steps\": [...]}. Each step is {\"name\": a unique name (letters, digits, _ and -), \
             \"kind\": one of the tools below, \"args\": the tool's arguments, \"depends_on\": the names of EARLIER \
             steps it needs}. Steps that do not depend on each other run in parallel, so a step depends only on \
             what it needs. An argument may take an earlier step's output: \"${steps.NAME.output.FIELD}\" (a whole \
             string keeps the value's type); NAME must then be in depends_on. Use as few steps as the goal needs.\n\
             Tools:\n",
        );
        for tool in tools {
            let schema = self
                .kind_schema(tool)
                .map(|s| compact_schema(&s))
                .unwrap_or_else(|| "{}".into());
            text.push_str(&format!("- {tool}: args {schema}\n"));
        }
        text
    }

    /// The model's answer as a checked workflow: its steps in order, each
    /// depending on earlier ones only.
    fn check(&self, content: &str, tools: &[String], replan: Option<&Replan<'_>>) -> Result<Compiled> {
        let answer: Value = serde_json::from_str(content.trim())
            .map_err(|e| Error::invalid_field("plan", format!("the answer is not JSON ({e})")))?;
        let steps: Vec<PlannedStep> = serde_json::from_value(answer["steps"].clone())
            .map_err(|e| Error::invalid_field("plan", format!("the answer is not {{\"steps\": [...]}} ({e})")))?;
        if steps.is_empty() || steps.len() > MAX_PLAN_STEPS {
            return Err(Error::invalid_field(
                "plan",
                format!("a plan has 1-{MAX_PLAN_STEPS} steps"),
            ));
        }
        let mut workflow: BTreeMap<String, Step> = BTreeMap::new();
        // A new step never takes an old step's name (nor its records).
        let taken = |name: &str| replan.is_some_and(|r| r.workflow.steps.contains_key(name));
        let kept = replan.map(|r| &r.outputs);
        for planned in steps {
            if workflow.contains_key(&planned.name) || taken(&planned.name) {
                return Err(Error::invalid_field(
                    "plan",
                    format!("two steps are named {:?}", planned.name),
                ));
            }
            if !tools.contains(&planned.kind) {
                return Err(Error::invalid_field(
                    "plan",
                    format!(
                        "step {} uses {:?}, which is not one of the tools",
                        planned.name, planned.kind
                    ),
                ));
            }
            if let Some(later) = planned
                .depends_on
                .iter()
                .find(|d| !workflow.contains_key(*d) && !kept.is_some_and(|k| k.contains_key(*d)))
            {
                return Err(Error::invalid_field(
                    "plan",
                    format!(
                        "step {} depends on {later:?}, which is not an earlier step",
                        planned.name
                    ),
                ));
            }
            workflow.insert(
                planned.name,
                Step {
                    kind: planned.kind,
                    args: planned.args,
                    depends_on: planned.depends_on,
                    when: None,
                    retries: None,
                    timeout_ms: None,
                    fallback: None,
                    on_failure: OnFailure::Fail,
                    description: None,
                },
            );
        }
        match replan {
            None => validate::compile(
                Workflow {
                    name: None,
                    description: None,
                    inputs: Map::new(),
                    steps: workflow,
                    max_parallel: None,
                    max_cost_usd: None,
                    on_cost_cap: None,
                    output: None,
                },
                self.kinds(),
            ),
            // The new steps are checked beside those they follow.
            Some(replan) => validate::compile(merge(replan, workflow), self.kinds()),
        }
    }

    /// What the plan's `llm.chat` steps may cost at most, at the price table.
    fn estimate(&self, compiled: &Compiled) -> u64 {
        compiled
            .workflow
            .steps
            .values()
            .map(|step| self.estimate_step(&step.kind, &step.args))
            .sum()
    }

    /// What an op of `kind` with `args` may cost at most, in micro-dollars:
    /// an `llm.chat`'s prompt (a token per 4 bytes of its args) and its
    /// `max_tokens` at the price table; nothing for other kinds.
    pub(crate) fn estimate_step(&self, kind: &str, args: &Value) -> u64 {
        let llm = self.config_llm();
        if kind != "llm.chat" {
            return 0;
        }
        let model = args["model"].as_str().unwrap_or_default();
        let Some(price) = llm.prices.get(model) else { return 0 };
        let prompt = args.to_string().len() as f64 / 4.0;
        let output = args["max_tokens"].as_u64().unwrap_or(u64::from(llm.default_max_tokens)) as f64;
        (prompt * price.input_per_mtok + output * price.output_per_mtok).ceil() as u64
    }
}

#[derive(Deserialize)]
struct PlannedStep {
    name: String,
    kind: String,
    #[serde(default)]
    args: Value,
    #[serde(default)]
    depends_on: Vec<String>,
}

fn prompt(spec: &GoalSpec, replan: Option<&Replan<'_>>) -> String {
    match replan {
        None => format!("Goal: {}", spec.goal),
        Some(replan) => format!(
            "Goal: {}\nA plan for it was running, and step {} failed: {}.\nThe plan was: {}\nThe steps that succeeded, and their outputs: {}\n\
             Plan what is left to reach the goal, as new steps (new names; they may depend on the steps that succeeded).",
            spec.goal,
            replan.failed_step,
            replan.failure.message,
            serde_json::to_string(replan.workflow).unwrap_or_default(),
            truncated(&Value::Object(replan.outputs.clone()), 8 * 1024),
        ),
    }
}

fn truncated(value: &Value, max: usize) -> String {
    let text = value.to_string();
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// A schema's properties and required fields, briefly.
fn compact_schema(schema: &Value) -> String {
    let properties = schema["properties"].as_object().map(|p| {
        p.iter()
            .map(|(name, field)| {
                let kind = field["type"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| field["type"].to_string());
                (name.clone(), Value::String(kind))
            })
            .collect::<Map<String, Value>>()
    });
    json!({ "properties": properties, "required": schema["required"] }).to_string()
}

/// The JSON Schema a plan must match (the model's output is constrained to it).
pub fn plan_schema(tools: &[String]) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["steps"],
        "properties": {
            "steps": {
                "type": "array",
                "minItems": 1,
                "maxItems": MAX_PLAN_STEPS,
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["name", "kind", "args", "depends_on"],
                    "properties": {
                        "name": { "type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_-]{0,63}$" },
                        "kind": { "type": "string", "enum": tools },
                        "args": { "type": "object" },
                        "depends_on": { "type": "array", "items": { "type": "string" } },
                    },
                },
            },
        },
    })
}

/// The run's workflow after a replan: every step that ended, as it was (the
/// failed one no longer failing the run: it was replaced), then the new
/// steps; those that waited on the failed one are gone.
fn merge(replan: &Replan<'_>, new: BTreeMap<String, Step>) -> Workflow {
    let mut steps: BTreeMap<String, Step> = replan
        .ended
        .iter()
        .filter_map(|name| Some((name.clone(), replan.workflow.steps.get(name)?.clone())))
        .collect();
    for name in &replan.failed {
        if let Some(failed) = steps.get_mut(name) {
            failed.on_failure = OnFailure::Continue;
        }
    }
    steps.extend(new);
    Workflow {
        steps,
        // Its references may name steps that are gone: the outputs of the
        // steps nothing depends on are the run's.
        output: None,
        ..replan.workflow.clone()
    }
}

/// The `goal.run` args of a run of `plan` for `spec`, confined to `kinds`.
pub fn run_args(plan: &Plan, spec: &GoalSpec, kinds: Option<&Vec<String>>) -> Value {
    json!({ "workflow": plan.compiled.workflow, "goal": spec, "kinds": kinds })
}
