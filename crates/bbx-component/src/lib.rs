//! The component contract: how a component offers op kinds to the AgentRing.
//!
//! A component is a crate that implements [`Component`]: the op kinds it serves
//! ([`OpKind`]: a name, and whether the kind changes the kernel's state), and how an
//! op's arguments become what the ring runs ([`Component::prepare`], called when an op
//! is submitted, so a bad op is refused before anything is journaled, and again when
//! it runs or is recovered, from its journaled record). Registering it is one line:
//! [`Components::register`].
//!
//! What the ring then guarantees for each prepared op:
//! - a [`Prepared::Read`] runs at once on the dispatcher against the store's durable
//!   view, and is never journaled (a lost one is harmless);
//! - a [`Prepared::Effect`] is journaled before it is acknowledged, and its effect is
//!   staged in the same store group as its completion ([`EffectOp::stage`]), so after a
//!   crash either both happened or neither did, and recovery runs it exactly when it
//!   had not; what it must compute first runs on a task ([`EffectOp::ready`]);
//! - a [`Prepared::Task`] runs on a task of its own, under its op's timeout, and is
//!   stopped by a cancel or the kernel's shutdown. One with external effects
//!   ([`TaskOp::effects`]) is journaled before it is acknowledged; before its first
//!   attempt the ring reserves on its path's budgets the most its attempts can
//!   spend ([`TaskOp::max_spend`]) and makes a start mark durable, so that after a
//!   crash it is never run again on its own: it completes `in_doubt`.
//!
//! The keyspaces a component stages into are its own, declared with
//! [`bbx_store::KeyspaceDef`].
//!
//! Beyond its kinds, a component takes part in an agent's life and the kernel's:
//! [`Component::start`] is its recovery step (it resumes what a crash interrupted,
//! once the ring has recovered and before the kernel serves), with a [`Context`]
//! whose [`Submitter`] lets it submit ops of its own through the whole pipeline;
//! [`Component::agent_deleted`] tells it to let go of a deleted agent's data; and
//! [`Component::export`] and [`Component::import`] carry an agent's data out and
//! back in (snapshots, forks), the export read at one view of the store (so every
//! component's part is of the same moment), the import staged in one atomic group;
//! [`Component::exported_write`] says how one of its store writes changes that
//! export, so a point-in-time recovery can replay the journal's history onto a
//! snapshot. What a component that saves and restores whole agents needs of the
//! kernel beyond ops is an [`AgentHost`].

pub mod access;
pub mod agent_data;
pub mod builtin;
pub mod endpoint;
pub mod refs;
pub mod workspace_gate;

pub use agent_data::{AgentData, AgentHost, AgentKeyspaces, Exported, ExportedWrite, Import, StoreWrite, StoredRecord};
pub use endpoint::{Endpoint, Events, Handler, StreamHandler};

pub use refs::Reference;

use bbx_auth::Caller;
use bbx_core::op::{Completion, Effects, OpInfo, SubmitBatch, SubmitOp, Submitted};
use bbx_core::quota::Spend;
use bbx_core::{AgentId, Error, OpId, Result};
use bbx_store::{GroupTx, KeyspaceDef, Store};
use chrono::{DateTime, Utc};
use fjall::Snapshot;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// An op's `args` as a component's argument type, or one `invalid_argument` error
/// naming the kind and what is wrong.
pub fn parse_args<T: serde::de::DeserializeOwned>(kind: &str, args: &Value) -> Result<T> {
    T::deserialize(args)
        .map_err(|e| Error::invalid_field("args", format!("the arguments of {kind} are not valid: {e}")))
}

/// An op kind a component serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpKind {
    /// `component.verb`, e.g. `state.set`.
    pub name: &'static str,
    /// [`Effects::None`] for a read, [`Effects::Kernel`] for a kind that stages an
    /// effect, [`Effects::External`] for a task that may act outside the kernel
    /// (some of its ops may not: a task's op says for itself). What a prepared op
    /// is must agree with it.
    pub effects: Effects,
}

/// What an op's arguments were turned into.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// Answered at once from the store's durable view.
    Read(Arc<dyn ReadOp>),
    /// Staged with the op's completion, in one atomic group.
    Effect(Arc<dyn EffectOp>),
    /// Run on a task of its own.
    Task(Arc<dyn TaskOp>),
}

impl Prepared {
    pub fn effects(&self) -> Effects {
        match self {
            Self::Read(_) => Effects::None,
            Self::Effect(_) => Effects::Kernel,
            Self::Task(task) => task.effects(),
        }
    }

    /// Whether it is what a kind declared to `declared` effects may prepare.
    fn agrees_with(&self, declared: Effects) -> bool {
        match self {
            Self::Task(task) => match task.effects() {
                Effects::None => declared != Effects::Kernel,
                effects => effects == declared,
            },
            other => other.effects() == declared,
        }
    }
}

/// An op that only reads.
pub trait ReadOp: Send + Sync + std::fmt::Debug {
    /// The op's result, read for `agent` from `store` (its view is what is durable).
    fn read(&self, store: &Store, agent: &AgentId) -> Result<Value>;
}

/// What an effect is staged for.
pub struct Staging<'a> {
    /// The op whose effect it is (an id the effect may name what it creates by:
    /// the same at every staging, recovery's included).
    pub op_id: OpId,
    pub agent: &'a AgentId,
    /// The agent's tenant.
    pub tenant: &'a str,
    /// When its op completes.
    pub at: DateTime<Utc>,
    /// The op's labels ([`Completion::labels`]), for an effect that keeps them
    /// with what it writes (taint that follows data).
    pub labels: &'a [String],
}

/// An op whose effect commits with its completion.
pub trait EffectOp: Send + Sync + std::fmt::Debug {
    /// Checks the effect's preconditions against the group, then stages it;
    /// returns the op's result. Every fallible read comes before the first write,
    /// so an effect that fails stages nothing (its op completes with that error
    /// instead).
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value>;

    /// Work the effect needs done before it can be staged, that must not hold
    /// up the store's committer (an embedding, a search of what is there): run
    /// on a task of its own under the op's timeout, before each attempt to
    /// stage, for the op's agent; its error fails the attempt (retried as the
    /// op's retries say). None, the default: staged at once.
    fn ready(&self, _agent: AgentId) -> Option<Pending<'static, ()>> {
        None
    }
}

/// What a task's attempt runs for.
pub struct TaskContext<'a> {
    pub op_id: OpId,
    pub agent: AgentId,
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// The store, whose view is what is durable (an agent's settings, say).
    pub store: &'a Store,
}

/// An attempt of a task, running.
pub type Running<'a> = Pin<Box<dyn Future<Output = Result<Value>> + Send + 'a>>;

/// An op that runs on a task of its own and may await.
pub trait TaskOp: Send + Sync + std::fmt::Debug {
    /// [`Effects::None`], or [`Effects::External`] if running it can change the
    /// world outside the kernel.
    fn effects(&self) -> Effects;

    /// The remote host (and port) it talks to, if any: its circuit breaker is its
    /// kind's on that host, so one failing server does not open every other's.
    fn remote_host(&self) -> Option<String> {
        None
    }

    /// The most one attempt can spend of a budget.
    fn max_spend(&self) -> Spend {
        Spend::default()
    }

    /// What an attempt that returned `result` spent.
    fn spent(&self, _result: &Value) -> Spend {
        Spend::default()
    }

    /// Runs one attempt. Dropping the future stops it (a timeout, a cancel, the
    /// kernel's shutdown), so what it starts outside the process must end with it.
    fn run<'a>(&'a self, ctx: &'a TaskContext<'a>) -> Running<'a>;
}

/// A future that a trait object returns.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Submits ops through the whole pipeline (auth, quotas, journal, ring), as a
/// component that acts on its own (a bus routing messages into ops, a workflow
/// submitting its steps). Implemented by the kernel.
pub trait Submitter: Send + Sync {
    /// Submits a batch as `caller`; answers once every op with effects is journaled.
    fn submit<'a>(&'a self, caller: &'a Caller, batch: SubmitBatch) -> Pending<'a, Submitted>;

    /// The op's completion, waiting up to `timeout` for it.
    fn wait<'a>(&'a self, caller: &'a Caller, op: bbx_core::OpId, timeout: Duration) -> Pending<'a, OpInfo>;

    /// Cancels an op (as an operator may): a running task is stopped, a queued
    /// op never runs.
    fn cancel<'a>(&'a self, caller: &'a Caller, op: bbx_core::OpId) -> Pending<'a, OpInfo>;

    /// Whether `caller` may read `agent`'s data as `operation` (an endpoint that
    /// answers from a component's own view, with no op): its tenant, its
    /// confinement to an agent, and the authorization policies. An agent the
    /// caller may not see is `not_found`, as everywhere else.
    fn may_read(&self, caller: &Caller, agent: &AgentId, operation: &str) -> Result<()>;
}

/// Runs one op of `agent` as `caller` through `submitter` (the whole
/// pipeline: auth, quotas, checks, journal) and answers with its result, or
/// its error; waits up to `wait` for it, then answers `timeout` naming the op
/// to ask for. What an endpoint that changes a component's data does.
pub async fn run_op(submitter: &dyn Submitter, caller: &Caller, op: SubmitOp, wait: Duration) -> Result<Value> {
    let kind = op.kind.clone();
    let submitted = submitter
        .submit(
            caller,
            SubmitBatch {
                ops: vec![op],
                wait_ms: Some(5_000),
            },
        )
        .await?;
    let id = submitted.ops[0].op_id;
    let info = submitter.wait(caller, id, wait).await?;
    let Some(completion) = info.completion else {
        return Err(Error::new(
            bbx_core::ErrorCode::Timeout,
            format!("{kind} op {id} is still running; ask for it with GET /v1/ops/{id}"),
        ));
    };
    match completion.status {
        bbx_core::op::CompletionStatus::Ok => Ok(completion.result.unwrap_or(Value::Null)),
        _ => Err(completion
            .error
            .unwrap_or_else(|| Error::internal(format!("{kind} op {id} ended {:?}", completion.status)))),
    }
}

/// A chat message, as an agent's context window becomes one for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Where a component that calls models (`llm.chat`) finds an agent's context,
/// assembled under a token budget into chat messages: implemented by the
/// component that keeps contexts, handed over when the kernel wires them.
pub trait ContextWindows: Send + Sync {
    fn window(&self, agent: &AgentId, budget: u32) -> Result<Vec<ChatMessage>>;
}

/// Where a component finds an agent's memories by meaning and by words
/// (ContextTiering's COLD items): implemented by the component that keeps
/// memories, handed over when the kernel wires them. A read in process: the
/// caller checks who may read first.
pub trait MemorySearch: Send + Sync {
    /// The `k` best of `agent`'s memories for `query` (hybrid) whose metadata
    /// matches `filter`: what `memory.search` answers.
    fn search(
        &self,
        agent: AgentId,
        query: String,
        k: usize,
        filter: serde_json::Map<String, Value>,
    ) -> Pending<'static, Value>;
}

/// What a component is given to act with outside of an op.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<Store>,
    /// Tasks the kernel waits for at shutdown: a component's background work is
    /// spawned here, and stops when the kernel does.
    pub tasks: TaskTracker,
    /// Cancelled when the kernel shuts down: a component's background loop ends
    /// on it.
    pub stopping: tokio_util::sync::CancellationToken,
    pub submitter: Arc<dyn Submitter>,
    /// Whole agents: their records, exports and imports.
    pub agents: Arc<dyn AgentHost>,
    /// Every op kind the kernel serves, with its args' schema (what a
    /// workflow's steps are checked against).
    pub kinds: Arc<Vec<(OpKind, Option<Value>)>>,
    /// What components tell the kernel's event stream ([`Context::notify`]).
    pub notices: tokio::sync::broadcast::Sender<Arc<Notice>>,
}

/// Something a component tells those who watch the kernel's event stream
/// (`GET /v1/ops/events`, beside the ops' completions, as `event: EVENT`): a
/// run's steps starting and ending, a flow decision other than allow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Notice {
    /// The SSE event's name (`run`, `flow`).
    pub event: &'static str,
    pub tenant: Arc<str>,
    pub agent: AgentId,
    pub at: DateTime<Utc>,
    /// What happened, an object.
    pub data: Value,
}

impl Context {
    /// Tells the event stream `data` about `agent` of `tenant` (a stream that
    /// nobody reads drops it; one that falls behind is told how much it missed).
    pub fn notify(&self, event: &'static str, (tenant, agent): (&str, AgentId), data: Value) {
        let _ = self.notices.send(Arc::new(Notice {
            event,
            tenant: tenant.into(),
            agent,
            at: Utc::now(),
            data,
        }));
    }

    /// See [`write_later`].
    pub fn write_later(&self, write: impl bbx_store::Staged + 'static, what: &'static str) {
        write_later(&self.store, &self.tasks, write, what);
    }
}

/// Makes `write` durable on a task of `tasks`, off the caller's path (an audit
/// event, a record that must outlive a restart but not hold up an op); a
/// failure is logged naming `what`.
pub fn write_later(
    store: &Arc<Store>,
    tasks: &TaskTracker,
    write: impl bbx_store::Staged + 'static,
    what: &'static str,
) {
    let store = store.clone();
    tasks.spawn(async move {
        if let Err(e) = store.write(write).await {
            tracing::error!(error = %e, "{what} could not be written");
        }
    });
}

/// An op as submitted, for the checks of components.
pub struct Submission<'a> {
    /// The id the op will have if it is accepted.
    pub op_id: OpId,
    pub caller: &'a Caller,
    /// The tenant of the op's agent.
    pub tenant: &'a str,
    pub op: &'a SubmitOp,
    /// The values its args took by reference (`$from`), already in `op.args`.
    pub references: &'a [Reference],
}

/// The op whose attempt succeeded, as [`Component::label`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Attempted<'a> {
    pub op_id: OpId,
    pub agent: AgentId,
    pub tenant: &'a str,
    pub kind: &'a str,
    pub args: &'a Value,
    /// The run it is a step of, if any.
    pub run: Option<&'a str>,
}

/// What a component's check says of a submitted op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Accept it, but run it only once an operator approves it; denied if not
    /// approved within `within`.
    Hold {
        reason: String,
        within: Duration,
    },
}

/// The label a check gives an op whose agent is to be snapshotted before it
/// runs (FlowIntegrity, for a policy that asks; StateSnapshots, checking
/// after it, takes the snapshot).
pub const SNAPSHOT_BEFORE: &str = "snapshot_before";

/// A hold the checks put on an op: the component that asked for it, why, and for
/// how long at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub by: &'static str,
    pub reason: String,
    pub within: Duration,
}

/// A component: the op kinds it serves, how their ops are prepared, and its part
/// in the life of agents and of the kernel.
pub trait Component: Send + Sync + std::any::Any {
    /// The component's name, e.g. `state`, for errors and listings.
    fn name(&self) -> &'static str;

    /// The op kinds it serves; none for a component that only checks ops,
    /// observes them or offers endpoints.
    fn kinds(&self) -> &'static [OpKind] {
        &[]
    }

    /// The JSON Schema of `kind`'s args, as published to clients (a workflow
    /// validator, an MCP client): derived from the type [`Component::prepare`]
    /// parses them into, so the two agree.
    fn args_schema(&self, _kind: &str) -> Option<Value> {
        None
    }

    /// Checks `args` of `kind` (one of [`Component::kinds`]) and prepares the op.
    /// A bad argument is an `invalid_argument` error naming it.
    fn prepare(&self, kind: &str, _args: &Value) -> Result<Prepared> {
        Err(Error::internal(format!("{} serves no op kind {kind}", self.name())))
    }

    /// The keyspaces it stages into: opened with the store, before any component
    /// runs. Their ids are what redo records carry, unique across components.
    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        &[]
    }

    /// Whether [`Component::check`] is to be called: a component that checks no op
    /// costs the pipeline nothing. So for [`Component::labels_results`] and
    /// [`Component::observes`].
    fn checks_ops(&self) -> bool {
        false
    }

    /// Checks a submitted op, after the quotas and before the journal: allows it,
    /// holds it for approval, or refuses it (an error; nothing of its batch is
    /// journaled). It may label the op (`labels`): the labels are journaled with
    /// it, given to its effect, and carried by its completion.
    fn check(&self, _submission: &Submission<'_>, _labels: &mut Vec<String>) -> Result<Verdict> {
        Ok(Verdict::Allow)
    }

    /// Labels a value written outside any op (a state write over the API), as
    /// [`Component::check`] labels an op's args: the taint that follows data.
    /// Called for components that check ops.
    fn label_write(&self, _agent: &AgentId, _value: &Value) -> Vec<String> {
        Vec::new()
    }

    /// Whether an op of `agent` held for approval may be approved now: what was
    /// decided since it was held (its agent quarantined, say) refuses it, and the
    /// op stays held. Called for components that check ops.
    fn check_approval(&self, _agent: &AgentId) -> Result<()> {
        Ok(())
    }

    fn labels_results(&self) -> bool {
        false
    }

    /// Labels an attempt's result (what a `tool.http` read from the web is
    /// untrusted, say), or a failed attempt's `{"error": ERROR}` (its message can
    /// carry what the outside sent); they follow the op's own in its completion. Called
    /// before the completion is visible, so what it records of the result is
    /// there for any op submitted after.
    fn label(&self, _op: &Attempted<'_>, _result: &Value) -> Vec<String> {
        Vec::new()
    }

    fn observes(&self) -> bool {
        false
    }

    /// The endpoints it offers clients, built once the kernel has started it.
    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        Vec::new()
    }

    /// Sees every completion once it is settled (durable where it must be), off
    /// the ring's lock, before the op's waiters are answered (so what it keeps of
    /// the completion is there for a caller that heard of it; ops that depend on
    /// it may already be running). It must not block: what takes time goes on a
    /// task.
    fn completed(&self, _completion: &Arc<Completion>) {}

    /// The recovery step: resumes what a crash interrupted. Called once, after the
    /// ring recovered and before the kernel serves; an error stops the start.
    fn start(&self, _ctx: &Context) -> Result<()> {
        Ok(())
    }

    /// An agent was deleted (its record is gone): let go of what is held for it.
    /// What takes long goes on `ctx.tasks`; what must survive a crash is the
    /// component's to make durable (and resume in [`Component::start`]).
    fn agent_deleted(&self, _ctx: &Context, _agent: AgentId) {}

    /// The agent's data this component holds, as read in `view` (one of the
    /// store's durable views, the same for every component of one export).
    fn export(&self, _store: &Store, _view: &Snapshot, _agent: &AgentId) -> Result<Vec<Exported>> {
        Ok(Vec::new())
    }

    /// How a store write (keyspace id, key, new value or `None` for a removal)
    /// shows in `agent`'s export: the record's key and its new value (`None`
    /// removes it), or `None` if the write is not of this component's export of
    /// that agent. A component that exports must answer for every write that
    /// changes its export, or a point-in-time recovery misses it.
    fn exported_write(&self, _agent: &AgentId, _write: StoreWrite<'_>) -> Option<ExportedWrite> {
        None
    }

    /// Replaces the agent's data with what [`Component::export`] gave, staged in
    /// `tx`: all of it commits, or none.
    fn import(&self, _tx: &mut GroupTx<'_>, _agent: &AgentId, _records: &[Exported]) -> Result<()> {
        Ok(())
    }

    /// An import of the agent's data committed: what is held in memory of it
    /// is stale.
    fn imported(&self, _agent: &AgentId) {}

    /// Registers the component's metrics (served at `/metrics`).
    fn register_metrics(&self, _registry: &mut prometheus_client::registry::Registry) {}
}

/// The registered components, by the kinds they serve.
#[derive(Default, Clone)]
pub struct Components {
    by_kind: HashMap<&'static str, (OpKind, Arc<dyn Component>)>,
    /// In the order they were registered.
    all: Vec<Arc<dyn Component>>,
    /// Those that check ops, label results, observe completions.
    checkers: Vec<Arc<dyn Component>>,
    labelers: Vec<Arc<dyn Component>>,
    observers: Vec<Arc<dyn Component>>,
}

/// What the checks of components said of an op.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checks {
    pub hold: Option<HoldRequest>,
    pub labels: Vec<String>,
}

impl Components {
    /// Registers a component; refused if one of its kinds is served already.
    pub fn register(&mut self, component: Arc<dyn Component>) -> Result<()> {
        for kind in component.kinds() {
            if let Some((_, other)) = self.by_kind.get(kind.name) {
                return Err(Error::internal(format!(
                    "op kind {} is served by both {} and {}",
                    kind.name,
                    other.name(),
                    component.name()
                )));
            }
        }
        if self.all.iter().any(|known| known.name() == component.name()) {
            return Err(Error::internal(format!(
                "two components are named {}",
                component.name()
            )));
        }
        for kind in component.kinds() {
            self.by_kind.insert(kind.name, (*kind, component.clone()));
        }
        for (takes_part, list) in [
            (component.checks_ops(), &mut self.checkers),
            (component.labels_results(), &mut self.labelers),
            (component.observes(), &mut self.observers),
        ] {
            if takes_part {
                list.push(component.clone());
            }
        }
        self.all.push(component);
        Ok(())
    }

    /// Every kind served: its name, effects and args schema, by name.
    pub fn kinds(&self) -> Vec<(OpKind, Option<Value>)> {
        let mut kinds: Vec<(OpKind, Option<Value>)> = self
            .by_kind
            .values()
            .map(|(kind, component)| (*kind, component.args_schema(kind.name)))
            .collect();
        kinds.sort_by_key(|(kind, _)| kind.name);
        kinds
    }

    /// Every keyspace the components stage into.
    pub fn keyspaces(&self) -> Vec<KeyspaceDef> {
        self.all.iter().flat_map(|c| c.keyspaces().iter().copied()).collect()
    }

    /// Runs every check on a submitted op: the first refusal refuses it; holds
    /// combine (every reason, the shortest time), and so do labels.
    pub fn check(&self, submission: &Submission<'_>) -> Result<Checks> {
        let mut held: Option<HoldRequest> = None;
        let mut labels = Vec::new();
        for checker in &self.checkers {
            if let Verdict::Hold { reason, within } = checker.check(submission, &mut labels)? {
                held = Some(match held {
                    None => HoldRequest {
                        by: checker.name(),
                        reason,
                        within,
                    },
                    Some(earlier) => HoldRequest {
                        by: earlier.by,
                        reason: format!("{}; {reason}", earlier.reason),
                        within: earlier.within.min(within),
                    },
                });
            }
        }
        labels.sort_unstable();
        labels.dedup();
        Ok(Checks { hold: held, labels })
    }

    /// The labels that components give a successful result of `kind`.
    pub fn label(&self, op: &Attempted<'_>, result: &Value) -> Vec<String> {
        let mut labels: Vec<String> = self.labelers.iter().flat_map(|c| c.label(op, result)).collect();
        labels.sort_unstable();
        labels.dedup();
        labels
    }

    pub fn labels_results(&self) -> bool {
        !self.labelers.is_empty()
    }

    /// What the checking components say of a value written outside any op.
    pub fn label_write(&self, agent: &AgentId, value: &Value) -> Vec<String> {
        let mut labels: Vec<String> = self.checkers.iter().flat_map(|c| c.label_write(agent, value)).collect();
        labels.sort_unstable();
        labels.dedup();
        labels
    }

    /// Asks every checking component whether a held op of `agent` may be
    /// approved now; the first refusal refuses it.
    pub fn check_approval(&self, agent: &AgentId) -> Result<()> {
        self.checkers.iter().try_for_each(|c| c.check_approval(agent))
    }

    /// Hands a settled completion to every observer.
    pub fn completed(&self, completion: &Arc<Completion>) {
        for observer in &self.observers {
            observer.completed(completion);
        }
    }

    pub fn observes(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Whether any component checks ops.
    pub fn checks_ops(&self) -> bool {
        !self.checkers.is_empty()
    }

    /// Every component, in the order they were registered.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Component>> {
        self.all.iter()
    }

    /// The component named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Component>> {
        self.all.iter().find(|component| component.name() == name)
    }

    /// The registered component of type `T`, as itself (an embedder's or a
    /// benchmark's handle on it).
    pub fn typed<T: Component>(&self) -> Option<Arc<T>> {
        self.all.iter().find_map(|component| {
            let any: Arc<dyn std::any::Any + Send + Sync> = component.clone();
            any.downcast::<T>().ok()
        })
    }

    /// Runs every component's recovery step, in registration order.
    pub fn start(&self, ctx: &Context) -> Result<()> {
        self.all.iter().try_for_each(|component| component.start(ctx))
    }

    /// The agent's data that every component holds, read in `view`.
    pub fn export(&self, store: &Store, view: &Snapshot, agent: &AgentId) -> Result<AgentData> {
        let mut parts = Vec::new();
        for component in &self.all {
            let records = component.export(store, view, agent)?;
            if !records.is_empty() {
                parts.push((component.name().to_owned(), records));
            }
        }
        Ok(AgentData { agent: *agent, parts })
    }

    /// The write that imports `data`; refused if a part names no registered
    /// component.
    pub fn import(&self, data: AgentData) -> Result<Import> {
        let components = data
            .parts
            .iter()
            .map(|(name, _)| {
                self.get(name)
                    .cloned()
                    .ok_or_else(|| Error::invalid_field("parts", format!("no component is named {name:?}")))
            })
            .collect::<Result<_>>()?;
        Ok(Import { data, components })
    }

    /// Every component's name, in registration order.
    pub fn names(&self) -> Vec<&'static str> {
        self.all.iter().map(|component| component.name()).collect()
    }

    /// The export part (by component name) a store write changes, and how.
    pub fn exported_write(&self, agent: &AgentId, write: StoreWrite<'_>) -> Option<(&'static str, ExportedWrite)> {
        self.all
            .iter()
            .find_map(|component| Some((component.name(), component.exported_write(agent, write)?)))
    }

    /// Registers every component's metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        for component in &self.all {
            component.register_metrics(registry);
        }
    }

    /// Tells the components that took part in an import that it committed.
    pub fn imported(&self, data: &AgentData) {
        for (name, _) in &data.parts {
            if let Some(component) = self.get(name) {
                component.imported(&data.agent);
            }
        }
    }

    /// Every component's endpoints.
    pub fn endpoints(&self, ctx: &Context) -> Vec<Endpoint> {
        self.all.iter().flat_map(|component| component.endpoints(ctx)).collect()
    }

    /// Tells every component that `agent` was deleted.
    pub fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        for component in &self.all {
            component.agent_deleted(ctx, agent);
        }
    }

    /// The kind as registered, if a component serves it.
    pub fn kind(&self, name: &str) -> Option<OpKind> {
        self.by_kind.get(name).map(|(kind, _)| *kind)
    }

    /// Every registered kind's name, sorted.
    pub fn kind_names(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.by_kind.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Prepares an op of a registered kind; `None` if no component serves `kind`.
    /// A component whose preparation disagrees with the effects it declared for the
    /// kind is refused: the ring journals by the declaration.
    pub fn prepare(&self, kind: &str, args: &Value) -> Option<Result<Prepared>> {
        let (declared, component) = self.by_kind.get(kind)?;
        Some(component.prepare(kind, args).and_then(|prepared| {
            if prepared.agrees_with(declared.effects) {
                Ok(prepared)
            } else {
                Err(Error::internal(format!(
                    "{} prepared a {kind} op with effects other than it declared",
                    component.name()
                )))
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Echo;

    impl ReadOp for Echo {
        fn read(&self, _: &Store, agent: &AgentId) -> Result<Value> {
            Ok(Value::String(agent.to_string()))
        }
    }

    struct Reader(&'static str, &'static [OpKind]);

    impl Component for Reader {
        fn name(&self) -> &'static str {
            self.0
        }

        fn kinds(&self) -> &'static [OpKind] {
            self.1
        }

        fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
            match (kind, args) {
                (_, Value::Null) => Ok(Prepared::Read(Arc::new(Echo))),
                _ => Err(Error::invalid_field("args", "takes no arguments")),
            }
        }
    }

    const ECHO: &[OpKind] = &[OpKind {
        name: "echo.get",
        effects: Effects::None,
    }];
    const LIAR: &[OpKind] = &[OpKind {
        name: "liar.set",
        effects: Effects::Kernel,
    }];

    #[test]
    fn kinds_route_to_their_component_and_are_served_once() {
        let mut components = Components::default();
        components.register(Arc::new(Reader("echo", ECHO))).unwrap();
        assert!(components.register(Arc::new(Reader("copy", ECHO))).is_err());
        assert_eq!(components.kind_names(), ["echo.get"]);
        assert!(matches!(
            components.prepare("echo.get", &Value::Null),
            Some(Ok(Prepared::Read(_)))
        ));
        let refused = components.prepare("echo.get", &serde_json::json!({"x": 1})).unwrap();
        assert_eq!(refused.unwrap_err().code, bbx_core::ErrorCode::InvalidArgument);
        assert!(components.prepare("other.get", &Value::Null).is_none());
    }

    #[test]
    fn a_preparation_must_match_the_declared_effects() {
        let mut components = Components::default();
        components.register(Arc::new(Reader("liar", LIAR))).unwrap();
        let refused = components.prepare("liar.set", &Value::Null).unwrap();
        assert_eq!(refused.unwrap_err().code, bbx_core::ErrorCode::Internal);
    }
}
