//! Context as a component of the kernel: its keyspaces, its start (the
//! model, the migrator), its op kinds and endpoints, and the completions that
//! change what memory holds.

use crate::contexts::Change;
use crate::{Contexts, KEYSPACES};
use bbx_component::{Component, Context, Endpoint, OpKind, Prepared};
use bbx_core::op::{Completion, CompletionStatus};
use bbx_core::{AgentId, Result};
use bbx_store::KeyspaceDef;
use serde_json::Value;
use std::sync::Arc;

impl Component for Contexts {
    fn name(&self) -> &'static str {
        "context"
    }

    fn keyspaces(&self) -> &'static [KeyspaceDef] {
        &KEYSPACES
    }

    fn start(&self, ctx: &Context) -> Result<()> {
        Contexts::start(self, ctx)
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

    /// A committed put, pin, delete or demote reaches memory before the op's
    /// caller hears of it: a get after the answer sees it.
    fn completed(&self, completion: &Arc<Completion>) {
        if completion.status != CompletionStatus::Ok {
            return;
        }
        let Some(result) = &completion.result else { return };
        let (ids, change) = match completion.kind.as_ref() {
            "context.put" => (result["id"].as_u64().into_iter().collect(), Change::Added),
            "context.pin" => (result["id"].as_u64().into_iter().collect(), Change::Changed),
            "context.demote" => (result["id"].as_u64().into_iter().collect(), Change::Demoted),
            "context.delete" => (
                result["deleted"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .collect::<Vec<_>>(),
                Change::Changed,
            ),
            _ => return,
        };
        // A put into another agent's context, by grant, names that agent.
        let agent = result["agent"]
            .as_str()
            .and_then(|a| a.parse::<AgentId>().ok())
            .unwrap_or(completion.agent);
        self.refresh(&agent, &ids, change);
        // A put, a delete or a demote may have written a chore.
        self.0.chores_written.notify_one();
    }

    fn export(
        &self,
        store: &bbx_store::Store,
        view: &fjall::Snapshot,
        agent: &AgentId,
    ) -> Result<Vec<bbx_component::Exported>> {
        crate::lifecycle::export(store, view, agent, |blocks| self.resolve_all(agent, blocks))
    }

    fn exported_write(
        &self,
        agent: &AgentId,
        write: bbx_component::StoreWrite<'_>,
    ) -> Option<bbx_component::ExportedWrite> {
        crate::lifecycle::exported_write(agent, write)
    }

    fn import(
        &self,
        tx: &mut bbx_store::GroupTx<'_>,
        agent: &AgentId,
        records: &[bbx_component::Exported],
    ) -> Result<()> {
        crate::lifecycle::import(tx, agent, records)
    }

    /// What memory holds of the agent is read again on its next use.
    fn imported(&self, agent: &AgentId) {
        self.0.agents.write().remove(agent);
    }

    /// Memory lets go at once; the store's records go on a task.
    fn agent_deleted(&self, ctx: &Context, agent: AgentId) {
        self.0.agents.write().remove(&agent);
        self.remove_agent_objects(agent);
        let store = ctx.store.clone();
        ctx.tasks.spawn(async move {
            if let Err(e) = crate::lifecycle::forget_agent(&store, agent).await {
                tracing::warn!(error = %e, %agent, "a deleted agent's context could not be removed");
            }
        });
    }
}
