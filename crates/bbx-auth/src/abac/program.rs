//! The policies in force as one program: compiled together, with a generated
//! module whose `decision` lists each policy's `deny`, so that one evaluation
//! decides a request for all of them. The program runs on regorus's VM (RVM),
//! some three times faster than its interpreter on the same rules (`bbx bench
//! auth`); a set the VM cannot compile, or decides differently from the
//! interpreter on the sample requests, runs on the interpreter.

use super::{Access, PACKAGE, StoredPolicy, TIME_BUDGET};
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

/// How the set runs.
enum Program {
    Vm {
        program: std::sync::Arc<regorus::rvm::program::Program>,
        /// VMs with the program loaded, each used by one decision at a time.
        idle: parking_lot::Mutex<Vec<regorus::rvm::vm::RegoVM>>,
    },
    Interpreted(regorus::CompiledPolicy),
}

/// The entry point: the generated module's list of decisions.
const DECISION: &str = "data.bbx.decision.decision";
/// The most VM instructions one decision may take (beside its time budget).
const MAX_INSTRUCTIONS: usize = 1_000_000;

impl Program {
    /// The set's program: on the VM if it compiles there and decides the samples
    /// as the interpreter does.
    fn of(compiled: regorus::CompiledPolicy) -> Self {
        let on_vm = regorus::languages::rego::compiler::Compiler::compile_from_policy(&compiled, &[DECISION]);
        let Ok(program) = on_vm else {
            return Self::Interpreted(compiled);
        };
        let vm = Self::Vm {
            program,
            idle: Default::default(),
        };
        let agrees = samples().iter().all(|(caller, access)| {
            let input = || regorus::Value::from(access.input(caller, Utc::now()));
            match (vm.eval(input()), compiled.eval_with_input(input())) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            }
        });
        if agrees { vm } else { Self::Interpreted(compiled) }
    }

    fn eval(&self, input: regorus::Value) -> std::result::Result<regorus::Value, String> {
        match self {
            Self::Interpreted(compiled) => compiled.eval_with_input(input).map_err(|e| e.to_string()),
            Self::Vm { program, idle } => {
                let mut vm = idle.lock().pop().unwrap_or_else(|| {
                    let mut vm = regorus::rvm::vm::RegoVM::new();
                    vm.load_program(program.clone());
                    vm.set_execution_timer_config(Some(timer()));
                    vm.set_max_instructions(MAX_INSTRUCTIONS);
                    vm
                });
                vm.set_input(input);
                let decided = vm.execute().map_err(|e| e.to_string());
                idle.lock().push(vm);
                decided
            }
        }
    }
}

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
        let entry: regorus::Rc<str> = DECISION.into();
        let compiled = engine.compile_with_entrypoint(&entry).map_err(|e| refused("set", e))?;
        Ok(Self {
            policies,
            program: Some(Program::of(compiled)),
        })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.program.is_none()
    }

    /// Whether the set runs on the VM (for the benchmark's report).
    pub(super) fn on_vm(&self) -> bool {
        matches!(self.program, Some(Program::Vm { .. }))
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

fn timer() -> regorus::utils::limits::ExecutionTimerConfig {
    regorus::utils::limits::ExecutionTimerConfig {
        limit: TIME_BUDGET,
        check_interval: std::num::NonZeroU32::new(256).expect("not zero"),
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

/// An engine as every policy is compiled in: built-ins given the wrong type are
/// undefined, as in OPA (`startswith` of an absent key), not an error; and every
/// evaluation has the time budget.
pub(super) fn engine() -> regorus::Engine {
    regorus::utils::limits::set_fallback_execution_timer_config(Some(timer()));
    let mut engine = regorus::Engine::new();
    engine.set_strict_builtin_errors(false);
    engine
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
