//! Values passed by reference: an arg `{"$from": {"op": OP_ID, "path": "/result/..."}}`
//! is replaced, before any check, by the value at `path` (a JSON pointer into
//! `{"result": ...}`) of that op's completion, which must be the same agent's and
//! have completed `ok`. What is journaled is the resolved value, so recovery
//! needs nothing of the referenced op. The checks see each reference (where,
//! from which op, with its labels): taint travels exactly, not by fingerprint.

use bbx_core::op::{CompletionStatus, OpInfo};
use bbx_core::{AgentId, Error, OpId, Result};
use serde_json::Value;

/// References one op may carry at most.
const MAX_REFERENCES: usize = 64;

/// A value an op's args took from another op's completion (`$from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Where in the args (a JSON pointer).
    pub path: String,
    /// The op whose result it is.
    pub source: OpId,
    /// That op's completion's labels (`untrusted`, say).
    pub labels: Vec<String>,
}

/// Resolves the references in the args of an op of `agent` in place, reading
/// each source op with `lookup` (as the submitter may); returns them. Args with
/// no `$from` are not walked.
pub fn resolve(
    agent: AgentId,
    args: &mut Value,
    mut lookup: impl FnMut(&OpId) -> Result<OpInfo>,
) -> Result<Vec<Reference>> {
    let mut found = Vec::new();
    if !mentions_from(args) {
        return Ok(found);
    }
    walk(args, &mut String::new(), &mut |at, target| {
        if found.len() == MAX_REFERENCES {
            return Err(Error::invalid_field(
                "args",
                format!("an op carries at most {MAX_REFERENCES} references"),
            ));
        }
        let (value, reference) = dereference(agent, at, target, &mut lookup)?;
        found.push(reference);
        Ok(value)
    })?;
    Ok(found)
}

/// Whether any object in `value` has a `$from` key (no allocation).
fn mentions_from(value: &Value) -> bool {
    match value {
        Value::Object(fields) => fields.contains_key("$from") || fields.values().any(mentions_from),
        Value::Array(items) => items.iter().any(mentions_from),
        _ => false,
    }
}

/// The value a reference at `at` names.
fn dereference(
    agent: AgentId,
    at: &str,
    target: &Value,
    lookup: &mut impl FnMut(&OpId) -> Result<OpInfo>,
) -> Result<(Value, Reference)> {
    let bad = |why: String| Error::invalid_field("args", format!("the reference at {at}: {why}"));
    let (Some(op), Some(path)) = (
        target.get("op").and_then(Value::as_str),
        target.get("path").and_then(Value::as_str),
    ) else {
        return Err(bad(r#"$from needs {"op": OP_ID, "path": "/result/..."}"#.into()));
    };
    if target.as_object().is_some_and(|o| o.len() != 2) {
        return Err(bad("$from takes only op and path".into()));
    }
    let source: OpId = op.parse()?;
    let info = lookup(&source)?;
    if info.agent != agent {
        return Err(bad(format!("op {source} is another agent's")));
    }
    let completion = info
        .completion
        .filter(|c| c.status == CompletionStatus::Ok)
        .ok_or_else(|| bad(format!("op {source} has not completed ok")))?;
    let value = path
        .strip_prefix("/result")
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .and_then(|rest| completion.result.as_ref()?.pointer(rest))
        .cloned()
        .ok_or_else(|| bad(format!("op {source}'s completion has nothing at {path}")))?;
    let reference = Reference {
        path: at.to_owned(),
        source,
        labels: completion.labels,
    };
    Ok((value, reference))
}

/// Replaces each `{"$from": ...}` object in `value` by what `dereference` gives
/// for it, with the JSON pointer of where it was.
fn walk(
    value: &mut Value,
    path: &mut String,
    dereference: &mut impl FnMut(&str, &Value) -> Result<Value>,
) -> Result<()> {
    match value {
        Value::Object(fields) if fields.len() == 1 && fields.contains_key("$from") => {
            *value = dereference(path, &fields["$from"])?;
        }
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                let len = path.len();
                path.push('/');
                path.push_str(&key.replace('~', "~0").replace('/', "~1"));
                walk(field, path, dereference)?;
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                walk(item, path, dereference)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references_are_found_with_their_paths_and_replaced() {
        let mut args = json!({
            "url": { "$from": { "op": "a", "path": "/result/body" } },
            "list": [1, { "$from": { "op": "b", "path": "/result" } }],
            "not": { "$from": 1, "other": 2 },
        });
        assert!(mentions_from(&args));
        assert!(!mentions_from(&json!({ "a": [1, { "b": "$from" }] })));
        let mut seen = Vec::new();
        walk(&mut args, &mut String::new(), &mut |at, target| {
            seen.push((at.to_owned(), target["op"].clone()));
            Ok(json!("resolved"))
        })
        .unwrap();
        assert_eq!(
            args,
            json!({ "url": "resolved", "list": [1, "resolved"], "not": { "$from": 1, "other": 2 } })
        );
        assert_eq!(
            seen,
            vec![("/list/1".to_owned(), json!("b")), ("/url".to_owned(), json!("a"))]
        );
    }
}
