//! Types of the AgentRing's ops, shared by the ring, the kernel and every front end.

use serde::{Deserialize, Serialize};

/// How urgently an op should run. Higher runs first; the ring ages waiting ops so
/// that `Low` is delayed, never starved.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    schemars::JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
    Realtime,
}

impl Priority {
    pub const ALL: [Priority; 4] = [Priority::Low, Priority::Normal, Priority::High, Priority::Realtime];

    /// 0 for `Low` up to 3 for `Realtime`.
    pub fn rank(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_use_the_reference_names_and_order() {
        assert_eq!(serde_json::to_value(Priority::Realtime).unwrap(), "REALTIME");
        assert_eq!(serde_json::from_value::<Priority>("LOW".into()).unwrap(), Priority::Low);
        assert!(
            Priority::ALL
                .windows(2)
                .all(|w| w[0] < w[1] && w[0].rank() + 1 == w[1].rank())
        );
    }
}
