//! FlowIntegrity's endpoints: served as HTTP routes, MCP tools (`flow_*`, and the
//! report's `enhanced_flow_*`) and `bbx flow VERB` commands.

use crate::policy::{self, Loaded, StoredPolicy};
use crate::{Change, Flow, Quarantine};
use bbx_auth::{Action, AuditKind, Caller};
use bbx_component::Endpoint;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Scope {
    /// A tenant's policies [default: the caller's and the global ones].
    #[serde(default)]
    tenant: Option<String>,
}

/// Modules one bundle holds at most.
const MAX_BUNDLE_MODULES: usize = 64;

/// Whether `policy` is the one named `name`, or a module of the bundle `name`.
fn named(policy: &Loaded, name: &str) -> bool {
    policy
        .stored
        .bundle
        .as_deref()
        .map_or(policy.stored.name == name, |bundle| bundle == name)
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddPolicy {
    /// The policy's name, or the bundle's.
    name: String,
    /// Rego in package bbx.flow whose `decision` is {"action", "reason"}.
    #[serde(default)]
    source: Option<String>,
    /// A bundle instead: module name -> Rego, each a policy evaluated on its own
    /// (named NAME/MODULE), all loaded, versioned and removed as one.
    #[serde(default)]
    modules: Option<std::collections::BTreeMap<String, String>>,
    /// The tenant whose ops it decides [default: the caller's; an administrator's
    /// policy without one decides every tenant's].
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PolicyName {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TestOp {
    /// The agent the op would be of.
    agent: String,
    kind: String,
    #[serde(default)]
    args: Value,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct QuarantineAgent {
    agent: String,
    /// Why, for the audit log and the refusals.
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AgentOnly {
    agent: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct Declassify {
    agent: String,
    /// Content (a URL, a host, a token) to trust from now on for this agent.
    value: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct OpOnly {
    op_id: String,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AnomaliesQuery {
    /// Only this agent's.
    #[serde(default)]
    agent: Option<String>,
    /// The latest this many [default and most: 1024].
    #[serde(default)]
    limit: Option<usize>,
}

impl Flow {
    /// The agent `id`, as `caller` may see it.
    pub(crate) fn agent(&self, caller: &Caller, id: &str) -> Result<bbx_core::model::Agent> {
        let id: AgentId = id.parse()?;
        let agent = bbx_agents::stored_agent(&self.ctx()?.store, &id)?;
        caller.check_owner(&agent.tenant, "agent", id)?;
        caller.check_agent(&id)?;
        Ok(agent)
    }

    /// The scope a policy change acts on: a tenant (the caller's unless named),
    /// or every tenant's for an administrator naming none.
    fn scope(caller: &Caller, tenant: Option<String>) -> Result<Option<String>> {
        caller.may(Action::Operate)?;
        match tenant.or_else(|| caller.tenant.clone()) {
            Some(tenant) => {
                bbx_core::validate::tenant(&tenant)?;
                caller.check_tenant(&tenant)?;
                Ok(Some(tenant))
            }
            None => {
                caller.require_admin("set policies for every tenant")?;
                Ok(None)
            }
        }
    }

    async fn add_policy(&self, caller: &Caller, req: AddPolicy) -> Result<Value> {
        let tenant = Self::scope(caller, req.tenant)?;
        bbx_core::validate::name("name", &req.name)?;
        if req.name.contains('/') {
            return Err(Error::invalid_field(
                "name",
                "a policy's name has no '/' (a bundle's modules are named BUNDLE/MODULE)",
            ));
        }
        let modules = match (req.source, req.modules) {
            (Some(source), None) => vec![(None, source)],
            (None, Some(modules)) if !modules.is_empty() && modules.len() <= MAX_BUNDLE_MODULES => modules
                .into_iter()
                .map(|(module, source)| (Some(module), source))
                .collect(),
            (None, Some(_)) => {
                return Err(Error::invalid_field(
                    "modules",
                    format!("a bundle holds 1 to {MAX_BUNDLE_MODULES} modules"),
                ));
            }
            _ => {
                return Err(Error::invalid_field(
                    "source",
                    "give either source (a policy) or modules (a bundle)",
                ));
            }
        };
        let _changing = self.0.changing.lock().await;
        let book = self.0.book.read().clone();
        let replaced: Vec<&Arc<Loaded>> = book
            .all()
            .filter(|p| p.stored.tenant == tenant && named(p, &req.name))
            .collect();
        let version = replaced.iter().map(|p| p.stored.version).max().unwrap_or(0) + 1;
        let bundle = modules[0].0.is_some().then(|| req.name.clone());
        let updated_at = Utc::now();
        let mut loaded = Vec::with_capacity(modules.len());
        for (module, source) in modules {
            let name = match &module {
                Some(module) => {
                    bbx_core::validate::name("modules", module)?;
                    if module.contains('/') {
                        return Err(Error::invalid_field(
                            "modules",
                            format!("module {module:?}: its name has no '/'"),
                        ));
                    }
                    format!("{}/{module}", req.name)
                }
                None => req.name.clone(),
            };
            let stored = StoredPolicy {
                name,
                tenant: tenant.clone(),
                source,
                bundle: bundle.clone(),
                version,
                updated_at,
            };
            // A bundle is refused whole for any module refused.
            loaded.push(Arc::new(Loaded::compile(stored)?));
        }
        let change = Change::Policies {
            put: loaded.iter().map(|p| p.stored.clone()).collect(),
            remove: replaced.iter().map(|p| p.stored.key()).collect(),
        };
        self.ctx()?.store.write(change).await?;
        let names: Vec<String> = loaded.iter().map(|p| p.stored.name.clone()).collect();
        let policies: Vec<Arc<Loaded>> = book
            .all()
            .filter(|p| !(p.stored.tenant == tenant && named(p, &req.name)))
            .cloned()
            .chain(loaded)
            .collect();
        *self.0.book.write() = Arc::new(policy::Book::new(policies));
        let what = format!("flow policy {} (version {version}: {})", req.name, names.join(", "));
        self.audit(
            Some(caller),
            tenant.as_deref().unwrap_or_default(),
            what,
            "set".into(),
            AuditKind::PolicyChanged,
        );
        Ok(json!({ "name": req.name, "tenant": tenant, "version": version, "bundle": bundle, "policies": names }))
    }

    /// Removes a policy, or a bundle with every module of it, in one write.
    async fn remove_policy(&self, caller: &Caller, req: PolicyName) -> Result<Value> {
        let tenant = Self::scope(caller, req.tenant)?;
        let _changing = self.0.changing.lock().await;
        let book = self.0.book.read().clone();
        let removed: Vec<StoredPolicy> = book
            .all()
            .filter(|p| p.stored.tenant == tenant && named(p, &req.name))
            .map(|p| p.stored.clone())
            .collect();
        if removed.is_empty() {
            return Err(Error::not_found("policy", &req.name));
        }
        let change = Change::Policies {
            put: Vec::new(),
            remove: removed.iter().map(StoredPolicy::key).collect(),
        };
        self.ctx()?.store.write(change).await?;
        let rest: Vec<Arc<Loaded>> = book
            .all()
            .filter(|p| !(p.stored.tenant == tenant && named(p, &req.name)))
            .cloned()
            .collect();
        *self.0.book.write() = Arc::new(policy::Book::new(rest));
        let names: Vec<&str> = removed.iter().map(|p| p.name.as_str()).collect();
        let what = format!("flow policy {} ({})", req.name, names.join(", "));
        self.audit(
            Some(caller),
            tenant.as_deref().unwrap_or_default(),
            what,
            "removed".into(),
            AuditKind::PolicyChanged,
        );
        Ok(json!({ "removed": names }))
    }

    /// The policies `caller` sees: the global ones and its tenant's (all, for an
    /// administrator), with their source for those who may change them.
    fn list_policies(&self, caller: &Caller, tenant: Option<String>) -> Result<Value> {
        caller.may(Action::Read)?;
        if let Some(tenant) = &tenant {
            caller.check_tenant(tenant)?;
        }
        let may_change = caller.may(Action::Operate).is_ok();
        let book = self.0.book.read().clone();
        let mut listed: Vec<Value> = book
            .all()
            .filter(|p| match (&p.stored.tenant, &tenant) {
                (None, _) => true,
                (Some(own), Some(asked)) => own == asked,
                (Some(own), None) => caller.sees(own),
            })
            .map(|p| {
                let mut shown = json!({
                    "name": p.stored.name, "tenant": p.stored.tenant, "version": p.stored.version, "bundle": p.stored.bundle,
                    "updated_at": p.stored.updated_at, "kinds": p.kinds,
                    "default_decision": if p.denies_by_default { "deny" } else { "allow" },
                });
                // A global policy's Rego is the administrator's to read.
                if may_change && (p.stored.tenant.is_some() || caller.is_admin()) {
                    shown["source"] = p.stored.source.clone().into();
                }
                shown
            })
            .collect();
        listed.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Ok(json!({ "policies": listed }))
    }

    async fn quarantine(&self, caller: &Caller, req: QuarantineAgent) -> Result<Quarantine> {
        caller.may(Action::Operate)?;
        let agent = self.agent(caller, &req.agent)?;
        if let Some(q) = self.0.quarantined.read().get(&agent.id) {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!("agent {} is already quarantined (since {})", agent.id, q.at),
            ));
        }
        let quarantine = Quarantine {
            agent: agent.id,
            by: format!("key {}", caller.key_id),
            reason: req.reason.unwrap_or_else(|| "quarantined by an operator".into()),
            at: Utc::now(),
        };
        self.ctx()?.store.write(Change::Quarantine(quarantine.clone())).await?;
        self.0.quarantined.write().insert(agent.id, quarantine.clone());
        let what = format!("quarantine agent {}", agent.id);
        self.audit(
            Some(caller),
            &agent.tenant,
            what,
            quarantine.reason.clone(),
            AuditKind::FlowDecision,
        );
        Ok(quarantine)
    }

    async fn release(&self, caller: &Caller, req: AgentOnly) -> Result<Quarantine> {
        caller.may(Action::Operate)?;
        let agent = self.agent(caller, &req.agent)?;
        let held = self.0.quarantined.read().get(&agent.id).cloned();
        let released = held.ok_or_else(|| {
            Error::new(
                ErrorCode::FailedPrecondition,
                format!("agent {} is not quarantined", agent.id),
            )
        })?;
        self.ctx()?.store.write(Change::Release(agent.id)).await?;
        self.0.quarantined.write().remove(&agent.id);
        let what = format!("release agent {}", agent.id);
        self.audit(
            Some(caller),
            &agent.tenant,
            what,
            "released".into(),
            AuditKind::FlowDecision,
        );
        Ok(released)
    }

    /// Why `op` got its decision: kept for the latest ops decided; an op no
    /// policy concerned and no model found anomalous was allowed with no more
    /// to say.
    async fn explain_op(&self, caller: &Caller, req: OpOnly) -> Result<Value> {
        caller.may(Action::Read)?;
        let op: bbx_core::OpId = req.op_id.parse()?;
        // The op must exist and be the caller's to read (its tenant, its agent,
        // the authorization policies).
        let info = self
            .ctx()?
            .submitter
            .wait(caller, op, std::time::Duration::ZERO)
            .await?;
        if let Some(decision) = self.decision(&op) {
            return serde_json::to_value(&*decision).map_err(|e| Error::internal(e.to_string()));
        }
        Ok(json!({
            "op_id": info.op_id, "agent": info.agent, "kind": info.kind, "action": "allow",
            "decided": [], "tainted": [],
            "note": format!("no decision of this op is kept: no policy concerned {} and its agent's model did not find it anomalous, or it is older than the latest {} ops decided (the audit log keeps every decision but allow)", info.kind, crate::decisions::KEPT),
        }))
    }

    fn anomalies(&self, caller: &Caller, req: AnomaliesQuery) -> Result<Value> {
        caller.may(Action::Read)?;
        let agent = req.agent.as_deref().map(|a| self.agent(caller, a)).transpose()?;
        let limit = req
            .limit
            .unwrap_or(crate::decisions::ANOMALIES_KEPT)
            .clamp(1, crate::decisions::ANOMALIES_KEPT);
        let listed = self.0.recent.anomalies(
            |d| {
                agent.as_ref().is_none_or(|a| a.id == d.agent)
                    && caller.sees(&d.tenant)
                    && caller.check_agent(&d.agent).is_ok()
            },
            limit,
        );
        let detector = self.0.detector.as_ref();
        let model = agent
            .as_ref()
            .and_then(|a| detector?.model(&a.id))
            .map(|m| json!({ "threshold": m.threshold, "trained_on": m.trained_on, "bytes": m.forest.bytes() }));
        Ok(json!({ "anomalies": listed, "model": model, "enabled": detector.is_some() }))
    }

    fn flow_audit(&self, caller: &Caller, mut query: bbx_auth::audit::AuditQuery) -> Result<Value> {
        query.kind = Some(AuditKind::FlowDecision);
        let events = bbx_auth::audit::query(&self.ctx()?.store, caller, &query)?;
        Ok(json!({ "events": events }))
    }

    fn declassify(&self, caller: &Caller, req: Declassify) -> Result<Value> {
        caller.may(Action::Operate)?;
        let agent = self.agent(caller, &req.agent)?;
        let forgotten = self.0.taints.declassify(&agent.id, &req.value);
        let what = format!("declassify for agent {}", agent.id);
        let why = format!("{forgotten} fingerprints trusted");
        self.audit(Some(caller), &agent.tenant, what, why, AuditKind::FlowDecision);
        Ok(json!({ "forgotten": forgotten }))
    }
}

/// Every endpoint, each holding the component.
pub(crate) fn all(flow: &Flow) -> Vec<Endpoint> {
    let policies = |name, path| {
        Endpoint::serving(
            flow,
            name,
            ("GET", path),
            "The flow policies in force: global ones and the tenant's, with the kinds each concerns (and its Rego for those who may change it).",
            |f: Flow, caller, scope: Scope| async move { f.list_policies(&caller, scope.tenant) },
        )
    };
    let stats = |name, path| {
        Endpoint::serving(
            flow,
            name,
            ("GET", path),
            "FlowIntegrity's figures: decisions by action, policies, quarantined agents, and the taint tables (agents, fingerprints, evictions).",
            |f: Flow, caller, _: NoArgs| async move {
                caller.may(Action::Read)?;
                Ok(f.stats())
            },
        )
    };
    let anomalies = |name, path| {
        Endpoint::serving(
            flow,
            name,
            ("GET", path),
            "Ops the anomaly detector found anomalous lately (latest first), each with its score, its agent's threshold and its features; with an agent, that agent's model.",
            |f: Flow, caller, req: AnomaliesQuery| async move { f.anomalies(&caller, req) },
        )
    };
    vec![
        anomalies("flow.anomalies", "/v1/flow/anomalies"),
        anomalies("enhanced_flow.anomalies", "/v1/enhanced-flow/anomalies"),
        Endpoint::serving(
            flow,
            "flow.explain",
            ("GET", "/v1/flow/ops/{op_id}/explain"),
            "Why an op got its flow decision: every policy that decided and why, its tainted args with their source ops, and its anomaly score.",
            |f: Flow, caller, req: OpOnly| async move { f.explain_op(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.audit",
            ("GET", "/v1/flow/audit"),
            "FlowIntegrity's audit log: every decision other than allow, quarantines, releases and declassifications, oldest first.",
            |f: Flow, caller, query: bbx_auth::audit::AuditQuery| async move { f.flow_audit(&caller, query) },
        ),
        policies("flow.policies", "/v1/flow/policies"),
        policies("enhanced_flow.policies", "/v1/enhanced-flow/policies"),
        stats("flow.stats", "/v1/flow/stats"),
        stats("enhanced_flow.stats", "/v1/enhanced-flow/stats"),
        Endpoint::serving(
            flow,
            "flow.add_policy",
            ("PUT", "/v1/flow/policies/{name}"),
            "Load a flow policy (source), or a bundle of them (modules: name -> Rego, loaded, versioned and removed as one): Rego in package bbx.flow whose decision is {\"action\": allow|audit|warn|block|require_approval|quarantine, \"reason\": ...}. One that fails to parse or to decide the sample ops is refused (a bundle whole) and the policies in force stay.",
            |f: Flow, caller, req: AddPolicy| async move { f.add_policy(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.remove_policy",
            ("DELETE", "/v1/flow/policies/{name}"),
            "Remove a flow policy (a tenant's, or a global one for an administrator).",
            |f: Flow, caller, req: PolicyName| async move { f.remove_policy(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.test",
            ("POST", "/v1/flow/test"),
            "Dry-run the flow decision of an op (agent, kind, args): the decision, every policy that decided and why, and the tainted args with their source ops. Nothing is submitted.",
            |f: Flow, caller, req: TestOp| async move {
                // Not for agents: trying encodings against the live policies is
                // how an injected agent would look for one that gets through.
                caller.may(Action::Operate)?;
                let agent = f.agent(&caller, &req.agent)?;
                let anomaly = f.peek_score(&agent.id, &req.kind, &req.args);
                Ok(f.explain(&agent, &req.kind, &req.args, caller.role.as_str(), anomaly))
            },
        ),
        Endpoint::serving(
            flow,
            "flow.grant",
            ("POST", "/v1/flow/agents/{agent}/grants"),
            "Grant another agent of the tenant (or every agent with a label) read, write and/or share over a region of this agent: its state keys under a prefix, its memory or its context. The grantee's state, memory and context ops may then name this agent (\"agent\": OWNER); share lets it grant on what it holds. Audited.",
            |f: Flow, caller, req: crate::granting::GrantReq| async move { f.grant(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.revoke",
            ("DELETE", "/v1/flow/agents/{agent}/grants/{grantee}"),
            "Revoke the grant this agent gave another over a region (state keys under a prefix, memory or context) (revoked: the grant, or null if there was none). Audited.",
            |f: Flow, caller, req: crate::granting::RevokeReq| async move { f.revoke(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.grants",
            ("GET", "/v1/flow/agents/{agent}/grants"),
            "The grants an agent gives and is given: region (state by prefix, memory, context) and rights (read, write, share).",
            |f: Flow, caller, req: AgentOnly| async move {
                caller.may(Action::Read)?;
                let agent = f.agent(&caller, &req.agent)?;
                Ok(json!({ "grants": f.0.grants.of(&agent.id) }))
            },
        ),
        Endpoint::serving(
            flow,
            "flow.quarantine",
            ("POST", "/v1/flow/agents/{agent}/quarantine"),
            "Quarantine an agent: every further op of it is refused with policy_denied until it is released.",
            |f: Flow, caller, req: QuarantineAgent| async move { f.quarantine(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.release",
            ("POST", "/v1/flow/agents/{agent}/release"),
            "Release a quarantined agent: its ops are decided by the policies again.",
            |f: Flow, caller, req: AgentOnly| async move { f.release(&caller, req).await },
        ),
        Endpoint::serving(
            flow,
            "flow.declassify",
            ("POST", "/v1/flow/agents/{agent}/declassify"),
            "Trust content an agent received (a URL, a host, a token): its fingerprints are forgotten, so it taints no later op. Audited.",
            |f: Flow, caller, req: Declassify| async move { f.declassify(&caller, req) },
        ),
    ]
}
