//! The policies in force as one program: compiled together, with a generated
//! module whose `decision` lists each policy's `deny`, so that one evaluation
//! decides a request for all of them, as a [`crate::rego::Program`].

use super::{Access, PACKAGE, StoredPolicy};
use crate::{Action, Caller};
use bbx_core::{Error, Result};
use chrono::Utc;

/// The policies in force, compiled into one program whose value is the list of
/// their `deny` values.
#[derive(Default)]
pub(super) struct PolicySet {
    pub(super) policies: Vec<StoredPolicy>,
    program: Option<Program>,
}

use crate::rego::{Program, engine};

/// The entry point: the generated module's list of decisions.
const DECISION: &str = "data.bbx.decision.decision";

impl PolicySet {
    /// Checks each policy alone (so that an error names it), then all together.
    pub(super) fn build(policies: Vec<StoredPolicy>) -> Result<Self> {
        let mut packages: Vec<Vec<String>> = Vec::with_capacity(policies.len());
        for policy in &policies {
            let package = check_alone(&policy.name, &policy.source)?;
            if let Some(twin) = packages.iter().position(|p| *p == package) {
                return Err(refused(
                    &policy.name,
                    format!("policy {} already has its package", policies[twin].name),
                ));
            }
            packages.push(package);
        }
        if policies.is_empty() {
            return Ok(Self::default());
        }
        let mut engine = engine();
        for policy in &policies {
            engine
                .add_policy(format!("{}.rego", policy.name), policy.source.clone())
                .map_err(|e| refused(&policy.name, e))?;
        }
        engine
            .add_policy("decision.rego".into(), decision_module(&packages))
            .map_err(|e| Error::internal(format!("the policies' decision module: {e}")))?;
        let samples: Vec<regorus::Value> = samples()
            .iter()
            .map(|(caller, access)| regorus::Value::from(access.input(caller, Utc::now())))
            .collect();
        let program = Program::compile(engine, DECISION, &samples).map_err(|e| refused("set", e))?;
        Ok(Self {
            policies,
            program: Some(program),
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.program.is_none()
    }

    /// Whether the set runs on the VM (for the benchmark's report).
    pub(super) fn on_vm(&self) -> bool {
        self.program.as_ref().is_some_and(Program::on_vm)
    }

    pub(super) fn decide(&self, caller: &Caller, access: &Access<'_>) -> Result<()> {
        let Some(program) = &self.program else {
            return Ok(());
        };
        let input = regorus::Value::from(access.input(caller, Utc::now()));
        let decided = program.eval(input).map_err(|e| {
            Error::permission_denied(format!(
                "the authorization policies could not decide ({e}), so they refuse"
            ))
        })?;
        let mut refusals = Vec::new();
        for (index, policy) in self.policies.iter().enumerate() {
            let name = &policy.name;
            match reasons(&decided[index]) {
                Ok(reasons) => refusals.extend(reasons.into_iter().map(|reason| format!("{name}: {reason}"))),
                Err(why) => refusals.push(format!("{name}: it could not decide ({why}), so it refuses")),
            }
        }
        if refusals.is_empty() {
            Ok(())
        } else {
            Err(Error::permission_denied(format!(
                "refused by policy {}",
                refusals.join("; ")
            )))
        }
    }
}

/// The reasons in a `deny` value: a set (or array) of strings or of objects with a
/// `reason`, or `undefined` (no reason).
fn reasons(value: &regorus::Value) -> std::result::Result<Vec<String>, String> {
    let items: Vec<&regorus::Value> = match value {
        regorus::Value::Undefined => return Ok(Vec::new()),
        regorus::Value::Set(set) => set.iter().collect(),
        regorus::Value::Array(array) => array.iter().collect(),
        regorus::Value::Bool(false) => return Ok(Vec::new()),
        regorus::Value::Bool(true) => return Ok(vec!["denied".to_owned()]),
        other => return Err(format!("deny is {}, not a set of reasons", kind_of(other))),
    };
    Ok(items
        .into_iter()
        .map(|item| match item {
            regorus::Value::String(s) => s.to_string(),
            regorus::Value::Object(fields) => fields
                .get(&regorus::Value::from("reason"))
                .map(|r| r.as_string().map(|s| s.to_string()).unwrap_or_else(|_| r.to_string()))
                .unwrap_or_else(|| item.to_string()),
            other => other.to_string(),
        })
        .collect())
}

fn kind_of(value: &regorus::Value) -> &'static str {
    match value {
        regorus::Value::Null => "null",
        regorus::Value::Number(_) => "a number",
        regorus::Value::String(_) => "a string",
        regorus::Value::Object(_) => "an object",
        _ => "another value",
    }
}

fn refused(name: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid_field("source", format!("policy {name} is refused: {why}"))
}

/// The module whose `decision` lists each policy's `deny` (undefined as empty), in
/// the order of `packages`.
fn decision_module(packages: &[Vec<String>]) -> String {
    let mut module = String::from("package bbx.decision\n");
    let mut names = Vec::with_capacity(packages.len());
    for (index, package) in packages.iter().enumerate() {
        let path: String = package.iter().map(|part| format!(".{part}")).collect();
        module.push_str(&format!(
            "default d{index} := set()\nd{index} := data.{PACKAGE}{path}.deny\n"
        ));
        names.push(format!("d{index}"));
    }
    module.push_str(&format!("decision := [{}]\n", names.join(", ")));
    module
}

/// Parses `source`, checks its package and its `deny` rule, and decides sample
/// requests with it to catch a policy that fails at run time; its package below
/// `bbx.authz`, as path components.
pub(super) fn check_alone(name: &str, source: &str) -> Result<Vec<String>> {
    let mut engine = engine();
    let package = engine
        .add_policy(format!("{name}.rego"), source.to_owned())
        .map_err(|e| refused(name, e))?;
    let package = package.strip_prefix("data.").unwrap_or(&package).to_owned();
    let below = match package.strip_prefix(PACKAGE) {
        Some("") => Vec::new(),
        Some(rest) if rest.starts_with('.') => rest[1..].split('.').map(str::to_owned).collect(),
        _ => {
            return Err(refused(
                name,
                format!("its package is {package}; it must be {PACKAGE} or under it"),
            ));
        }
    };
    if !engine
        .has_declared_rule_rooted_at(&format!("{name}.rego"), "deny")
        .unwrap_or(false)
    {
        return Err(refused(name, "it declares no deny rule"));
    }
    let entry: regorus::Rc<str> = format!("data.{package}.deny").into();
    let compiled = engine.compile_with_entrypoint(&entry).map_err(|e| refused(name, e))?;
    for (caller, access) in samples() {
        let value = compiled
            .eval_with_input(regorus::Value::from(access.input(&caller, Utc::now())))
            .map_err(|e| refused(name, format!("it fails on a sample request: {e}")))?;
        reasons(&value).map_err(|why| refused(name, format!("it fails on a sample request: {why}")))?;
    }
    Ok(below)
}

/// Requests a policy must decide without failing: a reader reading, an agent
/// submitting an op.
fn samples() -> [(Caller, Access<'static>); 2] {
    let reader = Caller::of_tenant(bbx_core::KeyId::generate(), "sample", bbx_core::model::Role::Reader);
    let agent = Caller::of_tenant(bbx_core::KeyId::generate(), "sample", bbx_core::model::Role::Agent);
    let mut submit = Access::new("op.submit", Some(Action::Act), Some("sample"));
    submit.op_kind = Some("http.get");
    let mut read = Access::new("state.get", Some(Action::Read), Some("sample"));
    read.key = Some("sample");
    [(reader, read), (agent, submit)]
}
