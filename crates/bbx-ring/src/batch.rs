//! Checks of a submitted batch that need nothing but the batch: its dependency
//! graph, its idempotency keys, and the digest that tells a repeated op from a
//! different op under the same key.

use bbx_core::op::SubmitOp;
use bbx_core::{Error, ErrorCode, OpId, Result};
use sha2::{Digest, Sha256};

/// The longest idempotency key, run id or kind accepted.
pub const MAX_KEY_LEN: usize = 256;

/// One entry of `depends_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// An op submitted earlier (possibly already completed).
    Op(OpId),
    /// The op at this index of the same batch.
    InBatch(usize),
}

impl Dependency {
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(index) = text.strip_prefix('#') {
            return index.parse().map(Self::InBatch).map_err(|_| {
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!("{text:?} is not a batch reference; write #N for the Nth op of the batch, from 0"),
                )
            });
        }
        text.parse().map(Self::Op)
    }
}

/// Parses every op's `depends_on` (one list per op of the batch) and checks the
/// references inside the batch: in range, not to itself, and free of cycles.
/// Errors name the op by its index.
pub fn dependencies(ops: &[&[String]]) -> Result<Vec<Vec<Dependency>>> {
    let mut all = Vec::with_capacity(ops.len());
    // Most batches name no op of their own: no graph to search then.
    let mut in_batch = false;
    for (index, depends_on) in ops.iter().enumerate() {
        let mut deps = Vec::with_capacity(depends_on.len());
        for text in depends_on.iter() {
            let dep = Dependency::parse(text).map_err(|e| at_op(index, e))?;
            if let Dependency::InBatch(target) = dep {
                if target >= ops.len() {
                    return Err(at_op(
                        index,
                        Error::new(
                            ErrorCode::InvalidArgument,
                            format!("depends on #{target}, but the batch has {} ops", ops.len()),
                        ),
                    ));
                }
                if target == index {
                    return Err(at_op(
                        index,
                        Error::new(ErrorCode::InvalidArgument, "an op cannot depend on itself"),
                    ));
                }
                in_batch = true;
            }
            deps.push(dep);
        }
        all.push(deps);
    }
    if let Some(cycle) = in_batch.then(|| find_cycle(&all)).flatten() {
        let path: Vec<String> = cycle.iter().map(|i| format!("#{i}")).collect();
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("depends_on forms a cycle: {}", path.join(" -> ")),
        )
        .with_details(serde_json::json!({ "cycle": cycle })));
    }
    Ok(all)
}

/// A cycle among in-batch references, as the indexes along it (first repeated last).
fn find_cycle(deps: &[Vec<Dependency>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let edges: Vec<Vec<usize>> = deps
        .iter()
        .map(|d| {
            d.iter()
                .filter_map(|d| match d {
                    Dependency::InBatch(t) => Some(*t),
                    Dependency::Op(_) => None,
                })
                .collect()
        })
        .collect();
    let mut marks = vec![Mark::New; deps.len()];
    for start in 0..deps.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative depth-first search: a batch may be thousands of ops long.
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some((node, next_edge)) = path.last_mut() {
            let node = *node;
            let Some(&target) = edges[node].get(*next_edge) else {
                marks[node] = Mark::Done;
                path.pop();
                continue;
            };
            *next_edge += 1;
            match marks[target] {
                Mark::OnPath => {
                    let from = path.iter().position(|(n, _)| *n == target).expect("on the path");
                    let mut cycle: Vec<usize> = path[from..].iter().map(|(n, _)| *n).collect();
                    cycle.push(target);
                    return Some(cycle);
                }
                Mark::New => {
                    marks[target] = Mark::OnPath;
                    path.push((target, 0));
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// The op's idempotency key: the one given, or one derived from its run and step.
/// Never derived from the op's text: two different ops that happen to look alike
/// are still two ops.
pub fn idempotency_key(op: &SubmitOp) -> Result<Option<String>> {
    if let Some(key) = &op.idempotency_key {
        check_key("idempotency_key", key)?;
        return Ok(Some(key.clone()));
    }
    match (&op.run_id, op.step) {
        (Some(run), Some(step)) => {
            check_key("run_id", run)?;
            Ok(Some(format!("run:{run}/step:{step}")))
        }
        (None, Some(_)) => Err(Error::invalid_field("step", "step needs a run_id")),
        (Some(run), None) => {
            check_key("run_id", run)?;
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

fn check_key(field: &str, key: &str) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.chars().any(char::is_control) {
        return Err(Error::invalid_field(
            field,
            format!("{field} must be 1-{MAX_KEY_LEN} bytes without control characters"),
        ));
    }
    Ok(())
}

/// What must match for a repeated idempotency key to be the same op: its kind and
/// its arguments, compared by value (object keys in any order).
pub fn args_digest(kind: &str, args: &serde_json::Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(kind.as_bytes());
    hasher.update([0]);
    // serde_json's map is ordered by key (the crate's `preserve_order` is off), so
    // this text is canonical; a test below fails if that ever changes.
    hasher.update(serde_json::to_vec(args).expect("a JSON value serializes"));
    hex::encode(&hasher.finalize()[..16])
}

/// Prefixes an error with the batch index of the op it is about, and adds `details.op`.
pub fn at_op(index: usize, e: Error) -> Error {
    let message = format!("op #{index}: {}", e.message);
    let mut details = match e.details {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    details.insert("op".into(), index.into());
    Error::new(e.code, message).with_details(serde_json::Value::Object(details))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbx_core::AgentId;
    use proptest::prelude::*;
    use serde_json::json;

    fn dependencies(ops: &[SubmitOp]) -> Result<Vec<Vec<Dependency>>> {
        let lists: Vec<&[String]> = ops.iter().map(|op| op.depends_on.as_slice()).collect();
        super::dependencies(&lists)
    }

    fn op(deps: &[&str]) -> SubmitOp {
        let mut op = SubmitOp::new(AgentId::generate(), "noop", json!({}));
        op.depends_on = deps.iter().map(|d| d.to_string()).collect();
        op
    }

    #[test]
    fn in_batch_references_must_exist_and_not_loop() {
        assert!(dependencies(&[op(&[]), op(&["#0"]), op(&["#0", "#1"])]).is_ok());
        let err = dependencies(&[op(&["#1"]), op(&["#2"]), op(&["#0"])]).unwrap_err();
        assert!(err.message.contains("cycle"), "{}", err.message);
        assert_eq!(err.details.unwrap()["cycle"], json!([0, 1, 2, 0]));
        let err = dependencies(&[op(&["#0"])]).unwrap_err();
        assert_eq!(err.details.unwrap()["op"], 0);
        assert!(dependencies(&[op(&["#5"])]).is_err());
        assert!(dependencies(&[op(&["#x"])]).is_err());
        assert_eq!(
            dependencies(&[op(&["not-an-id"])]).unwrap_err().code,
            ErrorCode::InvalidId
        );
        let id = OpId::generate().to_string();
        assert!(
            dependencies(&[op(&[&id])]).is_ok(),
            "other ops are checked by the kernel"
        );
    }

    #[test]
    fn keys_are_given_or_derived_from_run_and_step_never_from_the_text() {
        let mut a = op(&[]);
        assert_eq!(idempotency_key(&a).unwrap(), None);
        a.run_id = Some("r1".into());
        assert_eq!(
            idempotency_key(&a).unwrap(),
            None,
            "a run without a step is only metadata"
        );
        a.step = Some(3);
        assert_eq!(idempotency_key(&a).unwrap().as_deref(), Some("run:r1/step:3"));
        a.idempotency_key = Some("mine".into());
        assert_eq!(idempotency_key(&a).unwrap().as_deref(), Some("mine"));
        a.idempotency_key = Some(String::new());
        assert!(idempotency_key(&a).is_err());
        let mut b = op(&[]);
        b.step = Some(1);
        assert!(idempotency_key(&b).is_err());
    }

    #[test]
    fn digests_compare_values_not_spelling() {
        let one: serde_json::Value = serde_json::from_str(r#"{"key":"k","value":{"a":1,"b":2}}"#).unwrap();
        let two: serde_json::Value = serde_json::from_str(r#"{ "value": {"b":2, "a":1}, "key": "k" }"#).unwrap();
        assert_eq!(args_digest("state.set", &one), args_digest("state.set", &two));
        assert_ne!(args_digest("state.set", &one), args_digest("state.incr", &one));
        assert_ne!(
            args_digest("state.set", &one),
            args_digest("state.set", &json!({"key": "k", "value": 1}))
        );
    }

    proptest! {
        /// Random graphs: a cycle is reported exactly when a topological order does not exist.
        #[test]
        fn cycles_are_found_exactly_when_there_are_any(edges in proptest::collection::vec((0usize..8, 0usize..8), 0..16)) {
            let mut ops: Vec<SubmitOp> = (0..8).map(|_| op(&[])).collect();
            for (from, to) in &edges {
                if from != to {
                    ops[*from].depends_on.push(format!("#{to}"));
                }
            }
            // Kahn's algorithm as the oracle.
            let mut done = [false; 8];
            let mut progress = true;
            while progress {
                progress = false;
                for n in 0..8 {
                    let ready = !done[n] && ops[n].depends_on.iter().all(|d| done[d[1..].parse::<usize>().unwrap()]);
                    if ready { done[n] = true; progress = true; }
                }
            }
            let acyclic = done.iter().all(|d| *d);
            match dependencies(&ops) {
                Ok(_) => prop_assert!(acyclic),
                Err(e) => {
                    prop_assert!(!acyclic, "{}", e.message);
                    let cycle: Vec<usize> = serde_json::from_value(e.details.unwrap()["cycle"].clone()).unwrap();
                    prop_assert_eq!(cycle.first(), cycle.last());
                    for pair in cycle.windows(2) {
                        let dep = format!("#{}", pair[1]);
                        prop_assert!(ops[pair[0]].depends_on.contains(&dep));
                    }
                }
            }
        }
    }
}
