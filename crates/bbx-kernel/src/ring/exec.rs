//! The executors available to ops, and the checking of their arguments.
//!
//! Arguments are parsed into an [`Exec`] when an op is submitted (so a bad op is
//! refused before anything is journaled) and again when it runs (from the journaled
//! record, after a restart too).

use crate::store::Effect;
use bbx_core::{Error, ErrorCode, Result, validate};
use bbx_ring::Effects;
use bbx_tools::Call;
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// The kinds an op may name: the kernel's own, then the tools of `bbx-tools`.
pub const KINDS: [&str; 11] = [
    "noop",
    "sleep",
    "state.get",
    "state.set",
    "state.incr",
    "state.delete",
    "tool.http",
    "tool.shell",
    "tool.file",
    "tool.mcp",
    "llm.chat",
];

/// The kind's name from [`KINDS`] if it is one: a completion and an op's record
/// then share it instead of copying it.
pub(crate) fn interned(kind: String) -> Cow<'static, str> {
    KINDS
        .iter()
        .find(|known| **known == kind)
        .map_or(Cow::Owned(kind), |known| Cow::Borrowed(*known))
}

/// The longest `sleep`.
const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub(crate) enum Exec {
    Noop,
    Sleep(Duration),
    StateGet {
        key: String,
    },
    /// A kernel-service op: its effect commits with its completion.
    State(Effect),
    /// A tool: it runs on a task of its own and may act outside the kernel.
    Tool(Arc<Call>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyArgs {
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetArgs {
    key: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncrArgs {
    key: String,
    #[serde(default = "one")]
    by: serde_json::Number,
}

fn one() -> serde_json::Number {
    1.into()
}

impl Exec {
    pub fn parse(kind: &str, args: &Value) -> Result<Self> {
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
            "state.get" => {
                let KeyArgs { key } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                Self::StateGet { key }
            }
            "state.set" => {
                let SetArgs { key, value } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                let value = serde_json::to_vec(&value).map_err(|e| Error::internal(e.to_string()))?;
                Self::State(Effect::Set { key, value })
            }
            "state.incr" => {
                let IncrArgs { key, by } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                Self::State(Effect::Incr { key, by })
            }
            "state.delete" => {
                let KeyArgs { key } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                Self::State(Effect::Delete { key })
            }
            other => match Call::parse(other, args) {
                Some(call) => Self::Tool(Arc::new(call?)),
                None => {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!("unknown op kind {other:?}; the kinds are {}", KINDS.join(", ")),
                    )
                    .with_details(serde_json::json!({ "field": "kind", "kinds": KINDS })));
                }
            },
        };
        Ok(exec)
    }

    pub fn effects(&self) -> Effects {
        match self {
            Self::Noop | Self::Sleep(_) | Self::StateGet { .. } => Effects::None,
            Self::State(_) => Effects::Kernel,
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

fn parse_args<T: for<'de> Deserialize<'de>>(kind: &str, args: &Value) -> Result<T> {
    T::deserialize(args)
        .map_err(|e| Error::invalid_field("args", format!("the arguments of {kind} are not valid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arguments_are_checked_per_kind() {
        assert!(matches!(Exec::parse("noop", &Value::Null).unwrap(), Exec::Noop));
        assert!(matches!(
            Exec::parse("sleep", &json!({"ms": 5})).unwrap(),
            Exec::Sleep(_)
        ));
        assert!(Exec::parse("sleep", &json!({"ms": -5})).is_err());
        assert!(Exec::parse("sleep", &json!({"ms": 90_000_000_000u64})).is_err());
        assert!(
            Exec::parse("state.set", &json!({"key": "k"})).is_err(),
            "value is required"
        );
        assert!(Exec::parse("state.set", &json!({"key": "..", "value": 1})).is_err());
        assert!(Exec::parse("state.incr", &json!({"key": "n", "by": "x"})).is_err());
        assert!(matches!(
            Exec::parse("state.incr", &json!({"key": "n"})).unwrap(),
            Exec::State(Effect::Incr { .. })
        ));
        assert_eq!(
            Exec::parse("tool.file", &json!({"op": "read", "path": "a"}))
                .unwrap()
                .effects(),
            Effects::None
        );
        let http = Exec::parse("tool.http", &json!({"url": "http://example.com:8080/x"})).unwrap();
        assert_eq!(http.effects(), Effects::External);
        assert_eq!(http.breaker_target("tool.http"), "tool.http example.com:8080");
        // A path outside the workspace is the sandbox's to refuse when the op runs
        // (it completes with path_outside_workspace); malformed arguments are refused now.
        assert!(Exec::parse("tool.file", &json!({"op": "read", "path": "/etc/passwd"})).is_ok());
        assert!(Exec::parse("tool.file", &json!({"op": "chmod", "path": "a"})).is_err());
        assert!(
            Exec::parse("tool.shell", &json!({"args": ["x"]})).is_err(),
            "program is required"
        );
        for kind in bbx_tools::KINDS {
            assert!(KINDS.contains(&kind), "{kind} is not listed");
        }
        let unknown = Exec::parse("rm -rf", &json!({})).unwrap_err();
        assert_eq!(unknown.code, ErrorCode::InvalidArgument);
        assert!(unknown.message.contains("state.incr"));
        assert_eq!(
            Exec::parse("state.get", &json!({"key": "k"})).unwrap().effects(),
            Effects::None
        );
        assert_eq!(
            Exec::parse("state.delete", &json!({"key": "k"})).unwrap().effects(),
            Effects::Kernel
        );
    }
}
