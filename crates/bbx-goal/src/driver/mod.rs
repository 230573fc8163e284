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

mod cost;
mod refs;
mod replan;
mod save;
mod steer;
mod submit;

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
    /// Steps whose status is final (what `ended` asks on every round).
    ended_steps: usize,
    failure: Option<Error>,
    /// The step whose failure fails the run (what a replan replaces).
    failed_step: Option<usize>,
    writes: FuturesUnordered<BoxFuture<'static, Result<Applied>>>,
    /// What the steps in flight may still spend, estimated when they started.
    reserved: HashMap<usize, u64>,
    /// Steps past the cost cap that an operator let run.
    cost_approved: std::collections::HashSet<usize>,
    /// Steps whose ops were running when the kernel stopped: joined again by
    /// their keys, not asked about the cost cap again.
    resumed: std::collections::HashSet<usize>,
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
        let ended_steps = steps.iter().filter(|s| s.status.is_final()).count();
        let resumed = (0..n).filter(|&i| steps[i].status == StepStatus::Running).collect();
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
            ended_steps,
            failure,
            failed_step,
            writes: FuturesUnordered::new(),
            reserved: HashMap::new(),
            cost_approved: Default::default(),
            resumed,
        })
    }

    /// Drives the run until it ends, is planned again, or the kernel stops
    /// (it resumes at the next start).
    pub(crate) async fn drive(mut self, inbox: &mut mpsc::UnboundedReceiver<Notice>) -> Driven {
        let stopping = self.ctx.stopping.clone();
        let started = json!({ "run_id": self.run.id, "status": "running", "generation": self.run.generation });
        self.ctx.notify("run", (&self.run.tenant, self.run.agent), started);
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

    /// Whether nothing more will start: every step ended, or the run failed or
    /// was cancelled and what was running has stopped.
    fn ended(&self) -> bool {
        let stopping = self.failure.is_some() || self.run.cancelling;
        self.ended_steps == self.steps.len()
            || (stopping && self.busy == 0 && self.steps.iter().all(|s| s.status != StepStatus::Running))
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
            // A step approved past the cost cap is the op it was to be.
            _ => self.submit(index, self.cost_approved.contains(&index) && self.steps[index].fallback),
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

    fn settle(&mut self, index: usize, fallback: bool, outcome: Outcome) {
        if matches!(
            outcome,
            Outcome::Op(_) | Outcome::Refused(_) | Outcome::Lost(_) | Outcome::Child(_)
        ) {
            self.busy -= 1;
            self.reserved.remove(&index);
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
                record.cost_micros += cost::cost_of(completion.result.as_ref());
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

    fn end(
        &mut self,
        index: usize,
        status: StepStatus,
        output: Option<Value>,
        error: Option<Error>,
        reason: Option<String>,
    ) {
        let record = &mut self.steps[index];
        if !record.status.is_final() {
            self.ended_steps += 1;
        }
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
