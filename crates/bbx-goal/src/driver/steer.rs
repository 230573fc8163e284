//! What reaches a run from outside: steering, signals and approvals, and cancel.

use super::*;

impl Driver {
    pub(super) fn heed(&mut self, notice: Notice) {
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

    pub(super) fn signalled(&mut self, index: usize, name: &str, payload: &Value) {
        if self.steps[index].status.is_final() {
            return;
        }
        if name.starts_with("approval:") {
            if !engine_kinds::ALL.contains(&self.compiled.step(index).kind.as_str()) {
                return self.cost_approval(index, payload);
            }
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

    /// Stops what runs (ops cancelled, child runs cancelled too) and ends every
    /// step not ended as cancelled.
    pub(super) async fn cancel(&mut self) {
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
                self.ended_steps += 1;
            }
        }
        self.ready.clear();
    }
}
