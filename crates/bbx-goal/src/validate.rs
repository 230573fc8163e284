//! A workflow checked before anything runs, and compiled into what the
//! engine needs: each step's dependencies (given, and implied by references)
//! and its parsed condition.
//!
//! Each problem is one `invalid_argument` error whose `field` is the step's path
//! (`steps.c.depends_on[0]`, `steps.fetch.args.url`): unknown kinds, args that
//! fail their kind's schema, references to steps or inputs that do not exist,
//! and cycles, named step by step.

use crate::condition::Condition;
use crate::template::{self, Target};
use crate::workflow::{self, ApprovalArgs, SignalArgs, Step, TimerArgs, Workflow, WorkflowArgs, engine_kinds};
use bbx_core::{Error, Result};
use serde_json::Value;
use std::collections::HashMap;

/// How deep sub-workflows may nest.
pub const MAX_NESTING: usize = 8;

/// The op kinds a workflow may use, as the kernel serves them.
pub trait Kinds: Send + Sync {
    /// Whether `kind` is served; `Err` (the field being `path`) if not, or if
    /// `args` (with references left in) fail its schema.
    fn check(&self, kind: &str, args: &Value, path: &str) -> Result<()>;
}

/// A checked workflow, ready to run.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub workflow: Workflow,
    /// Step names, in the order of their indexes.
    pub names: Vec<String>,
    /// Each step's dependencies (indexes), given and implied, sorted.
    pub deps: Vec<Vec<usize>>,
    pub conditions: Vec<Option<Condition>>,
}

impl Compiled {
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.binary_search_by(|n| n.as_str().cmp(name)).ok()
    }

    pub fn step(&self, index: usize) -> &Step {
        &self.workflow.steps[&self.names[index]]
    }

    /// The steps with no dependency among them, at most, along the longest
    /// chain: steps divided by the critical path's length.
    pub fn critical_path(&self) -> usize {
        let mut depth = vec![0usize; self.names.len()];
        for index in topological(&self.deps).unwrap_or_default() {
            depth[index] = 1 + self.deps[index].iter().map(|&d| depth[d]).max().unwrap_or(0);
        }
        depth.into_iter().max().unwrap_or(0)
    }
}

/// Checks `workflow` (against `kinds` where given: a workflow recovered from
/// the journal was checked when submitted) and compiles it.
pub fn compile(workflow: Workflow, kinds: Option<&dyn Kinds>) -> Result<Compiled> {
    compile_nested(workflow, kinds, "", 0)
}

fn compile_nested(workflow: Workflow, kinds: Option<&dyn Kinds>, prefix: &str, nesting: usize) -> Result<Compiled> {
    let field = |rest: &str| format!("{prefix}{rest}");
    if workflow.steps.is_empty() {
        return Err(invalid(&field("steps"), "a workflow has at least one step"));
    }
    if workflow.steps.len() > workflow::MAX_STEPS {
        return Err(invalid(
            &field("steps"),
            format!(
                "a workflow has at most {} steps; this one has {}",
                workflow::MAX_STEPS,
                workflow.steps.len()
            ),
        ));
    }
    if let Some(parallel) = workflow.max_parallel
        && !(1..=workflow::MAX_PARALLEL).contains(&parallel)
    {
        return Err(invalid(
            &field("max_parallel"),
            format!("max_parallel must be from 1 to {}", workflow::MAX_PARALLEL),
        ));
    }
    if let Some(cap) = workflow.max_cost_usd
        && !(cap.is_finite() && (0.0..=1e9).contains(&cap))
    {
        return Err(invalid(
            &field("max_cost_usd"),
            "max_cost_usd must be a number of USD from 0 to 1e9".to_owned(),
        ));
    }
    if workflow.on_cost_cap.is_some() && workflow.max_cost_usd.is_none() {
        return Err(invalid(
            &field("on_cost_cap"),
            "on_cost_cap says what passing max_cost_usd does: give max_cost_usd too".to_owned(),
        ));
    }
    let names: Vec<String> = workflow.steps.keys().cloned().collect();
    let index = |name: &str| names.binary_search_by(|n| n.as_str().cmp(name)).ok();
    let mut deps = Vec::with_capacity(names.len());
    let mut conditions = Vec::with_capacity(names.len());
    for (me, (name, step)) in workflow.steps.iter().enumerate() {
        let at = field(&format!("steps.{name}"));
        check_name(name, &at)?;
        let mut mine = Vec::with_capacity(step.depends_on.len());
        for (i, dep) in step.depends_on.iter().enumerate() {
            let dep_at = format!("{at}.depends_on[{i}]");
            match index(dep) {
                Some(d) if d == me => return Err(invalid(&dep_at, format!("step {name} depends on itself"))),
                Some(d) => mine.push(d),
                None => {
                    return Err(invalid(
                        &dep_at,
                        format!("step {name} depends on {dep:?}, which is no step of this workflow"),
                    ));
                }
            }
        }
        let mut references = 0;
        let mut refer = |target: &Target, where_: &str| -> Result<()> {
            references += 1;
            if references > template::MAX_REFERENCES {
                return Err(invalid(
                    where_,
                    format!("a step makes at most {} references", template::MAX_REFERENCES),
                ));
            }
            match target {
                Target::Output { step: other, .. } | Target::Status { step: other } => match index(other) {
                    Some(d) if d == me => Err(invalid(where_, format!("${{{target}}} refers to its own step"))),
                    Some(d) => {
                        mine.push(d);
                        Ok(())
                    }
                    None => Err(invalid(
                        where_,
                        format!("${{{target}}} refers to {other:?}, which is no step of this workflow"),
                    )),
                },
                Target::Input { name: input, .. } if !workflow.inputs.contains_key(input) => Err(invalid(
                    where_,
                    format!("${{{target}}} refers to input {input:?}, which the workflow's inputs do not declare"),
                )),
                _ => Ok(()),
            }
        };
        let referenced = if step.kind == engine_kinds::WORKFLOW {
            step.args.get("inputs").cloned().unwrap_or(Value::Null)
        } else {
            step.args.clone()
        };
        let mut found = Vec::new();
        template::each_reference(&referenced, &mut format!("{at}.args"), &mut |path, target| {
            found.push((path.to_owned(), target.clone()));
            Ok(())
        })
        .map_err(|why| invalid(&format!("{at}.args"), why))?;
        if let Some(fallback) = &step.fallback {
            template::each_reference(
                &fallback.args,
                &mut format!("{at}.fallback.args"),
                &mut |path, target| {
                    found.push((path.to_owned(), target.clone()));
                    Ok(())
                },
            )
            .map_err(|why| invalid(&format!("{at}.fallback.args"), why))?;
        }
        let condition = match &step.when {
            Some(text) => {
                let parsed = Condition::parse(text).map_err(|why| invalid(&format!("{at}.when"), why))?;
                parsed.references(&mut |target| found.push((format!("{at}.when"), target.clone())));
                Some(parsed)
            }
            None => None,
        };
        for (path, target) in &found {
            refer(target, path)?;
        }
        check_kind(step, kinds, &at, nesting)?;
        if let Some(fallback) = &step.fallback {
            if engine_kinds::ALL.contains(&fallback.kind.as_str()) {
                return Err(invalid(
                    &format!("{at}.fallback.kind"),
                    format!("a fallback is an op; {} is the engine's own kind", fallback.kind),
                ));
            }
            if let Some(kinds) = kinds {
                kinds.check(&fallback.kind, &fallback.args, &format!("{at}.fallback"))?;
            }
        }
        mine.sort_unstable();
        mine.dedup();
        deps.push(mine);
        conditions.push(condition);
    }
    if let Err(cycle) = topological(&deps) {
        let named: Vec<&str> = cycle.iter().map(|&i| names[i].as_str()).collect();
        return Err(invalid(
            &field(&format!("steps.{}.depends_on", named[0])),
            format!(
                "the steps form a cycle (each waits for the one before it): {}",
                named.join(" -> ")
            ),
        ));
    }
    Ok(Compiled {
        workflow,
        names,
        deps,
        conditions,
    })
}

fn check_name(name: &str, at: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= workflow::MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            at,
            format!(
                "{name:?} is not a step name: 1-{} letters, digits, _ and -, starting with a letter or _",
                workflow::MAX_NAME_LEN
            ),
        ))
    }
}

fn engine_args<T: serde::de::DeserializeOwned>(step: &Step, at: &str) -> Result<T> {
    let args = if step.args.is_null() {
        Value::Object(Default::default())
    } else {
        step.args.clone()
    };
    T::deserialize(&args).map_err(|e| {
        invalid(
            &format!("{at}.args"),
            format!("the args of {} are not valid: {e}", step.kind),
        )
    })
}

fn check_kind(step: &Step, kinds: Option<&dyn Kinds>, at: &str, nesting: usize) -> Result<()> {
    match step.kind.as_str() {
        engine_kinds::TIMER => {
            let timer: TimerArgs = engine_args(step, at)?;
            match (timer.ms, timer.until) {
                (Some(ms), None) if ms <= workflow::MAX_TIMER_MS => Ok(()),
                (None, Some(_)) => Ok(()),
                (Some(_), None) => Err(invalid(
                    &format!("{at}.args.ms"),
                    format!("a timer waits at most {} ms", workflow::MAX_TIMER_MS),
                )),
                _ => Err(invalid(&format!("{at}.args"), "a timer takes ms or until, one of them")),
            }
        }
        engine_kinds::SIGNAL => {
            let signal: SignalArgs = engine_args(step, at)?;
            check_signal_name(&signal.name).map_err(|why| invalid(&format!("{at}.args.name"), why))
        }
        engine_kinds::APPROVAL => engine_args::<ApprovalArgs>(step, at).map(drop),
        engine_kinds::GOAL => {
            let spec: crate::planner::GoalSpec = engine_args(step, at)?;
            if spec.goal.trim().is_empty() {
                return Err(invalid(&format!("{at}.args.goal"), "a sub-goal says what it is"));
            }
            Ok(())
        }
        engine_kinds::WORKFLOW => {
            if nesting + 1 >= MAX_NESTING {
                return Err(invalid(
                    &format!("{at}.args.workflow"),
                    format!("workflows nest at most {MAX_NESTING} deep"),
                ));
            }
            let child: WorkflowArgs = engine_args(step, at)?;
            compile_nested(child.workflow, kinds, &format!("{at}.args.workflow."), nesting + 1).map(drop)
        }
        kind => match kinds {
            Some(kinds) => kinds.check(kind, &step.args, at),
            None => Ok(()),
        },
    }
}

/// An `invalid_argument` error whose message starts with the field's path.
pub(crate) fn invalid(field: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid_field(field, format!("{field}: {message}"))
}

/// What a signal may be named.
pub fn check_signal_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err("a signal's name is 1-128 bytes without control characters".into());
    }
    Ok(())
}

/// The steps in an order where each comes after its dependencies, or a cycle
/// (its steps in order, the first again at the end).
pub fn topological(deps: &[Vec<usize>]) -> std::result::Result<Vec<usize>, Vec<usize>> {
    let mut dependants = vec![Vec::new(); deps.len()];
    let mut waiting: Vec<usize> = deps.iter().map(Vec::len).collect();
    for (step, mine) in deps.iter().enumerate() {
        for &dep in mine {
            dependants[dep].push(step);
        }
    }
    let mut order: Vec<usize> = (0..deps.len()).filter(|&s| waiting[s] == 0).collect();
    let mut next = 0;
    while next < order.len() {
        for &dependant in &dependants[order[next]] {
            waiting[dependant] -= 1;
            if waiting[dependant] == 0 {
                order.push(dependant);
            }
        }
        next += 1;
    }
    if order.len() == deps.len() {
        return Ok(order);
    }
    // Every step left waits on another step left: walk dependencies until one
    // comes back.
    let start = (0..deps.len()).find(|&s| waiting[s] > 0).unwrap_or(0);
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut path = Vec::new();
    let mut at = start;
    loop {
        if let Some(&first) = seen.get(&at) {
            let mut cycle: Vec<usize> = path[first..].to_vec();
            cycle.reverse();
            // From its first step by name, so the same cycle reads the same.
            let lowest = (0..cycle.len()).min_by_key(|&i| cycle[i]).unwrap_or(0);
            cycle.rotate_left(lowest);
            cycle.push(cycle[0]);
            return Err(cycle);
        }
        seen.insert(at, path.len());
        path.push(at);
        at = deps[at].iter().copied().find(|&d| waiting[d] > 0).unwrap_or(start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workflow(yaml: &str) -> Workflow {
        Workflow::from_value(&Workflow::parse(yaml).unwrap()).unwrap()
    }

    fn refused(yaml: &str) -> Error {
        compile(workflow(yaml), Some(&OnlyState)).unwrap_err()
    }

    struct OnlyState;

    impl Kinds for OnlyState {
        fn check(&self, kind: &str, args: &Value, path: &str) -> Result<()> {
            if !kind.starts_with("state.") {
                return Err(invalid(&format!("{path}.kind"), format!("no op kind {kind}")));
            }
            match args.get("key") {
                Some(Value::String(_)) => Ok(()),
                _ => Err(invalid(&format!("{path}.args"), "key is required")),
            }
        }
    }

    fn field(e: &Error) -> String {
        e.details.as_ref().unwrap()["field"].as_str().unwrap().to_owned()
    }

    #[test]
    fn references_and_depends_on_make_the_dependencies() {
        let compiled = compile(
            workflow(
                "steps:\n  a: {kind: state.incr, args: {key: a}}\n  b: {kind: state.incr, args: {key: b}}\n  c: {kind: state.set, args: {key: c, value: '${steps.inc.output.value}'}, depends_on: [a, b]}\n  inc: {kind: state.incr, args: {key: i}}\n",
            ),
            Some(&OnlyState),
        )
        .unwrap();
        assert_eq!(compiled.names, ["a", "b", "c", "inc"]);
        assert_eq!(compiled.deps[2], [0, 1, 3]);
        assert_eq!(compiled.critical_path(), 2);
    }

    #[test]
    fn a_cycle_is_named_step_by_step() {
        let e = refused(
            "steps:\n  a: {kind: state.get, args: {key: a}, depends_on: [c]}\n  b: {kind: state.get, args: {key: b}, depends_on: [a]}\n  c: {kind: state.get, args: {key: '${steps.b.output.value}'}}\n  d: {kind: state.get, args: {key: d}}\n",
        );
        assert!(e.message.ends_with(": a -> b -> c -> a"), "{}", e.message);
        assert_eq!(field(&e), "steps.a.depends_on");
    }

    #[test]
    fn each_mistake_names_its_step_and_field() {
        let cases = [
            (
                "steps: {a: {kind: state.get, args: {key: a}, depends_on: [zz]}}",
                "steps.a.depends_on[0]",
                "zz",
            ),
            (
                "steps: {a: {kind: state.get, args: {key: a}, depends_on: [a]}}",
                "steps.a.depends_on[0]",
                "itself",
            ),
            ("steps: {a: {kind: shell.run, args: {}}}", "steps.a.kind", "shell.run"),
            ("steps: {a: {kind: state.get, args: {}}}", "steps.a.args", "key"),
            (
                "steps: {a: {kind: state.get, args: {key: '${steps.nope.output}'}}}",
                "steps.a.args.key",
                "nope",
            ),
            (
                "steps: {a: {kind: state.get, args: {key: '${inputs.city}'}}}",
                "steps.a.args.key",
                "city",
            ),
            (
                "steps: {a: {kind: state.get, args: {key: '${steps.a.output}'}}}",
                "steps.a.args.key",
                "own step",
            ),
            (
                "steps: {a: {kind: state.get, args: {key: x}, when: '1 <'}}",
                "steps.a.when",
                "expected",
            ),
            (
                "steps: {a: {kind: wait.timer, args: {}}}",
                "steps.a.args",
                "ms or until",
            ),
            (
                "steps: {a: {kind: wait.signal, args: {name: ''}}}",
                "steps.a.args.name",
                "1-128",
            ),
            (
                "steps: {'9a': {kind: state.get, args: {key: x}}}",
                "steps.9a",
                "step name",
            ),
            (
                "steps: {a: {kind: workflow, args: {workflow: {steps: {b: {kind: state.get, args: {}}}}}}}",
                "steps.a.args.workflow.steps.b.args",
                "key",
            ),
            (
                "steps: {a: {kind: state.get, args: {key: x}, fallback: {kind: wait.timer}}}",
                "steps.a.fallback.kind",
                "engine",
            ),
            ("steps: {}", "steps", "at least one"),
            (
                "max_parallel: 0\nsteps: {a: {kind: state.get, args: {key: x}}}",
                "max_parallel",
                "from 1",
            ),
        ];
        for (yaml, at, says) in cases {
            let e = refused(yaml);
            assert_eq!(field(&e), at, "{yaml}: {}", e.message);
            assert!(e.message.contains(says), "{yaml}: {}", e.message);
        }
    }

    #[test]
    fn a_ten_thousand_step_chain_compiles() {
        let mut steps = serde_json::Map::new();
        for i in 0..workflow::MAX_STEPS {
            let mut step = serde_json::json!({"kind": "state.get", "args": {"key": "k"}});
            if i > 0 {
                step["depends_on"] = serde_json::json!([format!("s{:05}", i - 1)]);
            }
            steps.insert(format!("s{i:05}"), step);
        }
        let compiled = compile(
            Workflow::from_value(&serde_json::json!({ "steps": steps })).unwrap(),
            Some(&OnlyState),
        )
        .unwrap();
        assert_eq!(compiled.critical_path(), workflow::MAX_STEPS);
    }
}
