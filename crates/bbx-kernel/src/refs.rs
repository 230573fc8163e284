//! Values passed by reference: an arg `{"$from": {"op": OP_ID, "path": "/result/..."}}`
//! is replaced, before any check, by the value at `path` (a JSON pointer into
//! `{"result": ...}`) of that op's completion, which must be the same agent's and
//! have completed `ok`. What is journaled is the resolved value, so recovery
//! needs nothing of the referenced op. The checks see each reference (where,
//! from which op, with its labels): taint travels exactly, not by fingerprint.

use super::*;
use bbx_component::Reference;
use bbx_core::op::{CompletionStatus, SubmitOp};
use serde_json::Value;

/// References one op may carry at most.
const MAX_REFERENCES: usize = 64;

impl Kernel {
    /// Resolves the references in each op's args in place; returns, per op, the
    /// references it carried.
    pub(crate) fn resolve_references(&self, caller: &Caller, ops: &mut [SubmitOp]) -> Result<Vec<Vec<Reference>>> {
        let mut all = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter_mut().enumerate() {
            let mut found = Vec::new();
            let mut path = String::new();
            resolve(&mut op.args, &mut path, &mut |at, target| {
                if found.len() == MAX_REFERENCES {
                    return Err(Error::invalid_field(
                        "args",
                        format!("an op carries at most {MAX_REFERENCES} references"),
                    ));
                }
                let (value, reference) = self.dereference(caller, op.agent, at, target)?;
                found.push(reference);
                Ok(value)
            })
            .map_err(|e| bbx_ring::batch::at_op(index, e))?;
            all.push(found);
        }
        Ok(all)
    }

    /// The value a reference at `at` names, read as `caller`.
    fn dereference(&self, caller: &Caller, agent: AgentId, at: &str, target: &Value) -> Result<(Value, Reference)> {
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
        let info = self.op(caller, &source)?;
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
}

/// Replaces each `{"$from": ...}` object in `value` by what `dereference` gives
/// for it, with the JSON pointer of where it was.
fn resolve(
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
                resolve(field, path, dereference)?;
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push('/');
                path.push_str(&i.to_string());
                resolve(item, path, dereference)?;
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
        let mut seen = Vec::new();
        resolve(&mut args, &mut String::new(), &mut |at, target| {
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
