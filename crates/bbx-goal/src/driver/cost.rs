//! A run's cost cap (`max_cost_usd` in its workflow). What its steps cost (the
//! `cost_micros` their results report: `llm.chat`'s, at the price table) is
//! added up as they end, in their durable records. A step whose estimate, with
//! what was spent and what the steps running may still spend, would pass the
//! cap does not start: it fails the run, or (`on_cost_cap: approval`) waits
//! for an operator's approval (the signal `approval:STEP`), and runs once
//! approved; denied, it fails.

use super::*;

/// What an op's result says it cost, in micro-dollars.
pub(super) fn cost_of(result: Option<&Value>) -> u64 {
    result.and_then(|r| r["cost_micros"].as_u64()).unwrap_or(0)
}

impl Driver {
    /// Whether the step (or its fallback) may start now under the run's cost
    /// cap; if not, it has failed the run or waits for an approval.
    pub(super) fn within_cost_cap(&mut self, index: usize, fallback: bool, kind: &str, args: &Value) -> bool {
        let Some(cap) = self.compiled.workflow.cost_cap_micros() else {
            return true;
        };
        let step = self.compiled.step(index);
        let retries = match (&step.fallback, fallback) {
            (Some(f), true) => f.retries.as_ref(),
            _ => step.retries.as_ref(),
        };
        // Each attempt may cost as much.
        let attempts = u64::from(retries.map_or(0, |r| r.count)).saturating_add(1);
        let estimate = self.goals.estimate_step(kind, args).saturating_mul(attempts);
        let rejoined = !fallback && self.resumed.remove(&index);
        let spent = self.steps.iter().fold(0u64, |sum, s| sum.saturating_add(s.cost_micros));
        let reserved = self.reserved.values().fold(0u64, |sum, r| sum.saturating_add(*r));
        let within = spent.saturating_add(reserved).saturating_add(estimate) <= cap;
        // A step that costs nothing is never held by the cap.
        if rejoined || estimate == 0 || self.cost_approved.contains(&index) || within {
            self.reserved.insert(index, estimate);
            return true;
        }
        let usd = |micros: u64| micros as f64 / 1e6;
        let why = format!(
            "the run's cost cap is ${:.6}: ${:.6} spent, ${:.6} held by steps running, and this step may cost ${:.6}",
            usd(cap),
            usd(spent),
            usd(reserved),
            usd(estimate)
        );
        if !self.compiled.workflow.cost_cap_waits() {
            let error = Error::new(ErrorCode::QuotaExceeded, why).with_details(json!({ "limit": "run_cost_cap" }));
            self.end(index, StepStatus::Failed, None, Some(error.clone()), None);
            // Past the cap, the run fails whatever the step's on_failure, and
            // is not planned again.
            if self.failure.is_none() {
                self.failure = Some(error);
                self.failed_step = None;
            }
            return false;
        }
        let name = run::approval_signal(&self.compiled.names[index]);
        let record = &mut self.steps[index];
        record.status = StepStatus::Waiting;
        record.fallback = fallback;
        record.reason = Some(format!("{why}: it waits for an operator's approval"));
        self.dirty.push(index);
        match self.signals.get(&name).cloned() {
            Some(payload) => self.cost_approval(index, &payload),
            None => self.awaiting.entry(name).or_default().push(index),
        }
        false
    }

    /// An operator's decision on a step waiting past the cost cap.
    pub(super) fn cost_approval(&mut self, index: usize, payload: &Value) {
        if payload["approved"] == Value::Bool(false) {
            let reason = payload["reason"].as_str().unwrap_or("no reason given");
            let denied = format!("an operator denied it past the run's cost cap: {reason}");
            return self.fail(index, Error::new(ErrorCode::PermissionDenied, denied));
        }
        // Started again as any ready step is (not while paused or failing,
        // within max_parallel), as the op it was to be (its fallback's, say).
        self.cost_approved.insert(index);
        let record = &mut self.steps[index];
        record.reason = None;
        record.status = StepStatus::Pending;
        self.dirty.push(index);
        self.ready.push_front(index);
    }
}
