//! The executors available to ops, and the checking of their arguments.
//!
//! Arguments are parsed into an [`Exec`] when an op is submitted (so a bad op is
//! refused before anything is journaled) and again when it runs (from the journaled
//! record, after a restart too). `noop` is the ring's own; every other kind is a
//! registered component's ([`bbx_component::Components`]).

use bbx_component::{Components, EffectOp, Prepared, ReadOp, TaskOp};
use bbx_core::op::Effects;
use bbx_core::{Error, ErrorCode, Result};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;

/// The ring's own kind: it does nothing, as fast as the ring can.
const NOOP: &str = "noop";

/// The kind's name as a `'static` str if it is a known one: a completion and an
/// op's record then share it instead of copying it.
pub(super) fn interned(components: &Components, kind: String) -> Cow<'static, str> {
    let known = if kind == NOOP {
        Some(NOOP)
    } else {
        components.kind(&kind).map(|k| k.name)
    };
    known.map_or(Cow::Owned(kind), Cow::Borrowed)
}

/// Every kind an op may name.
pub fn kinds(components: &Components) -> Vec<&'static str> {
    let mut kinds = vec![NOOP];
    kinds.extend(components.kind_names());
    kinds
}

#[derive(Debug, Clone)]
pub enum Exec {
    /// Nothing to run: not even timed.
    Noop,
    /// A component's read: answered at once from the durable store.
    Read(Arc<dyn ReadOp>),
    /// A component's kernel-service op: its effect commits with its completion.
    Effect(Arc<dyn EffectOp>),
    /// A component's task: it runs on a task of its own and may act outside the kernel.
    Task(Arc<dyn TaskOp>),
    /// A recovered op whose journaled args its kind no longer takes (the
    /// configuration changed across the crash, say): it completes with this
    /// error rather than keeping the kernel from starting.
    Refused(Error),
}

impl Exec {
    pub fn parse(components: &Components, kind: &str, args: &Value) -> Result<Self> {
        if kind == NOOP {
            return Ok(Self::Noop);
        }
        match components.prepare(kind, args) {
            Some(prepared) => Ok(match prepared? {
                Prepared::Read(read) => Self::Read(read),
                Prepared::Effect(effect) => Self::Effect(effect),
                Prepared::Task(task) => Self::Task(task),
            }),
            None => {
                let kinds = kinds(components);
                Err(Error::new(
                    ErrorCode::InvalidArgument,
                    format!("unknown op kind {kind:?}; the kinds are {}", kinds.join(", ")),
                )
                .with_details(serde_json::json!({ "field": "kind", "kinds": kinds })))
            }
        }
    }

    pub fn effects(&self) -> Effects {
        match self {
            Self::Noop | Self::Read(_) | Self::Refused(_) => Effects::None,
            Self::Effect(_) => Effects::Kernel,
            Self::Task(task) => task.effects(),
        }
    }

    /// Whether a running attempt can be stopped (its future dropped).
    pub fn cancellable(&self) -> bool {
        matches!(self, Self::Task(_))
    }

    /// The circuit breaker an op answers to: its kind, and for a remote target
    /// the host too, so one failing server does not open the breaker of every
    /// other.
    pub fn breaker_target<'a>(&self, kind: &'a str) -> Cow<'a, str> {
        match self {
            Self::Task(task) => match task.remote_host() {
                Some(host) => Cow::Owned(format!("{kind} {host}")),
                None => Cow::Borrowed(kind),
            },
            _ => Cow::Borrowed(kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kinds_are_the_rings_noop_and_the_registered_components() {
        let mut components = Components::default();
        components.register(Arc::new(bbx_component::builtin::Builtin)).unwrap();
        components.register(Arc::new(bbx_agents::StateOps)).unwrap();
        let parse = |kind: &str, args: &Value| Exec::parse(&components, kind, args);
        assert!(matches!(parse("noop", &Value::Null).unwrap(), Exec::Noop));
        let sleep = parse("sleep", &json!({"ms": 5})).unwrap();
        assert!(matches!(sleep, Exec::Task(_)) && sleep.cancellable());
        assert_eq!(sleep.effects(), Effects::None);
        assert!(matches!(
            parse("state.get", &json!({"key": "k"})).unwrap(),
            Exec::Read(_)
        ));
        assert_eq!(
            parse("state.delete", &json!({"key": "k"})).unwrap().effects(),
            Effects::Kernel
        );
        assert!(parse("state.set", &json!({"key": "k"})).is_err(), "value is required");
        let unknown = parse("rm -rf", &json!({})).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::InvalidArgument);
        assert!(unknown.message.contains("state.incr") && unknown.message.contains("sleep"));
        assert!(matches!(interned(&components, "state.get".into()), Cow::Borrowed(_)));
        assert!(matches!(interned(&components, "other".into()), Cow::Owned(_)));
    }
}
