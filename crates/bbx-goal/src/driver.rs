//! A run, driven: each step becomes an op (or a durable wait, or a child run)
//! as soon as the steps it depends on have ended, up to the run's parallelism,
//! through the whole pipeline as the run's agent (quotas, flow checks,
//! journal). Step records are written as steps start and end, many in one
//! group; the run's final record last.
//!
//! After a crash the driver starts again from what is durable: a step that
//! had ended keeps its record; any other is submitted again under the same
//! (agent, run, step) key, so the ring answers with the op it already was (its
//! completion, or the op still running) instead of running it twice, and a
//! tool op that was running at the crash comes back `in_doubt`.

use crate::Goals;
use crate::ops::{self, RunArgs};
use crate::planner::{GoalSpec, Replan};
use crate::run::{self, GOAL_ACTIVE, GOAL_RUNS, GOAL_STEPS, Parent, RunRecord, RunStatus, StepRecord, StepStatus};
use crate::template::{self, Resolved, Target};
use crate::validate::{self, Compiled};
use crate::workflow::{ApprovalArgs, OnFailure, SignalArgs, TimerArgs, WorkflowArgs, engine_kinds};
use bbx_auth::{Caller, Role};
use bbx_component::Context;
use bbx_core::op::{Completion, CompletionStatus, SubmitBatch, SubmitOp};
use bbx_core::{Error, ErrorCode, KeyId, OpId, Result};
use bbx_store::{Applied, GroupTx, Staged};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What a driver is told of its run from outside.
#[derive(Debug)]
pub enum Notice {
    /// Its record changed (cancel, pause, resume): read it again.
    Steered,
    /// A signal or approval was recorded: read them again.
    Signalled,
}

/// How long one wait for an op's completion lasts before it is asked again.
const WAIT: Duration = Duration::from_secs(60);
/// The first pause before a submission refused for now (a quota) is tried
/// again, doubled up to [`MAX_RESUBMIT_BACKOFF`].
const RESUBMIT_BACKOFF: Duration = Duration::from_millis(20);
const MAX_RESUBMIT_BACKOFF: Duration = Duration::from_secs(2);

/// How a step's work ended.
enum Outcome {
    Op(Box<Completion>),
    /// Never became an op (or its child run could not be made).
    Refused(Error),
    /// Its op was made, but its completion could not be had: no fallback
    /// runs beside what may still run.
    Lost(Error),
    Fired,
    Child(Box<RunRecord>),
}

type Running = BoxFuture<'static, (usize, bool, Outcome)>;

pub(crate) struct Driver {
    goals: Goals,
    ctx: Context,
    caller: Caller,
    run: RunRecord,
    compiled: Arc<Compiled>,
    steps: Vec<StepRecord>,
    dependants: Vec<Vec<usize>>,
    /// Dependencies not yet ended, per step.
    waiting_on: Vec<usize>,
    ready: VecDeque<usize>,
    signals: HashMap<String, Value>,
    /// Steps waiting for a signal, by its name.
    awaiting: HashMap<String, Vec<usize>>,
    in_flight: FuturesUnordered<Running>,
    /// In flight and counted against the run's parallelism (ops and child runs).
    busy: usize,
    /// Ops of steps in flight, once submitted: what a cancel stops.
    ops: Arc<Mutex<HashMap<usize, OpId>>>,
    dirty: Vec<usize>,
    failure: Option<Error>,
    /// The step whose failure fails the run (what a replan replaces).
    failed_step: Option<usize>,
    writes: FuturesUnordered<BoxFuture<'static, Result<Applied>>>,
}

impl Driver {
    pub(crate) fn new(goals: Goals, ctx: Context, run: RunRecord) -> Result<Self> {
        let compiled = Arc::new(validate::compile(run.workflow.clone(), None)?);
        let n = compiled.names.len();
        let mut steps = vec![StepRecord::pending(); n];
        for (name, record) in run::load_steps(&ctx.store, &run.id)? {
            if let Some(index) = compiled.index(&name) {
                steps[index] = record;
            }
        }
        let signals = run::load_signals(&ctx.store, &run.id)?.into_iter().collect();
        let mut dependants = vec![Vec::new(); n];
        for (step, deps) in compiled.deps.iter().enumerate() {
            for &dep in deps {
                dependants[dep].push(step);
            }
        }
        let waiting_on: Vec<usize> = compiled
            .deps
            .iter()
            .map(|deps| deps.iter().filter(|&&d| !steps[d].status.is_final()).count())
            .collect();
        let ready = (0..n)
            .filter(|&s| !steps[s].status.is_final() && waiting_on[s] == 0)
            .collect();
        let mut caller = Caller::of_tenant(KeyId::from_bytes(*run.id.as_bytes()), run.tenant.clone(), Role::Agent);
        caller.agent = Some(run.agent);
        // Every step is checked against the kinds its creator was confined to.
        caller.kinds = run.kinds.clone();
        let failed_step =
            (0..n).find(|&i| steps[i].status.is_failure() && compiled.step(i).on_failure == OnFailure::Fail);
        let failure = failed_step.map(|i| step_failed(&compiled.names[i], &steps[i]));
        Ok(Self {
            goals,
            ctx,
            caller,
            run,
            compiled,
            steps,
            dependants,
            waiting_on,
            ready,
            signals,
            awaiting: HashMap::new(),
            in_flight: FuturesUnordered::new(),
            busy: 0,
            ops: Arc::default(),
            dirty: Vec::new(),
            failure,
            failed_step,
            writes: FuturesUnordered::new(),
        })
    }

    /// Drives the run until it ends, is planned again, or the kernel stops
    /// (it resumes at the next start).
    pub(crate) async fn drive(mut self, inbox: &mut mpsc::UnboundedReceiver<Notice>) -> Driven {
        let stopping = self.ctx.stopping.clone();
        loop {
            if self.run.cancelling {
                self.cancel().await;
            }
            if !self.run.paused && !self.run.cancelling {
                self.launch_ready();
            }
            self.flush().await;
            // A failed run waits for its ops, not for its timers and signals.
            let only_waits_left = self.busy == 0 && self.failure.is_some();
            if only_waits_left && self.may_replan() {
                match self.replan().await {
                    Ok(()) => return Driven::Replanned,
                    Err(e) => {
                        let failed = self.failure.take().map(|f| f.message).unwrap_or_default();
                        self.failure = Some(Error::new(
                            e.code,
                            format!("{failed}; planning again failed: {}", e.message),
                        ));
                        self.failed_step = None;
                    }
                }
            }
            if (self.in_flight.is_empty() || only_waits_left) && self.ended() {
                break;
            }
            tokio::select! {
                biased;
                _ = stopping.cancelled() => return Driven::Stopped,
                notice = inbox.recv() => match notice {
                    Some(notice) => self.heed(notice),
                    None => return Driven::Stopped,
                },
                Some((step, fallback, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.settle(step, fallback, outcome);
                    // Take every outcome already there in this round: one write for all.
                    while let Some(Some((step, fallback, outcome))) = futures::FutureExt::now_or_never(self.in_flight.next()) {
                        self.settle(step, fallback, outcome);
                    }
                }
                Some(written) = self.writes.next(), if !self.writes.is_empty() => {
                    if let Err(e) = written {
                        tracing::error!(run = %self.run.id, error = %e, "a run's steps could not be saved; it resumes at the next start");
                        return Driven::Stopped;
                    }
                }
            }
        }
        self.finish().await;
        Driven::Ended
    }

    /// Whether the step that failed the run may have the rest planned again:
    /// the run was made from a goal and has replans left.
    fn may_replan(&self) -> bool {
        // What is in doubt may have acted: a new plan could do it again.
        let planned_over_doubt = self.steps.iter().any(|s| s.status == StepStatus::InDoubt);
        self.failed_step.is_some()
            && !planned_over_doubt
            && self.run.goal.is_some()
            && !self.run.cancelling
            && self.run.generation < self.goals.config().max_replans
    }

    /// Asks the planner for what is left after the failed step, given the
    /// outputs so far; the run's new workflow keeps every step that ended
    /// (none runs again) and the replacement's steps, under the next
    /// generation's keys.
    async fn replan(&mut self) -> Result<()> {
        let (Some(failed), Some(spec), Some(failure)) = (self.failed_step, self.run.goal.clone(), self.failure.clone())
        else {
            return Err(Error::internal("nothing to plan again"));
        };
        let ended: Vec<String> = (0..self.steps.len())
            .filter(|&i| self.steps[i].status.is_final())
            .map(|i| self.compiled.names[i].clone())
            .collect();
        let outputs = (0..self.steps.len())
            .filter(|&i| self.steps[i].status == StepStatus::Succeeded)
            .map(|i| {
                (
                    self.compiled.names[i].clone(),
                    self.steps[i].output.clone().unwrap_or(Value::Null),
                )
            })
            .collect();
        let failed_steps = (0..self.steps.len())
            .filter(|&i| self.steps[i].status.is_failure())
            .map(|i| self.compiled.names[i].clone())
            .collect();
        let dropped: Vec<String> = (0..self.steps.len())
            .filter(|&i| !self.steps[i].status.is_final())
            .map(|i| self.compiled.names[i].clone())
            .collect();
        let replan = Replan {
            workflow: &self.compiled.workflow,
            failed: failed_steps,
            ended,
            outputs,
            failed_step: &self.compiled.names[failed],
            failure: &failure,
        };
        let plan = self
            .goals
            .plan(
                &self.caller,
                self.run.agent,
                &spec,
                Some(&replan),
                Some(self.run.root()),
            )
            .await?;
        while let Some(written) = self.writes.next().await {
            written?;
        }
        self.ctx
            .store
            .write(Replanned {
                run: self.run.id,
                workflow: plan.compiled.workflow,
                generation: self.run.generation + 1,
                dropped,
            })
            .await?;
        Ok(())
    }

    /// Whether nothing more will start: every step ended, or the run failed or
    /// was cancelled and what was running has stopped.
    fn ended(&self) -> bool {
        let all_final = self.steps.iter().all(|s| s.status.is_final());
        let waits_only = self.busy == 0 && self.steps.iter().all(|s| s.status != StepStatus::Running);
        all_final || ((self.failure.is_some() || self.run.cancelling) && waits_only)
    }

    fn heed(&mut self, notice: Notice) {
        match notice {
            Notice::Steered => match run::load_run(&self.ctx.store, &self.run.id) {
                Ok(Some(record)) => {
                    self.run.paused = record.paused;
                    self.run.cancelling = record.cancelling;
                }
                Ok(None) => {}
                Err(e) => tracing::error!(run = %self.run.id, error = %e, "a run's record could not be read"),
            },
            Notice::Signalled => match run::load_signals(&self.ctx.store, &self.run.id) {
                Ok(signals) => {
                    for (name, payload) in signals {
                        if let Some(waiting) = self.awaiting.remove(&name) {
                            for step in waiting {
                                self.signalled(step, &name, &payload);
                            }
                        }
                        self.signals.insert(name, payload);
                    }
                }
                Err(e) => tracing::error!(run = %self.run.id, error = %e, "a run's signals could not be read"),
            },
        }
    }

    /// Starts ready steps up to the run's parallelism. A failing run starts
    /// nothing new, but takes back the steps that were running when the
    /// kernel stopped (their ops are joined by their keys), so that it ends
    /// once they have.
    fn launch_ready(&mut self) {
        let limit = self.compiled.workflow.parallelism();
        let mut held = VecDeque::new();
        while self.busy < limit {
            let Some(step) = self.ready.pop_front() else { break };
            if self.failure.is_some() && self.steps[step].status != StepStatus::Running {
                held.push_back(step);
                continue;
            }
            self.launch(step);
        }
        held.extend(self.ready.drain(..));
        self.ready = held;
    }

    fn launch(&mut self, index: usize) {
        let compiled = self.compiled.clone();
        let step = compiled.step(index);
        if let Some(reason) = self.blocked_by_dependency(index) {
            return self.end(index, StepStatus::Skipped, None, None, Some(reason));
        }
        if let Some(condition) = &compiled.conditions[index] {
            let holds = condition.holds(&mut |target| Ok(self.condition_value(target)));
            match holds {
                Ok(true) => {}
                Ok(false) => {
                    let reason = format!(
                        "its condition does not hold: {}",
                        step.when.as_deref().unwrap_or_default()
                    );
                    return self.end(index, StepStatus::Skipped, None, None, Some(reason));
                }
                Err(why) => return self.fail(index, Error::invalid_field("when", why)),
            }
        }
        let now = Utc::now();
        self.steps[index].started_at.get_or_insert(now);
        match step.kind.as_str() {
            engine_kinds::TIMER => {
                let record = &mut self.steps[index];
                let wake_at = match record.wake_at {
                    Some(at) => at,
                    None => {
                        let timer: TimerArgs = serde_json::from_value(step.args.clone()).unwrap_or(TimerArgs {
                            ms: Some(0),
                            until: None,
                        });
                        timer
                            .until
                            .unwrap_or_else(|| now + chrono::Duration::milliseconds(timer.ms.unwrap_or(0) as i64))
                    }
                };
                record.wake_at = Some(wake_at);
                record.status = StepStatus::Waiting;
                self.dirty.push(index);
                let wait = (wake_at - now).to_std().unwrap_or_default();
                self.in_flight.push(Box::pin(async move {
                    tokio::time::sleep(wait).await;
                    (index, false, Outcome::Fired)
                }));
            }
            engine_kinds::SIGNAL | engine_kinds::APPROVAL => {
                let name = match step.kind.as_str() {
                    engine_kinds::SIGNAL => serde_json::from_value::<SignalArgs>(step.args.clone())
                        .map(|a| a.name)
                        .unwrap_or_default(),
                    _ => run::approval_signal(&compiled.names[index]),
                };
                self.steps[index].status = StepStatus::Waiting;
                self.dirty.push(index);
                match self.signals.get(&name).cloned() {
                    Some(payload) => self.signalled(index, &name, &payload),
                    None => self.awaiting.entry(name).or_default().push(index),
                }
            }
            // A child workflow's own references are its own: only its inputs
            // are the parent's to fill.
            engine_kinds::WORKFLOW | engine_kinds::GOAL => match self.render_child_args(&step.kind, &step.args) {
                Ok(args) => {
                    let parent = Some(Parent {
                        run: self.run.id,
                        step: self.compiled.names[index].clone(),
                        root: Some(self.run.root()),
                    });
                    let child: BoxFuture<'static, Result<RunArgs>> = if step.kind == engine_kinds::WORKFLOW {
                        let child: WorkflowArgs = match serde_json::from_value(args) {
                            Ok(child) => child,
                            Err(e) => return self.fail(index, Error::invalid_field("args", e.to_string())),
                        };
                        Box::pin(std::future::ready(Ok(RunArgs {
                            workflow: Some(child.workflow),
                            workflow_ref: None,
                            kinds: self.run.kinds.clone(),
                            inputs: match child.inputs {
                                Value::Object(inputs) => inputs,
                                _ => Map::new(),
                            },
                            parent,
                            goal: None,
                        })))
                    } else {
                        let spec: GoalSpec = match serde_json::from_value(args) {
                            Ok(spec) => spec,
                            Err(e) => return self.fail(index, Error::invalid_field("args", e.to_string())),
                        };
                        let (goals, caller, agent, root) =
                            (self.goals.clone(), self.caller.clone(), self.run.agent, self.run.root());
                        let kinds = self.run.kinds.clone();
                        Box::pin(async move {
                            let plan = goals.plan(&caller, agent, &spec, None, Some(root)).await?;
                            Ok(RunArgs {
                                workflow: Some(plan.compiled.workflow),
                                workflow_ref: None,
                                kinds,
                                inputs: Map::new(),
                                parent,
                                goal: Some(spec),
                            })
                        })
                    };
                    self.steps[index].status = StepStatus::Running;
                    self.dirty.push(index);
                    self.start_child(index, child);
                }
                Err(e) => self.fail(index, e),
            },
            _ => self.submit(index, false),
        }
    }

    /// Why the step cannot run given how its dependencies ended, if it cannot.
    fn blocked_by_dependency(&self, index: usize) -> Option<String> {
        self.compiled.deps[index].iter().find_map(|&dep| {
            let name = &self.compiled.names[dep];
            let record = &self.steps[dep];
            match record.status {
                StepStatus::Skipped => Some(format!("it depends on {name}, which was skipped")),
                status if status.is_failure() && self.compiled.step(dep).on_failure != OnFailure::Continue => {
                    Some(format!("it depends on {name}, which failed"))
                }
                StepStatus::Cancelled => Some(format!("it depends on {name}, which was cancelled")),
                _ => None,
            }
        })
    }

    /// A reference's value in a condition: what is missing is null.
    fn condition_value(&self, target: &Target) -> Value {
        self.resolve(target).map(|r| r.value).unwrap_or(Value::Null)
    }

    fn resolve(&self, target: &Target) -> std::result::Result<Resolved, String> {
        let plain = |value: Value| Resolved { value, from: None };
        let missing = || format!("${{{target}}} names nothing in what it refers to");
        match target {
            Target::RunId => Ok(plain(json!(self.run.id))),
            Target::RunAgent => Ok(plain(json!(self.run.agent))),
            Target::Input { name, path } => self
                .run
                .inputs
                .get(name)
                .and_then(|value| template::at(value, path))
                .cloned()
                .map(plain)
                .ok_or_else(missing),
            Target::Status { step } => {
                let index = self.compiled.index(step).ok_or_else(missing)?;
                Ok(plain(
                    serde_json::to_value(self.steps[index].status).unwrap_or_default(),
                ))
            }
            Target::Output { step, path } => {
                let index = self.compiled.index(step).ok_or_else(missing)?;
                let record = &self.steps[index];
                if record.status != StepStatus::Succeeded {
                    let why = match &record.error {
                        Some(e) => format!(": {}", e.message),
                        None => String::new(),
                    };
                    let status = serde_json::to_value(record.status).unwrap_or_default();
                    return Err(format!(
                        "${{{target}}} refers to the output of step {step}, which ended {}{why}",
                        status.as_str().unwrap_or("without output")
                    ));
                }
                let value = record
                    .output
                    .as_ref()
                    .and_then(|output| template::at(output, path))
                    .cloned()
                    .ok_or_else(missing)?;
                // Tainted values travel through the ring, which carries their
                // labels to the op that takes them.
                let from = match (&record.op_id, record.labels.is_empty()) {
                    (Some(op), false) => {
                        Some(json!({ "op": op, "path": format!("/result{}", template::pointer(path)) }))
                    }
                    _ => None,
                };
                Ok(Resolved { value, from })
            }
        }
    }

    fn render_child_args(&self, kind: &str, args: &Value) -> Result<Value> {
        if kind != engine_kinds::WORKFLOW {
            return self.render(args);
        }
        let mut args = args.clone();
        if let Some(inputs) = args.get("inputs") {
            args["inputs"] = self.render(inputs)?;
        }
        Ok(args)
    }

    fn render(&self, args: &Value) -> Result<Value> {
        template::render(args, &mut |target| self.resolve(target)).map_err(|why| Error::invalid_field("args", why))
    }

    /// Submits the step's op (or its fallback's) and waits for its completion.
    fn submit(&mut self, index: usize, fallback: bool) {
        let step = self.compiled.step(index);
        let (kind, args, retries, timeout_ms) = match (&step.fallback, fallback) {
            (Some(f), true) => (&f.kind, &f.args, f.retries, f.timeout_ms),
            _ => (&step.kind, &step.args, step.retries, step.timeout_ms),
        };
        let args = match self.render(args) {
            Ok(args) => args,
            Err(e) => return self.failed_attempt(index, fallback, e),
        };
        let op = SubmitOp {
            run_id: Some(self.run.root().to_string()),
            idempotency_key: Some(self.op_key(index, fallback)),
            retries,
            timeout_ms,
            ..SubmitOp::new(self.run.agent, kind.clone(), args)
        };
        self.steps[index].status = StepStatus::Running;
        self.dirty.push(index);
        self.busy += 1;
        let submitter = self.ctx.submitter.clone();
        let caller = self.caller.clone();
        let ops = self.ops.clone();
        self.in_flight.push(Box::pin(async move {
            let outcome = run_op(&*submitter, &caller, op, |id| {
                ops.lock().insert(index, id);
            })
            .await;
            ops.lock().remove(&index);
            (index, fallback, outcome)
        }));
    }

    /// Runs the child run `args` make (a workflow as given, or a sub-goal's
    /// plan) as the step, and waits for its end.
    fn start_child(&mut self, index: usize, args: BoxFuture<'static, Result<RunArgs>>) {
        let (root, agent, key) = (self.run.root(), self.run.agent, self.op_key(index, false));
        // Made before a restart: wait on it, never make (or plan) it again.
        let made = self.steps[index].op_id;
        self.busy += 1;
        let submitter = self.ctx.submitter.clone();
        let caller = self.caller.clone();
        let ops = self.ops.clone();
        let goals = self.goals.clone();
        let store = self.ctx.store.clone();
        self.in_flight.push(Box::pin(async move {
            if let Some(child) = made {
                ops.lock().insert(index, child);
                let outcome = match goals.wait_ended(&store, &child).await {
                    Ok(child) => Outcome::Child(Box::new(child)),
                    Err(e) => Outcome::Refused(e),
                };
                ops.lock().remove(&index);
                return (index, false, outcome);
            }
            let args = match args.await {
                Ok(args) => args,
                Err(e) => return (index, false, Outcome::Refused(e)),
            };
            let op = SubmitOp {
                run_id: Some(root.to_string()),
                idempotency_key: Some(key),
                ..SubmitOp::new(agent, ops::RUN, run_args_json(&args))
            };
            let outcome = match run_op(&*submitter, &caller, op, |id| {
                ops.lock().insert(index, id);
            })
            .await
            {
                Outcome::Op(completion) if completion.status == CompletionStatus::Ok => {
                    match goals.wait_ended(&store, &completion.op_id).await {
                        Ok(child) => Outcome::Child(Box::new(child)),
                        Err(e) => Outcome::Refused(e),
                    }
                }
                other => other,
            };
            ops.lock().remove(&index);
            (index, false, outcome)
        }));
    }

    fn signalled(&mut self, index: usize, name: &str, payload: &Value) {
        if self.steps[index].status.is_final() {
            return;
        }
        if name.starts_with("approval:") {
            if payload["approved"] == Value::Bool(false) {
                let reason = payload["reason"].as_str().unwrap_or("no reason given");
                return self.fail(
                    index,
                    Error::new(ErrorCode::PermissionDenied, format!("an operator denied it: {reason}")),
                );
            }
            let reason = serde_json::from_value::<ApprovalArgs>(self.compiled.step(index).args.clone())
                .map(|a| a.reason)
                .unwrap_or_default();
            let output = json!({ "approved": true, "asked": reason, "reason": payload["reason"] });
            return self.end(index, StepStatus::Succeeded, Some(output), None, None);
        }
        self.end(index, StepStatus::Succeeded, Some(payload.clone()), None, None);
    }

    fn settle(&mut self, index: usize, fallback: bool, outcome: Outcome) {
        if matches!(
            outcome,
            Outcome::Op(_) | Outcome::Refused(_) | Outcome::Lost(_) | Outcome::Child(_)
        ) {
            self.busy -= 1;
        }
        if self.steps[index].status.is_final() {
            return;
        }
        match outcome {
            Outcome::Fired => {
                let at = self.steps[index].wake_at;
                self.end(
                    index,
                    StepStatus::Succeeded,
                    Some(json!({ "fired_at": at })),
                    None,
                    None,
                );
            }
            Outcome::Child(child) => match child.status {
                RunStatus::Succeeded => {
                    self.steps[index].op_id = Some(child.id);
                    self.end(index, StepStatus::Succeeded, child.output, None, None);
                }
                status => {
                    let error = child.error.unwrap_or_else(|| {
                        Error::new(
                            ErrorCode::FailedPrecondition,
                            format!("child run {} ended {}", child.id, ops::status_name(status)),
                        )
                    });
                    self.steps[index].op_id = Some(child.id);
                    self.fail(index, error);
                }
            },
            Outcome::Refused(error) => self.failed_attempt(index, fallback, error),
            Outcome::Lost(error) => self.fail(index, error),
            Outcome::Op(completion) => {
                let completion = *completion;
                let record = &mut self.steps[index];
                record.op_id = Some(completion.op_id);
                record.attempts += completion.attempts;
                record.labels = completion.labels.clone();
                record.fallback = fallback;
                match completion.status {
                    CompletionStatus::Ok => {
                        self.steps[index].finished_at = Some(completion.completed_at);
                        self.end(index, StepStatus::Succeeded, completion.result, None, None);
                    }
                    CompletionStatus::InDoubt => {
                        let error = completion.error.unwrap_or_else(|| {
                            Error::new(ErrorCode::FailedPrecondition, "its op is in doubt after a crash")
                        });
                        self.end(index, StepStatus::InDoubt, None, Some(error), None);
                        self.failed(index);
                    }
                    CompletionStatus::Cancelled if self.run.cancelling => {
                        self.end(index, StepStatus::Cancelled, None, completion.error, None);
                    }
                    status => {
                        let error = completion.error.unwrap_or_else(|| {
                            Error::new(ErrorCode::ToolFailed, format!("its op ended {}", status.as_str()))
                        });
                        self.failed_attempt(index, fallback, error);
                    }
                }
            }
        }
    }

    /// The step's op failed past its retries: its fallback runs if it has one
    /// not yet tried, else it fails.
    fn failed_attempt(&mut self, index: usize, fallback: bool, error: Error) {
        if !fallback && self.compiled.step(index).fallback.is_some() && !self.run.cancelling {
            self.steps[index].error = Some(error);
            return self.submit(index, true);
        }
        self.fail(index, error);
    }

    fn fail(&mut self, index: usize, error: Error) {
        self.end(index, StepStatus::Failed, None, Some(error), None);
        self.failed(index);
    }

    /// The step ended without its effect: the run fails with it if its
    /// `on_failure` says so.
    fn failed(&mut self, index: usize) {
        if self.compiled.step(index).on_failure == OnFailure::Fail && self.failure.is_none() {
            self.failure = Some(step_failed(&self.compiled.names[index], &self.steps[index]));
            self.failed_step = Some(index);
        }
    }

    /// The idempotency key of a step's op in this run's generation: the run,
    /// then its index twice (its fallback's one more) in the low half and the
    /// generation in the high half, so every op of a run has a key of its
    /// own. The ring's run is the tree's root (the flow scope), so the key is
    /// given, not derived from it.
    fn op_key(&self, index: usize, fallback: bool) -> String {
        let step = (u64::from(self.run.generation) << 32) | (index as u64 * 2 + u64::from(fallback));
        format!("goal:{}:{step}", self.run.id)
    }

    fn end(
        &mut self,
        index: usize,
        status: StepStatus,
        output: Option<Value>,
        error: Option<Error>,
        reason: Option<String>,
    ) {
        let record = &mut self.steps[index];
        record.status = status;
        record.output = output;
        if error.is_some() || status == StepStatus::Succeeded {
            record.error = error;
        }
        record.reason = reason;
        record.finished_at.get_or_insert_with(Utc::now);
        self.dirty.push(index);
        for i in 0..self.dependants[index].len() {
            let dependant = self.dependants[index][i];
            self.waiting_on[dependant] -= 1;
            if self.waiting_on[dependant] == 0 {
                self.ready.push_back(dependant);
            }
        }
    }

    /// Stops what runs (ops cancelled, child runs cancelled too) and ends every
    /// step not ended as cancelled.
    async fn cancel(&mut self) {
        let mut operator = self.caller.clone();
        operator.role = Role::Operator;
        let mut running: Vec<(usize, OpId)> = self.ops.lock().iter().map(|(&s, &op)| (s, op)).collect();
        for (index, record) in self.steps.iter().enumerate() {
            if let (StepStatus::Running, Some(op)) = (record.status, record.op_id)
                && !running.iter().any(|(s, _)| *s == index)
            {
                running.push((index, op));
            }
        }
        for (index, op) in running {
            let kind = self.compiled.step(index).kind.as_str();
            let result = if kind == engine_kinds::WORKFLOW || kind == engine_kinds::GOAL {
                let cancel = SubmitOp::new(self.run.agent, ops::CANCEL, json!({ "run": op }));
                bbx_component::run_op(&*self.ctx.submitter, &self.caller, cancel, WAIT)
                    .await
                    .map(drop)
            } else {
                self.ctx.submitter.cancel(&operator, op).await.map(drop)
            };
            if let Err(e) = result {
                tracing::debug!(run = %self.run.id, op = %op, error = %e, "a cancelled run's op could not be stopped");
            }
        }
        self.in_flight = FuturesUnordered::new();
        self.busy = 0;
        self.awaiting.clear();
        for index in 0..self.steps.len() {
            if !self.steps[index].status.is_final() {
                let record = &mut self.steps[index];
                record.status = StepStatus::Cancelled;
                record.finished_at.get_or_insert_with(Utc::now);
                self.dirty.push(index);
            }
        }
        self.ready.clear();
    }

    /// Queues the step records changed since the last flush, in one group,
    /// behind those queued before (a step's later record is never overtaken
    /// by its earlier one).
    async fn flush(&mut self) {
        // The op (or child run) a running step made is saved: what a resume
        // waits on and a cancel stops.
        let made: Vec<(usize, OpId)> = self.ops.lock().iter().map(|(&s, &op)| (s, op)).collect();
        for (index, op) in made {
            if self.steps[index].status == StepStatus::Running && self.steps[index].op_id != Some(op) {
                self.steps[index].op_id = Some(op);
                self.dirty.push(index);
            }
        }
        if self.dirty.is_empty() {
            return;
        }
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let writes: Vec<(Vec<u8>, Vec<u8>)> = self
            .dirty
            .drain(..)
            .filter_map(|index| {
                Some((
                    run::step_key(&self.run.id, &self.compiled.names[index]),
                    run::encode(&self.steps[index]).ok()?,
                ))
            })
            .collect();
        let written = self
            .ctx
            .store
            .queue(SaveSteps {
                run: self.run.id,
                writes,
            })
            .await;
        self.writes.push(Box::pin(written));
    }

    /// Ends the run: its status, output and error, once every step's record
    /// is durable.
    async fn finish(mut self) {
        for index in 0..self.steps.len() {
            if !self.steps[index].status.is_final() {
                let reason = match &self.failure {
                    Some(e) => format!("the run failed: {}", e.message),
                    None => "the run ended".to_owned(),
                };
                self.end(index, StepStatus::Skipped, None, None, Some(reason));
            }
        }
        self.flush().await;
        while let Some(written) = self.writes.next().await {
            if let Err(e) = written {
                tracing::error!(run = %self.run.id, error = %e, "a run's steps could not be saved; it resumes at the next start");
                return;
            }
        }
        let (status, error) = match (self.run.cancelling, self.failure.take()) {
            (true, _) => (RunStatus::Cancelled, None),
            (false, Some(error)) => (RunStatus::Failed, Some(error)),
            (false, None) => (RunStatus::Succeeded, None),
        };
        let output = match status {
            RunStatus::Succeeded => Some(self.output()),
            _ => None,
        };
        let end = EndRun {
            run: self.run.id,
            status,
            error,
            output,
            at: Utc::now(),
        };
        match self.ctx.store.write(end).await {
            Ok(_) => self.goals.ended(&self.run.id),
            Err(e) => {
                tracing::error!(run = %self.run.id, error = %e, "a run's end could not be saved; it resumes at the next start")
            }
        }
    }

    /// The run's output: the workflow's `output` with its references, or the
    /// outputs of the steps nothing depends on.
    fn output(&self) -> Value {
        if let Some(output) = &self.compiled.workflow.output {
            return template::render(output, &mut |target| {
                self.resolve(target).map(|r| Resolved {
                    value: r.value,
                    from: None,
                })
            })
            .unwrap_or_else(|why| json!({ "error": why }));
        }
        let leaves = (0..self.steps.len())
            .filter(|&i| self.dependants[i].is_empty() && self.steps[i].status == StepStatus::Succeeded)
            .map(|i| {
                (
                    self.compiled.names[i].clone(),
                    self.steps[i].output.clone().unwrap_or(Value::Null),
                )
            });
        Value::Object(leaves.collect())
    }
}

fn run_args_json(args: &RunArgs) -> Value {
    json!({ "workflow": args.workflow, "inputs": args.inputs, "parent": args.parent, "goal": args.goal, "kinds": args.kinds })
}

/// How a driver stopped.
pub(crate) enum Driven {
    Ended,
    /// Its run has a new workflow: drive that.
    Replanned,
    /// The kernel is stopping: the run resumes at the next start.
    Stopped,
}

fn step_failed(name: &str, step: &StepRecord) -> Error {
    let why = step.error.as_ref().map(|e| e.message.as_str()).unwrap_or("it failed");
    let code = step.error.as_ref().map(|e| e.code).unwrap_or(ErrorCode::ToolFailed);
    Error::new(code, format!("step {name} failed: {why}")).with_details(json!({ "step": name }))
}

/// Submits `op` (again, after a crash: its key joins the op it was), tries
/// again while it is refused for now, and waits for its completion.
async fn run_op(
    submitter: &dyn bbx_component::Submitter,
    caller: &Caller,
    op: SubmitOp,
    submitted: impl FnOnce(OpId),
) -> Outcome {
    let mut backoff = RESUBMIT_BACKOFF;
    let id = loop {
        let batch = SubmitBatch {
            ops: vec![op.clone()],
            wait_ms: Some(1_000),
        };
        match submitter.submit(caller, batch).await {
            Ok(answer) => break answer.ops[0].op_id,
            Err(e) if e.code == ErrorCode::ResourceExhausted => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RESUBMIT_BACKOFF);
            }
            // The key names an op with other args: a step whose references
            // read differently after a crash. The op it was is the step.
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                match e
                    .details
                    .as_ref()
                    .and_then(|d| d["op_id"].as_str())
                    .and_then(|id| id.parse().ok())
                {
                    Some(id) => break id,
                    None => return Outcome::Refused(e),
                }
            }
            Err(e) => return Outcome::Refused(e),
        }
    };
    submitted(id);
    loop {
        match submitter.wait(caller, id, WAIT).await {
            Ok(info) => {
                if let Some(completion) = info.completion {
                    return Outcome::Op(Box::new(completion));
                }
            }
            // The op may still run: waiting failed, not the op.
            Err(e) => return Outcome::Lost(e),
        }
    }
}

#[derive(Debug)]
struct SaveSteps {
    run: OpId,
    writes: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Staged for SaveSteps {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        // A run deleted with its agent keeps no steps.
        if tx.read(GOAL_RUNS, &run::run_key(&self.run))?.is_none() {
            return Ok(Applied::Done);
        }
        for (key, value) in &self.writes {
            tx.put(GOAL_STEPS, key.clone(), value.clone());
        }
        Ok(Applied::Done)
    }
}

/// A run's new workflow after a replan, and its next generation.
#[derive(Debug)]
struct Replanned {
    run: OpId,
    workflow: crate::workflow::Workflow,
    generation: u32,
    /// Steps the new workflow no longer has: their records and approvals go.
    dropped: Vec<String>,
}

impl Staged for Replanned {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let key = run::run_key(&self.run);
        let Some(bytes) = tx.read(GOAL_RUNS, &key)? else {
            return Ok(Applied::Done);
        };
        let mut record: RunRecord = run::decode(&bytes, "run")?;
        record.workflow = self.workflow.clone();
        record.generation = self.generation;
        tx.put(GOAL_RUNS, key, run::encode(&record)?);
        for name in &self.dropped {
            tx.remove(GOAL_STEPS, run::step_key(&self.run, name));
            tx.remove(
                run::GOAL_SIGNALS,
                run::signal_key(&self.run, &run::approval_signal(name)),
            );
        }
        Ok(Applied::Done)
    }
}

#[derive(Debug)]
struct EndRun {
    run: OpId,
    status: RunStatus,
    error: Option<Error>,
    output: Option<Value>,
    at: DateTime<Utc>,
}

impl Staged for EndRun {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let key = run::run_key(&self.run);
        let Some(bytes) = tx.read(GOAL_RUNS, &key)? else {
            return Ok(Applied::Done);
        };
        let mut record: RunRecord = run::decode(&bytes, "run")?;
        record.status = self.status;
        record.error = self.error.clone();
        record.output = self.output.clone();
        record.finished_at = Some(self.at);
        let mut encoded = run::encode(&record)?;
        if encoded.len() > tx.max_value() {
            record.output = Some(json!({ "error": "the run's output is larger than the store takes" }));
            encoded = run::encode(&record)?;
        }
        tx.put(GOAL_RUNS, key.clone(), encoded);
        tx.remove(GOAL_ACTIVE, key);
        Ok(Applied::Done)
    }
}
