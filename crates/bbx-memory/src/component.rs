//! Memory as a component of the kernel: its keyspaces, its recovery (the
//! catalog and the index from the store), its op kinds and endpoints, and the
//! completions that change what the catalog and index hold.

use crate::record::MemoryId;
use crate::{KEYSPACES, Memories};
use bbx_component::{Component, Context, Endpoint, Exported, ExportedWrite, OpKind, Prepared, StoreWrite};
use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Result};
use bbx_store::KeyspaceDef;
use serde_json::Value;
use std::sync::Arc;

impl Component for Memories {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        &KEYSPACES
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        Memories::start(self, ctx)
    }

    fn endpoints(&self, _ctx: &Context) -> Vec<Endpoint> {
        crate::endpoints::endpoints(self)
    }

    fn kinds(&self) -> &'static [OpKind] {
        crate::ops::KINDS
    }

    fn args_schema(&self, kind: &str) -> Option<Value> {
        crate::ops::args_schema(kind)
    }

    fn prepare(&self, kind: &str, args: &Value) -> Result<Prepared> {
        crate::ops::prepare(self, kind, args)
    }

    fn observes(&self) -> bool {
        true
    }

    /// A committed add, delete or forget changes the catalog and the index
    /// before the op's caller hears of it: a search after the answer sees it.
    fn completed(&self, completion: &Arc<Completion>) {
        if completion.status == CompletionStatus::Ok && completion.kind.starts_with("memory.") {
            self.completed_op(completion);
        }
    }

    fn export(&self, store: &bbx_store::Store, view: &fjall::Snapshot, agent: &AgentId) -> Result<Vec<Exported>> {
        crate::agent_data::EXPORTED.export(store, view, agent)
    }

    fn exported_write(&self, agent: &AgentId, write: StoreWrite<'_>) -> Option<ExportedWrite> {
        crate::agent_data::EXPORTED.exported_write(agent, write)
    }

    fn import(&self, tx: &mut bbx_store::GroupTx<'_>, agent: &AgentId, records: &[Exported]) -> Result<()> {
        Memories::import(self, tx, agent, records)
    }

    fn imported(&self, agent: &AgentId) {
        if let Err(e) = self.relearn(agent) {
            tracing::error!(error = %e, %agent, "imported memories could not be indexed (a restart does)");
        }
    }

    /// Deleted in steps on a task; a crash before the end is finished by the
    /// next start, which deletes the memories of agents that no longer exist.
    fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        let this = self.clone();
        ctx.tasks.spawn(async move {
            if let Err(e) = this.forget_agent(agent).await {
                tracing::warn!(error = %e, %agent, "a deleted agent's memories could not be removed (the next start does)");
            }
        });
    }
}

fn ids(list: &Value) -> Vec<MemoryId> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str()?.parse().ok())
        .collect()
}

impl Memories {
    /// What a committed add, delete or forget changes in the catalog and index.
    pub(crate) fn apply(&self, completion: &Completion) {
        let Some(result) = &completion.result else { return };
        // An add to another agent's memory, by grant, names that agent.
        let agent = result["agent"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or(completion.agent);
        let applied = match completion.kind.as_ref() {
            "memory.add" => self.added(agent, result, completion.completed_at),
            "memory.delete" => self.unlearn(&ids(&result["deleted"])),
            "memory.forget" => self.unlearn(&ids(&result["forgotten"])),
            _ => Ok(()),
        };
        if let Err(e) = applied {
            tracing::error!(error = %e, op = %completion.op_id, "a memory op's changes could not reach the index");
        }
    }

    fn added(&self, agent: AgentId, result: &Value, at: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let mut merged_into = Vec::new();
        for outcome in result["memories"].as_array().into_iter().flatten() {
            let Some(id) = outcome["id"].as_str().and_then(|id| id.parse::<MemoryId>().ok()) else {
                continue;
            };
            if outcome["merged"].is_null() {
                self.learn(agent, id)?;
            } else {
                merged_into.push(id);
            }
        }
        for superseded in ids(&result["superseded"]) {
            self.learn(agent, superseded)?;
        }
        for merged in &merged_into {
            // Its subject or validity may have changed with the merge.
            self.learn(agent, *merged)?;
        }
        self.touch(agent, &merged_into, at);
        Ok(())
    }
}

impl bbx_component::MemorySearch for Memories {
    fn search(
        &self,
        agent: bbx_core::AgentId,
        query: String,
        k: usize,
        filter: serde_json::Map<String, Value>,
    ) -> bbx_component::Pending<'static, Value> {
        let this = self.clone();
        Box::pin(async move {
            let args: crate::search::SearchArgs = bbx_component::parse_args(
                "memory.search",
                &serde_json::json!({ "query": query, "k": k, "filter": filter }),
            )?;
            let search = args.check(this.0.config.max_text_bytes)?;
            this.search(agent, search, true).await
        })
    }
}
