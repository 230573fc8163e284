//! The memory op kinds, so quotas, flow checks, idempotency and the journal
//! apply to memory as to every other act of an agent: `memory.add`,
//! `memory.delete` and `memory.forget` (effects staged with their completion),
//! `memory.search` (a task: it embeds the query), `memory.get` and
//! `memory.stats` (reads).

use crate::Memories;
use crate::forget::{Delete, Forget, ForgetArgs};
use crate::record::MemoryId;
use crate::search::SearchArgs;
use crate::write::{Add, AddArgs};
use bbx_component::{OpKind, Prepared, ReadOp, Running, TaskContext, TaskOp, parse_args};
use bbx_core::op::Effects;
use bbx_core::{AgentId, Error, Result};
use bbx_store::Store;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

pub(crate) const KINDS: &[OpKind] = &[
    OpKind {
        name: "memory.add",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "memory.search",
        effects: Effects::None,
    },
    OpKind {
        name: "memory.get",
        effects: Effects::None,
    },
    OpKind {
        name: "memory.delete",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "memory.forget",
        effects: Effects::Kernel,
    },
    OpKind {
        name: "memory.stats",
        effects: Effects::None,
    },
];

/// `memory.get`'s args.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetArgs {
    pub id: MemoryId,
    /// Another agent's memory to read, where that agent granted this one
    /// read over it (FlowIntegrity).
    #[serde(default)]
    pub owner: Option<AgentId>,
}

/// `memory.delete`'s args.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteArgs {
    /// The memories to delete: all must exist, or none is deleted.
    pub ids: Vec<MemoryId>,
}

/// `memory.stats`'s args: none.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsArgs {}

pub(crate) fn args_schema(kind: &str) -> Option<Value> {
    let schema = match kind {
        "memory.add" => schemars::schema_for!(AddArgs),
        "memory.search" => schemars::schema_for!(SearchArgs),
        "memory.get" => schemars::schema_for!(GetArgs),
        "memory.delete" => schemars::schema_for!(DeleteArgs),
        "memory.forget" => schemars::schema_for!(ForgetArgs),
        "memory.stats" => schemars::schema_for!(StatsArgs),
        _ => return None,
    };
    serde_json::to_value(schema).ok()
}

/// The most ids one `memory.delete` takes.
const MAX_DELETE: usize = 10_000;

pub(crate) fn prepare(memories: &Memories, kind: &str, args: &Value) -> Result<Prepared> {
    Ok(match kind {
        "memory.add" => Prepared::Effect(Arc::new(Add::new(memories, parse_args(kind, args)?)?)),
        "memory.search" => {
            let args: SearchArgs = parse_args(kind, args)?;
            let owner = args.owner;
            let search = args.check(memories.0.config.max_text_bytes)?;
            Prepared::Task(Arc::new(SearchTask {
                memories: memories.clone(),
                search,
                owner,
            }))
        }
        "memory.get" => {
            let GetArgs { id, owner } = parse_args(kind, args)?;
            Prepared::Read(Arc::new(GetRead { id, owner }))
        }
        "memory.delete" => {
            let DeleteArgs { mut ids } = parse_args(kind, args)?;
            ids.sort();
            ids.dedup();
            if ids.is_empty() || ids.len() > MAX_DELETE {
                return Err(Error::invalid_field("ids", format!("give from 1 to {MAX_DELETE} ids")));
            }
            Prepared::Effect(Arc::new(Delete { ids }))
        }
        "memory.forget" => {
            let args: ForgetArgs = parse_args(kind, args)?;
            args.check()?;
            Prepared::Effect(Arc::new(Forget {
                memories: memories.clone(),
                args,
                chosen: Arc::default(),
            }))
        }
        "memory.stats" => {
            let StatsArgs {} = parse_args(kind, args)?;
            Prepared::Read(Arc::new(StatsRead(memories.clone())))
        }
        _ => return Err(Error::internal(format!("memory serves no op kind {kind}"))),
    })
}

/// A search of the op's agent's memory, or of the owner's it names.
#[derive(Debug)]
struct SearchTask {
    memories: Memories,
    search: crate::search::Search,
    owner: Option<AgentId>,
}

impl TaskOp for SearchTask {
    fn effects(&self) -> Effects {
        Effects::None
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext<'a>) -> Running<'a> {
        Box::pin(self.memories.search(
            self.owner.unwrap_or(ctx.agent),
            self.search.clone(),
            self.owner.is_none_or(|owner| owner == ctx.agent),
        ))
    }
}

#[derive(Debug)]
struct GetRead {
    id: MemoryId,
    owner: Option<AgentId>,
}

impl ReadOp for GetRead {
    fn read(&self, store: &Store, agent: &AgentId) -> Result<Value> {
        crate::record::get(store, self.owner.as_ref().unwrap_or(agent), self.id)
    }
}

#[derive(Debug)]
struct StatsRead(Memories);

impl ReadOp for StatsRead {
    fn read(&self, _store: &Store, agent: &AgentId) -> Result<Value> {
        Ok(self.0.stats(agent))
    }
}
