//! The context API: an endpoint that changes context submits its op through
//! the whole pipeline as the caller (auth, quotas, flow checks, journal) and
//! answers with the op's result; one that reads answers from the component
//! once the kernel says the caller may read the agent. Served as
//! `context.*` (HTTP under `/v1/agents/{agent}/context`, MCP `context_*`,
//! CLI `bbx context VERB`) and under the report's names,
//! `enhanced_context.stats|prefetch|score` (`/v1/enhanced-context/...`, MCP
//! `enhanced_context_*`).

use crate::Contexts;
use crate::item::ItemId;
use crate::ops::{DiskTier, PutArgs};
use bbx_auth::Caller;
use bbx_component::Endpoint;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Error, Result};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// An item id from a path (text) or a body (a number).
#[derive(Debug, Clone, Copy)]
struct Id(ItemId);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Number(u64),
            Text(String),
        }
        match Given::deserialize(d)? {
            Given::Number(n) => Ok(Self(n)),
            Given::Text(text) => text
                .parse()
                .map(Self)
                .map_err(|_| serde::de::Error::custom(format!("{text:?} is not an item id (a whole number)"))),
        }
    }
}

impl schemars::JsonSchema for Id {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ItemId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["integer", "string"], "minimum": 1, "pattern": "^[0-9]+$" })
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PutReq {
    agent: AgentId,
    /// Putting again with the same key adds nothing and answers as the first time.
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(flatten)]
    args: PutArgs,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ItemReq {
    agent: AgentId,
    id: Id,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PinReq {
    agent: AgentId,
    id: Id,
    #[serde(default)]
    pinned: Option<bool>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DemoteReq {
    agent: AgentId,
    id: Id,
    tier: DiskTier,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ListReq {
    agent: AgentId,
    #[serde(flatten)]
    args: crate::ops::ListArgs,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AssembleReq {
    agent: AgentId,
    /// The most tokens the window may take.
    budget: u32,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SearchReq {
    agent: AgentId,
    /// What to look for, by meaning and by words.
    query: String,
    /// Items at most [default: 10].
    #[serde(default)]
    k: Option<usize>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct PrefetchReq {
    agent: AgentId,
    ids: Vec<ItemId>,
}

/// The report's prefetch hint: one item, by its key (the item's id).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct KeyReq {
    agent: AgentId,
    key: Id,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AgentReq {
    agent: AgentId,
}

impl Contexts {
    async fn run_op(
        &self,
        caller: &Caller,
        agent: AgentId,
        kind: &str,
        args: Value,
        key: Option<String>,
    ) -> Result<Value> {
        let op = SubmitOp {
            idempotency_key: key,
            ..SubmitOp::new(agent, kind.to_owned(), args)
        };
        bbx_component::run_op(&*self.context()?.submitter, caller, op, WAIT).await
    }

    fn may_read(&self, caller: &Caller, agent: &AgentId, operation: &str) -> Result<()> {
        self.context()?.submitter.may_read(caller, agent, operation)
    }

    /// Runs blocking work (a load, a read from disk) off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Contexts) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(this))
            .await
            .map_err(|e| Error::internal(format!("a context read failed: {e}")))?
    }
}

fn to_args(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

pub(crate) fn endpoints(contexts: &Contexts) -> Vec<Endpoint> {
    let stats = |name, path| {
        Endpoint::serving(
            contexts,
            name,
            ("GET", path),
            "An agent's context figures: items and bytes per tier (hot, warm, cool, cold), tokens, the importance model (gbdt or formula, samples, AUC), prefetch hits.",
            |c: Contexts, caller, req: AgentReq| async move {
                c.may_read(&caller, &req.agent, "context.stats")?;
                c.blocking(move |c| c.stats(req.agent)).await
            },
        )
    };
    const SCORE: &str = "How important an item is now: the learned model's chance that it is accessed again soon (or the formula's score before there is a model), with the features it saw.";
    vec![
        Endpoint::serving(
            contexts,
            "context.put",
            ("POST", "/v1/agents/{agent}/context"),
            "Add an item to an agent's context (a message, tool_result, document, note or summary): counted in tokens, journaled, HOT; answers with its id once durable.",
            |c: Contexts, caller, req: PutReq| async move {
                c.run_op(
                    &caller,
                    req.agent,
                    "context.put",
                    to_args(req.args),
                    req.idempotency_key,
                )
                .await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.list",
            ("GET", "/v1/agents/{agent}/context"),
            "An agent's context items in order, without their content: kind, role, tokens, tier, pin and accesses; filter by tier or kind, page with after and limit.",
            |c: Contexts, caller, req: ListReq| async move {
                c.may_read(&caller, &req.agent, "context.list")?;
                req.args.check()?;
                c.blocking(move |c| c.list(req.agent, &req.args)).await
            },
        ),
        stats("context.stats", "/v1/agents/{agent}/context/stats"),
        Endpoint::serving(
            contexts,
            "context.assemble",
            ("POST", "/v1/agents/{agent}/context/assemble"),
            "Assemble a model input under a token budget: system and pinned items, then the context in order, keeping the previous window as its prefix; on overflow, evicted items become a summary. Says how much it shares with the previous window.",
            |c: Contexts, caller, req: AssembleReq| async move {
                c.may_read(&caller, &req.agent, "context.assemble")?;
                if req.budget == 0 {
                    return Err(Error::invalid_field("budget", "must be at least 1 token"));
                }
                // Only a key acting as the agent may have a model summarize,
                // on the agent's budget.
                let asker = match caller.agent == Some(req.agent) {
                    true => crate::window::Asker::Agent,
                    false => crate::window::Asker::Operator,
                };
                c.blocking(move |c| c.assemble(req.agent, req.budget, asker)).await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.search",
            ("POST", "/v1/agents/{agent}/context/search"),
            "Search an agent's context items that reached COLD, by meaning and by words, through SemanticMemory: each found item with its score, tier and content.",
            |c: Contexts, caller, req: SearchReq| async move {
                c.may_read(&caller, &req.agent, "context.search")?;
                c.search(req.agent, req.query, req.k.unwrap_or(10)).await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.prefetch",
            ("POST", "/v1/agents/{agent}/context/prefetch"),
            "Hint that items are about to be needed: they are brought into HOT now.",
            |c: Contexts, caller, mut req: PrefetchReq| async move {
                c.may_read(&caller, &req.agent, "context.prefetch")?;
                crate::ops::check_ids("ids", &mut req.ids)?;
                let promoted = c.blocking(move |c| c.prefetch(req.agent, &req.ids)).await?;
                Ok(json!({ "promoted": promoted }))
            },
        ),
        Endpoint::serving(
            contexts,
            "context.get",
            ("GET", "/v1/agents/{agent}/context/{id}"),
            "One item with its content and the tier it was served from (an access: it becomes HOT).",
            |c: Contexts, caller, req: ItemReq| async move {
                c.may_read(&caller, &req.agent, "context.get")?;
                c.blocking(move |c| Ok(crate::views::item(&c.get(req.agent, req.id.0)?)))
                    .await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.delete",
            ("DELETE", "/v1/agents/{agent}/context/{id}"),
            "Delete one item of an agent's context, from every tier.",
            |c: Contexts, caller, req: ItemReq| async move {
                c.run_op(&caller, req.agent, "context.delete", json!({ "ids": [req.id.0] }), None)
                    .await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.pin",
            ("POST", "/v1/agents/{agent}/context/{id}/pin"),
            "Pin an item (pinned: false unpins): always in an assembled window, at its head, and kept HOT.",
            |c: Contexts, caller, req: PinReq| async move {
                let args = json!({ "id": req.id.0, "pinned": req.pinned.unwrap_or(true) });
                c.run_op(&caller, req.agent, "context.pin", args, None).await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.demote",
            ("POST", "/v1/agents/{agent}/context/{id}/demote"),
            "Move an item to COOL or COLD now (zstd on disk), as the migrator does on its own.",
            |c: Contexts, caller, req: DemoteReq| async move {
                let args = json!({ "id": req.id.0, "tier": to_args(req.tier) });
                c.run_op(&caller, req.agent, "context.demote", args, None).await
            },
        ),
        Endpoint::serving(
            contexts,
            "context.score",
            ("GET", "/v1/agents/{agent}/context/{id}/score"),
            SCORE,
            |c: Contexts, caller, req: ItemReq| async move {
                c.may_read(&caller, &req.agent, "context.score")?;
                c.blocking(move |c| c.score(req.agent, req.id.0)).await
            },
        ),
        stats("enhanced_context.stats", "/v1/enhanced-context/{agent}/stats"),
        Endpoint::serving(
            contexts,
            "enhanced_context.prefetch",
            ("POST", "/v1/enhanced-context/{agent}/prefetch/{key}"),
            "The report's prefetch hint: bring the item KEY (its id) into HOT now.",
            |c: Contexts, caller, req: KeyReq| async move {
                c.may_read(&caller, &req.agent, "context.prefetch")?;
                let promoted = c.blocking(move |c| c.prefetch(req.agent, &[req.key.0])).await?;
                Ok(json!({ "promoted": promoted }))
            },
        ),
        Endpoint::serving(
            contexts,
            "enhanced_context.score",
            ("GET", "/v1/enhanced-context/{agent}/ml-score/{key}"),
            SCORE,
            |c: Contexts, caller, req: KeyReq| async move {
                c.may_read(&caller, &req.agent, "context.score")?;
                c.blocking(move |c| c.score(req.agent, req.key.0)).await
            },
        ),
    ]
}
