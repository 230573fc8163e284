//! The context op kinds, so quotas, flow checks, idempotency and the journal
//! apply to context as to every other act of an agent: `context.put`,
//! `context.pin`, `context.delete` and `context.demote` (effects staged with
//! their completion); `context.get`, `context.list`, `context.stats`,
//! `context.score`, `context.assemble` and `context.prefetch` read, as tasks
//! without effects: they may load an agent or read from disk, which must not
//! hold up the ring's dispatcher.

use crate::codec::{self, Codec, Tier};
use crate::contexts::{Contexts, SEQUENCE, not_found};
use crate::item::{ItemId, Kind, Record, Role, agent_key, item_key};
use crate::{CONTEXT_ACCESS, CONTEXT_AGENTS, CONTEXT_BLOCKS, CONTEXT_ITEMS};
use bbx_component::{EffectOp, OpKind, Pending, Prepared, Running, Staging, TaskContext, TaskOp, parse_args};
use bbx_core::op::Effects;
use bbx_core::{AgentId, Error, ErrorCode, Result};
use bbx_store::GroupTx;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::Arc;

const fn kind(name: &'static str, effects: Effects) -> OpKind {
    OpKind { name, effects }
}

pub(crate) const KINDS: &[OpKind] = &[
    kind("context.put", Effects::Kernel),
    kind("context.get", Effects::None),
    kind("context.list", Effects::None),
    kind("context.pin", Effects::Kernel),
    kind("context.delete", Effects::Kernel),
    kind("context.demote", Effects::Kernel),
    kind("context.assemble", Effects::None),
    kind("context.stats", Effects::None),
    kind("context.prefetch", Effects::None),
    kind("context.score", Effects::None),
];

/// `context.put`'s args.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PutArgs {
    /// The text (a message, a tool's result, a document, a note).
    pub content: String,
    #[serde(default)]
    pub kind: Kind,
    #[serde(default)]
    pub role: Option<Role>,
    /// Always in an assembled window, at its head, and kept HOT.
    #[serde(default)]
    pub pinned: bool,
    /// How important the writer says it is, 0 to 1.
    #[serde(default)]
    pub importance: Option<f32>,
    /// Earlier items it refers to.
    #[serde(default)]
    pub refs: Vec<ItemId>,
    /// Another agent's context to put it in, where that agent granted this
    /// one write over it (FlowIntegrity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<AgentId>,
}

/// Args naming one item.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ItemArgs {
    pub id: ItemId,
}

/// `context.get`'s args.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetArgs {
    pub id: ItemId,
    /// Another agent's context to read, where that agent granted this one
    /// read over it (FlowIntegrity).
    #[serde(default)]
    pub owner: Option<AgentId>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PinArgs {
    pub id: ItemId,
    /// false unpins [default: true].
    #[serde(default = "yes")]
    pub pinned: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteArgs {
    /// All must exist, or none is deleted.
    pub ids: Vec<ItemId>,
}

/// Where an operator may demote an item to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DiskTier {
    Cool,
    Cold,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DemoteArgs {
    pub id: ItemId,
    pub tier: DiskTier,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListArgs {
    /// Items after this id [default: from the first].
    #[serde(default)]
    pub after: Option<ItemId>,
    /// At most this many, 1 to 1000 [default: 100].
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub tier: Option<Tier>,
    #[serde(default)]
    pub kind: Option<Kind>,
}

impl ListArgs {
    pub(crate) fn check(&self) -> Result<()> {
        if self.limit.is_some_and(|limit| !(1..=1000).contains(&limit)) {
            return Err(Error::invalid_field("limit", "must be 1 to 1000"));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AssembleArgs {
    /// The most tokens the window may take.
    pub budget: u32,
    /// Another agent's context to assemble, where that agent granted this
    /// one read over it (FlowIntegrity).
    #[serde(default)]
    pub owner: Option<AgentId>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrefetchArgs {
    /// Items about to be needed.
    pub ids: Vec<ItemId>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatsArgs {}

pub(crate) fn args_schema(kind: &str) -> Option<Value> {
    let schema = match kind {
        "context.put" => schemars::schema_for!(PutArgs),
        "context.get" => schemars::schema_for!(GetArgs),
        "context.score" => schemars::schema_for!(ItemArgs),
        "context.list" => schemars::schema_for!(ListArgs),
        "context.pin" => schemars::schema_for!(PinArgs),
        "context.delete" => schemars::schema_for!(DeleteArgs),
        "context.demote" => schemars::schema_for!(DemoteArgs),
        "context.assemble" => schemars::schema_for!(AssembleArgs),
        "context.prefetch" => schemars::schema_for!(PrefetchArgs),
        "context.stats" => schemars::schema_for!(StatsArgs),
        _ => return None,
    };
    serde_json::to_value(schema).ok()
}

/// The most ids one delete or prefetch takes, and the most refs of an item.
const MAX_IDS: usize = 1000;

pub(crate) fn check_ids(field: &str, ids: &mut Vec<ItemId>) -> Result<()> {
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() || ids.len() > MAX_IDS {
        return Err(Error::invalid_field(field, format!("give from 1 to {MAX_IDS} ids")));
    }
    Ok(())
}

pub(crate) fn prepare(contexts: &Contexts, kind: &str, args: &Value) -> Result<Prepared> {
    let contexts = contexts.clone();
    Ok(match kind {
        "context.put" => Prepared::Effect(Arc::new(Put::new(&contexts, parse_args(kind, args)?)?)),
        "context.get" => {
            let GetArgs { id, owner } = parse_args(kind, args)?;
            Prepared::Task(Arc::new(Task(contexts, TaskKind::Get(id), owner)))
        }
        "context.score" => {
            let ItemArgs { id } = parse_args(kind, args)?;
            Prepared::Task(Arc::new(Task(contexts, TaskKind::Score(id), None)))
        }
        "context.list" => {
            let args: ListArgs = parse_args(kind, args)?;
            args.check()?;
            Prepared::Task(Arc::new(Task(contexts, TaskKind::List(args), None)))
        }
        "context.stats" => {
            let StatsArgs {} = parse_args(kind, args)?;
            Prepared::Task(Arc::new(Task(contexts, TaskKind::Stats, None)))
        }
        "context.pin" => {
            let PinArgs { id, pinned } = parse_args(kind, args)?;
            Prepared::Effect(Arc::new(Pin { id, pinned }))
        }
        "context.delete" => {
            let DeleteArgs { mut ids } = parse_args(kind, args)?;
            check_ids("ids", &mut ids)?;
            Prepared::Effect(Arc::new(Delete {
                ids,
                forget_memory: contexts.cold_search(),
            }))
        }
        "context.demote" => {
            let DemoteArgs { id, tier } = parse_args(kind, args)?;
            Prepared::Effect(Arc::new(Demote {
                contexts,
                id,
                tier,
                block: Arc::default(),
            }))
        }
        "context.assemble" => {
            let AssembleArgs { budget, owner } = parse_args(kind, args)?;
            if budget == 0 {
                return Err(Error::invalid_field("budget", "must be at least 1 token"));
            }
            Prepared::Task(Arc::new(Task(contexts, TaskKind::Assemble(budget), owner)))
        }
        "context.prefetch" => {
            let PrefetchArgs { mut ids } = parse_args(kind, args)?;
            check_ids("ids", &mut ids)?;
            Prepared::Task(Arc::new(Task(contexts, TaskKind::Prefetch(ids), None)))
        }
        _ => return Err(Error::internal(format!("context serves no op kind {kind}"))),
    })
}

#[derive(Debug)]
struct Put {
    args: PutArgs,
    tokens: u32,
    block: Vec<u8>,
}

impl Put {
    fn new(contexts: &Contexts, mut args: PutArgs) -> Result<Self> {
        if args.content.is_empty() {
            return Err(Error::invalid_field("content", "an item must not be empty"));
        }
        let max = contexts.0.config.max_item_bytes;
        if args.content.len() > max {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the item is {} bytes; context.max_item_bytes is {max}",
                    args.content.len()
                ),
            ));
        }
        if args.importance.is_some_and(|i| !(0.0..=1.0).contains(&i)) {
            return Err(Error::invalid_field("importance", "must be from 0 to 1"));
        }
        if !args.refs.is_empty() {
            check_ids("refs", &mut args.refs)?;
        }
        let tokens = contexts.counter().count(&args.content);
        let block = codec::encode(&args.content, Codec::Lz4, 0)?;
        Ok(Self { args, tokens, block })
    }
}

impl EffectOp for Put {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let agent = self.args.owner.as_ref().unwrap_or(staging.agent);
        let sequence = agent_key(agent, SEQUENCE);
        let last = crate::item::counter(tx.read(CONTEXT_AGENTS, &sequence)?);
        for id in &self.args.refs {
            if tx.read(CONTEXT_ITEMS, &item_key(agent, *id))?.is_none() {
                return Err(Error::invalid_field(
                    "refs",
                    format!("the agent's context has no item {id}"),
                ));
            }
        }
        let id = last + 1;
        let record = Record {
            id,
            kind: self.args.kind,
            role: self.args.role,
            tokens: self.tokens,
            bytes: self.args.content.len() as u32,
            pinned: self.args.pinned,
            importance: self.args.importance,
            created: staging.at,
            refs: self.args.refs.clone(),
            codec: Codec::Lz4,
            stored_bytes: self.block.len() as u32,
            labels: staging.labels.to_vec(),
        };
        let key = item_key(agent, id);
        tx.put(CONTEXT_AGENTS, sequence, id.to_be_bytes().to_vec());
        tx.put(CONTEXT_ITEMS, key.clone(), record.encode());
        tx.put(CONTEXT_BLOCKS, key, self.block.clone());
        let mut put = json!({ "id": id, "tokens": self.tokens, "tier": Tier::Hot });
        if let Some(owner) = self.args.owner {
            put["agent"] = json!(owner);
        }
        Ok(put)
    }
}

fn stored_record(tx: &GroupTx<'_>, agent: &AgentId, id: ItemId) -> Result<Record> {
    let bytes = tx
        .read(CONTEXT_ITEMS, &item_key(agent, id))?
        .ok_or_else(|| not_found(id))?;
    Record::decode(&bytes)
}

#[derive(Debug)]
struct Pin {
    id: ItemId,
    pinned: bool,
}

impl EffectOp for Pin {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut record = stored_record(tx, staging.agent, self.id)?;
        record.pinned = self.pinned;
        tx.put(CONTEXT_ITEMS, item_key(staging.agent, self.id), record.encode());
        Ok(json!({ "id": self.id, "pinned": self.pinned }))
    }
}

#[derive(Debug)]
struct Delete {
    ids: Vec<ItemId>,
    /// Memory holds COLD items: what it holds of these goes too (a chore).
    forget_memory: bool,
}

impl EffectOp for Delete {
    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        for id in &self.ids {
            stored_record(tx, staging.agent, *id)?;
        }
        for id in &self.ids {
            crate::chores::deleted(tx, staging.agent, *id, self.forget_memory)?;
            let key = item_key(staging.agent, *id);
            for keyspace in [CONTEXT_ITEMS, CONTEXT_BLOCKS, CONTEXT_ACCESS] {
                tx.remove(keyspace, key.clone());
            }
        }
        Ok(json!({ "deleted": self.ids }))
    }
}

/// A block's codec, what the store keeps of it (the block, or its stub in
/// object storage), and its size.
type Encoded = (Codec, Vec<u8>, u32);

#[derive(Debug)]
struct Demote {
    contexts: Contexts,
    id: ItemId,
    tier: DiskTier,
    /// The block, encoded for the tier before the op is staged.
    block: Arc<Mutex<Option<Encoded>>>,
}

impl EffectOp for Demote {
    fn ready(&self, agent: AgentId) -> Option<Pending<'static, ()>> {
        let (contexts, id, slot) = (self.contexts.clone(), self.id, self.block.clone());
        let (codec, level) = match self.tier {
            DiskTier::Cool => (Codec::Zstd, self.contexts.0.config.cool_level),
            DiskTier::Cold => (Codec::ZstdHigh, self.contexts.0.config.cold_level),
        };
        Some(Box::pin(async move {
            let reader = contexts.clone();
            let block = tokio::task::spawn_blocking(move || {
                // Refused before anything is put in the bucket (the stage
                // checks again).
                if reader.with(agent, |ctx| ctx.items.get(&id).is_some_and(|e| e.record.pinned))? {
                    return Err(pinned(id));
                }
                let content = reader.content(agent, id)?;
                codec::encode(&content, codec, level)
            })
            .await
            .map_err(|e| Error::internal(format!("encoding an item failed: {e}")))??;
            let size = block.len() as u32;
            let kept = match codec {
                Codec::ZstdHigh => contexts.offload(&agent, id, &block).await?,
                _ => block,
            };
            *slot.lock() = Some((codec, kept, size));
            Ok(())
        }))
    }

    fn stage(&self, tx: &mut GroupTx<'_>, staging: &Staging<'_>) -> Result<Value> {
        let mut record = stored_record(tx, staging.agent, self.id)?;
        if record.pinned {
            return Err(pinned(self.id));
        }
        let Some((codec, block, size)) = self.block.lock().clone() else {
            return Err(Error::internal("the demoted block was not encoded"));
        };
        record.codec = codec;
        record.stored_bytes = size;
        let key = item_key(staging.agent, self.id);
        crate::chores::overwritten(tx, staging.agent, self.id)?;
        tx.put(CONTEXT_ITEMS, key.clone(), record.encode());
        tx.put(CONTEXT_BLOCKS, key, block);
        if codec == Codec::ZstdHigh && self.contexts.cold_search() {
            crate::chores::cold(tx, staging.agent, self.id)?;
        }
        Ok(json!({ "id": self.id, "tier": codec.disk_tier() }))
    }
}

fn pinned(id: ItemId) -> Error {
    Error::new(
        ErrorCode::FailedPrecondition,
        format!("item {id} is pinned: unpin it before demoting it"),
    )
}

#[derive(Debug)]
enum TaskKind {
    Get(ItemId),
    Score(ItemId),
    List(ListArgs),
    Stats,
    Assemble(u32),
    Prefetch(Vec<ItemId>),
}

/// A read of the op's agent's context, or of the owner's it names.
#[derive(Debug)]
struct Task(Contexts, TaskKind, Option<AgentId>);

impl TaskOp for Task {
    fn effects(&self) -> Effects {
        Effects::None
    }

    fn run<'a>(&'a self, ctx: &'a TaskContext<'a>) -> Running<'a> {
        let (contexts, agent) = (self.0.clone(), self.2.unwrap_or(ctx.agent));
        let work: Box<dyn FnOnce() -> Result<Value> + Send> = match &self.1 {
            TaskKind::Get(id) => {
                let (id, grantee) = (*id, agent != ctx.agent);
                Box::new(move || {
                    let got = match grantee {
                        false => contexts.get(agent, id)?,
                        true => contexts.peek(agent, id)?,
                    };
                    Ok(crate::views::item(&got))
                })
            }
            TaskKind::Score(id) => {
                let id = *id;
                Box::new(move || contexts.score(agent, id))
            }
            TaskKind::List(args) => {
                let args = args.clone();
                Box::new(move || contexts.list(agent, &args))
            }
            TaskKind::Stats => Box::new(move || contexts.stats(agent)),
            TaskKind::Assemble(budget) => {
                let budget = *budget;
                // The agent's own op may have a model summarize; a grantee's
                // reads another's context, and never spends for it.
                let asker = match agent == ctx.agent {
                    true => crate::window::Asker::Agent,
                    false => crate::window::Asker::Grantee,
                };
                Box::new(move || contexts.assemble(agent, budget, asker))
            }
            TaskKind::Prefetch(ids) => {
                let ids = ids.clone();
                Box::new(move || Ok(json!({ "promoted": contexts.prefetch(agent, &ids)? })))
            }
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| Error::internal(format!("a context task failed: {e}")))?
        })
    }
}
