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
//!   had not;
//! - a [`Prepared::Task`] runs on a task of its own, under its op's timeout, and is
//!   stopped by a cancel or the kernel's shutdown. One with external effects
//!   ([`TaskOp::effects`]) is journaled before it is acknowledged; before its first
//!   attempt the ring reserves on its path's budgets the most its attempts can
//!   spend ([`TaskOp::max_spend`]) and makes a start mark durable, so that after a
//!   crash it is never run again on its own: it completes `in_doubt`.
//!
//! The keyspaces a component stages into are its own, declared with
//! [`bbx_store::KeyspaceDef`].

pub mod builtin;

use bbx_core::op::Effects;
use bbx_core::quota::Spend;
use bbx_core::{AgentId, Error, OpId, Result};
use bbx_store::{GroupTx, Store};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

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

/// An op whose effect commits with its completion.
pub trait EffectOp: Send + Sync + std::fmt::Debug {
    /// Checks the effect's preconditions against the group, then stages it for
    /// `agent` as of `at`; returns the op's result. Every fallible read comes before
    /// the first write, so an effect that fails stages nothing (its op completes
    /// with that error instead).
    fn stage(&self, tx: &mut GroupTx<'_>, agent: &AgentId, at: DateTime<Utc>) -> Result<Value>;
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

/// A component: the op kinds it serves, and how their ops are prepared.
pub trait Component: Send + Sync + 'static {
    /// The component's name, e.g. `state`, for errors and listings.
    fn name(&self) -> &'static str;

    fn kinds(&self) -> &'static [OpKind];

    /// Checks `args` of `kind` (one of [`Component::kinds`]) and prepares the op.
    /// A bad argument is an `invalid_argument` error naming it.
    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared>;
}

/// The registered components, by the kinds they serve.
#[derive(Default, Clone)]
pub struct Components {
    by_kind: HashMap<&'static str, (OpKind, Arc<dyn Component>)>,
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
        for kind in component.kinds() {
            self.by_kind.insert(kind.name, (*kind, component.clone()));
        }
        Ok(())
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
