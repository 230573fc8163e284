//! What the driver makes durable: step records in groups, a replan's new workflow, and the run's end.

use super::*;

impl Driver {
    /// Queues the step records changed since the last flush, in one group,
    /// behind those queued before (a step's later record is never overtaken
    /// by its earlier one).
    pub(super) async fn flush(&mut self) {
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
        for &index in &self.dirty {
            self.tell_step(index);
        }
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
    pub(super) async fn finish(mut self) {
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
        let end_error = error.clone();
        let end = EndRun {
            run: self.run.id,
            status,
            error,
            output,
            at: Utc::now(),
        };
        match self.ctx.store.write(end).await {
            Ok(_) => {
                let data = json!({ "run_id": self.run.id, "status": ops::status_name(status), "error": end_error });
                self.ctx.notify("run", (&self.run.tenant, self.run.agent), data);
                self.goals.run_ended()
            }
            Err(e) => {
                tracing::error!(run = %self.run.id, error = %e, "a run's end could not be saved; it resumes at the next start")
            }
        }
    }

    /// Tells the event stream where a step stands (`event: run`).
    fn tell_step(&self, index: usize) {
        // Nobody reads the stream: nothing to build on the scheduling path.
        if self.ctx.notices.receiver_count() == 0 {
            return;
        }
        let record = &self.steps[index];
        let mut data = json!({
            "run_id": self.run.id,
            "step": self.compiled.names[index],
            "status": record.status,
        });
        for (field, value) in [
            ("op_id", record.op_id.map(|id| json!(id))),
            ("error", record.error.as_ref().map(|e| json!(e))),
            ("reason", record.reason.as_ref().map(|r| json!(r))),
            (
                "cost_usd",
                (record.cost_micros > 0).then(|| json!(record.cost_micros as f64 / 1e6)),
            ),
        ] {
            if let Some(value) = value {
                data[field] = value;
            }
        }
        self.ctx.notify("run", (&self.run.tenant, self.run.agent), data);
    }

    /// The run's output: the workflow's `output` with its references, or the
    /// outputs of the steps nothing depends on.
    pub(super) fn output(&self) -> Value {
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
pub(super) struct Replanned {
    pub(super) run: OpId,
    pub(super) workflow: crate::workflow::Workflow,
    pub(super) generation: u32,
    /// Steps the new workflow no longer has: their records and approvals go.
    pub(super) dropped: Vec<String>,
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
