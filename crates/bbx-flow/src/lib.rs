//! FlowIntegrity: the check every op passes between the quotas and the journal.
//!
//! `bbx-flow` owns:
//! - **policies** ([`policy`]): Rego modules in package `bbx.flow`, global or a
//!   tenant's, each deciding on its own `allow`, `audit`, `warn`, `block`,
//!   `require_approval` or `quarantine`; the strictest decision wins and names the
//!   policies that made it. `block` refuses the op with `policy_denied` (nothing
//!   is journaled); `require_approval` holds it in `pending_approval` until an
//!   operator decides (denied after an hour); `quarantine` suspends the agent,
//!   whose every op is then refused until an operator releases it. An op no
//!   policy decides is allowed.
//! - **taint tracking** ([`taint`]): outputs of ops that bring outside content in
//!   are labelled `untrusted` and fingerprinted per agent before their completion
//!   is visible; a later op whose args carry such content is labelled `tainted`
//!   (and `tainted_by:OP` per source) and its policies see each tainted arg's
//!   path and source op. Taint is scoped per agent and run, and follows data: a
//!   state value written from tainted content keeps its labels, and reading it
//!   back makes its content untrusted again.
//!
//! - **anomaly detection** ([`anomaly`]): a baseline of each agent's behaviour
//!   and an Isolation Forest that scores each op once the agent has a model; an
//!   anomalous op gets the configured action (`warn` by default), as if a policy
//!   named `anomaly` had decided it.
//!
//! Every decision other than `allow` goes to the audit log shared with Auth;
//! what was decided of the latest ops, and why, is kept for `bbx flow explain`.

pub mod access;
pub mod anomaly;
mod decisions;
mod endpoints;
mod granting;
pub mod injection;
pub mod policy;
pub mod taint;
mod watch;

use anomaly::{Detector, Saved, Scored};
use bbx_auth::{AuditEvent, AuditKind, Caller};
use bbx_component::{Attempted, Component, Context, Endpoint, Submission, Verdict};
use bbx_core::config::FlowConfig;
use bbx_core::{AgentId, Error, ErrorCode, OpId, Result};
use bbx_store::{Applied, GroupTx, KeyspaceDef, Staged, storage_error};
use chrono::{DateTime, Utc};
use decisions::{Decision, Recent};
use policy::{Action, Book, Decided, Loaded, StoredPolicy};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use taint::Taints;

/// Quarantined agents: agent id -> [`Quarantine`] as JSON. Its id is what redo
/// records carry: never change it.
pub const FLOW_QUARANTINE: KeyspaceDef = KeyspaceDef {
    id: 16,
    name: "flow_quarantine",
};

/// The starter policy (`policies/starter.rego`): what an injected page, file or
/// tool result points to receives no data, and commands built from it wait for an
/// operator.
pub const STARTER_POLICY: &str = include_str!("../policies/starter.rego");

/// Anomaly models: agent id -> [`Saved`] as JSON. Its id is what redo records
/// carry: never change it.
pub const FLOW_ANOMALY_MODELS: KeyspaceDef = KeyspaceDef {
    id: 17,
    name: "flow_anomaly_models",
};

/// Every keyspace FlowIntegrity stages into.
pub const KEYSPACES: &[KeyspaceDef] = &[
    policy::FLOW_POLICIES,
    FLOW_QUARANTINE,
    FLOW_ANOMALY_MODELS,
    access::FLOW_GRANTS,
];

/// How long an op held for approval waits before it is denied.
const APPROVAL_WINDOW: Duration = Duration::from_secs(3600);

/// Kinds whose ops store what their args carry, so that what they store keeps
/// its taint.
const STORING_KINDS: &[&str] = &["state.set", "context.put", "memory.add"];

/// Kinds whose outputs bring outside content in.
const UNTRUSTED_KINDS: &[&str] = &[
    "tool.http",
    "tool.mcp",
    "tool.shell",
    "tool.file",
    "llm.chat",
    // Messages other agents (or anyone of the tenant) sent.
    "bus.fetch",
];

/// The prefix of the labels naming each op whose untrusted content an op's args
/// carry.
const TAINTED_BY: &str = "tainted_by:";
/// Sources an op's labels name at most.
const MAX_SOURCES_LABELLED: usize = 8;

/// Labels an op whose args carry untrusted content: `tainted`, and
/// `tainted_by:OP` for each source (a state value written from it keeps them).
fn label_tainted(tainted: &[taint::Tainted], labels: &mut Vec<String>) {
    if tainted.is_empty() {
        return;
    }
    labels.push("tainted".into());
    let mut sources: Vec<OpId> = tainted.iter().map(|t| t.source).collect();
    sources.sort_unstable();
    sources.dedup();
    labels.extend(
        sources
            .into_iter()
            .take(MAX_SOURCES_LABELLED)
            .map(|s| format!("{TAINTED_BY}{s}")),
    );
}

/// Adds the args that took an untrusted value by reference, exactly where and
/// from which op, in place of what fingerprints found there.
fn referenced_taint(references: &[bbx_component::Reference], tainted: &mut Vec<taint::Tainted>) {
    for reference in references {
        let untrusted = reference.labels.iter().any(|l| l == "untrusted" || l == "tainted");
        if untrusted {
            let within = |path: &str| {
                path.strip_prefix(reference.path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            };
            tainted.retain(|t| !within(&t.path));
            tainted.push(taint::Tainted {
                path: reference.path.clone(),
                source: reference.source,
            });
        }
    }
}

/// Why an agent is quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Quarantine {
    pub agent: AgentId,
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug)]
enum Change {
    /// Policies put and removed in one write: a bundle changes whole.
    Policies {
        put: Vec<StoredPolicy>,
        remove: Vec<Vec<u8>>,
    },
    Quarantine(Quarantine),
    Release(AgentId),
    SaveModel(AgentId, Arc<Saved>),
    RemoveModel(AgentId),
    /// One owner's grants: one put, those that went removed.
    Grants {
        put: Option<access::Grant>,
        remove: Vec<Vec<u8>>,
    },
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(e.to_string()))
}

/// Who asked about a region, for the audit log.
struct Asked<'a> {
    caller: Option<&'a Caller>,
    tenant: &'a str,
    /// The op's kind, or what the component was asked to do.
    what: &'a str,
}

impl bbx_component::access::RegionAccess for Flow {
    fn check(
        &self,
        tenant: &str,
        owner: &AgentId,
        agent: &AgentId,
        at: (access::Region, &str),
        right: access::Right,
    ) -> Result<()> {
        let what = match right {
            access::Right::Read => "a read",
            access::Right::Write => "a write",
            access::Right::Share => "a share",
        };
        let asked = Asked {
            caller: None,
            tenant,
            what,
        };
        self.check_region(&asked, owner, agent, at, right)
    }
}

impl Staged for Change {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        match self {
            Self::Policies { put, remove } => {
                for key in remove {
                    tx.remove(policy::FLOW_POLICIES, key.clone());
                }
                for policy in put {
                    tx.put(policy::FLOW_POLICIES, policy.key(), json(policy)?);
                }
            }
            Self::Quarantine(q) => tx.put(FLOW_QUARANTINE, q.agent.as_bytes().to_vec(), json(q)?),
            Self::Release(agent) => tx.remove(FLOW_QUARANTINE, agent.as_bytes().to_vec()),
            Self::SaveModel(agent, saved) => tx.put(FLOW_ANOMALY_MODELS, agent.as_bytes().to_vec(), json(&**saved)?),
            Self::RemoveModel(agent) => tx.remove(FLOW_ANOMALY_MODELS, agent.as_bytes().to_vec()),
            Self::Grants { put, remove } => {
                for key in remove {
                    tx.remove(access::FLOW_GRANTS, key.clone());
                }
                if let Some(grant) = put {
                    tx.put(access::FLOW_GRANTS, grant.key(), json(grant)?);
                }
            }
        }
        Ok(Applied::Done)
    }
}

/// FlowIntegrity, as a component of the kernel.
#[derive(Clone)]
pub struct Flow(Arc<Inner>);

impl Default for Flow {
    fn default() -> Self {
        Self::new(&FlowConfig::default())
    }
}

struct Inner {
    ctx: OnceLock<Context>,
    book: parking_lot::RwLock<Arc<Book>>,
    taints: Taints,
    /// Fx hashing, as the ring's: agent ids are ids the kernel made.
    quarantined: parking_lot::RwLock<FxHashMap<AgentId, Quarantine>>,
    decisions: [AtomicU64; 6],
    /// Serializes changes of policies (a version is read, then written) and
    /// of grants (what a sharer holds is read, then written).
    changing: tokio::sync::Mutex<()>,
    /// `None` when anomaly detection is off.
    detector: Option<Detector>,
    /// What an anomalous op gets.
    anomaly_action: Action,
    recent: Recent,
    grants: access::Grants,
    /// Decisions by action and by the policy that made them.
    by_policy: prometheus_client::metrics::family::Family<DecisionLabels, prometheus_client::metrics::counter::Counter>,
}

/// How `/metrics` names the tenants' policies, together.
const TENANT_POLICIES: &str = "tenant";

/// A decision's labels in `/metrics`: global policies by name (bounded by
/// what administrators load), the anomaly detector, and the tenants'.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DecisionLabels {
    action: &'static str,
    policy: String,
}

/// What an op would be decided, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Explained {
    pub action: Action,
    /// Every policy that decided, strictest first (`anomaly` for the detector).
    pub decided: Vec<Decided>,
    pub tainted: Vec<taint::Tainted>,
    /// The op's anomaly score, once its agent has a model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<Scored>,
}

impl Flow {
    pub fn new(config: &FlowConfig) -> Self {
        let anomaly = &config.anomaly;
        Self(Arc::new(Inner {
            ctx: OnceLock::new(),
            book: Default::default(),
            taints: Taints::default(),
            quarantined: Default::default(),
            decisions: Default::default(),
            changing: Default::default(),
            detector: anomaly.enabled.then(|| Detector::new(anomaly.clone())),
            anomaly_action: match anomaly.action.as_str() {
                "quarantine" => Action::Quarantine,
                "require_approval" => Action::RequireApproval,
                _ => Action::Warn,
            },
            recent: Recent::default(),
            grants: access::Grants::default(),
            by_policy: Default::default(),
        }))
    }

    /// FlowIntegrity with `policies` in force and nothing stored, for measuring
    /// and trying decisions in process (the kernel's is loaded from its store).
    pub fn with_policies(config: &FlowConfig, policies: Vec<StoredPolicy>) -> Result<Self> {
        let loaded = policies
            .into_iter()
            .map(|p| Loaded::compile(p).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let flow = Self::new(config);
        *flow.0.book.write() = Arc::new(Book::new(loaded));
        Ok(flow)
    }

    /// The taint tables.
    pub fn taints(&self) -> &Taints {
        &self.0.taints
    }

    fn ctx(&self) -> Result<&Context> {
        self.0
            .ctx
            .get()
            .ok_or_else(|| Error::unavailable("flow has not started"))
    }

    /// What the policies in force make of an op of `agent` with `kind` and
    /// `args`, and of its anomaly score if it has one.
    pub fn explain(
        &self,
        agent: &bbx_core::model::Agent,
        kind: &str,
        args: &Value,
        role: &str,
        anomaly: Option<Scored>,
    ) -> Explained {
        self.explain_in(None, agent, (kind, args, &[]), role, anomaly)
    }

    /// [`Self::explain`] for an op of `run` (its taint scope).
    pub fn explain_in(
        &self,
        run: Option<&str>,
        agent: &bbx_core::model::Agent,
        (kind, args, references): (&str, &Value, &[bbx_component::Reference]),
        role: &str,
        anomaly: Option<Scored>,
    ) -> Explained {
        let mut tainted = self.0.taints.tainted(taint::Scope::new(agent.id, run), args);
        referenced_taint(references, &mut tainted);
        let book = self.0.book.read().clone();
        let concerned = book.concerning(&agent.tenant, kind);
        let mut decided: Vec<Decided> = Vec::new();
        if !concerned.is_empty() {
            let input = policy::input(kind, args, agent, &tainted, role, anomaly.as_ref());
            let input = regorus::Value::from(input);
            decided.extend(concerned.iter().filter_map(|p| p.decide(&input)));
            // No policy decided: a policy that governs this kind may deny by default.
            if decided.is_empty()
                && let Some(strict) = concerned.iter().find(|p| p.denies_by_default)
            {
                decided.push(Decided::new(
                    strict.stored.name.clone(),
                    Action::Block,
                    format!("no policy allowed this {kind} op, and this policy denies the kinds it governs by default"),
                ));
            }
        }
        if let Some(scored) = anomaly.as_ref().filter(|s| s.anomalous) {
            decided.push(watch::anomaly_decided(self.0.anomaly_action, scored));
        }
        decided.sort_by_key(|d| std::cmp::Reverse(d.action));
        Explained {
            action: decided.first().map_or(Action::Allow, |d| d.action),
            decided,
            tainted,
            anomaly,
        }
    }

    /// What was decided of `op`, if it is among the latest ops decided.
    pub fn decision(&self, op: &OpId) -> Option<Arc<Decision>> {
        self.0.recent.get(op)
    }

    fn audit(&self, caller: Option<&Caller>, tenant: &str, what: String, why: String, kind: AuditKind) {
        let Ok(ctx) = self.ctx() else { return };
        let mut event = AuditEvent::new(kind, caller, what, why);
        event.tenant = Some(tenant.to_owned());
        ctx.write_later(bbx_auth::audit::Record(event), "a flow decision's audit event");
    }

    /// Quarantines `agent` at once (its next op is refused), and durably.
    fn quarantine_now(&self, quarantine: Quarantine) -> Result<()> {
        let ctx = self.ctx()?;
        self.0.quarantined.write().insert(quarantine.agent, quarantine.clone());
        ctx.write_later(Change::Quarantine(quarantine), "a quarantine");
        Ok(())
    }

    fn refused_quarantined(q: &Quarantine) -> Error {
        Error::new(
            ErrorCode::PolicyDenied,
            format!(
                "agent {} is quarantined ({}: {}); an operator releases it with bbx flow release",
                q.agent, q.by, q.reason
            ),
        )
    }

    /// An op on another agent's region (`"agent": OWNER` in a `state.*` op,
    /// `"owner": OWNER` in a memory or context op) needs the owner, of the same tenant, to
    /// have granted the op's agent its right over the region (for state, over
    /// the key); a refusal is audited.
    fn check_access(&self, submission: &Submission<'_>) -> Result<()> {
        let op = submission.op;
        let Some((region, right)) = access::right_of(&op.kind) else {
            return Ok(());
        };
        // State ops name the owner `agent` (their args came first); the others `owner`.
        let field = match region {
            access::Region::State => "agent",
            _ => "owner",
        };
        let Some(owner) = op.args.get(field).filter(|a| !a.is_null()) else {
            return Ok(());
        };
        let owner: AgentId = owner
            .as_str()
            .ok_or_else(|| Error::invalid_field(&format!("args.{field}"), format!("{field} must be an agent id")))?
            .parse()?;
        if owner == op.agent {
            return Ok(());
        }
        let record = bbx_agents::stored_agent(&self.ctx()?.store, &owner)?;
        if record.tenant != submission.tenant {
            // Another tenant's agent is not there at all, to this one.
            return Err(Error::not_found("agent", owner));
        }
        let key = match region {
            access::Region::State => op.args.get("key").and_then(Value::as_str).unwrap_or_default(),
            _ => "",
        };
        let asked = Asked {
            caller: Some(submission.caller),
            tenant: submission.tenant,
            what: &op.kind,
        };
        self.check_region(&asked, &owner, &op.agent, (region, key), right)
    }

    /// `Ok` where `agent` is the owner or a grant covers its use; else a
    /// refusal, audited.
    fn check_region(
        &self,
        asked: &Asked<'_>,
        owner: &AgentId,
        agent: &AgentId,
        (region, key): (access::Region, &str),
        right: access::Right,
    ) -> Result<()> {
        if owner == agent {
            return Ok(());
        }
        let labels = bbx_agents::stored_agent(&self.ctx()?.store, agent)?.labels;
        if self.0.grants.allows(owner, (agent, &labels), (region, key), right) {
            return Ok(());
        }
        let over = match region {
            access::Region::State => format!("its state at {key:?}"),
            access::Region::Topic => format!("its topic {key:?}"),
            other => format!("its {}", other.name()),
        };
        let why = format!("agent {owner} has not granted agent {agent} {right:?} over {over}");
        let what = format!(
            "refuse {} of agent {agent} on agent {owner}'s {}",
            asked.what,
            region.name()
        );
        self.audit(asked.caller, asked.tenant, what, why.clone(), AuditKind::FlowDecision);
        Err(Error::new(ErrorCode::PolicyDenied, why))
    }

    /// Audits a decision other than `allow`, and carries it out.
    fn act(&self, submission: &Submission<'_>, explained: &Explained) -> Result<Verdict> {
        let op = submission.op;
        let Some(strictest) = explained.decided.first() else {
            return Ok(Verdict::Allow);
        };
        let by: Vec<&str> = explained
            .decided
            .iter()
            .filter(|d| d.action == strictest.action)
            .map(|d| d.policy.as_str())
            .collect();
        let why = format!("policy {}: {}", by.join(", "), strictest.reason);
        if strictest.action != Action::Allow {
            let what = format!(
                "{} {} of agent {} (op {})",
                strictest.action.as_str(),
                op.kind,
                op.agent,
                submission.op_id
            );
            let caller = Some(submission.caller);
            self.audit(caller, submission.tenant, what, why.clone(), AuditKind::FlowDecision);
            if let Ok(ctx) = self.ctx() {
                let data = serde_json::json!({
                    "op_id": submission.op_id, "kind": op.kind, "action": strictest.action.as_str(),
                    "reason": why, "decided": explained.decided, "tainted": explained.tainted,
                });
                ctx.notify("flow", (submission.tenant, op.agent), data);
            }
        }
        match strictest.action {
            Action::Allow | Action::Audit | Action::Warn => Ok(Verdict::Allow),
            Action::RequireApproval => Ok(Verdict::Hold {
                reason: why,
                within: APPROVAL_WINDOW,
            }),
            Action::Block => Err(Error::new(ErrorCode::PolicyDenied, format!("blocked by {why}"))),
            Action::Quarantine => {
                let quarantine = Quarantine {
                    agent: op.agent,
                    by: format!("policy {}", by.join(", ")),
                    reason: strictest.reason.clone(),
                    at: Utc::now(),
                };
                self.quarantine_now(quarantine.clone())?;
                Err(Self::refused_quarantined(&quarantine))
            }
        }
    }

    pub fn stats(&self) -> Value {
        let (watched, modelled) = self.0.detector.as_ref().map_or((0, 0), Detector::stats);
        let decisions: serde_json::Map<String, Value> = Action::ALL
            .iter()
            .zip(&self.0.decisions)
            .map(|(action, count)| (action.as_str().to_owned(), count.load(Ordering::Relaxed).into()))
            .collect();
        serde_json::json!({
            "decisions": decisions,
            "policies": self.0.book.read().all().count(),
            "quarantined": self.0.quarantined.read().len(),
            "taint": self.0.taints.stats(),
            "anomaly": {
                "enabled": self.0.detector.is_some(),
                "agents_watched": watched,
                "agents_with_model": modelled,
                "unobserved_ops": self.0.detector.as_ref().map_or(0, Detector::unobserved),
                "action": self.0.anomaly_action.as_str(),
            },
        })
    }
}

impl Component for Flow {
    fn name(&self) -> &'static str {
        "flow"
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        KEYSPACES
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        let mut loaded = Vec::new();
        for item in ctx.store.keyspace(policy::FLOW_POLICIES).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load flow policies", e))?;
            let stored: StoredPolicy = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a stored flow policy is unreadable: {e}")))?;
            loaded.push(Arc::new(Loaded::compile(stored)?));
        }
        *self.0.book.write() = Arc::new(Book::new(loaded));
        let mut quarantined = self.0.quarantined.write();
        for item in ctx.store.keyspace(FLOW_QUARANTINE).iter() {
            let (_, value) = item.into_inner().map_err(|e| storage_error("load quarantines", e))?;
            let q: Quarantine = serde_json::from_slice(&value)
                .map_err(|e| Error::internal(format!("a stored quarantine is unreadable: {e}")))?;
            quarantined.insert(q.agent, q);
        }
        drop(quarantined);
        self.load_models(&ctx.store)?;
        self.load_grants(ctx)?;
        let _ = self.0.ctx.set(ctx.clone());
        Ok(())
    }

    fn checks_ops(&self) -> bool {
        true
    }

    fn check(&self, submission: &Submission<'_>, labels: &mut Vec<String>) -> Result<Verdict> {
        let op = submission.op;
        if let Some(q) = self.0.quarantined.read().get(&op.agent) {
            return Err(Self::refused_quarantined(q));
        }
        self.check_access(submission)?;
        let anomaly = self.observe(submission.op_id, op.agent, &op.kind, &op.args);
        let anomalous = anomaly.as_ref().is_some_and(|a| a.anomalous);
        if !anomalous && !self.0.book.read().concerns_any(submission.tenant, &op.kind) {
            // A write that stores data (state, a context item, a memory) keeps
            // the taint of what it writes whether or not a policy looks at it:
            // a later read passes it on.
            if STORING_KINDS.contains(&op.kind.as_str()) || !submission.references.is_empty() {
                let scope = taint::Scope::new(op.agent, op.run_id.as_deref());
                let mut tainted = self.0.taints.tainted(scope, &op.args);
                referenced_taint(submission.references, &mut tainted);
                label_tainted(&tainted, labels);
            }
            self.0.decisions[0].fetch_add(1, Ordering::Relaxed);
            return Ok(Verdict::Allow);
        }
        let agent = bbx_agents::stored_agent(&self.ctx()?.store, &op.agent)?;
        let role = submission.caller.role.as_str();
        let explained = self.explain_in(
            op.run_id.as_deref(),
            &agent,
            (&op.kind, &op.args, submission.references),
            role,
            anomaly,
        );
        label_tainted(&explained.tainted, labels);
        if anomalous {
            labels.push("anomalous".into());
        }
        // StateSnapshots, checking after this, snapshots the agent first.
        if explained.decided.iter().any(|d| d.snapshot) {
            labels.push(bbx_component::SNAPSHOT_BEFORE.into());
        }
        self.0.decisions[explained.action as usize].fetch_add(1, Ordering::Relaxed);
        let book = self.0.book.read().clone();
        for decided in &explained.decided {
            // Tenants' policy names are theirs: /metrics, which anyone may
            // read, counts their decisions together.
            let named = decided.policy == watch::ANOMALY || book.is_global(&decided.policy);
            let labels = DecisionLabels {
                action: decided.action.as_str(),
                policy: if named {
                    decided.policy.clone()
                } else {
                    TENANT_POLICIES.to_owned()
                },
            };
            self.0.by_policy.get_or_create(&labels).inc();
        }
        let verdict = self.act(submission, &explained);
        self.0.recent.record(Decision {
            op_id: submission.op_id,
            agent: op.agent,
            tenant: submission.tenant.to_owned(),
            kind: op.kind.clone(),
            at: Utc::now(),
            explained,
        });
        verdict
    }

    fn labels_results(&self) -> bool {
        true
    }

    /// An op held before its agent was quarantined stays held: approving it
    /// would let a quarantined agent act.
    fn check_approval(&self, agent: &AgentId) -> Result<()> {
        match self.0.quarantined.read().get(agent) {
            Some(quarantine) => Err(Self::refused_quarantined(quarantine)),
            None => Ok(()),
        }
    }

    fn label_write(&self, agent: &AgentId, value: &Value) -> Vec<String> {
        let mut labels = Vec::new();
        label_tainted(&self.0.taints.tainted(*agent, value), &mut labels);
        labels
    }

    fn observes(&self) -> bool {
        self.0.detector.is_some()
    }

    fn completed(&self, completion: &Arc<bbx_core::op::Completion>) {
        if let Some(detector) = &self.0.detector {
            let failed = completion.status != bbx_core::op::CompletionStatus::Ok;
            let tokens = anomaly::spent_tokens(completion.result.as_ref());
            let at_ms = completion.completed_at.timestamp_millis();
            detector.completed(&completion.agent, completion.op_id, failed, (tokens, at_ms));
        }
    }

    fn label(&self, op: &Attempted<'_>, result: &Value) -> Vec<String> {
        let scope = taint::Scope::new(op.agent, op.run);
        if UNTRUSTED_KINDS.contains(&op.kind) {
            self.0.taints.record(scope, op.op_id, result);
            return vec!["untrusted".into()];
        }
        // A state value or context item written from tainted content is
        // untrusted when read back (alone, or in an assembled window), from the
        // op that first brought it in.
        let stored: Vec<(&Value, &Value)> = match op.kind {
            "state.get" => result
                .get("labels")
                .map(|l| (l, &result["value"]))
                .into_iter()
                .collect(),
            "context.get" => result
                .get("labels")
                .map(|l| (l, &result["content"]))
                .into_iter()
                .collect(),
            "context.assemble" => result["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|item| Some((item.get("labels")?, &item["content"])))
                .collect(),
            _ => return Vec::new(),
        };
        let mut untrusted = false;
        for (labels, value) in stored {
            let Some(labels) = labels.as_array() else { continue };
            if labels.iter().any(|l| l == "tainted") {
                let source = labels
                    .iter()
                    .filter_map(|l| l.as_str()?.strip_prefix(TAINTED_BY)?.parse().ok())
                    .next()
                    .unwrap_or(op.op_id);
                self.0.taints.record(scope, source, value);
                untrusted = true;
            }
        }
        if untrusted {
            vec!["untrusted".into()]
        } else {
            Vec::new()
        }
    }

    fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "bbx_flow_decisions",
            "Flow decisions of the policies (and the anomaly detector) that decided an op, by action and policy",
            self.0.by_policy.clone(),
        );
    }

    fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        let this = self.clone();
        ctx.tasks.spawn(async move {
            if let Err(e) = this.forget_grants(agent).await {
                tracing::warn!(error = %e, %agent, "a deleted agent's grants could not be removed (the next start does)");
            }
        });
        self.0.taints.forget_agent(&agent);
        self.0.recent.forget_agent(&agent);
        if let Some(detector) = &self.0.detector {
            detector.forget(&agent);
            ctx.write_later(
                Change::RemoveModel(agent),
                "the removal of a deleted agent's anomaly model",
            );
        }
        if self.0.quarantined.write().remove(&agent).is_some() {
            ctx.write_later(Change::Release(agent), "the release of a deleted agent's quarantine");
        }
    }

    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        endpoints::all(self)
    }
}
