//! What changed between two snapshots: per part, the records added, changed
//! and removed (state keys as text, workspace files by path, other parts'
//! record keys in hex).

use crate::manifest::FILES;
use crate::pitr::Parts;
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// A record key as shown.
fn shown(part: &str, key: &[u8]) -> String {
    match part {
        "state" | FILES => String::from_utf8_lossy(key).into_owned(),
        _ => hex::encode(key),
    }
}

pub fn diff(from: &Parts, to: &Parts) -> Value {
    let names: BTreeSet<&String> = from.keys().chain(to.keys()).collect();
    let empty = Default::default();
    let mut parts = serde_json::Map::new();
    for name in names {
        let (a, b) = (from.get(name).unwrap_or(&empty), to.get(name).unwrap_or(&empty));
        let added: Vec<String> = b
            .keys()
            .filter(|k| !a.contains_key(*k))
            .map(|k| shown(name, k))
            .collect();
        let removed: Vec<String> = a
            .keys()
            .filter(|k| !b.contains_key(*k))
            .map(|k| shown(name, k))
            .collect();
        let changed: Vec<String> = b
            .iter()
            .filter(|(k, v)| a.get(*k).is_some_and(|old| old != *v))
            .map(|(k, _)| shown(name, k))
            .collect();
        if !(added.is_empty() && removed.is_empty() && changed.is_empty()) {
            parts.insert(
                name.clone(),
                json!({ "added": added, "changed": changed, "removed": removed }),
            );
        }
    }
    let state = parts
        .get("state")
        .cloned()
        .unwrap_or_else(|| json!({ "added": [], "changed": [], "removed": [] }));
    json!({
        "added": state["added"],
        "changed": state["changed"],
        "removed": state["removed"],
        "parts": parts,
    })
}
