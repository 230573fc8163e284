//! The memory API: an endpoint that changes memory submits its op through the
//! whole pipeline as the caller (auth, quotas, flow checks, journal) and
//! answers with the op's result; one that reads answers from the component's
//! view once the kernel says the caller may read the agent. Served as `memory.*` (HTTP under `/v1/agents/{agent}/memories`, MCP
//! `memory_*`, CLI `bbx memory VERB`) and under the report's names,
//! `semantic_memory.*` (`/v1/semantic-memory/...`, MCP `semantic_memory_*`).

use crate::Memories;
use crate::forget::ForgetArgs;
use crate::record::MemoryId;
use crate::search::SearchArgs;
use crate::write::AddArgs;
use bbx_auth::Caller;
use bbx_component::Endpoint;
use bbx_core::op::SubmitOp;
use bbx_core::{AgentId, Result};
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

/// How long an endpoint waits for its op (an add embeds; a forget may delete
/// many).
const WAIT: Duration = Duration::from_secs(120);

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AddReq {
    agent: AgentId,
    /// Adding again with the same key adds nothing and answers as the first time.
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(flatten)]
    args: AddArgs,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SearchReq {
    agent: AgentId,
    #[serde(flatten)]
    args: SearchArgs,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ForgetReq {
    agent: AgentId,
    #[serde(flatten)]
    args: ForgetArgs,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct MemoryReq {
    agent: AgentId,
    id: MemoryId,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AgentReq {
    agent: AgentId,
}

impl Memories {
    /// Runs one op of `agent` as `caller` and returns its result (or its error).
    async fn run_op(
        &self,
        caller: &Caller,
        agent: AgentId,
        kind: &str,
        args: Value,
        idempotency_key: Option<String>,
    ) -> Result<Value> {
        let submitter = self.context()?.submitter.clone();
        let op = SubmitOp {
            idempotency_key,
            ..SubmitOp::new(agent, kind.to_owned(), args)
        };
        bbx_component::run_op(&*submitter, caller, op, WAIT).await
    }
}

impl Memories {
    fn may_read(&self, caller: &Caller, agent: &AgentId, operation: &str) -> Result<()> {
        self.context()?.submitter.may_read(caller, agent, operation)
    }
}

fn to_args(value: impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

pub(crate) fn endpoints(memories: &Memories) -> Vec<Endpoint> {
    let add = |name, path, description| {
        Endpoint::serving(
            memories,
            name,
            ("POST", path),
            description,
            |m: Memories, caller, req: AddReq| async move {
                let args = to_args(req.args);
                m.run_op(&caller, req.agent, "memory.add", args, req.idempotency_key)
                    .await
            },
        )
    };
    let search = |name, path, description| {
        Endpoint::serving(
            memories,
            name,
            ("POST", path),
            description,
            |m: Memories, caller, req: SearchReq| async move {
                if req.args.owner.is_some() {
                    return Err(bbx_core::Error::invalid_field(
                        "owner",
                        "owner is for an agent's memory.search op (another agent's memory, by grant); search the owner's memory at its own path",
                    ));
                }
                m.may_read(&caller, &req.agent, "memory.search")?;
                m.search(req.agent, req.args.check(m.0.config.max_text_bytes)?, true)
                    .await
            },
        )
    };
    let forget = |name, path, description| {
        Endpoint::serving(
            memories,
            name,
            ("POST", path),
            description,
            |m: Memories, caller, req: ForgetReq| async move {
                m.run_op(&caller, req.agent, "memory.forget", to_args(req.args), None)
                    .await
            },
        )
    };
    let stats = |name, path, description| {
        Endpoint::serving(
            memories,
            name,
            ("GET", path),
            description,
            |m: Memories, caller, req: AgentReq| async move {
                m.may_read(&caller, &req.agent, "memory.stats")?;
                Ok(m.stats(&req.agent))
            },
        )
    };
    const ADD: &str = "Remember a text for an agent: embedded, merged into an exact or near duplicate, superseding the memory that held for its subject; answers with its id once durable. A long text is split into chunks.";
    const SEARCH: &str = "Search an agent's memories: vector, keyword (BM25) or hybrid (default), with metadata filters, a score threshold, MMR diversity, time decay and as_of; each result says why it scored.";
    const FORGET: &str = "Forget an agent's memories by strategy: lru or capacity (keep max), age (older than max_age_secs), decay (weight below min_weight); dry_run says what would go.";
    const STATS: &str =
        "An agent's memory figures: count, valid and superseded memories, text bytes, the model and the index.";
    vec![
        add("memory.add", "/v1/agents/{agent}/memories", ADD),
        search("memory.search", "/v1/agents/{agent}/memories/search", SEARCH),
        forget("memory.forget", "/v1/agents/{agent}/memories/forget", FORGET),
        stats("memory.stats", "/v1/agents/{agent}/memories/stats", STATS),
        Endpoint::serving(
            memories,
            "memory.get",
            ("GET", "/v1/agents/{agent}/memories/{id}"),
            "One memory of an agent by id: its text, model, metadata, subject and validity (valid_from, valid_to, superseded_by).",
            |m: Memories, caller, req: MemoryReq| async move {
                m.may_read(&caller, &req.agent, "memory.get")?;
                crate::record::get(m.store()?, &req.agent, req.id)
            },
        ),
        Endpoint::serving(
            memories,
            "memory.delete",
            ("DELETE", "/v1/agents/{agent}/memories/{id}"),
            "Delete one memory of an agent by id, from the store and the index.",
            |m: Memories, caller, req: MemoryReq| async move {
                m.run_op(&caller, req.agent, "memory.delete", json!({ "ids": [req.id] }), None)
                    .await
            },
        ),
        add("semantic_memory.add", "/v1/semantic-memory/{agent}/add", ADD),
        search("semantic_memory.search", "/v1/semantic-memory/{agent}/search", SEARCH),
        forget("semantic_memory.forget", "/v1/semantic-memory/{agent}/forget", FORGET),
        stats("semantic_memory.stats", "/v1/semantic-memory/{agent}/stats", STATS),
    ]
}
