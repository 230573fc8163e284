//! GoalEngine: durable workflows run on the AgentRing.
//!
//! This crate owns the workflow format ([`workflow`]: a DAG of steps in YAML or
//! JSON, with a published JSON Schema), its checks ([`validate`]: unknown kinds,
//! args that fail their kind's schema, dangling references, cycles named step
//! by step, each error with the step's path), references and conditions
//! ([`template`], [`condition`]), and running it ([`driver`]).
//!
//! What it guarantees:
//! - a run exists exactly when the `goal.run` op that created it completed
//!   (the run's id is that op's id), and a cancel, pause, resume, signal or
//!   approval is an op whose change commits with its completion;
//! - a step becomes an op of the run's agent, through the whole pipeline
//!   (quotas, flow checks, journal), as soon as its dependencies have ended, up
//!   to the run's parallelism; its idempotency key derives from (agent, run,
//!   step), so after a crash the run resumes and no completed step runs again
//!   (a tool step running at the crash ends `in_doubt`, never re-run);
//! - a value passed by reference keeps its taint: a labelled output reaches the
//!   op that takes it through the ring's `$from`, which carries its labels;
//! - durable waits (a timer, a signal, an operator's approval) and child runs
//!   are steps, and survive restarts;
//! - a goal in words becomes a workflow through the [`planner`]: a model asked
//!   through an `llm.chat` op of the agent, its answer constrained by a JSON
//!   Schema, checked like any workflow and repaired from the errors a bounded
//!   number of times; a run planned from a goal whose step fails past its
//!   retries has the rest planned again, and no step that ended runs again.

mod component;
pub mod condition;
pub mod driver;
mod endpoints;
pub mod ops;
pub mod planner;
pub mod run;
pub mod template;
pub mod validate;
mod views;
pub mod workflow;

pub use run::KEYSPACES;
pub use workflow::Workflow;

use bbx_component::Context;
use bbx_core::config::{GoalsConfig, LlmConfig};
use bbx_core::{Error, OpId, Result};
use bbx_store::Store;
use driver::{Driver, Notice};
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// The GoalEngine, registered with the kernel as the `goal` component.
#[derive(Clone, Default)]
pub struct Goals(Arc<Inner>);

#[derive(Default)]
struct Inner {
    config: GoalsConfig,
    /// The models' prices, for a plan's estimated cost.
    llm: LlmConfig,
    ctx: OnceLock<Context>,
    kinds: OnceLock<KindCatalog>,
    /// The driver of each run being driven.
    drivers: Mutex<HashMap<OpId, mpsc::UnboundedSender<Notice>>>,
    /// Told whenever a run ends (what a parent run waits for).
    ended: tokio::sync::Notify,
}

impl Goals {
    pub fn new(config: &GoalsConfig, llm: &LlmConfig) -> Self {
        Self(Arc::new(Inner {
            config: config.clone(),
            llm: llm.clone(),
            ..Inner::default()
        }))
    }

    pub(crate) fn config(&self) -> &GoalsConfig {
        &self.0.config
    }

    pub(crate) fn config_llm(&self) -> &LlmConfig {
        &self.0.llm
    }

    /// Every op kind the kernel serves, by name (none before it has started).
    pub(crate) fn kind_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .kinds
            .get()
            .map(|k| k.schemas.keys().cloned().collect())
            .unwrap_or_default();
        names.sort_unstable();
        names
    }

    /// The JSON Schema of `kind`'s args, if it publishes one.
    pub(crate) fn kind_schema(&self, kind: &str) -> Option<Value> {
        self.0.kinds.get()?.schemas.get(kind)?.clone()
    }

    fn context(&self) -> Result<&Context> {
        self.0
            .ctx
            .get()
            .ok_or_else(|| Error::unavailable("the goal engine has not started"))
    }

    /// The kinds a workflow may use, once the kernel has started (a workflow
    /// recovered before was checked when it was submitted).
    pub(crate) fn kinds(&self) -> Option<&dyn validate::Kinds> {
        self.0.kinds.get().map(|k| k as &dyn validate::Kinds)
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        let _ = self.0.kinds.set(KindCatalog::new(&ctx.kinds));
        let _ = self.0.ctx.set(ctx.clone());
        for run in run::unfinished_runs(&ctx.store)? {
            self.drive(run);
        }
        Ok(())
    }

    /// Starts driving `run` unless it is driven already.
    fn drive(&self, run: run::RunRecord) {
        let Ok(ctx) = self.context() else { return };
        let (sender, inbox) = mpsc::unbounded_channel();
        {
            let mut drivers = self.0.drivers.lock();
            if drivers.contains_key(&run.id) {
                return;
            }
            drivers.insert(run.id, sender);
        }
        let id = run.id;
        let this = self.clone();
        let ctx = ctx.clone();
        ctx.tasks.clone().spawn(async move {
            let mut inbox = inbox;
            let mut run = run;
            loop {
                let driven = match Driver::new(this.clone(), ctx.clone(), run) {
                    Ok(driver) => driver.drive(&mut inbox).await,
                    Err(e) => {
                        tracing::error!(run = %id, error = %e, "a run could not be resumed");
                        break;
                    }
                };
                // A replanned run is driven again from its new record.
                match (driven, run::load_run(&ctx.store, &id)) {
                    (driver::Driven::Replanned, Ok(Some(record))) => run = record,
                    _ => break,
                }
            }
            this.0.drivers.lock().remove(&id);
        });
    }

    /// Starts driving the run `id` once its record is durable.
    fn created(&self, id: &OpId) {
        let Ok(ctx) = self.context() else { return };
        match run::load_run(&ctx.store, id) {
            Ok(Some(run)) if !run.status.is_final() => self.drive(run),
            Ok(_) => {}
            Err(e) => tracing::error!(run = %id, error = %e, "a new run could not be read"),
        }
    }

    fn notify(&self, run: &OpId, notice: Notice) {
        if let Some(driver) = self.0.drivers.lock().get(run) {
            let _ = driver.send(notice);
        }
    }

    /// Wakes whoever waits for a run's end (a parent run's driver).
    fn run_ended(&self) {
        self.0.ended.notify_waiters();
    }

    /// The run's record once it has ended (an embedder's or a benchmark's
    /// wait), with its steps' records by index.
    pub async fn finished(&self, run: &OpId) -> Result<(run::RunRecord, Vec<(String, run::StepRecord)>)> {
        let store = &self.context()?.store;
        let record = self.wait_ended(store, run).await?;
        Ok((record, run::load_steps(store, run)?))
    }

    /// The run's record once it has ended.
    async fn wait_ended(&self, store: &Store, run: &OpId) -> Result<run::RunRecord> {
        loop {
            let ended = self.0.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            match run::load_run(store, run)? {
                Some(record) if record.status.is_final() => return Ok(record),
                Some(_) => {}
                None => return Err(Error::not_found("run", run)),
            }
            // Woken by any run's end; the timeout covers an end written by
            // another path (a deletion).
            let _ = tokio::time::timeout(Duration::from_secs(1), ended).await;
        }
    }
}

/// The op kinds the kernel serves, with their args' schemas compiled when
/// first used.
struct KindCatalog {
    schemas: HashMap<String, Option<Value>>,
    compiled: Mutex<HashMap<String, Arc<jsonschema::Validator>>>,
}

impl KindCatalog {
    fn new(kinds: &[(bbx_component::OpKind, Option<Value>)]) -> Self {
        Self {
            schemas: kinds
                .iter()
                .map(|(kind, schema)| (kind.name.to_owned(), schema.clone()))
                .collect(),
            compiled: Mutex::default(),
        }
    }

    fn validator(&self, kind: &str, schema: &Value) -> Option<Arc<jsonschema::Validator>> {
        if let Some(validator) = self.compiled.lock().get(kind) {
            return Some(validator.clone());
        }
        let validator = Arc::new(jsonschema::validator_for(schema).ok()?);
        self.compiled.lock().insert(kind.to_owned(), validator.clone());
        Some(validator)
    }
}

impl validate::Kinds for KindCatalog {
    fn check(&self, kind: &str, args: &Value, path: &str) -> Result<()> {
        if kind.starts_with("goal.") {
            return Err(validate::invalid(
                &format!("{path}.kind"),
                format!("{kind} steers runs from outside; a child run is a workflow or goal step"),
            ));
        }
        let Some(schema) = self.schemas.get(kind) else {
            let mut known: Vec<&str> = self.schemas.keys().map(String::as_str).collect();
            known.extend(workflow::engine_kinds::ALL);
            known.sort_unstable();
            return Err(validate::invalid(
                &format!("{path}.kind"),
                format!("no op kind is named {kind:?}; the kinds are {}", known.join(", ")),
            ));
        };
        let Some(validator) = schema.as_ref().and_then(|schema| self.validator(kind, schema)) else {
            return Ok(());
        };
        let empty = Value::Object(Default::default());
        let args = if args.is_null() { &empty } else { args };
        // A value still to come from a reference is checked when the step runs.
        let error = validator
            .iter_errors(args)
            .find(|error| !error.instance().as_str().is_some_and(template::mentions));
        match error {
            None => Ok(()),
            Some(error) => {
                let at = error.instance_path().to_string().replace('/', ".");
                Err(validate::invalid(
                    &format!("{path}.args{at}"),
                    format!("the args of {kind} are not valid: {error}"),
                ))
            }
        }
    }
}
