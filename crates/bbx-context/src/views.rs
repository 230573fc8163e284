//! What the reads answer: an item, a page of items, an agent's figures, and
//! why an item scores as it does.

use crate::codec::Tier;
use crate::contexts::{Contexts, Got, not_found};
use crate::importance::{self, FEATURE_NAMES};
use crate::item::Record;
use crate::ops::ListArgs;
use crate::state::Entry;
use bbx_core::{AgentId, Result};
use chrono::TimeZone;
use serde_json::{Map, Value, json};

/// An item's record as the reads show it (labels included), without its
/// content.
pub(crate) fn described(record: &Record, tier: Tier) -> Value {
    Value::Object(record_fields(record, tier))
}

fn record_fields(record: &Record, tier: Tier) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("id".into(), json!(record.id));
    fields.insert("kind".into(), json!(record.kind));
    if let Some(role) = record.role {
        fields.insert("role".into(), json!(role));
    }
    fields.insert("tokens".into(), json!(record.tokens));
    fields.insert("bytes".into(), json!(record.bytes));
    fields.insert("tier".into(), json!(tier));
    fields.insert("pinned".into(), json!(record.pinned));
    if let Some(importance) = record.importance {
        fields.insert("importance".into(), json!(importance));
    }
    fields.insert("created".into(), json!(record.created));
    if !record.refs.is_empty() {
        fields.insert("refs".into(), json!(record.refs));
    }
    if !record.labels.is_empty() {
        fields.insert("labels".into(), json!(record.labels));
    }
    fields
}

/// An item as `context.get` answers it.
pub fn item(got: &Got) -> Value {
    let mut fields = record_fields(&got.record, got.tier);
    fields.insert("content".into(), json!(&*got.content));
    fields.insert("accesses".into(), json!(got.access.count));
    if let Some(at) = chrono::Utc.timestamp_millis_opt(got.access.at_ms).single() {
        fields.insert("accessed".into(), json!(at));
    }
    Value::Object(fields)
}

fn listed(entry: &Entry) -> Value {
    let mut fields = record_fields(&entry.record, entry.tier());
    fields.insert("accesses".into(), json!(entry.access.count));
    Value::Object(fields)
}

impl Contexts {
    pub(crate) fn list(&self, agent: AgentId, args: &ListArgs) -> Result<Value> {
        let limit = args.limit.unwrap_or(100);
        self.with(agent, |ctx| {
            let after = args.after.unwrap_or(0);
            let mut items = Vec::new();
            let mut next = None;
            for entry in ctx
                .items
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .map(|(_, e)| e)
            {
                if args.tier.is_some_and(|t| t != entry.tier()) || args.kind.is_some_and(|k| k != entry.record.kind) {
                    continue;
                }
                if items.len() == limit {
                    next = items.last().and_then(|v: &Value| v["id"].as_u64());
                    break;
                }
                items.push(listed(entry));
            }
            json!({ "items": items, "next_after": next })
        })
    }

    /// The agent's figures: items and bytes per tier, tokens, the model, prefetch.
    pub fn stats(&self, agent: AgentId) -> Result<Value> {
        let model = self.model();
        let cold_search = json!({ "on": self.cold_search(), "pending": self.cold_pending(&agent)? });
        self.with(agent, |ctx| {
            let (issued, hits) = ctx.prefetch;
            let tiers: Map<String, Value> = Tier::ALL
                .iter()
                .map(|t| {
                    let i = *t as usize;
                    (
                        t.name().to_owned(),
                        json!({ "items": ctx.counts[i], "bytes": ctx.bytes[i] }),
                    )
                })
                .collect();
            json!({
                "items": ctx.items.len(),
                "tokens": ctx.tokens,
                "steps": ctx.step,
                "tiers": tiers,
                "importance": match &model {
                    Some(m) => json!({ "model": "gbdt", "auc": m.auc, "trained_at": m.trained_at }),
                    None => json!({ "model": "formula" }),
                },
                "cold_search": cold_search,
                "prefetch": {
                    "issued": issued,
                    "hits": hits,
                    "hit_rate": if issued == 0 { 0.0 } else { hits as f64 / issued as f64 },
                },
            })
        })
    }

    pub(crate) fn score(&self, agent: AgentId, id: u64) -> Result<Value> {
        let model = self.model();
        self.with(agent, |ctx| {
            let entry = ctx.items.get(&id).ok_or_else(|| not_found(id))?;
            let newest = ctx.items.keys().next_back().copied().unwrap_or(id);
            let features = importance::features(entry, ctx.step, newest);
            let score = self.scores(ctx, &[id])[0];
            let named: Map<String, Value> = FEATURE_NAMES
                .iter()
                .zip(features)
                .map(|(name, value)| ((*name).to_owned(), json!(value)))
                .collect();
            Ok(json!({
                "id": id,
                "score": score,
                "model": if model.is_some() { "gbdt" } else { "formula" },
                "tier": entry.tier(),
                "features": named,
            }))
        })?
    }
}
