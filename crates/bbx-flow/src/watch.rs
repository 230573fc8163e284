//! FlowIntegrity's side of anomaly detection: each op is observed as it is
//! checked (learned from, and scored once its agent has a model), and an
//! anomalous one gets the configured action, as if a policy named `anomaly` had
//! decided it.
//!
//! Scoring takes about 1.3 µs an op. Where anomalies are only warned of (the
//! default), an agent's ops past `max_ops_per_sec` in a second go unobserved
//! (counted in `flow stats`): a flood of cheap ops costs the kernel nothing more,
//! and blinds the detector to no other agent. Where they hold or quarantine an
//! op, every op is scored.

use crate::anomaly::{Observation, Saved, Scored, Training};
use crate::policy::{Action, Decided};
use crate::{Change, Flow};
use bbx_core::{AgentId, OpId};
use chrono::Utc;
use serde_json::Value;
use std::sync::Arc;

impl Flow {
    /// Observes an op of `agent`: learns from it and, once the agent has a
    /// model, scores it.
    pub(crate) fn observe(&self, op_id: OpId, agent: AgentId, kind: &str, args: &Value) -> Option<Scored> {
        let detector = self.0.detector.as_ref()?;
        let at_ms = Utc::now().timestamp_millis();
        if self.0.anomaly_action == Action::Warn && !detector.admit(&agent, at_ms) {
            return None;
        }
        let (scored, training) = detector.submitted(&agent, op_id, &Observation::of(kind, args, at_ms));
        if let Some(training) = training {
            self.train(training);
        }
        scored
    }

    /// Trains a model off the submitting task, installs it and saves it.
    pub(crate) fn train(&self, training: Training) {
        let flow = self.clone();
        // Nowhere to train (a Flow measured in process): the agent stays without
        // a model.
        let Ok(ctx) = self.ctx() else { return };
        let store = ctx.store.clone();
        ctx.tasks.spawn(async move {
            let agent = training.agent;
            let Some(detector) = flow.0.detector.as_ref() else {
                return;
            };
            let threshold = detector.config().threshold;
            let saved = tokio::task::spawn_blocking(move || training.run(threshold).map(Arc::new))
                .await
                .ok()
                .flatten();
            // Deleted (or evicted) while training: nothing to come back.
            if !detector.watches(&agent) {
                return;
            }
            detector.install(&agent, saved.clone());
            if let Some(saved) = saved
                && let Err(e) = store.write(Change::SaveModel(agent, saved)).await
            {
                tracing::warn!(error = %e, %agent, "an anomaly model could not be saved");
            }
        });
    }

    /// What an op would score against its agent's model now, learning nothing.
    pub fn peek_score(&self, agent: &AgentId, kind: &str, args: &Value) -> Option<Scored> {
        let observation = Observation::of(kind, args, Utc::now().timestamp_millis());
        self.0.detector.as_ref()?.peek(agent, &observation)
    }

    /// Installs the saved models, as many as are watched.
    pub(crate) fn load_models(&self, store: &bbx_store::Store) -> bbx_core::Result<()> {
        let Some(detector) = &self.0.detector else {
            return Ok(());
        };
        for item in store
            .keyspace(crate::FLOW_ANOMALY_MODELS)
            .iter()
            .take(crate::anomaly::MAX_WATCHED)
        {
            let (key, value) = item
                .into_inner()
                .map_err(|e| bbx_store::storage_error("load anomaly models", e))?;
            let (Ok(agent), Ok(saved)) = (
                <[u8; 16]>::try_from(&key[..]).map(AgentId::from_bytes),
                serde_json::from_slice::<Saved>(&value),
            ) else {
                // A model is a cache of what the agent's next ops teach again.
                tracing::warn!("an unreadable anomaly model is ignored");
                continue;
            };
            detector.install(&agent, Some(Arc::new(saved)));
        }
        Ok(())
    }
}

/// The detector's decision of an anomalous op, as a policy's.
/// The detector's name where a policy's would be.
pub(crate) const ANOMALY: &str = "anomaly";

pub(crate) fn anomaly_decided(action: Action, scored: &Scored) -> Decided {
    Decided::new(
        ANOMALY,
        action,
        format!(
            "anomaly score {:.3} is at or above this agent's threshold {:.3}",
            scored.score, scored.threshold
        ),
    )
}
