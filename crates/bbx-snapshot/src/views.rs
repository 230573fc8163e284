//! How snapshots are shown in answers.

use crate::catalog::Summary;
use serde_json::{Value, json};

pub fn summary(summary: &Summary) -> Value {
    json!({
        "id": summary.id,
        "agent": summary.agent,
        "tenant": summary.tenant,
        "created_at": summary.created_at,
        "position": summary.position,
        "trigger": summary.trigger,
        "bytes": summary.bytes,
        "bytes_written": summary.bytes_written,
        "chunks": summary.chunks,
        "new_chunks": summary.new_chunks,
        "parts": summary.parts.iter().map(|(name, records)| (name.clone(), json!(records))).collect::<serde_json::Map<_, _>>(),
        "stores": summary.stores,
    })
}
