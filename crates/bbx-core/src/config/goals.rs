//! The GoalEngine's settings (`[goals]`): the planner's model, and how hard it
//! tries.

use serde::{Deserialize, Serialize};

/// `[goals]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GoalsConfig {
    /// The model that plans goals, served by an endpoint of `[tools.llm]`
    /// (its calls are `llm.chat` ops of the agent); no planning without it.
    pub planner_model: Option<String>,
    /// Which of `[tools.llm.endpoints]` serves it; may be left out when there is one.
    pub planner_endpoint: Option<String>,
    /// Answers the planner asks for before it gives up: the first, then a
    /// repair for each one refused [default: 3].
    pub plan_attempts: u32,
    /// The most tokens one answer may take [default: 2048].
    pub planner_max_tokens: u32,
    /// Time allowed for one answer, in milliseconds [default: 120000].
    pub planner_timeout_ms: u64,
    /// Times a run made from a goal is planned again when a step fails past
    /// its retries, before the run fails [default: 2; 0 turns replanning off].
    pub max_replans: u32,
}

impl Default for GoalsConfig {
    fn default() -> Self {
        Self {
            planner_model: None,
            planner_endpoint: None,
            plan_attempts: 3,
            planner_max_tokens: 2048,
            planner_timeout_ms: 120_000,
            max_replans: 2,
        }
    }
}

impl GoalsConfig {
    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |field: &str, why: &str| Err(crate::Error::invalid_field(field, format!("goals.{field} {why}")));
        if !(1..=10).contains(&self.plan_attempts) {
            return bad("plan_attempts", "must be 1 to 10");
        }
        if !(64..=32_768).contains(&self.planner_max_tokens) {
            return bad("planner_max_tokens", "must be 64 to 32768");
        }
        if !(1_000..=3_600_000).contains(&self.planner_timeout_ms) {
            return bad("planner_timeout_ms", "must be 1000 to 3600000");
        }
        if self.max_replans > 10 {
            return bad("max_replans", "must be at most 10");
        }
        if self.planner_model.as_deref().is_some_and(str::is_empty) {
            return bad("planner_model", "must not be empty");
        }
        Ok(())
    }
}
