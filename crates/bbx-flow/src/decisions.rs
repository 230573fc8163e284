//! What FlowIntegrity decided of recent ops, for `bbx flow explain OP` and
//! `bbx flow anomalies`: kept in memory, bounded. The durable record of every
//! decision other than `allow` is the audit log.

use crate::Explained;
use bbx_core::{AgentId, OpId};
use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Arc;

/// Decisions kept for explaining, the oldest forgotten first.
pub const KEPT: usize = 65_536;
/// Tainted args kept of one decision.
pub const TAINTED_KEPT: usize = 32;
/// Anomalous ops kept for listing.
pub const ANOMALIES_KEPT: usize = 1024;

/// Why an op got its decision.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub op_id: OpId,
    pub agent: AgentId,
    pub tenant: String,
    pub kind: String,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub explained: Explained,
}

#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_op: FxHashMap<OpId, Arc<Decision>>,
    order: VecDeque<OpId>,
    anomalies: VecDeque<Arc<Decision>>,
}

impl Recent {
    pub fn record(&self, mut decision: Decision) {
        // Args of many tainted strings must not make the log large.
        decision.explained.tainted.truncate(TAINTED_KEPT);
        let decision = Arc::new(decision);
        let mut inner = self.inner.lock();
        if inner.order.len() == KEPT
            && let Some(oldest) = inner.order.pop_front()
        {
            inner.by_op.remove(&oldest);
        }
        if decision.explained.anomaly.as_ref().is_some_and(|a| a.anomalous) {
            if inner.anomalies.len() == ANOMALIES_KEPT {
                inner.anomalies.pop_front();
            }
            inner.anomalies.push_back(decision.clone());
        }
        inner.order.push_back(decision.op_id);
        inner.by_op.insert(decision.op_id, decision);
    }

    pub fn get(&self, op: &OpId) -> Option<Arc<Decision>> {
        self.inner.lock().by_op.get(op).cloned()
    }

    /// The anomalous ops that `sees` lets through, the latest first.
    pub fn anomalies(&self, sees: impl Fn(&Decision) -> bool, limit: usize) -> Vec<Arc<Decision>> {
        let inner = self.inner.lock();
        inner
            .anomalies
            .iter()
            .rev()
            .filter(|d| sees(d))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn forget_agent(&self, agent: &AgentId) {
        let mut inner = self.inner.lock();
        inner.anomalies.retain(|d| d.agent != *agent);
        inner.by_op.retain(|_, d| d.agent != *agent);
        let Inner { by_op, order, .. } = &mut *inner;
        order.retain(|op| by_op.contains_key(op));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::anomaly::Scored;
    use crate::policy::{Action, Decided};

    fn decision(op_id: OpId, agent: AgentId, action: Action, anomaly: Option<Scored>) -> Decision {
        Decision {
            op_id,
            agent,
            tenant: "t".into(),
            kind: "noop".into(),
            at: Utc::now(),
            explained: Explained {
                action,
                decided: vec![Decided::new("p", action, "r")],
                tainted: Vec::new(),
                anomaly,
            },
        }
    }

    fn scored(anomalous: bool) -> Scored {
        Scored {
            score: 0.9,
            threshold: 0.7,
            anomalous,
            features: Default::default(),
        }
    }

    #[test]
    fn decisions_are_kept_bounded_and_anomalies_listed() {
        let recent = Recent::default();
        let agent = AgentId::generate();
        let first = OpId::generate();
        recent.record(decision(first, agent, Action::Audit, None));
        for _ in 0..KEPT {
            recent.record(decision(OpId::generate(), agent, Action::Warn, Some(scored(true))));
        }
        assert!(recent.get(&first).is_none(), "the oldest is forgotten");
        assert_eq!(recent.anomalies(|_| true, usize::MAX).len(), ANOMALIES_KEPT);
        recent.forget_agent(&agent);
        assert!(recent.anomalies(|_| true, 10).is_empty());
    }
}
