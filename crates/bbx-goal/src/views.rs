//! Runs as clients see them: status, timings and each step's output.

use crate::ops::status_name;
use crate::run::{RunRecord, StepRecord, StepStatus};
use serde_json::{Map, Value, json};

/// A run with its steps by name: `status`, `output`, `error`, `started_at`,
/// `finished_at` (RFC 3339), the op that ran it, its attempts and labels.
pub fn run(run: &RunRecord, records: Vec<(String, StepRecord)>) -> Value {
    let mut records: std::collections::HashMap<String, StepRecord> = records.into_iter().collect();
    let mut counts: Map<String, Value> = Map::new();
    let mut steps = Map::new();
    let mut spent_micros = 0;
    for (name, step) in &run.workflow.steps {
        let record = records.remove(name).unwrap_or_else(StepRecord::pending);
        spent_micros += record.cost_micros;
        let status = serde_json::to_value(record.status).unwrap_or_default();
        let count = counts
            .entry(status.as_str().unwrap_or_default().to_owned())
            .or_insert(json!(0));
        *count = json!(count.as_u64().unwrap_or(0) + 1);
        let mut view = json!({
            "kind": step.kind,
            "status": status,
            "output": record.output,
            "started_at": record.started_at,
            "finished_at": record.finished_at,
        });
        let extra = [
            ("op_id", record.op_id.map(|id| json!(id))),
            ("error", record.error.map(|e| json!(e))),
            ("attempts", (record.attempts > 0).then(|| json!(record.attempts))),
            ("labels", (!record.labels.is_empty()).then(|| json!(record.labels))),
            ("fallback", record.fallback.then_some(Value::Bool(true))),
            ("wake_at", record.wake_at.map(|at| json!(at))),
            ("reason", record.reason.map(Value::String)),
            (
                "cost_usd",
                (record.cost_micros > 0).then(|| json!(record.cost_micros as f64 / 1e6)),
            ),
            (
                "in_doubt",
                (record.status == StepStatus::InDoubt).then_some(Value::Bool(true)),
            ),
        ];
        for (field, value) in extra {
            if let Some(value) = value {
                view[field] = value;
            }
        }
        steps.insert(name.clone(), view);
    }
    let mut view = summary(run);
    for (field, value) in [
        ("cancelling", json!(run.cancelling)),
        ("output", json!(run.output)),
        ("parent", json!(run.parent)),
        ("goal", json!(run.goal)),
        ("generation", json!(run.generation)),
        ("counts", Value::Object(counts)),
        (
            "cost",
            json!({ "spent_usd": spent_micros as f64 / 1e6, "cap_usd": run.workflow.max_cost_usd }),
        ),
        ("steps", Value::Object(steps)),
    ] {
        view[field] = value;
    }
    view
}

/// A run in a list: no steps.
pub fn summary(run: &RunRecord) -> Value {
    json!({
        "run_id": run.id,
        "agent": run.agent,
        "name": run.workflow.name,
        "status": status_name(run.status),
        "paused": run.paused,
        "steps": run.workflow.steps.len(),
        "created_at": run.created_at,
        "finished_at": run.finished_at,
        "error": run.error,
    })
}
