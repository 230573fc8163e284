//! Flow policies: Rego modules in package `bbx.flow`, each evaluated on its own.
//! A policy's decision is `data.bbx.flow.decision`: undefined (it does not
//! decide) or `{"action": ..., "reason": ...}`. A policy may say which op kinds it
//! concerns (`kinds := {"tool.http"}`); an op whose kind no loaded policy
//! concerns pays two map lookups. Policies are global or a tenant's, versioned,
//! and stored; a set changes atomically, and a policy that fails to parse, to
//! compile or to decide the sample ops is refused while the set in force stays.

use bbx_auth::rego::{Program, engine};
use bbx_core::{Error, ErrorCode, Result};
use bbx_store::KeyspaceDef;
use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::Arc;

/// scope (a tenant, or empty for global), NUL, name -> [`StoredPolicy`] as JSON.
/// Its id is what redo records carry: never change it.
pub const FLOW_POLICIES: KeyspaceDef = KeyspaceDef {
    id: 15,
    name: "flow_policies",
};

const DECISION: &str = "data.bbx.flow.decision";
const KINDS: &str = "data.bbx.flow.kinds";
const DEFAULT: &str = "data.bbx.flow.default_decision";
/// The largest policy accepted, in bytes.
const MAX_POLICY_BYTES: usize = 256 * 1024;

/// What a policy decides, from the least strict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Audit,
    Warn,
    RequireApproval,
    Block,
    Quarantine,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Self::Allow,
        Self::Audit,
        Self::Warn,
        Self::RequireApproval,
        Self::Block,
        Self::Quarantine,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Audit => "audit",
            Self::Warn => "warn",
            Self::RequireApproval => "require_approval",
            Self::Block => "block",
            Self::Quarantine => "quarantine",
        }
    }
}

/// A policy as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StoredPolicy {
    pub name: String,
    /// The tenant whose ops it decides; none for every tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub source: String,
    /// The bundle it came in: its modules are loaded, versioned and removed as
    /// one, and each is named `BUNDLE/MODULE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    pub version: u64,
    pub updated_at: DateTime<Utc>,
}

impl StoredPolicy {
    pub fn key(&self) -> Vec<u8> {
        key(self.tenant.as_deref(), &self.name)
    }
}

pub fn key(tenant: Option<&str>, name: &str) -> Vec<u8> {
    [tenant.unwrap_or("").as_bytes(), &[0], name.as_bytes()].concat()
}

/// A policy ready to decide.
pub struct Loaded {
    pub stored: StoredPolicy,
    /// The kinds it concerns; `None` for every kind.
    pub kinds: Option<BTreeSet<String>>,
    /// `default_decision := "deny"`: an op of a kind it concerns that no policy
    /// decides is blocked.
    pub denies_by_default: bool,
    program: Program,
}

/// One policy's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decided {
    pub policy: String,
    pub action: Action,
    pub reason: String,
    /// The policy asks for a snapshot of the agent before the op runs
    /// (`"snapshot": true` in its decision).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

impl Decided {
    /// A decision that asks for no snapshot.
    pub fn new(policy: impl Into<String>, action: Action, reason: impl Into<String>) -> Self {
        Self {
            policy: policy.into(),
            action,
            reason: reason.into(),
            snapshot: false,
        }
    }
}

impl Loaded {
    /// Compiles `stored`, refusing it if it does not parse, is not in `bbx.flow`,
    /// or fails on the sample ops.
    pub fn compile(stored: StoredPolicy) -> Result<Self> {
        let name = stored.name.clone();
        if stored.source.len() > MAX_POLICY_BYTES {
            return Err(refused(&name, format!("it is over {MAX_POLICY_BYTES} bytes")));
        }
        let mut parsed = engine();
        let package = parsed
            .add_policy(format!("{name}.rego"), stored.source.clone())
            .map_err(|e| refused(&name, e))?;
        if package != "data.bbx.flow" {
            return Err(refused(&name, format!("its package is {package}; it must be bbx.flow")));
        }
        let declares_kinds = parsed
            .has_declared_rule_rooted_at(&format!("{name}.rego"), "kinds")
            .unwrap_or(false);
        let kinds = match declares_kinds.then(|| parsed.eval_rule(KINDS.to_owned())) {
            None | Some(Ok(regorus::Value::Undefined)) => None,
            Some(Ok(value)) => Some(kind_set(&value).map_err(|why| refused(&name, why))?),
            Some(Err(e)) => return Err(refused(&name, format!("its kinds cannot be read: {e}"))),
        };
        let declares_default = parsed
            .has_declared_rule_rooted_at(&format!("{name}.rego"), "default_decision")
            .unwrap_or(false);
        let denies_by_default = match declares_default.then(|| parsed.eval_rule(DEFAULT.to_owned())) {
            None | Some(Ok(regorus::Value::Undefined)) => false,
            Some(Ok(value)) => match value.as_string().map(|s| s.to_string()).as_deref() {
                Ok("deny") => true,
                Ok("allow") => false,
                _ => return Err(refused(&name, "its default_decision must be \"allow\" or \"deny\"")),
            },
            Some(Err(e)) => return Err(refused(&name, format!("its default_decision cannot be read: {e}"))),
        };
        let samples: Vec<regorus::Value> = samples().into_iter().map(regorus::Value::from).collect();
        let program = Program::compile(parsed, DECISION, &samples).map_err(|e| refused(&name, e))?;
        for sample in samples {
            let value = program
                .eval(sample)
                .map_err(|e| refused(&name, format!("it fails on a sample op: {e}")))?;
            decision(&name, &value).map_err(|e| refused(&name, format!("on a sample op: {}", e.message)))?;
        }
        Ok(Self {
            stored,
            kinds,
            denies_by_default,
            program,
        })
    }

    pub fn concerns(&self, kind: &str) -> bool {
        self.kinds.as_ref().is_none_or(|kinds| kinds.contains(kind))
    }

    /// This policy's decision on `input`; an evaluation that fails blocks (fails
    /// closed), naming why.
    pub fn decide(&self, input: &regorus::Value) -> Option<Decided> {
        let name = &self.stored.name;
        match self.program.eval(input.clone()) {
            Ok(value) => decision(name, &value).unwrap_or_else(|e| Some(Decided::new(name, Action::Block, e.message))),
            Err(e) => Some(Decided::new(
                name,
                Action::Block,
                format!("it could not decide ({e}), so it blocks"),
            )),
        }
    }
}

fn kind_set(value: &regorus::Value) -> std::result::Result<BTreeSet<String>, String> {
    let items: Vec<&regorus::Value> = match value {
        regorus::Value::Set(set) => set.iter().collect(),
        regorus::Value::Array(array) => array.iter().collect(),
        _ => return Err("kinds must be a set of op kinds".into()),
    };
    items
        .into_iter()
        .map(|v| {
            v.as_string()
                .map(|s| s.to_string())
                .map_err(|_| "kinds must be strings".to_owned())
        })
        .collect()
}

/// A policy's decision value: undefined, or an object with a known `action`.
fn decision(name: &str, value: &regorus::Value) -> Result<Option<Decided>> {
    if *value == regorus::Value::Undefined {
        return Ok(None);
    }
    let bad = |why: &str| {
        Error::new(
            ErrorCode::PolicyDenied,
            format!("policy {name}: its decision {why}, so it blocks"),
        )
    };
    let action = value["action"].as_string().map_err(|_| bad("has no action"))?;
    let action = Action::ALL
        .into_iter()
        .find(|a| a.as_str() == action.as_ref())
        .ok_or_else(|| bad(&format!("names an unknown action {action:?}")))?;
    let reason = match &value["reason"] {
        regorus::Value::Undefined => String::new(),
        reason => reason
            .as_string()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| reason.to_string()),
    };
    let snapshot = match &value["snapshot"] {
        regorus::Value::Undefined => false,
        snapshot => snapshot
            .as_bool()
            .copied()
            .map_err(|_| bad("has a snapshot that is not true or false"))?,
    };
    Ok(Some(Decided {
        snapshot,
        ..Decided::new(name, action, reason)
    }))
}

fn refused(name: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid_field("source", format!("policy {name} is refused: {why}"))
}

/// The input a policy sees for an op.
pub fn input(
    kind: &str,
    args: &Value,
    agent: &bbx_core::model::Agent,
    tainted: &[crate::taint::Tainted],
    role: &str,
    anomaly: Option<&crate::anomaly::Scored>,
) -> Value {
    let mut input = json!({
        "op": { "kind": kind, "args": args },
        "agent": { "id": agent.id.to_string(), "tenant": agent.tenant, "labels": agent.labels },
        "tainted": tainted,
        "caller": { "role": role },
    });
    if let Some(scored) = anomaly {
        input["anomaly"] =
            json!({ "score": scored.score, "threshold": scored.threshold, "anomalous": scored.anomalous });
    }
    input
}

/// Ops a policy must decide without failing: an outbound request, tainted and
/// not, and a shell command.
fn samples() -> Vec<Value> {
    let agent = json!({ "id": bbx_core::AgentId::generate().to_string(), "tenant": "sample", "labels": {} });
    let source = bbx_core::OpId::generate().to_string();
    vec![
        json!({ "op": { "kind": "tool.http", "args": { "url": "https://example.com/" } }, "agent": agent, "tainted": [], "caller": { "role": "agent" } }),
        json!({ "op": { "kind": "tool.http", "args": { "url": "https://example.com/", "method": "POST", "body": "x" } }, "agent": agent,
                "tainted": [{ "path": "/url", "source": source }], "caller": { "role": "agent" } }),
        json!({ "op": { "kind": "tool.shell", "args": { "program": "ls" } }, "agent": agent, "tainted": [], "caller": { "role": "operator" } }),
    ]
}

/// The policies in force: global, and per tenant. Fx hashing: an op's check
/// looks here for every op, and tenant names and kinds are checked names.
#[derive(Default)]
pub struct Book {
    scopes: FxHashMap<String, Scope>,
}

/// One scope's policies, indexed by the kinds they concern.
#[derive(Default)]
struct Scope {
    all: Vec<Arc<Loaded>>,
    every_kind: Vec<Arc<Loaded>>,
    by_kind: FxHashMap<String, Vec<Arc<Loaded>>>,
}

impl Book {
    pub fn new(policies: Vec<Arc<Loaded>>) -> Self {
        let mut scopes: FxHashMap<String, Scope> = FxHashMap::default();
        for policy in policies {
            let scope = scopes
                .entry(policy.stored.tenant.clone().unwrap_or_default())
                .or_default();
            match &policy.kinds {
                None => scope.every_kind.push(policy.clone()),
                Some(kinds) => {
                    for kind in kinds {
                        scope.by_kind.entry(kind.clone()).or_default().push(policy.clone());
                    }
                }
            }
            scope.all.push(policy);
        }
        Self { scopes }
    }

    /// Whether any policy concerns an op of `kind` of `tenant`: the whole check of
    /// an op no policy concerns.
    pub fn concerns_any(&self, tenant: &str, kind: &str) -> bool {
        [self.scopes.get(""), self.scopes.get(tenant)]
            .into_iter()
            .flatten()
            .any(|scope| !scope.every_kind.is_empty() || scope.by_kind.contains_key(kind))
    }

    /// The policies that concern an op of `kind` of `tenant`: global ones first.
    pub fn concerning(&self, tenant: &str, kind: &str) -> Vec<&Arc<Loaded>> {
        let mut out = Vec::new();
        for scope in [self.scopes.get(""), self.scopes.get(tenant)].into_iter().flatten() {
            out.extend(scope.every_kind.iter());
            if let Some(by_kind) = scope.by_kind.get(kind) {
                out.extend(by_kind.iter());
            }
        }
        out
    }

    /// Whether a global policy (an administrator's) is named `name`.
    pub fn is_global(&self, name: &str) -> bool {
        self.scopes
            .get("")
            .is_some_and(|scope| scope.all.iter().any(|p| p.stored.name == name))
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Loaded>> {
        self.scopes.values().flat_map(|s| s.all.iter())
    }
}

#[cfg(test)]
mod tests;
