//! The kinds every kernel serves whatever components it runs: `sleep`, which waits
//! on a task of its own (for tests, benchmarks, and workflows that pause).

use crate::{Component, OpKind, Prepared, Running, TaskContext, TaskOp, parse_args};
use bbx_core::op::Effects;
use bbx_core::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The longest `sleep`.
const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

const KINDS: &[OpKind] = &[OpKind {
    name: "sleep",
    effects: Effects::None,
}];

/// Serves `sleep`.
pub struct Builtin;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    /// How long, in milliseconds (at most a day).
    ms: u64,
}

#[derive(Debug)]
struct Sleep(Duration);

impl Component for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn kinds(&self) -> &'static [OpKind] {
        KINDS
    }

    fn args_schema(&self, _kind: &str) -> Option<Value> {
        serde_json::to_value(schemars::schema_for!(SleepArgs)).ok()
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        let SleepArgs { ms } = parse_args(kind, args)?;
        let duration = Duration::from_millis(ms);
        if duration > MAX_SLEEP {
            return Err(Error::invalid_field("args.ms", "sleep is at most 24 hours"));
        }
        Ok(Prepared::Task(Arc::new(Sleep(duration))))
    }
}

impl TaskOp for Sleep {
    fn effects(&self) -> Effects {
        Effects::None
    }

    fn run<'a>(&'a self, _: &'a TaskContext<'a>) -> Running<'a> {
        Box::pin(async move {
            tokio::time::sleep(self.0).await;
            Ok(serde_json::json!({ "slept_ms": self.0.as_millis() as u64 }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sleep_takes_milliseconds_up_to_a_day() {
        assert!(matches!(
            Builtin.prepare("sleep", &json!({"ms": 5})),
            Ok(Prepared::Task(_))
        ));
        for bad in [
            json!({"ms": -5}),
            json!({"ms": 90_000_000_000u64}),
            json!({}),
            json!({"ms": 1, "x": 2}),
        ] {
            assert!(Builtin.prepare("sleep", &bad).is_err(), "{bad} was accepted");
        }
    }
}
