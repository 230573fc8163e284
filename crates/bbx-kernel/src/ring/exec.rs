//! The executors available to ops, and the checking of their arguments.
//!
//! Arguments are parsed into an [`Exec`] when an op is submitted (so a bad op is
//! refused before anything is journaled) and again when it runs (from the journaled
//! record, after a restart too). `noop` and `sleep` are the ring's own; the kinds
//! of registered components ([`bbx_component::Components`]) come next, then the
//! tools of `bbx-tools`.

use bbx_component::{Components, EffectOp, Prepared, ReadOp, parse_args};
use bbx_core::op::Effects;
use bbx_core::{Error, ErrorCode, Result};
use bbx_tools::Call;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// The ring's own kinds.
const BUILTIN: [&str; 2] = ["noop", "sleep"];

/// The kind's name as a `'static` str if it is a known one: a completion and an
/// op's record then share it instead of copying it.
pub(crate) fn interned(components: &Components, kind: String) -> Cow<'static, str> {
    let known = BUILTIN
        .iter()
        .chain(bbx_tools::KINDS.iter())
        .find(|known| **known == kind)
        .copied()
        .or_else(|| components.kind(&kind).map(|k| k.name));
    known.map_or(Cow::Owned(kind), Cow::Borrowed)
}

/// Every kind an op may name.
pub(crate) fn kinds(components: &Components) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = BUILTIN.to_vec();
    kinds.extend(components.kind_names());
    kinds.extend(bbx_tools::KINDS);
    kinds
}

/// The longest `sleep`.
const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub(crate) enum Exec {
    Noop,
    Sleep(Duration),
    /// A component's read: answered at once from the durable store.
    Read(Arc<dyn ReadOp>),
    /// A component's kernel-service op: its effect commits with its completion.
    Effect(Arc<dyn EffectOp>),
    /// A tool: it runs on a task of its own and may act outside the kernel.
    Tool(Arc<Call>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

impl Exec {
    pub fn parse(components: &Components, kind: &str, args: &Value) -> Result<Self> {
        let exec = match kind {
            "noop" => Self::Noop,
            "sleep" => {
                let SleepArgs { ms } = parse_args(kind, args)?;
                let duration = Duration::from_millis(ms);
                if duration > MAX_SLEEP {
                    return Err(Error::invalid_field("args.ms", "sleep is at most 24 hours"));
                }
                Self::Sleep(duration)
            }
            other => {
                if let Some(prepared) = components.prepare(other, args) {
                    match prepared? {
                        Prepared::Read(read) => Self::Read(read),
                        Prepared::Effect(effect) => Self::Effect(effect),
                    }
                } else if let Some(call) = Call::parse(other, args) {
                    Self::Tool(Arc::new(call?))
                } else {
                    let kinds = kinds(components);
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!("unknown op kind {other:?}; the kinds are {}", kinds.join(", ")),
                    )
                    .with_details(serde_json::json!({ "field": "kind", "kinds": kinds })));
                }
            }
        };
        Ok(exec)
    }

    pub fn effects(&self) -> Effects {
        match self {
            Self::Noop | Self::Sleep(_) | Self::Read(_) => Effects::None,
            Self::Effect(_) => Effects::Kernel,
            Self::Tool(call) if call.has_external_effects() => Effects::External,
            Self::Tool(_) => Effects::None,
        }
    }

    /// Whether a running attempt can be stopped (its future dropped).
    pub fn cancellable(&self) -> bool {
        matches!(self, Self::Sleep(_) | Self::Tool(_))
    }

    /// The circuit breaker an op answers to: its kind, and for a remote target
    /// the host too, so one failing server does not open the breaker of every
    /// other.
    pub fn breaker_target<'a>(&self, kind: &'a str) -> Cow<'a, str> {
        match self {
            Self::Tool(call) => match call.remote_host() {
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

    fn components() -> Components {
        let mut components = Components::default();
        components.register(Arc::new(bbx_agents::StateOps)).unwrap();
        components
    }

    #[test]
    fn arguments_are_checked_per_kind() {
        let components = components();
        let parse = |kind: &str, args: &Value| Exec::parse(&components, kind, args);
        assert!(matches!(parse("noop", &Value::Null).unwrap(), Exec::Noop));
        assert!(matches!(parse("sleep", &json!({"ms": 5})).unwrap(), Exec::Sleep(_)));
        assert!(parse("sleep", &json!({"ms": -5})).is_err());
        assert!(parse("sleep", &json!({"ms": 90_000_000_000u64})).is_err());
        assert!(parse("state.set", &json!({"key": "k"})).is_err(), "value is required");
        assert!(parse("state.set", &json!({"key": "..", "value": 1})).is_err());
        assert!(parse("state.incr", &json!({"key": "n", "by": "x"})).is_err());
        assert!(matches!(
            parse("state.incr", &json!({"key": "n"})).unwrap(),
            Exec::Effect(_)
        ));
        assert_eq!(
            parse("tool.file", &json!({"op": "read", "path": "a"}))
                .unwrap()
                .effects(),
            Effects::None
        );
        let http = parse("tool.http", &json!({"url": "http://example.com:8080/x"})).unwrap();
        assert_eq!(http.effects(), Effects::External);
        assert_eq!(http.breaker_target("tool.http"), "tool.http example.com:8080");
        // A path outside the workspace is the sandbox's to refuse when the op runs
        // (it completes with path_outside_workspace); malformed arguments are refused now.
        assert!(parse("tool.file", &json!({"op": "read", "path": "/etc/passwd"})).is_ok());
        assert!(parse("tool.file", &json!({"op": "chmod", "path": "a"})).is_err());
        assert!(
            parse("tool.shell", &json!({"args": ["x"]})).is_err(),
            "program is required"
        );
        let listed = kinds(&components);
        for kind in bbx_tools::KINDS.iter().chain(&["noop", "state.get", "state.incr"]) {
            assert!(listed.contains(kind), "{kind} is not listed");
        }
        let unknown = parse("rm -rf", &json!({})).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::InvalidArgument);
        assert!(unknown.message.contains("state.incr"));
        assert_eq!(
            parse("state.get", &json!({"key": "k"})).unwrap().effects(),
            Effects::None
        );
        assert_eq!(
            parse("state.delete", &json!({"key": "k"})).unwrap().effects(),
            Effects::Kernel
        );
    }
}
