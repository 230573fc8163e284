//! The GoalEngine as a component of the kernel: its keyspaces and op kinds,
//! the checks on who may start and steer runs, the completions that start and
//! steer drivers, and its recovery (every run not ended is driven again).

use crate::driver::Notice;
use crate::{Goals, KEYSPACES, ops, run, workflow};
use bbx_component::{Component, Context, Endpoint, OpKind, Prepared, Submission, Verdict};
use bbx_core::model::Role;
use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged};
use serde_json::Value;
use std::sync::Arc;

impl Component for Goals {
    fn name(&self) -> &'static str {
        "goal"
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        &KEYSPACES
    }

    fn kinds(&self) -> &'static [OpKind] {
        ops::KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        ops::args_schema(kind)
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        ops::prepare(self, kind, args)
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        Goals::start(self, ctx)
    }

    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        crate::endpoints::endpoints(self)
    }

    fn checks_ops(&self) -> bool {
        true
    }

    /// An approval is an operator's; a caller confined to some op kinds runs
    /// workflows confined the same way (every step is checked against them:
    /// a run acts with its creator's rights, never more), and an inline
    /// workflow of other kinds is refused at once.
    fn check(&self, submission: &Submission<'_>, _labels: &mut Vec<String>) -> Result<Verdict> {
        let caller = submission.caller;
        match submission.op.kind.as_str() {
            ops::APPROVE if !matches!(caller.role, Role::Admin | Role::TenantAdmin | Role::Operator) => {
                Err(Error::new(
                    ErrorCode::PermissionDenied,
                    "approving a step of a run is an operator's",
                ))
            }
            ops::RUN => {
                if let Some(allowed) = &caller.kinds {
                    let confined: Option<Vec<String>> = submission
                        .op
                        .args
                        .get("kinds")
                        .and_then(|k| serde_json::from_value(k.clone()).ok());
                    if !confined.is_some_and(|kinds| kinds.iter().all(|k| allowed.contains(k))) {
                        return Err(Error::new(
                            ErrorCode::PermissionDenied,
                            "this credential is confined to some op kinds: its runs are too (give them as kinds)",
                        ));
                    }
                }
                if let Some(allowed) = &caller.kinds
                    && let Some(steps) = submission.op.args.get("workflow")
                {
                    let mut used = Vec::new();
                    kinds_used(steps, &mut used);
                    if let Some(kind) = used.into_iter().find(|k| !allowed.iter().any(|a| a == k)) {
                        return Err(Error::new(
                            ErrorCode::PermissionDenied,
                            format!("this credential may not submit {kind} ops, which the workflow has"),
                        ));
                    }
                }
                Ok(Verdict::Allow)
            }
            _ => Ok(Verdict::Allow),
        }
    }

    fn observes(&self) -> bool {
        true
    }

    fn completed(&self, completion: &Arc<Completion>) {
        if completion.status != CompletionStatus::Ok || !completion.kind.starts_with("goal.") {
            return;
        }
        let run = || {
            completion
                .result
                .as_ref()
                .and_then(|r| r["run_id"].as_str())
                .and_then(|id| id.parse::<OpId>().ok())
        };
        match completion.kind.as_ref() {
            ops::RUN => self.created(&completion.op_id),
            ops::CANCEL | ops::PAUSE | ops::RESUME => {
                if let Some(run) = run() {
                    self.notify(&run, Notice::Steered);
                }
            }
            ops::SIGNAL | ops::APPROVE => {
                if let Some(run) = run() {
                    self.notify(&run, Notice::Signalled);
                }
            }
            _ => {}
        }
    }

    fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        ctx.write_later(ForgetAgent { agent }, "a deleted agent's runs");
    }
}

/// The op kinds a workflow's steps (and its children's, and fallbacks) use.
fn kinds_used(workflow: &Value, used: &mut Vec<String>) {
    for step in workflow["steps"].as_object().into_iter().flat_map(|s| s.values()) {
        match step["kind"].as_str() {
            Some(workflow::engine_kinds::WORKFLOW) => kinds_used(&step["args"]["workflow"], used),
            Some(kind) if !workflow::engine_kinds::ALL.contains(&kind) => used.push(kind.to_owned()),
            _ => {}
        }
        if let Some(kind) = step["fallback"]["kind"].as_str() {
            used.push(kind.to_owned());
        }
    }
}

/// Removes every record of a deleted agent's runs; their drivers find them
/// gone and stop writing.
#[derive(Debug)]
struct ForgetAgent {
    agent: AgentId,
}

impl Staged for ForgetAgent {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let runs: Vec<Vec<u8>> = tx
            .keyspace(run::GOAL_BY_AGENT)?
            .prefix(self.agent.as_bytes())
            .filter_map(|kv| kv.key().ok().map(|k| k[16..].to_vec()))
            .collect();
        for id in runs {
            for keyspace in [run::GOAL_STEPS, run::GOAL_SIGNALS] {
                let keys: Vec<Vec<u8>> = tx
                    .keyspace(keyspace)?
                    .prefix(&id)
                    .filter_map(|kv| kv.key().ok().map(|k| k.to_vec()))
                    .collect();
                for key in keys {
                    tx.remove(keyspace, key);
                }
            }
            tx.remove(run::GOAL_RUNS, id.clone());
            tx.remove(run::GOAL_ACTIVE, id.clone());
            tx.remove(run::GOAL_BY_AGENT, [self.agent.as_bytes().as_slice(), &id].concat());
        }
        Ok(Applied::Done)
    }
}
