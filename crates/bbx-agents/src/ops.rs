//! `state.*`: the agent state store's op kinds, served through the component
//! contract like any component's. `state.get` reads; `state.set`, `state.incr` and
//! `state.delete` stage their effect with their op's completion.
//!
//! An op acts on its own agent's state, or, with `"agent": OWNER`, on another
//! agent's: FlowIntegrity's access control lets it only where the owner granted
//! the op's agent that right over the key's prefix (same tenant).

use crate::effect::{Effect, apply_effect};
use crate::{STATE, decode_state, state_key};
use bbx_component::{Component, Context, EffectOp, Exported, OpKind, Prepared, ReadOp, Staging, parse_args};
use bbx_core::op::Effects;
use bbx_core::{AgentId, Error, Result, validate};
use bbx_store::{GroupTx, Store, storage_error};
use fjall::Readable;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

/// The `state.*` op kinds, registered with the kernel like any component.
pub struct StateOps;

const KINDS: &[OpKind] = &[
    OpKind {
        name: "state.get",
        effects: Effects::None,
    },
    OpKind {
        name: "state.set",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "state.incr",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "state.delete",
        effects: Effects::Kernel,
    },
];

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct KeyArgs {
    key: String,
    /// Whose state [default: the op's agent's].
    #[serde(default)]
    agent: Option<AgentId>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SetArgs {
    key: String,
    value: Value,
    #[serde(default)]
    agent: Option<AgentId>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct IncrArgs {
    key: String,
    #[serde(default = "one")]
    by: serde_json::Number,
    #[serde(default)]
    agent: Option<AgentId>,
}

fn one() -> serde_json::Number {
    1.into()
}

impl Component for StateOps {
    fn name(&self) -> &'static str {
        "state"
    }

    fn kinds(&self) -> &'static [OpKind] {
        KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        let schema = match kind {
            "state.get" | "state.delete" => schemars::schema_for!(KeyArgs),
            "state.set" => schemars::schema_for!(SetArgs),
            "state.incr" => schemars::schema_for!(IncrArgs),
            _ => return None,
        };
        serde_json::to_value(schema).ok()
    }

    /// Resumes the purges of deleted agents' state that a crash interrupted.
    fn start(&self, ctx: &Context) -> Result<()> {
        crate::lifecycle::resume_purges(ctx)
    }

    fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        crate::lifecycle::purge(ctx, agent);
    }

    fn export(&self, store: &Store, view: &fjall::Snapshot, agent: &AgentId) -> Result<Vec<Exported>> {
        crate::lifecycle::export(store, view, agent)
    }

    fn exported_write(
        &self,
        agent: &AgentId,
        write: bbx_component::StoreWrite<'_>,
    ) -> Option<bbx_component::ExportedWrite> {
        crate::lifecycle::exported_write(agent, write)
    }

    fn import(&self, tx: &mut GroupTx<'_>, agent: &AgentId, records: &[Exported]) -> Result<()> {
        crate::lifecycle::import(tx, agent, records)
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        let (owner, effect) = match kind {
            "state.get" => {
                let KeyArgs { key, agent: owner } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                return Ok(Prepared::Read(Arc::new(StateRead { key, owner })));
            }
            "state.set" => {
                let SetArgs {
                    key,
                    value,
                    agent: owner,
                } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                let value = serde_json::to_vec(&value).map_err(|e| Error::internal(e.to_string()))?;
                (owner, Effect::Set { key, value })
            }
            "state.incr" => {
                let IncrArgs { key, by, agent: owner } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                (owner, Effect::Incr { key, by })
            }
            "state.delete" => {
                let KeyArgs { key, agent: owner } = parse_args(kind, args)?;
                validate::state_key(&key)?;
                (owner, Effect::Delete { key })
            }
            other => return Err(Error::internal(format!("the state component serves no {other}"))),
        };
        Ok(Prepared::Effect(Arc::new(StateEffect { owner, effect })))
    }
}

/// `state.get`: a key's value and version, from what is durable.
#[derive(Debug)]
struct StateRead {
    key: String,
    /// Another agent's state, where granted.
    owner: Option<AgentId>,
}

impl ReadOp for StateRead {
    fn read(&self, store: &Store, agent: &AgentId) -> Result<Value> {
        let key = &self.key;
        let agent = self.owner.as_ref().unwrap_or(agent);
        let bytes = store
            .view()
            .get(store.keyspace(STATE), state_key(agent, key))
            .map_err(|e| storage_error("read", e))?;
        let stored = bytes.as_deref().map(decode_state).transpose()?;
        match stored {
            Some(stored) if !stored.is_tombstone() => {
                let value: Value = serde_json::from_slice(stored.json)
                    .map_err(|e| Error::internal(format!("stored value is unreadable: {e}")))?;
                let mut read = serde_json::json!({ "key": key, "value": value, "version": stored.version });
                if !stored.labels.is_empty() {
                    read["labels"] = stored.labels.into();
                }
                Ok(read)
            }
            _ => Err(Error::not_found("state key", key)),
        }
    }
}

/// `state.set`, `state.incr`, `state.delete`: an effect on one key of its
/// agent's state, or of the owner's where granted.
#[derive(Debug)]
pub(crate) struct StateEffect {
    owner: Option<AgentId>,
    effect: Effect,
}

impl EffectOp for StateEffect {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        apply_effect(tx, self.owner.as_ref().unwrap_or(staging.agent), &self.effect, staging)
    }
}
