//! Planning again what is left of a run made from a goal, when a step fails it.

use super::save::Replanned;
use super::*;

impl Driver {
    /// Whether the step that failed the run may have the rest planned again:
    /// the run was made from a goal and has replans left.
    pub(super) fn may_replan(&self) -> bool {
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
    pub(super) async fn replan(&mut self) -> Result<()> {
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
}
