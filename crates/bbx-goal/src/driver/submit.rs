//! Steps as ops and child runs: submitted under their keys, and waited for.

use super::*;

impl Driver {
    /// Submits the step's op (or its fallback's) and waits for its completion.
    pub(super) fn submit(&mut self, index: usize, fallback: bool) {
        let step = self.compiled.step(index);
        let (kind, args, retries, timeout_ms) = match (&step.fallback, fallback) {
            (Some(f), true) => (&f.kind, &f.args, f.retries, f.timeout_ms),
            _ => (&step.kind, &step.args, step.retries, step.timeout_ms),
        };
        let args = match self.render(args) {
            Ok(args) => args,
            Err(e) => return self.failed_attempt(index, fallback, e),
        };
        let kind = kind.clone();
        if !self.within_cost_cap(index, fallback, &kind, &args) {
            return;
        }
        let op = SubmitOp {
            run_id: Some(self.run.root().to_string()),
            idempotency_key: Some(self.op_key(index, fallback)),
            retries,
            timeout_ms,
            ..SubmitOp::new(self.run.agent, kind, args)
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
    pub(super) fn start_child(&mut self, index: usize, args: BoxFuture<'static, Result<RunArgs>>) {
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

    /// The idempotency key of a step's op in this run's generation: the run,
    /// then its index twice (its fallback's one more) in the low half and the
    /// generation in the high half, so every op of a run has a key of its
    /// own. The ring's run is the tree's root (the flow scope), so the key is
    /// given, not derived from it.
    pub(super) fn op_key(&self, index: usize, fallback: bool) -> String {
        let step = (u64::from(self.run.generation) << 32) | (index as u64 * 2 + u64::from(fallback));
        format!("goal:{}:{step}", self.run.id)
    }
}

fn run_args_json(args: &RunArgs) -> Value {
    json!({ "workflow": args.workflow, "inputs": args.inputs, "parent": args.parent, "goal": args.goal, "kinds": args.kinds })
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
