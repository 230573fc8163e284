//! Custom authorization policies (ABAC) in Rego, evaluated with regorus.
//!
//! The built-in roles are the default policy and are decided natively
//! ([`Caller::may`]); custom policies refine them. Each policy is a Rego module in
//! a package under `bbx.authz` whose `deny` set names reasons to refuse a request,
//! over the principal's attributes, the action (an API operation, an op kind), the
//! resource (tenant, agent and its labels, state key) and the context (time,
//! source address). A policy can refuse what a role allows; it never widens a role
//! and never reaches across tenants, which are decided before it is asked.
//!
//! A policy that fails to parse, has no `deny` rule or fails on a sample request
//! is refused and the policies in force stay. Evaluation has a time budget; a
//! policy that errs or runs past it refuses (fails closed). With no custom policy
//! loaded, a decision costs one read of a lock.

mod program;

use program::PolicySet;

use crate::{Action, Caller};
use bbx_core::{AgentId, Error, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, Store, storage_error};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Custom policies: name -> [`StoredPolicy`] as JSON. Its id is what redo records
/// carry: never change it.
pub const AUTH_POLICIES: KeyspaceDef = KeyspaceDef {
    id: 13,
    name: "auth_policies",
};

/// The package every policy's must be, or be under.
pub const PACKAGE: &str = "bbx.authz";
/// The largest policy accepted, in bytes.
const MAX_POLICY_BYTES: usize = 256 * 1024;

/// A policy as stored and as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StoredPolicy {
    pub name: String,
    /// The Rego source.
    pub source: String,
    /// 1 for a new policy, one more on each replacement.
    pub version: u64,
    pub updated_at: DateTime<Utc>,
}

/// What is asked of the policies: who, doing what, to what.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    /// The API operation (`state.set`, `op.submit`, an endpoint's name).
    pub operation: &'a str,
    /// What the built-in roles call it; an endpoint's is its own.
    pub action: Option<Action>,
    /// The tenant of the resource, where it has one.
    pub tenant: Option<&'a str>,
    pub agent: Option<&'a AgentId>,
    pub labels: Option<&'a BTreeMap<String, String>>,
    /// A state key.
    pub key: Option<&'a str>,
    /// An op's kind.
    pub op_kind: Option<&'a str>,
}

impl<'a> Access<'a> {
    pub fn new(operation: &'a str, action: Option<Action>, tenant: Option<&'a str>) -> Self {
        Self {
            operation,
            action,
            tenant,
            agent: None,
            labels: None,
            key: None,
            op_kind: None,
        }
    }

    /// On `agent`: its tenant, id and labels.
    pub fn on(self, agent: &'a bbx_core::model::Agent) -> Self {
        Self {
            tenant: Some(&agent.tenant),
            agent: Some(&agent.id),
            labels: Some(&agent.labels),
            ..self
        }
    }

    pub fn key(self, key: &'a str) -> Self {
        Self { key: Some(key), ..self }
    }

    pub fn op_kind(self, kind: &'a str) -> Self {
        Self {
            op_kind: Some(kind),
            ..self
        }
    }

    /// The input a policy sees.
    fn input(&self, caller: &Caller, now: DateTime<Utc>) -> serde_json::Value {
        serde_json::json!({
            "principal": {
                "id": caller.key_id.to_string(),
                "tenant": caller.tenant,
                "role": caller.role.as_str(),
                "agent": caller.agent.map(|a| a.to_string()),
            },
            "action": {
                "operation": self.operation,
                "class": self.action.map(Action::as_str),
                "op_kind": self.op_kind,
            },
            "resource": {
                "tenant": self.tenant,
                "agent": self.agent.map(|a| a.to_string()),
                "labels": self.labels,
                "key": self.key,
            },
            "context": {
                "time": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                "unix": now.timestamp(),
                "hour": chrono::Timelike::hour(&now),
                "weekday": chrono::Datelike::weekday(&now).to_string(),
                "source": caller.source,
            },
        })
    }
}

/// The custom policies in force.
pub struct Policies {
    store: Arc<Store>,
    set: parking_lot::RwLock<Arc<PolicySet>>,
    /// Serializes changes, so that a put and a delete cannot lose each other.
    changing: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
enum Change {
    Put(StoredPolicy),
    Delete(String),
}

impl Staged for Change {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        match self {
            Self::Put(policy) => {
                let json = serde_json::to_vec(policy).map_err(|e| Error::internal(e.to_string()))?;
                tx.put(AUTH_POLICIES, policy.name.as_bytes().to_vec(), json);
            }
            Self::Delete(name) => tx.remove(AUTH_POLICIES, name.as_bytes().to_vec()),
        }
        Ok(Applied::Done)
    }
}

impl Policies {
    /// Loads and compiles the stored policies; if they no longer compile, the
    /// start stops rather than leave their restrictions off.
    pub fn open(store: Arc<Store>) -> Result<Self> {
        let mut stored = Vec::new();
        for item in store.keyspace(AUTH_POLICIES).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load auth policies", e))?;
            stored.push(
                serde_json::from_slice::<StoredPolicy>(&value)
                    .map_err(|e| Error::internal(format!("a stored auth policy is unreadable: {e}")))?,
            );
        }
        let set = PolicySet::build(stored)
            .map_err(|e| Error::internal(format!("the stored auth policies: {}", e.message)))?;
        Ok(Self {
            store,
            set: parking_lot::RwLock::new(Arc::new(set)),
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The policies in force, by name.
    pub fn list(&self) -> Vec<StoredPolicy> {
        self.set.read().policies.clone()
    }

    /// Adds or replaces the policy `name`, durably, once it compiles (alone and
    /// with the others) and decides a sample request; otherwise refuses it and the
    /// policies in force stay.
    pub async fn put(&self, caller: &Caller, name: &str, source: String) -> Result<StoredPolicy> {
        caller.require_admin("set authorization policies")?;
        bbx_core::validate::name("name", name)?;
        if source.len() > MAX_POLICY_BYTES {
            return Err(Error::invalid_field(
                "source",
                format!("the policy is {} bytes; the limit is {MAX_POLICY_BYTES}", source.len()),
            ));
        }
        let _changing = self.changing.lock().await;
        let mut policies = self.list();
        let version = policies.iter().find(|p| p.name == name).map_or(1, |p| p.version + 1);
        let stored = StoredPolicy {
            name: name.to_owned(),
            source,
            version,
            updated_at: Utc::now(),
        };
        policies.retain(|p| p.name != name);
        policies.push(stored.clone());
        let next = PolicySet::build(policies)?;
        self.store.write(Change::Put(stored.clone())).await?;
        *self.set.write() = Arc::new(next);
        Ok(stored)
    }

    /// Removes the policy `name`.
    pub async fn delete(&self, caller: &Caller, name: &str) -> Result<StoredPolicy> {
        caller.require_admin("remove authorization policies")?;
        let _changing = self.changing.lock().await;
        let mut policies = self.list();
        let index = policies
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::not_found("policy", name))?;
        let removed = policies.remove(index);
        let next = PolicySet::build(policies)?;
        self.store.write(Change::Delete(name.to_owned())).await?;
        *self.set.write() = Arc::new(next);
        Ok(removed)
    }

    pub fn is_empty(&self) -> bool {
        self.set.read().is_empty()
    }

    /// Whether the custom policies allow `access` by `caller`: 403 naming each
    /// policy that refused and why.
    /// Whether the policies in force run on regorus's VM (else its interpreter).
    pub fn on_vm(&self) -> bool {
        self.set.read().on_vm()
    }

    pub fn decide(&self, caller: &Caller, access: &Access<'_>) -> Result<()> {
        let set = self.set.read().clone();
        set.decide(caller, access)
    }
}

#[cfg(test)]
mod tests;
