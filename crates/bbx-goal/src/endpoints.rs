//! The goals API: starting and steering a run submits its op through the whole
//! pipeline as the caller (auth, quotas, flow checks, journal); reading a run
//! answers from its durable records once the kernel says the caller may read
//! its agent. Served as `goals.*` (HTTP under `/v1/goals`, MCP `goals_*`, CLI
//! `bbx goals VERB`) and under the report's names, `goal_engine.execute|status|list`
//! (MCP `goal_engine_*`).

use crate::planner::{self, GoalSpec};
use crate::run::{self, RunRecord};
use crate::{Goals, ops, validate, views, workflow};
use bbx_auth::{Action, Caller};
use bbx_component::Endpoint;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, OpId, Result};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
/// A workflow larger than this (as JSON) is stored before its run starts,
/// not carried in the op's args.
const INLINE_WORKFLOW_BYTES: usize = 32 * 1024;
/// Runs a list answers with at most.
const MAX_LIST: usize = 1_000;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RunReq {
    agent: AgentId,
    /// The workflow: an object, or its text in YAML or JSON.
    workflow: Value,
    #[serde(default)]
    inputs: Map<String, Value>,
    /// Running again with the same key starts nothing and answers as the first time.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PlanReq {
    agent: AgentId,
    /// The goal, in words.
    goal: String,
    /// The op kinds the plan may use; every kind but goal.* when empty.
    #[serde(default)]
    tools: Vec<String>,
    /// The most the plan may be estimated to cost, in USD.
    #[serde(default)]
    max_cost_usd: Option<f64>,
    /// Plan only: answer with the plan, run nothing.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ValidateReq {
    /// The workflow: an object, or its text in YAML or JSON.
    workflow: Value,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RunIdReq {
    run: OpId,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListReq {
    agent: AgentId,
    /// Runs created before this one (the last of the previous page).
    #[serde(default)]
    before: Option<OpId>,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SignalReq {
    run: OpId,
    name: String,
    #[serde(default)]
    payload: Value,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ApproveReq {
    run: OpId,
    step: String,
    /// false denies it.
    #[serde(default)]
    approve: Option<bool>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Nothing {}

fn workflow_value(given: Value) -> Result<Value> {
    match given {
        Value::String(text) => workflow::Workflow::parse(&text),
        other => Ok(other),
    }
}

impl Goals {
    async fn run_op(&self, caller: &Caller, op: SubmitOp) -> Result<Value> {
        bbx_component::run_op(&*self.context()?.submitter, caller, op, WAIT).await
    }

    /// The run, if the caller may read its agent (else `not_found`, as for a
    /// run that does not exist).
    fn readable(&self, caller: &Caller, id: &OpId, operation: &str) -> Result<RunRecord> {
        let ctx = self.context()?;
        let run = run::load_run(&ctx.store, id)?.ok_or_else(|| Error::not_found("run", id))?;
        ctx.submitter
            .may_read(caller, &run.agent, operation)
            .map_err(|_| Error::not_found("run", id))?;
        Ok(run)
    }

    fn status(&self, caller: &Caller, id: &OpId, operation: &str) -> Result<Value> {
        let run = self.readable(caller, id, operation)?;
        let steps = run::load_steps(&self.context()?.store, id)?;
        Ok(views::run(&run, steps))
    }

    fn list(&self, caller: &Caller, req: ListReq, operation: &str) -> Result<Value> {
        let ctx = self.context()?;
        ctx.submitter.may_read(caller, &req.agent, operation)?;
        let limit = req.limit.unwrap_or(100);
        if !(1..=MAX_LIST).contains(&limit) {
            return Err(Error::invalid_field(
                "limit",
                format!("limit must be from 1 to {MAX_LIST}"),
            ));
        }
        let mut runs = Vec::new();
        for id in run::agent_runs(&ctx.store, &req.agent, req.before.as_ref(), limit)? {
            if let Some(run) = run::load_run(&ctx.store, &id)? {
                runs.push(views::summary(&run));
            }
        }
        Ok(json!({ "runs": runs }))
    }

    /// Submits `kind` on the run's agent with `args`. A caller whose role may
    /// not is refused before the run is looked up (the answer says nothing of
    /// whether it exists).
    async fn steer(&self, caller: &Caller, run: &OpId, kind: &str, args: Value) -> Result<Value> {
        let needs = if kind == ops::APPROVE {
            Action::Operate
        } else {
            Action::Act
        };
        caller.may(needs)?;
        let record = self.readable(caller, run, kind)?;
        self.run_op(caller, SubmitOp::new(record.agent, kind, args)).await
    }

    /// Plans the goal as the caller (the model's calls are the agent's
    /// `llm.chat` ops) and, unless only a plan was asked for, runs it.
    async fn plan_goal(&self, caller: &Caller, req: PlanReq) -> Result<Value> {
        caller.may(Action::Act)?;
        self.context()?.submitter.may_read(caller, &req.agent, "goals.plan")?;
        let spec = GoalSpec {
            goal: req.goal,
            tools: req.tools,
            max_cost_usd: req.max_cost_usd,
        };
        let plan = self.plan(caller, req.agent, &spec, None, None).await?;
        let mut view = plan.view();
        if !req.dry_run {
            let op = SubmitOp::new(
                req.agent,
                ops::RUN,
                planner::run_args(&plan, &spec, caller.kinds.as_ref()),
            );
            let started = self.run_op(caller, op).await?;
            view["run_id"] = started["run_id"].clone();
        }
        Ok(view)
    }

    /// Checks the workflow whole, then runs it: inline in the `goal.run` op,
    /// or (when it is larger than an op's args may be) stored first under
    /// its digest and named by the op.
    async fn start_run(&self, caller: &Caller, req: RunReq) -> Result<Value> {
        let workflow = workflow_value(req.workflow)?;
        validate::compile(workflow::Workflow::from_value(&workflow)?, self.kinds())?;
        let json = serde_json::to_vec(&workflow).map_err(|e| Error::internal(e.to_string()))?;
        let args = if json.len() <= INLINE_WORKFLOW_BYTES {
            json!({ "workflow": workflow, "inputs": req.inputs, "kinds": caller.kinds })
        } else {
            caller.may(Action::Act)?;
            self.context()?.submitter.may_read(caller, &req.agent, ops::RUN)?;
            let digest = run::workflow_digest(&json);
            self.context()?
                .store
                .write(run::StoreWorkflow {
                    digest: digest.clone(),
                    json,
                })
                .await?;
            json!({ "workflow_ref": digest, "inputs": req.inputs, "kinds": caller.kinds })
        };
        let op = SubmitOp {
            idempotency_key: req.idempotency_key,
            ..SubmitOp::new(req.agent, ops::RUN, args)
        };
        self.run_op(caller, op).await
    }
}

pub(crate) fn endpoints(goals: &Goals) -> Vec<Endpoint> {
    const RUN: &str = "Run a workflow (a DAG of steps, YAML or JSON; see goals.schema) as an agent: checked whole before anything runs, then each step becomes an op as soon as its dependencies end. Answers with the run's id.";
    const STATUS: &str =
        "A run's status (running, succeeded, failed, cancelled) and each step's status, output, error and timings.";
    const LIST: &str = "An agent's runs, newest first, without their steps.";
    let run = |name, path| {
        Endpoint::serving(
            goals,
            name,
            ("POST", path),
            RUN,
            |g: Goals, caller, req: RunReq| async move { g.start_run(&caller, req).await },
        )
    };
    let status = |name, path| {
        Endpoint::serving(
            goals,
            name,
            ("GET", path),
            STATUS,
            move |g: Goals, caller, req: RunIdReq| async move { g.status(&caller, &req.run, name) },
        )
    };
    let list = |name, path| {
        Endpoint::serving(
            goals,
            name,
            ("GET", path),
            LIST,
            move |g: Goals, caller, req: ListReq| async move { g.list(&caller, req, name) },
        )
    };
    const PLAN: &str = "Plan a goal in words as a workflow with the configured model (its answer constrained to the workflow's form and the allowed tools, checked, and repaired from the errors), then run it; dry_run answers with the plan only.";
    let plan = |name, path| {
        Endpoint::serving(
            goals,
            name,
            ("POST", path),
            PLAN,
            |g: Goals, caller, req: PlanReq| async move { g.plan_goal(&caller, req).await },
        )
    };
    let steer = |name, path, kind: &'static str, description| {
        Endpoint::serving(
            goals,
            name,
            ("POST", path),
            description,
            move |g: Goals, caller, req: RunIdReq| async move {
                g.steer(&caller, &req.run, kind, json!({ "run": req.run })).await
            },
        )
    };
    vec![
        run("goals.run", "/v1/goals/runs"),
        list("goals.list", "/v1/goals/runs"),
        status("goals.status", "/v1/goals/runs/{run}"),
        steer(
            "goals.cancel",
            "/v1/goals/runs/{run}/cancel",
            ops::CANCEL,
            "Cancel a run: its running ops are cancelled, its child runs too, and no further step starts.",
        ),
        steer(
            "goals.pause",
            "/v1/goals/runs/{run}/pause",
            ops::PAUSE,
            "Pause a run: what runs finishes, nothing new starts until it is resumed.",
        ),
        steer(
            "goals.resume",
            "/v1/goals/runs/{run}/resume",
            ops::RESUME,
            "Resume a paused run: steps whose dependencies have ended start again.",
        ),
        Endpoint::serving(
            goals,
            "goals.signal",
            ("POST", "/v1/goals/runs/{run}/signals"),
            "Send a run a named signal with a payload: a wait.signal step of that name ends with the payload as its output (now, or when it is reached). The first signal of a name is kept.",
            |g: Goals, caller, req: SignalReq| async move {
                g.steer(
                    &caller,
                    &req.run,
                    ops::SIGNAL,
                    json!({ "run": req.run, "name": req.name, "payload": req.payload }),
                )
                .await
            },
        ),
        Endpoint::serving(
            goals,
            "goals.approve",
            ("POST", "/v1/goals/runs/{run}/steps/{step}/approve"),
            "An operator's decision on a wait.approval step: approve (the default) or deny (approve: false; the step fails).",
            |g: Goals, caller, req: ApproveReq| async move {
                let args = json!({ "run": req.run, "step": req.step, "approve": req.approve.unwrap_or(true), "reason": req.reason });
                g.steer(&caller, &req.run, ops::APPROVE, args).await
            },
        ),
        Endpoint::serving(
            goals,
            "goals.validate",
            ("POST", "/v1/goals/validate"),
            "Check a workflow without running it: each problem is one error naming the step's path; a valid one answers with its steps and its critical path's length.",
            |g: Goals, _caller, req: ValidateReq| async move {
                let value = workflow_value(req.workflow)?;
                let compiled = validate::compile(workflow::Workflow::from_value(&value)?, g.kinds())?;
                let critical = compiled.critical_path();
                Ok(json!({
                    "valid": true,
                    "steps": compiled.names.len(),
                    "critical_path": critical,
                    "parallelism": compiled.names.len() as f64 / critical.max(1) as f64,
                }))
            },
        ),
        Endpoint::serving(
            goals,
            "goals.schema",
            ("GET", "/v1/goals/schema"),
            "The JSON Schema of the workflow format (steps, depends_on, when, retries, fallback, on_failure).",
            |_g: Goals, _caller, _req: Nothing| async move { Ok(workflow::schema()) },
        ),
        plan("goals.plan", "/v1/goals/plan"),
        plan("goal_engine.plan", "/v1/goal-engine/plan"),
        run("goal_engine.execute", "/v1/goal-engine/execute"),
        status("goal_engine.status", "/v1/goal-engine/status/{run}"),
        list("goal_engine.list", "/v1/goal-engine/list"),
    ]
}
