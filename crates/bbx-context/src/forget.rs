//! Letting go of a deleted agent's context: every record under its prefix,
//! in bounded steps (a step is one write, small enough for one journal
//! record).

use crate::KEYSPACES;
use bbx_core::{AgentId, Result};
use bbx_store::{Applied, GroupTx, Staged, Store, storage_error};
use fjall::Readable;

/// Keys removed per step.
const STEP: usize = 2000;

/// Removes up to [`STEP`] of the agent's records; answers how many.
#[derive(Debug)]
struct ForgetStep(AgentId);

impl Staged for ForgetStep {
    fn stage(&self, tx: &mut GroupTx<'_>) -> Result<Applied> {
        let mut removed = 0usize;
        for keyspace in KEYSPACES.iter().filter(|k| k.id != crate::CONTEXT_MODEL.id) {
            let keys: Vec<Vec<u8>> = tx
                .keyspace(*keyspace)?
                .prefix(self.0.as_bytes())
                .take(STEP - removed)
                .map(|kv| kv.into_inner().map(|(k, _)| k.to_vec()))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| storage_error("list a deleted agent's context", e))?;
            removed += keys.len();
            for key in keys {
                tx.remove(*keyspace, key);
            }
            if removed == STEP {
                break;
            }
        }
        Ok(Applied::output(removed))
    }
}

/// Removes the context of agents that no longer exist: what a crash left
/// behind of a deletion (each agent's context has its id sequence, so one
/// key per agent is read).
pub(crate) async fn forget_orphans(store: &Store) -> Result<()> {
    let agents = store.keyspace(bbx_agents::AGENTS);
    let view = store.view();
    let mut orphans = Vec::new();
    for kv in view.iter(store.keyspace(crate::CONTEXT_AGENTS)) {
        let (key, _) = kv.into_inner().map_err(|e| storage_error("list contexts", e))?;
        let Some(agent) = key
            .get(..16)
            .and_then(|b| <[u8; 16]>::try_from(b).ok())
            .map(AgentId::from_bytes)
        else {
            continue;
        };
        if key[16..] == *crate::contexts::SEQUENCE
            && view
                .get(agents, agent.as_bytes())
                .map_err(|e| storage_error("read an agent", e))?
                .is_none()
        {
            orphans.push(agent);
        }
    }
    for agent in orphans {
        forget_agent(store, agent).await?;
    }
    Ok(())
}

/// Removes all the agent's records, step by step.
pub(crate) async fn forget_agent(store: &Store, agent: AgentId) -> Result<()> {
    loop {
        let removed: usize = store.write(ForgetStep(agent)).await?.into_output()?;
        if removed < STEP {
            return Ok(());
        }
    }
}
